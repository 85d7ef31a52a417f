"""The OpenAI-compatible server (jax_sp/server.py) on loopback, driven by the real `openai`
client: each greedy answer is what `generate` gives the same prompt alone, stop strings cut
where the text would, bad requests get HTTP 400 and the server keeps serving."""

import asyncio
import concurrent.futures
import json
import re
import socket
import threading
import time

import httpx
import pytest

from jax_sp import LLM, SamplingParams

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

MODEL = "smollm2"


@pytest.fixture(scope="module")
def served(smollm2):
    from jax_sp.server import create_app

    cfg, params, tokenizer, _ = smollm2
    llm = LLM(cfg, params, tokenizer=tokenizer, max_seq_len=192)
    app = create_app(llm, model_name=MODEL, max_batch=4)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    yield llm, app.state.server, base, openai.OpenAI(base_url=base + "/v1", api_key="none")
    server.should_exit = True
    thread.join(timeout=60)


def text_alone(llm, prompt, n, chat):
    return llm.generate([prompt], SamplingParams(max_new_tokens=n), chat=chat)[0].text


@pytest.fixture
def submitted(served, monkeypatch):
    """The engine requests the server submits during a test, in order (the engine's own
    submit runs; each request it returns is kept)."""
    engine, requests = served[1].engine, []
    submit = engine.submit

    def keep(*args, **kwargs):
        requests.append(submit(*args, **kwargs))
        return requests[-1]
    monkeypatch.setattr(engine, "submit", keep)
    return requests


def counter(base, name):
    text = httpx.get(base + "/metrics").text
    return int(re.search(rf"^jax_sp_{name}_total (\d+)$", text, re.M).group(1))


def test_concurrent_chat_and_completions_streamed_or_not_match_generate(served):
    llm, _, _, client = served
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "system", "content": "You answer in one word."},
              {"role": "user", "content": "Name a colour."},
              {"role": "assistant", "content": "Blue."},
              {"role": "user", "content": "Another one?"}]]
    texts = ["The three primary colours are", "Once upon a time"]

    def chat(messages, stream):
        kw = dict(model=MODEL, messages=messages, max_tokens=12, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **kw))

    def complete(prompt, stream):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=10, temperature=0)
        if not stream:
            return client.completions.create(**kw).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))

    jobs = [(chat, m, s) for m in chats for s in (False, True)] + [
        (complete, t, s) for t in texts for s in (False, True)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: j[0](j[1], j[2]), jobs))
    want = [text_alone(llm, m, 12, True) for m in chats for _ in (0, 1)] + [
        text_alone(llm, t, 10, False) for t in texts for _ in (0, 1)]
    assert got == want


def test_stop_strings_cut_the_text_where_it_meets_them(served, submitted):
    """The text ends before the stop string, and the engine's request ends "stop" there too
    (the stream's end cancels it again, which leaves the first reason)."""
    llm, _, _, client = served
    prompt = "The three primary colours are"
    full = text_alone(llm, prompt, 24, False)
    word = full.split()[3]
    stop = full[full.index(word):][:3]
    for stream in (False, True):
        kw = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stop=[stop])
        if stream:
            chunks = list(client.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            out = client.completions.create(**kw).choices[0]
            text, reason = out.text, out.finish_reason
        assert (text, reason) == (full[: full.index(stop)], "stop")
        request = submitted[-1]
        request.result(timeout=30)
        assert request.finish_reason == "stop" and len(request.token_ids) < 24


BAD = [
    ("{not json", "not valid JSON"),
    ({"model": "gpt-4", "prompt": "hi"}, "model 'gpt-4' is not served here"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, "'max_tokens' must be an integer"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 500}, "'max_tokens' must be an integer in "
                                                           r"\[1, 192\]"),
    ({"model": MODEL, "prompt": "hi " * 150, "max_tokens": 100}, "exceeds max_seq_len=192"),
    ({"model": MODEL, "prompt": "hi", "temperature": "hot"}, "'temperature' must be a number"),
    ({"model": MODEL, "prompt": 7}, "'prompt' must be a non-empty string"),
    ({"model": MODEL, "prompt": ["hi", 3]}, "'prompt' must be a non-empty string"),
    ({"model": MODEL, "prompt": [[1, 2], []]}, "'prompt' must be a non-empty string"),
    ({"model": MODEL, "prompt": "hi", "n": 5}, r"'n' must be an integer in \[1, 4\]"),
    ({"model": MODEL, "prompt": "hi", "stream_options": {"include_usage": True}},
     "'stream_options' is only allowed with 'stream': true"),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
     "'stream_options' must be an object like"),
    ({"model": MODEL, "prompt": "hi", "stream": True, "stream_options": True},
     "'stream_options' must be an object like"),
    # asked for and not done: refused, not silently ignored
    ({"model": MODEL, "prompt": "hi", "echo": True}, "'echo' is not supported"),
    ({"model": MODEL, "prompt": "hi", "presence_penalty": 0.5},
     "'presence_penalty' is not supported"),
    ({"model": MODEL, "prompt": "hi", "best_of": 3}, "'best_of' is not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
      "tools": [{"type": "function", "function": {"name": "f"}}]}, "'tools' is not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "'messages' must be a non-empty list"),
]


