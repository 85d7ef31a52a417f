"""One process of a jax.distributed test job (see test_multihost.py).

argv: PORT NUM_PROCESSES PROCESS_ID SCENARIO OUT_JSON [DEVICES_PER_PROCESS (4)].
Scenarios tp8, tp4pp2, die: build the same tiny HF model in every process, run it and write the
results (logits, greedy and sampled tokens; tp8 also FP8's logits and greedy tokens) to
OUT_JSON. Scenario ckpt: load each checkpoint of
the JSON in $MH_CKPT ({"tp", "pp", "paths": {format: path}, "prompts"}) with from_pretrained and
write each one's greedy tokens. Scenario serve_fault: a serving engine at tp 2 across the
processes whose process 1 alone fails to read one launch; process 0 writes what its requests
ended with and what the same prompts got afterwards, then its planning fails (process 1 must
stop with it)."""

import json
import os
import sys

os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={sys.argv[6] if len(sys.argv) > 6 else 4}"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import faulthandler  # noqa: E402

faulthandler.dump_traceback_later(int(os.environ.get("MH_DUMP", "0")) or 10 ** 6, exit=True)
port, n, pid, scenario, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], \
    sys.argv[5]

from jax_sp.distributed import initialize  # noqa: E402

initialize(f"127.0.0.1:{port}", n, pid)

import jax  # noqa: E402

jax.devices()  # start the backend with 4 devices before conftest's flags are imported

from jax_sp import LLM, ParallelConfig, SamplingParams  # noqa: E402

if scenario == "ckpt":  # no torch here: every format through from_pretrained
    job = json.loads(os.environ["MH_CKPT"])
    parallel = ParallelConfig(tp=job["tp"], pp=job["pp"], sp="on")
    tokens, first = {}, None
    for fmt, path in job["paths"].items():
        llm = LLM.from_pretrained(path, parallel=parallel)
        tokens[fmt] = [c.token_ids for c in llm.generate(job["prompts"],
                                                         SamplingParams(max_new_tokens=5))]
        first = first or llm
    sampling = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=-3)  # SAMPLED
    extra = {"logits": [x.tolist() for x in first.logits(job["prompts"])],
             "sampled": [c.token_ids for c in first.generate(job["prompts"], sampling)]
             } if job["pp"] > 1 else {}  # what crosses processes between stages
    json.dump({"process": jax.process_index(), "devices": len(jax.devices()),
               "local": len(jax.local_devices()), "tokens": tokens, **extra}, open(out, "w"))
    sys.exit(0)

from conftest import SAMPLED, _build, random_prompts  # noqa: E402

if scenario == "serve_fault":  # tp 2 over the two processes, one device each
    from jax_sp.serving import Engine

    model = _build("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"))
    prompts = random_prompts(model.config.vocab_size, (5, 11), seed=7)
    greedy = SamplingParams(max_new_tokens=24, stop_token_ids=())
    alone = [c.token_ids for c in llm.generate(prompts, greedy)]
    engine = Engine(llm, max_batch=2)
    if pid == 1:  # this process alone fails one read of a launch's tokens (a host-side error)
        collect, failed = engine._collect, []

        def failing():
            if any(engine.active) and not failed:
                failed.append(True)
                raise RuntimeError("a read failed on process 1")
            return collect()
        engine._collect = failing
        engine.join()  # follows process 0's plan until it shuts down
        result = {"failed_here": bool(failed)}
    else:
        with engine.hold():  # admitted together: both running when process 1 fails
            first = [engine.submit(p, greedy) for p in prompts]
        errors = []
        for r in first:
            try:
                r.result(timeout=120)
                errors.append(None)
            except RuntimeError as e:
                errors.append(str(e))
        again = [engine.submit(p, greedy).result(timeout=120) for p in prompts]

        def plan():  # then a bug in process 0's planning: process 1 must stop, not wait
            raise RuntimeError("a bug in the plan")
        engine._plan = plan
        try:
            engine.submit(prompts[0], greedy).result(timeout=120)
            fault = None
        except RuntimeError as e:
            fault = str(e)
        engine.join()
        result = {"errors": errors, "again": again, "alone": alone, "fault": fault}
    json.dump({"process": jax.process_index(), **result}, open(out, "w"))
    sys.exit(0)

if scenario == "die" and pid == 1:
    os._exit(3)
model = _build("llama")
prompts = random_prompts(model.config.vocab_size, (5, 11), seed=7)
parallel = {"tp8": ParallelConfig(tp=8, sp="on"),
            "tp4pp2": ParallelConfig(tp=4, pp=2, sp="on"),
            "die": ParallelConfig(tp=8, sp="on")}[scenario]
llm = LLM.from_torch(model, parallel=parallel)
logits = [x.tolist() for x in llm.logits(prompts)]
tokens = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=6))]
sampled = [c.token_ids for c in llm.generate(prompts, SAMPLED)]
fp8 = {}
if scenario == "tp8":  # FP8 weights quantized on each process's own shards, W8A8 prefill and
    # weight-only decode steps
    quantized = LLM.from_torch(model, parallel=parallel, quantization="fp8")
    fp8 = {"fp8_logits": [x.tolist() for x in quantized.logits(prompts)],
           "fp8_tokens": [c.token_ids for c in quantized.generate(
               prompts, SamplingParams(max_new_tokens=6))]}
json.dump({"process": jax.process_index(), "devices": len(jax.devices()),
           "local": len(jax.local_devices()), "logits": logits, "tokens": tokens,
           "sampled": sampled, **fp8},
          open(out, "w"))
