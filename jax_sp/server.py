"""An OpenAI-compatible HTTP server over the continuous-batching engine (jax_sp/serving.py), on
Starlette and uvicorn (`pip install -e ".[serve]"`). Routes: `GET /health`, `GET /v1/models`,
`POST /v1/completions`, `POST /v1/chat/completions` (streamed as server-sent events with
`"stream": true`, whole otherwise; `n` choices and a completion's list of prompts, each choice
an engine request of its own, sampled with seed + i; `stream_options.include_usage` ends a
stream with a usage chunk) and `GET /metrics` (Prometheus' text format). Bad requests get HTTP
400 with an OpenAI-style error body (`{"error": {"message", "type", "param", "code"}}`) and
change nothing else. A client that goes away, mid-stream or waiting for a whole answer, has its
requests cancelled and their slots freed. A request the engine fails gets HTTP 500 (a stream: an
error event); an engine stopped on a fault answers 503, /health too. `stop` strings are met on
the decoded text: the text ends before the first one and the request ends there (finish_reason
"stop"). On shutdown (SIGTERM, Ctrl-C) uvicorn stops accepting connections and waits for the
open ones; then the engine drains what is left.

    jax-sp serve --model smollm2 --port 8000
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import time
import uuid
import weakref

from jax_sp.config import MAX_LOGPROBS, SamplingParams
from jax_sp.detok import TextStream
from jax_sp.serving import Engine, EngineStopped

_METRICS = ("requests", "request_errors", "prompt_tokens", "generation_tokens")


class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


def _error(message, param=None, code=None, status=400):
    """OpenAI's error body: a bad request (400) or the server's own failure (5xx)."""
    from starlette.responses import JSONResponse

    return JSONResponse(_error_body(message, param, code, status), status_code=status)


def _error_body(message, param=None, code=None, status=400):
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body, name, default, low, high, integer=False):
    value = body.get(name, default)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise BadRequest(f"'{name}' must be {kind} in [{low}, {high}], got {value!r}", name)
    return value


def _text(content) -> str | None:
    """A message's text: a string, OpenAI's list of text parts (joined by newlines, as vLLM
    joins them) or null (an assistant turn with no text); None when it is none of these."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "\n".join(p["text"] for p in content)
    return None


# fields this server does not act on, with the values that ask for nothing
_NOT_SERVED = {"echo": (None, False), "suffix": (None, ""), "logit_bias": (None, {}),
               "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
               "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"),
               "response_format": (None, {"type": "text"})}


def _unsupported(body: dict):
    """A request that asks for something this server does not do gets a 400 naming it, rather
    than an answer that silently ignores it."""
    for name, neutral in _NOT_SERVED.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v)
                                    for v in neutral):
            raise BadRequest(f"'{name}' is not supported by this server (got "
                             f"{body[name]!r:.80}); leave it out", name)
    best_of = body.get("best_of")
    if best_of is not None and best_of != (body.get("n") or 1):
        raise BadRequest(f"'best_of' is not supported by this server (got {best_of!r}): ask "
                         f"for n choices instead", "best_of")


@dataclasses.dataclass(frozen=True)
class Ask:
    """One parsed request: what `Engine.submit` takes, and how to answer."""

    prompts: list  # each a string or token ids (chat: one, the conversation's ids)
    sampling: SamplingParams  # choice 0's; choice i's seed is seed + i
    stop: list[str]
    stream: bool
    n: int = 1  # choices
    usage_chunk: bool = False  # a stream ends with a chunk holding the usage