def test_bad_requests_get_400_with_an_openai_error_body_and_serving_goes_on(served):
    llm, _, base, client = served
    errors = counter(base, "request_errors")
    for body, message in BAD:
        data = body if isinstance(body, str) else None
        path = "chat/completions" if isinstance(body, dict) and "messages" in body else (
            "completions")
        r = httpx.post(f"{base}/v1/{path}", content=data, json=None if data else body,
                       timeout=60)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert re.search(message, error["message"]), (message, error)
        assert error["type"] == "invalid_request_error"
    assert counter(base, "request_errors") - errors == len(BAD)
    # neutral values of the fields not acted on are taken as OpenAI's clients send them
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4,
                                    temperature=0, presence_penalty=0, echo=False, best_of=1)
    assert out.choices[0].text == text_alone(llm, "Once upon a time", 4, False)


def test_a_chat_template_that_refuses_the_messages_gets_400(served, monkeypatch):
    """A template's own error (transformers' raise_exception: roles that do not alternate, a
    system turn it does not take) is the request's fault: 400 naming it, counted, and the
    server goes on."""
    llm, _, base, client = served
    errors = counter(base, "request_errors")
    monkeypatch.setattr(llm.tokenizer, "chat_template",
                        "{{ raise_exception('Conversation roles must alternate') }}")
    for max_tokens in (None, 4):  # the room left is counted, or the engine templates it
        r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens})
        assert r.status_code == 400, r.text
        assert re.search(r"do not fit the model's chat template \(TemplateError: "
                         r"Conversation roles must alternate\)", r.json()["error"]["message"])
    assert counter(base, "request_errors") - errors == 2
    monkeypatch.undo()
    out = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4,
                                    temperature=0)
    assert out.choices[0].text == text_alone(llm, "Once upon a time", 4, False)


def test_text_parts_and_null_fields_are_taken_as_openai_takes_them(served):
    """A message's content as a list of text parts (joined by newlines, as vLLM joins them) or
    null (an assistant turn); "stream": null is not streamed; "max_completion_tokens": null
    leaves max_tokens in force."""
    llm, _, base, _ = served
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a colour."},
                                          {"type": "text", "text": "One word."}]},
             {"role": "assistant", "content": None},
             {"role": "user", "content": "Another one?"}]
    plain = [{"role": "user", "content": "Name a colour.\nOne word."},
             {"role": "assistant", "content": ""}, {"role": "user", "content": "Another one?"}]
    r = httpx.post(base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": parts, "max_tokens": 5, "max_completion_tokens": None,
        "temperature": 0, "stream": None})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert answer["choices"][0]["message"]["content"] == text_alone(llm, plain, 5, True)
    assert answer["usage"]["completion_tokens"] <= 5


