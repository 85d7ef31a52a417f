"""The server under load, across processes and at shutdown: 200 mixed requests at concurrency
32 all complete, once each, and a second round of them does not grow the process's memory; two
processes serve what one generates; SIGTERM lets a request in flight finish first."""

import concurrent.futures
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
import torch
import transformers

from jax_sp import LLM

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

WORDS = "the a sea colour prime number capital France write explain haiku twelve".split()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_folder(smollm2, tmp_path_factory):
    """A 2-layer random Llama with SmolLM2's tokenizer, as an HF folder."""
    tokenizer = smollm2[2]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=True)).eval()
    folder = tmp_path_factory.mktemp("tiny-served")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_200_mixed_requests_at_concurrency_32_complete_once_each(tiny_folder):
    from jax_sp.server import create_app

    llm = LLM.from_pretrained(tiny_folder, max_seq_len=128, progress=False)
    app = create_app(llm, model_name="tiny", max_batch=8)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                           max_retries=0, timeout=120)
    rng = random.Random(0)
    jobs = [(" ".join(rng.choices(WORDS, k=rng.randint(1, 40))), rng.randint(1, 12),
             i % 2 == 0, i % 3 == 0) for i in range(200)]

    def one(job):
        prompt, n, stream, chat = job
        kw = dict(model="tiny", max_tokens=n, temperature=0)  # sampling: test_serving.py
        if chat:
            kw["messages"] = [{"role": "user", "content": prompt}]
            create = client.chat.completions.create
        else:
            kw["prompt"] = prompt
            create = client.completions.create
        if stream:
            chunks = list(create(stream=True, **kw))
            return chunks[0].id, chunks[-1].choices[0].finish_reason
        out = create(**kw)
        assert 1 <= out.usage.completion_tokens <= n
        return out.id, out.choices[0].finish_reason

    sizes = []
    for _ in range(2):
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            done = list(pool.map(one, jobs))
        assert len(done) == 200 and len({rid for rid, _ in done}) == 200
        assert {reason for _, reason in done} <= {"length", "stop"}
        engine = app.state.server.engine
        assert not any(engine.active) and engine.waiting.empty() and not engine._cancelled
        sizes.append(rss_mb())
    # the first round compiles and warms caches; the second must not grow the process
    assert sizes[1] - sizes[0] < 32, sizes
    served = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    assert "jax_sp_requests_total 400" in served
    server.should_exit = True
    thread.join(timeout=60)


@pytest.mark.slow
def test_two_processes_serve_what_one_process_generates_and_drain_on_sigterm(tiny_folder):
    """tp=2 over two jax.distributed processes of one CPU device each: process 0 serves, process
    1 follows its schedule (the plan broadcast every round; a long prompt prefilled in chunks
    of 16 on both). SIGTERM to process 0 while a request streams: the stream ends with its last
    token, then both processes stop."""
    coordinator, port = free_port(), free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jax_sp.cli", "serve", "--model", tiny_folder, "--tp", "2",
         "--port", str(port), "--max-batch", "2", "--max-seq-len", "128", "--prefill-chunk", "16",
         "--served-model-name", "tiny", "--coordinator", f"127.0.0.1:{coordinator}",
         "--num-processes", "2", "--process-id", str(i), "--warm"], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = {}
    readers = [threading.Thread(target=lambda i=i, p=p: logs.__setitem__(i, p.stdout.read()),
                                daemon=True) for i, p in enumerate(procs)]
    for t in readers:
        t.start()
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while time.time() < deadline and all(p.poll() is None for p in procs):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        prompts = ["the sea", "a prime number twelve", "write",
                   "a long prompt that comes in chunks: " + "the sea and the sky " * 8]

        def ask(prompt):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
            return httpx.post(base + "/v1/completions", json=body, timeout=120).json()

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            got = [r["choices"][0]["text"] for r in pool.map(ask, prompts)]
        body = {"model": "tiny", "prompt": "the sea", "max_tokens": 40, "temperature": 0,
                "stream": True}
        lines = []
        with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line and not lines:
                    procs[0].send_signal(signal.SIGTERM)  # with the request decoding
                if line:
                    lines.append(line)
        codes = [p.wait(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for t in readers:
            t.join(timeout=10)
    assert codes == [0, 0], logs  # both let go through jax.distributed's shutdown
    assert "2 processes" in logs[0] and "Waiting for connections to close" in logs[0], logs
    assert lines[-1] == "data: [DONE]" and '"finish_reason": ' in lines[-2]
    assert '"finish_reason": null' not in lines[-2]
    llm = LLM.from_pretrained(tiny_folder, max_seq_len=128, progress=False)
    from jax_sp import SamplingParams

    assert got == [llm.generate([p], SamplingParams(max_new_tokens=8), chat=False)[0].text
                   for p in prompts]