class Server:
    """The app's state: the LLM, its engine, the served name, the metrics."""

    def __init__(self, llm, engine: Engine, model_name: str):
        if llm.tokenizer is None:
            raise ValueError("the server needs a model with a tokenizer (text in and out)")
        self.llm, self.engine, self.model_name = llm, engine, model_name
        self.counters = dict.fromkeys(_METRICS, 0)
        # (count, sum of seconds): time to the first token, per output token after the first
        self.ttft, self.tpot = [0, 0.0], [0, 0.0]
        self.created = int(time.time())
        # each request's text as `pieces` decodes it (its tokens' text offsets: `logprobs`)
        self.texts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    # -- parsing -------------------------------------------------------------------------------

    def parse(self, body, chat: bool) -> Ask:
        """The request's Ask, or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model != self.model_name:
            raise BadRequest(f"model {model!r} is not served here; this server serves "
                             f"{self.model_name!r}", "model", "model_not_found")
        _unsupported(body)
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and _text(m.get("content")) is not None for m in messages):
                raise BadRequest("'messages' must be a non-empty list of {\"role\": str, "
                                 "\"content\": str, or a list of {\"type\": \"text\", "
                                 "\"text\": str} parts}", "messages")
            prompts = [[{"role": m["role"], "content": _text(m["content"])} for m in messages]]
        else:
            prompt = body.get("prompt")
            ids = lambda p: isinstance(p, list) and p and all(  # noqa: E731
                isinstance(t, int) and not isinstance(t, bool) for t in p)
            one = lambda p: (isinstance(p, str) and p) or ids(p)  # noqa: E731
            # a string or token ids, or a list of either: one prompt each
            prompts = [prompt] if one(prompt) else prompt
            if not isinstance(prompts, list) or not prompts or not all(map(one, prompts)):
                raise BadRequest("'prompt' must be a non-empty string, a list of token ids, or "
                                 f"a list of those (one prompt each), got {prompt!r:.80}",
                                 "prompt")
        n = _number(body, "n", 1, 1, self.engine.slots, integer=True)  # side by side
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else (stop or [])
        if not isinstance(stop, list) or len(stop) > 4 or not all(
                isinstance(s, str) and s for s in stop):
            raise BadRequest("'stop' must be a string or a list of at most 4 non-empty strings",
                             "stop")
        stream = body.get("stream")
        stream = False if stream is None else stream  # null: not streamed, as OpenAI takes it
        if not isinstance(stream, bool):
            raise BadRequest(f"'stream' must be true or false, got {stream!r}", "stream")
        options = body.get("stream_options")
        if options is not None and not stream:
            raise BadRequest("'stream_options' is only allowed with 'stream': true",
                             "stream_options")
        usage_chunk = options.get("include_usage") if isinstance(options, dict) else None
        if (options is not None and not isinstance(options, dict)) or not isinstance(
                usage_chunk, (bool, type(None))):
            raise BadRequest("'stream_options' must be an object like {\"include_usage\": true}"
                             f", got {options!r}", "stream_options")
        limit = self.llm.max_seq_len
        max_tokens = _number(body, "max_completion_tokens" if chat and body.get(
                             "max_completion_tokens") is not None else "max_tokens",
                             None, 1, limit, integer=True)
        sampling = SamplingParams(
            max_new_tokens=max_tokens or (16 if not chat else 1),
            temperature=float(_number(body, "temperature", 1.0, 0, 2)),
            top_p=float(_number(body, "top_p", 1.0, 1e-6, 1)),
            top_k=_number(body, "top_k", 0, 0, self.llm.cfg.vocab_size, integer=True),
            # no seed: one of its own (OpenAI's); a seed makes a choice reproducible
            seed=_number(body, "seed", None, -2 ** 63, 2 ** 64 - 1, integer=True)
            if body.get("seed") is not None else secrets.randbits(63),
            logprobs=self._logprobs(body, chat))
        if chat:  # through the chat template once, here: the engine takes the token ids
            try:
                prompts = [self.llm.encode(prompts[0])]
            except Exception as e:  # noqa: BLE001 - jinja2's TemplateError, no template, ...
                raise BadRequest(f"the messages do not fit the model's chat template "
                                 f"({type(e).__name__}: {e})", "messages") from None
        if chat and max_tokens is None:  # as much as the context leaves
            room = limit - len(prompts[0])
            if room < 1:
                raise BadRequest(f"the messages take {limit - room} tokens, the whole context "
                                 f"of {limit}", "messages", "context_length_exceeded")
            sampling = dataclasses.replace(sampling, max_new_tokens=room)
        return Ask(prompts, sampling, stop, stream, n, bool(usage_chunk))

    @staticmethod
    def _logprobs(body, chat: bool) -> int | None:
        """How many top log-probabilities a request asks for with each token (None: none).
        Completions: `logprobs` (an integer); chat: `logprobs` (true / false) and
        `top_logprobs` (an integer, with logprobs true)."""
        if not chat:
            return _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
        wanted = body.get("logprobs", False)
        if wanted is None:
            wanted = False
        if not isinstance(wanted, bool):
            raise BadRequest(f"'logprobs' must be true or false, got {wanted!r}", "logprobs")
        top = _number(body, "top_logprobs", None, 0, MAX_LOGPROBS, integer=True)
        if top is not None and not wanted:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return (top or 0) if wanted else None

    def logprobs(self, request, start: int, end: int, chat: bool):
        """The OpenAI `logprobs` object of the request's tokens [start, end) (None when the
        request asked for none): chat's {"content": [...]} or completions' token lists, each
        token's text_offset where its text begins in the completion's text."""
        if request.sampling.logprobs is None:
            return None
        text = lambda i: self.llm.tokenizer.decode([i])  # noqa: E731
        ids, entries = request.token_ids[start:end], request.logprobs[start:end]
        if chat:
            def one(i, lp):
                t = text(i)
                return {"token": t, "logprob": lp, "bytes": list(t.encode())}
            return {"content": [{**one(i, lp), "top_logprobs": [one(j, v) for j, v in top]}
                                for i, (lp, top) in zip(ids, entries)]}
        tokens = [text(i) for i in ids]
        offsets = self.texts[request].offsets[start:end]  # decoded by `pieces`, before this
        return {"tokens": tokens, "token_logprobs": [lp for lp, _ in entries],
                "top_logprobs": [{text(j): v for j, v in top} for _, top in entries],
                "text_offset": offsets}

    # -- one request ---------------------------------------------------------------------------

    def submit(self, ask: Ask, chat: bool) -> list:
        """One engine request per choice, prompt by prompt (choice j * n + i: prompt j with
        seed + i, so that each is what a request of that seed alone gives); a completion's text
        goes in as it is, a chat's as the ids `parse` made through the chat template. Bad
        input: BadRequest, and nothing stays queued."""
        requests = []
        for j, prompt in enumerate(ask.prompts):
            try:
                for i in range(ask.n):
                    sampling = dataclasses.replace(ask.sampling, seed=(ask.sampling.seed + i)
                                                   % 2**64) if i else ask.sampling
                    requests.append(self.engine.submit(prompt, sampling, chat=chat))
            except Exception as e:
                for request in requests:  # nothing of this HTTP request stays queued
                    self.engine.cancel(request)
                if not isinstance(e, (ValueError, TypeError)):  # EngineStopped, or a bug
                    raise
                code = "context_length_exceeded" if "max_seq_len" in str(e) else None
                # past the first, only a prompt of its own can fail (they share the settings)
                which, param = (f"prompt {j}: ", "prompt") if j else ("", None)
                raise BadRequest(which + str(e), param, code) from None
        return requests

    async def choices(self, requests: list, stop: list[str]):
        """(choice index, text piece, finish_reason or None, its tokens so far) from every
        choice as its tokens come (`pieces`); leaving early stops reading them (`settle`
        cancels the unfinished ones)."""
        out: asyncio.Queue = asyncio.Queue()

        async def pump(i, request):
            try:
                async for item in self.pieces(request, stop):
                    out.put_nowait((i, *item))
                out.put_nowait((i, None, None, None))
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - raised below, in the caller's task
                out.put_nowait((i, e, None, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            left = len(tasks)
            while left:
                i, piece, end, count = await out.get()
                if isinstance(piece, BaseException):
                    raise piece
                if piece is None:
                    left -= 1
                else:
                    yield i, piece, end, count
        finally:
            for task in tasks:
                task.cancel()

    async def watch(self, http, requests: list, every: float = 0.2):
        """Cancel the requests of a whole (not streamed) answer whose client has gone away
        (a timed-out client, which the `openai` client then retries): their slots free at once
        instead of decoding for no one. Ends when they are done."""
        while not all(r.done for r in requests):
            if await http.is_disconnected():
                for request in requests:
                    if not request.done:
                        self.engine.cancel(request)
                return
            await asyncio.sleep(every)

    async def pieces(self, request, stop: list[str]):
        """(text piece, finish_reason or None, tokens consumed so far) as the request's tokens
        come; the text ends before the first stop string, which ends the request. One left
        early leaves its request running: `settle` cancels it as the HTTP request ends."""
        stop_ids = request.stop_ids  # (the stream's decode must not hold the request: `texts`)
        decoded = self.texts[request] = TextStream(lambda ids: self.llm._detok(ids, stop_ids))
        ids, shown = decoded.ids, 0  # the characters sent
        longest = max((len(s) for s in stop), default=1)

        def stop_at(before: int) -> int:
            """Where the first stop string begins, -1 if none: one not in the text before
            ends in the new text, so begins late enough."""
            since = max(0, before - longest + 1)
            return min((i for i in (decoded.text.find(s, since) for s in stop) if i >= 0),
                       default=-1)

        async for token in request.stream():
            before = len(decoded.text)
            if not decoded.add(token):
                continue  # no new text (half a character)
            text = decoded.text
            if (cut := stop_at(before)) >= 0:
                self.engine.cancel(request, "stop")
                if cut > shown:
                    yield text[shown:cut], None, len(ids)
                yield "", "stop", len(ids)
                return
            ready = len(text) - (longest - 1) if stop else len(text)
            if ready > shown:  # (the stream holds back a character split over tokens)
                yield text[shown:ready], None, len(ids)
                shown = ready
        before = len(decoded.text)
        decoded.finish()  # a character the last token left incomplete
        text, cut = decoded.text, stop_at(before)
        end = cut if cut >= 0 else len(text)
        if end > shown:
            yield text[shown:end], None, len(ids)
        yield "", "stop" if cut >= 0 else request.finish_reason, len(ids)

    def failure(self, requests: list, error: BaseException) -> str | None:
        """The error message of an answer cut short by `error`, counted among the request
        errors: what the engine ended one of these requests with (a program failed, or the
        engine stopped on a fault), or the server's own failure (a bug) while answering. None
        for the end of a client's wait (a cancellation, a closed stream), which is re-raised."""
        if any(r.finish_reason is error for r in requests):
            why = f"the engine failed this request: {error!r}"
        elif isinstance(error, Exception):
            why = f"the server failed this request: {error!r}"
        else:  # asyncio.CancelledError, GeneratorExit
            return None
        self.counters["request_errors"] += 1
        return why

    def settle(self, requests: list, n: int, counts: list[int]):
        """One HTTP request's end, however it came (answered, the client gone, a stream cut
        off before its first piece): what is still running is cancelled, and the metrics count
        what `usage` counts (each prompt once, each choice's consumed tokens), with the time to
        the first token and per output token of every choice that began."""
        for request in requests:
            if not request.done:
                self.engine.cancel(request)
            self.texts.pop(request, None)
        usage = self.usage(requests, n, counts)
        self.counters["prompt_tokens"] += usage["prompt_tokens"]
        self.counters["generation_tokens"] += usage["completion_tokens"]
        now = time.perf_counter()
        for request in requests:
            if request.first_token_s is None:
                continue
            self.ttft[0] += 1
            self.ttft[1] += request.first_token_s
            made = len(request.token_ids)
            if made > 1:
                total = (request.finished or now) - request.submitted
                self.tpot[0] += 1
                self.tpot[1] += (total - request.first_token_s) / (made - 1)

    @staticmethod
    def usage(requests: list, n: int, counts: list[int]):
        """OpenAI's usage of one HTTP request: each prompt once (its n choices share it), every
        choice's tokens as its answer consumed them (counts: a stop string's cut leaves tokens
        the engine had already made uncounted)."""
        p = sum(len(r.prompt) for r in requests[::n])
        c = sum(counts)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def metrics(self) -> str:
        lines = []
        for name, value in self.counters.items():
            lines += [f"# TYPE jax_sp_{name}_total counter", f"jax_sp_{name}_total {value}"]
        gauges = {"queue": self.engine.queued, "running": self.engine.running,
                  "slots": self.engine.slots}
        for name, value in gauges.items():
            lines += [f"# TYPE jax_sp_{name} gauge", f"jax_sp_{name} {value}"]
        for name, (count, total) in (("time_to_first_token_seconds", self.ttft),
                                     ("time_per_output_token_seconds", self.tpot)):
            lines += [f"# TYPE jax_sp_{name} summary", f"jax_sp_{name}_count {count}",
                      f"jax_sp_{name}_sum {total}"]
        return "\n".join(lines) + "\n"