def test_logprobs_through_the_openai_client(served):
    """Completions' `logprobs` and chat's `logprobs` / `top_logprobs`, streamed or not: one
    entry per completion token, the engine's values, the greedy token the top one; the text
    unchanged. Bad values get 400."""
    llm, server, base, client = served
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0,
                                    logprobs=2)
    c, n = out.choices[0], out.usage.completion_tokens
    assert c.text == text_alone(llm, prompt, 6, False)
    assert len(c.logprobs.tokens) == len(c.logprobs.token_logprobs) == n
    assert len(c.logprobs.top_logprobs) == len(c.logprobs.text_offset) == n
    # each token's text_offset is where its text begins: the tokens' texts laid end to end
    assert "".join(c.logprobs.tokens) == c.text
    assert c.logprobs.text_offset == [len("".join(c.logprobs.tokens[:i])) for i in range(n)]
    direct = server.engine.submit(prompt, SamplingParams(max_new_tokens=6, logprobs=2),
                                  chat=False)
    direct.result(timeout=60)
    assert c.logprobs.token_logprobs == pytest.approx([lp for lp, _ in direct.logprobs])
    for value, top in zip(c.logprobs.token_logprobs, c.logprobs.top_logprobs):
        assert len(top) <= 2 and value == pytest.approx(max(top.values())) and value <= 0

    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
              max_tokens=5, temperature=0, logprobs=True, top_logprobs=1)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for ch in chunks if ch.choices and ch.choices[0].logprobs
                for e in ch.choices[0].logprobs.content]
    content = whole.choices[0].logprobs.content
    assert len(content) == len(streamed) == whole.usage.completion_tokens
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content])
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
        whole.choices[0].message.content)
    for e in content:
        assert len(e.top_logprobs) == 1 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
        assert bytes(e.bytes).decode() == e.token
    plain = client.chat.completions.create(**{**kw, "logprobs": False, "top_logprobs": None})
    assert plain.choices[0].logprobs is None

    # streamed with a stop string, which holds text back: each token's text_offset is still
    # where its text begins in the completion, as in the whole answer
    skw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=1,
               stop=["zzz"])
    offsets = client.completions.create(**skw).choices[0].logprobs.text_offset
    streamed = [o for ch in client.completions.create(stream=True, **skw)
                if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset]
    assert streamed == offsets == c.logprobs.text_offset

    for path, body, message in [
            ("chat/completions", {**kw, "logprobs": False}, "'top_logprobs' needs 'logprobs'"),
            ("chat/completions", {**kw, "logprobs": 1}, "'logprobs' must be true or false"),
            ("completions", {"model": MODEL, "prompt": "hi", "logprobs": 21},
             r"'logprobs' must be an integer in \[0, 20\]")]:
        r = httpx.post(f"{base}/v1/{path}", json=body, timeout=60)
        assert r.status_code == 400 and re.search(message, r.json()["error"]["message"]), r.text

    # each answer's decoded text (its tokens' offsets) ends with its HTTP request
    deadline = time.monotonic() + 10
    while server.texts and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.texts


def test_n_choices_are_each_what_a_request_of_seed_plus_i_gives_streamed_or_not(served,
                                                                                 submitted):
    """n = 3 sampled choices: choice i is `generate`'s text for seed + i alone; streamed, each
    index's pieces join into the same texts, and a usage chunk (stream_options) ends the
    stream with the whole answer's usage: the prompt once, every choice's tokens (the metrics
    count alike). A list of prompts gives each its n choices, sampled with the same seeds;
    chat's n greedy choices are equal; requests without a seed draw one each."""
    llm, _, base, client = served
    prompt, n = "Once upon a time", 3
    kw = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.9, top_p=0.95, seed=11)
    before = {k: counter(base, k) for k in ("prompt_tokens", "generation_tokens")}
    whole = client.completions.create(n=n, **kw)
    assert counter(base, "prompt_tokens") - before["prompt_tokens"] == whole.usage.prompt_tokens
    assert (counter(base, "generation_tokens") - before["generation_tokens"]
            == whole.usage.completion_tokens)
    alone = [llm.generate([prompt], SamplingParams(max_new_tokens=8, temperature=0.9,
                                                   top_p=0.95, seed=11 + i), chat=False)[0]
             for i in range(n)]
    want = [c.text for c in alone]
    assert len(set(want)) > 1  # the seeds really differ
    assert [c.text for c in sorted(whole.choices, key=lambda c: c.index)] == want
    chunks = list(client.completions.create(n=n, stream=True,
                                            stream_options={"include_usage": True}, **kw))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices
                        and c.choices[0].index == i) for i in range(n)]
    assert streamed == want
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len(llm.encode(prompt, chat=False))
    assert whole.usage.completion_tokens == sum(len(c.token_ids) for c in alone)

    # a list of prompts (text, or token ids): prompt j's choice i at index j * n + i, sampled
    # with seed + i as one prompt's are (the same settings: `generate` compiles nothing new)
    texts = ["The three primary colours are", prompt]
    first = [llm.generate([texts[0]], SamplingParams(max_new_tokens=8, temperature=0.9,
                                                     top_p=0.95, seed=11 + i),
                          chat=False)[0].text for i in (0, 1)]
    for prompts in (texts, [llm.encode(t, chat=False) for t in texts]):
        out = client.completions.create(**{**kw, "prompt": prompts, "n": 2})
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == first + want[:2]
        assert out.usage.prompt_tokens == sum(len(llm.encode(t, chat=False)) for t in texts)
    del submitted[:]
    for _ in range(2):
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0.9)
    assert submitted[0].sampling.seed != submitted[1].sampling.seed

    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Name a colour."}],
                max_tokens=4, temperature=0, n=2)
    greedy = text_alone(llm, chat["messages"], 4, True)
    assert [c.message.content for c in client.chat.completions.create(**chat).choices] == [
        greedy, greedy]
    chunks = list(client.chat.completions.create(stream=True, **chat))
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].delta.role) == [0, 1]
    assert ["".join(c.choices[0].delta.content or "" for c in chunks
                    if c.choices[0].index == i) for i in (0, 1)] == [greedy, greedy]


@pytest.mark.parametrize("n", [1, 2])
def test_a_client_that_leaves_mid_stream_frees_its_slot(served, submitted, n):
    """Every choice of a stream the client leaves is cancelled there, short of its
    max_tokens, and its slot freed."""
    _, server, base, client = served
    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 150,
            "temperature": 0, "stream": True, "n": n}
    with httpx.stream("POST", base + "/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # decoding has begun
    assert len(submitted) == n
    for request in submitted:
        request.result(timeout=30)
        assert request.finish_reason == "abort" and len(request.token_ids) < 150
    deadline = time.time() + 30
    while any(server.engine.active) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(server.engine.active)
    assert client.completions.create(model=MODEL, prompt="Hi", max_tokens=2).choices[0].text


def test_a_stream_whose_client_left_before_its_body_began_is_cancelled_and_counted(
        served, submitted):
    """A client gone before its stream's body began: the send of the response's start fails
    (ASGI 2.4: OSError), so Starlette never starts the body. Every choice is still cancelled,
    and the metrics count its prompt. The ASGI app is called directly, on the served engine."""
    from starlette.requests import ClientDisconnect

    from jax_sp.server import create_app

    llm, server, _, _ = served
    app = create_app(llm, server.engine, model_name=MODEL)
    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 150,
            "temperature": 0, "stream": True, "n": 2}
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"},
             "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        raise OSError("the client has gone")

    with server.engine.hold():  # queued until the app has returned
        with pytest.raises(ClientDisconnect):
            asyncio.run(app(scope, receive, send))
    assert len(submitted) == 2
    for request in submitted:
        request.result(timeout=30)
        assert request.finish_reason == "abort" and not request.token_ids
    counters = app.state.server.counters
    assert counters["prompt_tokens"] == len(llm.encode(body["prompt"], chat=False))
    assert counters["generation_tokens"] == 0


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_an_engine_stopped_by_a_fault_answers_errors_and_health_says_so(served, monkeypatch):
    """An engine stopped by a fault (a bug in its loop: here its planning raises) leaves no
    request hanging: a whole answer it held gets HTTP 500 with an OpenAI error body, a stream
    an error event and [DONE]; then /health and every new request answer 503 (a load
    balancer or supervisor takes the server out). The app runs on an engine of its own."""
    from jax_sp.server import create_app
    from jax_sp.serving import Engine

    llm = served[0]
    engine = Engine(llm, max_batch=4)
    app = create_app(llm, engine, model_name=MODEL)
    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 50,
            "temperature": 0}
    fault = RuntimeError("a bug in the plan")

    def plan():
        raise fault

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://jax-sp") as c:
            assert (await c.get("/health")).status_code == 200
            with engine.hold():
                whole = asyncio.create_task(c.post("/v1/completions", json=body))
                streamed = asyncio.create_task(c.post("/v1/completions",
                                                      json={**body, "stream": True}))
                while engine.queued < 2:
                    await asyncio.sleep(0.01)
                monkeypatch.setattr(engine, "_plan", plan)
                answers = await whole, await streamed
            return (*answers, await c.get("/health"),
                    await c.post("/v1/completions", json=body))

    whole, streamed, health, after = asyncio.run(main())
    assert whole.status_code == 500, whole.text
    assert whole.json()["error"]["type"] == "server_error"
    assert "a bug in the plan" in whole.json()["error"]["message"]
    assert streamed.status_code == 200
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    assert "a bug in the plan" in json.loads(events[-2])["error"]["message"]
    assert health.status_code == 503 and "a bug in the plan" in health.json()["error"]
    assert after.status_code == 503, after.text
    assert "the engine stopped on a fault" in after.json()["error"]["message"]
    engine.shutdown()