def create_app(llm, engine: Engine | None = None, model_name: str = "jax-sp",
               max_batch: int = 8, steps_per_launch: int = 4, max_prefill_tokens: int = 2048,
               prefill_chunk: int | None = 2048):
    """The Starlette app serving `llm` (an engine of max_batch slots, steps_per_launch decode
    steps a launch, admissions prefilled together up to max_prefill_tokens and prompts longer
    than prefill_chunk in chunks, unless one is given)."""
    from starlette.applications import Starlette
    from starlette.requests import Request as HttpRequest
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.routing import Route

    server = Server(llm, engine or Engine(llm, max_batch=max_batch,
                                          steps_per_launch=steps_per_launch,
                                          max_prefill_tokens=max_prefill_tokens,
                                          prefill_chunk=prefill_chunk), model_name)

    class Stream(StreamingResponse):
        """A streamed answer that calls `settle` once it has ended, however it ended: done,
        the client gone, or cut off before its body began."""

        def __init__(self, body, settle, **kwargs):
            super().__init__(body, **kwargs)
            self.settle = settle

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                self.settle()

    async def health(_):
        if server.engine.fault is not None:  # the engine has stopped: restart the server
            return JSONResponse({"status": "error", "error": repr(server.engine.fault)},
                                status_code=503)
        return JSONResponse({"status": "ok"})

    async def models(_):
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": server.created,
             "owned_by": "jax-sp", "max_model_len": llm.max_seq_len}]})

    async def metrics(_):
        return PlainTextResponse(server.metrics(), media_type="text/plain; version=0.0.4")

    def handler(chat: bool):
        kind = "chat.completion" if chat else "text_completion"

        async def handle(http: HttpRequest):
            server.counters["requests"] += 1
            try:
                try:
                    body = json.loads(await http.body())
                except ValueError as e:
                    raise BadRequest(f"the request body is not valid JSON ({e})") from None
                ask = server.parse(body, chat)
                requests = server.submit(ask, chat)
            except BadRequest as e:
                server.counters["request_errors"] += 1
                return _error(str(e), e.param, e.code)
            except EngineStopped as e:  # shut down, or stopped on a fault
                server.counters["request_errors"] += 1
                return _error(str(e), status=503)
            except Exception as e:  # noqa: BLE001 - the server's own failure: an error body
                server.counters["request_errors"] += 1
                return _error(f"the server failed this request: {e!r}", status=500)
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            head = {"id": rid, "created": int(time.time()), "model": model_name}

            def choice(i, text, reason, delta, logprobs=None):
                if not chat:
                    return {"index": i, "text": text, "logprobs": logprobs,
                            "finish_reason": reason}
                key = "delta" if delta else "message"
                return {"index": i, key: ({"content": text} if delta else
                                          {"role": "assistant", "content": text}),
                        "logprobs": logprobs, "finish_reason": reason}

            k = len(requests)  # prompts x n
            if not ask.stream:
                texts, reasons, counts = [""] * k, [None] * k, [0] * k
                watch = asyncio.create_task(server.watch(http, requests))
                try:
                    async with contextlib.aclosing(server.choices(requests, ask.stop)) as got:
                        async for i, piece, end, count in got:
                            texts[i], reasons[i] = texts[i] + piece, end or reasons[i]
                            counts[i] = count
                    return JSONResponse({**head, "object": kind, "choices": [
                        choice(i, texts[i], reasons[i], False,
                               server.logprobs(r, 0, counts[i], chat))
                        for i, r in enumerate(requests)],
                        "usage": server.usage(requests, ask.n, counts)})
                except BaseException as e:
                    why = server.failure(requests, e)
                    if why is None:
                        raise  # cancelled: the client has gone
                    return _error(why, status=500)
                finally:
                    watch.cancel()
                    server.settle(requests, ask.n, counts)

            sent = [0] * k  # each choice's tokens sent

            async def events():
                obj = kind + ".chunk" if chat else kind
                # with include_usage every chunk carries "usage", null but in the last (OpenAI's)
                extra = {"usage": None} if ask.usage_chunk else {}

                def event(choices, **more):
                    chunk = {**head, "object": obj, "choices": choices, **extra, **more}
                    return f"data: {json.dumps(chunk)}\n\n"
                merged = server.choices(requests, ask.stop)
                try:
                    for i in range(ask.n if chat else 0):
                        yield event([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    try:
                        async for i, piece, end, count in merged:
                            if piece or end:
                                logprobs = server.logprobs(requests[i], sent[i], count, chat)
                                sent[i] = count
                                yield event([choice(i, piece, end, True, logprobs)])
                        if ask.usage_chunk:
                            yield event([], usage=server.usage(requests, ask.n, sent))
                    except BaseException as e:
                        why = server.failure(requests, e)
                        if why is None:
                            raise  # the client has gone, or the stream is closed
                        # the status has gone out: an error event, as OpenAI and vLLM send
                        body = _error_body(why, status=500)
                        yield f"data: {json.dumps(body)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                    yield "data: [DONE]\n\n"
                finally:  # the client left (or the stream ended): its pumps stop
                    await merged.aclose()

            return Stream(events(), lambda: server.settle(requests, ask.n, sent),
                           media_type="text/event-stream")

        return handle

    @contextlib.asynccontextmanager
    async def lifespan(_):
        yield
        server.engine.shutdown(drain=True)  # after uvicorn has closed every connection

    app = Starlette(routes=[
        Route("/health", health), Route("/v1/models", models), Route("/metrics", metrics),
        Route("/v1/completions", handler(False), methods=["POST"]),
        Route("/v1/chat/completions", handler(True), methods=["POST"])],
        lifespan=lifespan)
    app.state.server = server
    return app


def serve(llm, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 8,
          model_name: str = "jax-sp", steps_per_launch: int = 4,
          max_prefill_tokens: int = 2048, warm: bool = False,
          prefill_chunk: int | None = 2048):
    """Serve until SIGTERM / Ctrl-C (in-flight requests drain first), then return: uvicorn
    re-raises the signal after its graceful shutdown, which would end the process before a
    multi-process job's other processes are let go (jax.distributed's shutdown at exit)."""
    import signal

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            signals = (signal.SIGINT, signal.SIGTERM)
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    engine = Engine(llm, max_batch=max_batch, steps_per_launch=steps_per_launch,
                    max_prefill_tokens=max_prefill_tokens, prefill_chunk=prefill_chunk)
    if warm:  # before the port opens
        engine.warm()
    app = create_app(llm, engine, model_name=model_name)
    Server(uvicorn.Config(app, host=host, port=port, log_level="info")).run()