def test_a_server_bug_while_answering_gets_an_error_body_and_the_server_goes_on(served,
                                                                               monkeypatch):
    """A failure of the server's own code as it builds an answer (here its log-probabilities
    raise) gets what an engine failure gets, counted among the errors: a whole answer HTTP
    500 with an OpenAI error body (not Starlette's plain-text 500), a stream an error event
    and [DONE] (not a stream cut off); the next request is served."""
    llm, server, base, client = served
    body = {"model": MODEL, "prompt": "Count to three:", "max_tokens": 4, "temperature": 0,
            "logprobs": 1}

    def logprobs(*_):
        raise RuntimeError("a bug in the answer")

    errors = counter(base, "request_errors")
    monkeypatch.setattr(server, "logprobs", logprobs)
    whole = httpx.post(base + "/v1/completions", json=body, timeout=60)
    streamed = httpx.post(base + "/v1/completions", json={**body, "stream": True}, timeout=60)
    monkeypatch.undo()
    assert whole.status_code == 500, whole.text
    assert whole.json()["error"]["type"] == "server_error"
    assert "the server failed this request" in whole.json()["error"]["message"]
    assert "a bug in the answer" in whole.json()["error"]["message"]
    assert streamed.status_code == 200
    events = [line[len("data: "):] for line in streamed.text.splitlines() if line]
    assert events[-1] == "[DONE]"
    assert "a bug in the answer" in json.loads(events[-2])["error"]["message"]
    assert counter(base, "request_errors") == errors + 2
    after = client.completions.create(model=MODEL, prompt="Count to three:", max_tokens=4,
                                      temperature=0)
    assert after.choices[0].text == text_alone(llm, "Count to three:", 4, chat=False)


def test_a_client_that_gives_up_on_a_whole_answer_frees_its_slots(served, submitted):
    """A client whose wait for a whole (not streamed) answer times out has every choice
    cancelled short of its max_tokens (the `openai` client retries after a timeout: the
    abandoned requests must not hold slots meanwhile)."""
    _, server, base, _ = served
    body = {"model": MODEL, "prompt": "Count to one hundred:", "max_tokens": 150,
            "temperature": 0, "n": 2}
    with server.engine.hold():  # queued until the client has gone, however fast the device
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(base + "/v1/completions", json=body, timeout=1.0)
        time.sleep(0.5)  # the server notices within 0.2 s
    assert len(submitted) == 2
    for request in submitted:  # ended by the server, not by decoding to the end
        request.result(timeout=30)
        assert request.finish_reason == "abort" and len(request.token_ids) < 150


def test_a_bad_prompt_in_a_list_leaves_nothing_of_its_request_queued(served, submitted):
    _, server, base, _ = served
    r = httpx.post(base + "/v1/completions", timeout=60, json={
        "model": MODEL, "prompt": ["hi", "hi " * 150], "max_tokens": 100, "n": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["message"].startswith("prompt 1: ") and error["param"] == "prompt"
    assert len(submitted) == 2  # prompt 0's two choices, then cancelled
    for request in submitted:
        request.result(timeout=30)
        assert request.finish_reason == "abort"
    deadline = time.time() + 30
    while (server.engine.queued or any(server.engine.active)) and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.queued == 0 and not any(server.engine.active)


def test_health_models_and_metrics(served):
    _, _, base, client = served
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert [m.id for m in client.models.list().data] == [MODEL]
    client.completions.create(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    text = httpx.get(base + "/metrics").text
    for name in ("jax_sp_requests_total", "jax_sp_generation_tokens_total", "jax_sp_queue",
                 "jax_sp_time_to_first_token_seconds_count",
                 "jax_sp_time_per_output_token_seconds_sum"):
        assert name in text
    import re

    for name in ("requests_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count"):
        assert int(re.search(rf"^jax_sp_{name} (\d+)$", text, re.M).group(1)) > 0, name
