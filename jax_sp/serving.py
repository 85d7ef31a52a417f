"""Continuous batching: requests join and leave a running decode batch.

`Engine(llm, max_batch=N)` keeps N decode slots and one KV cache for them ([L, N, S, K, H],
S = the LLM's max_seq_len rounded up to 16) and schedules the programs of jax_sp/slots.py
on them. A background thread loops:

1. admit: the waiting requests, while slots are free, are prefilled and written into the free
   slots. One stage: the round's admissions, sorted by length, are prefilled together in
   groups of at most `max_prefill_tokens` padded tokens (a power-of-two batch times the
   bucket of its longest prompt; a longer prompt alone), one program per group that runs the
   forward (SP by `sp` as `generate` decides for that many tokens), samples each first token
   with its request's own settings and key, and writes the rows into their slots of the cache
   in place. One process, one stage: the first tokens and keys stay on the device and are
   written into the next launch's inputs there (`join_first`), read once that launch is issued,
   so an admission never waits for the device. A prompt longer than a chunk (the largest
   power of two within `prefill_chunk`; one stage) is prefilled in chunks, one a round into
   its held slot (`extend_fn` after the first), while the other slots decode; its last chunk
   seats it as an admission (one such prompt at a time: the next waits without a slot). A
   pipeline prefills each request on its own through every stage (the runner's prefill) and
   writes each stage's row into the slot;
2. step: one decode step of every slot (one compiled program per stage for the N slots, the
   carry handed from stage to stage as `generate` hands it; free slots compute on whatever
   their rows hold and are ignored), each row sampled with its own temperature, top-k, top-p,
   seed and step (`jax_sp.sampling.sample_rows`; the launch samples when some running
   request does, else a program of its own takes the argmax; no program has data-dependent
   control flow, which on GPU would make each launch wait for the device). A launch runs
   `steps_per_launch` steps (default 4) in one program, each step's tokens feeding the next,
   so the host's work per launch is shared by that many steps (vLLM's multi-step scheduling);
   a request that ends inside a launch has its later tokens dropped, and a new one joins at
   the next launch. The
   slots' tokens, positions and step numbers stay on the device from launch to launch (put
   again from the host after a round that admitted, ended or cancelled a request), and each
   launch is issued before the previous
   one's tokens are read, so the host's work runs while the device computes (one process, one
   stage; pipelines and multi-process jobs read each launch before issuing the next);
3. each request that reached a stop id or its max_new_tokens ends and frees its slot at once
   (its slot still computes the launch already issued, up to steps_per_launch steps; those
   tokens are dropped).

A request's row draws with the key `generate` gives row 0 of a batch with its seed, at the same
step numbers, so a request decodes the tokens `generate` gives its prompt alone, whatever else
shares the batch (tests/test_serving.py). `submit` checks a request at the API's edge (the same
checks as `generate`) and raises there; nothing a request does stops the loop.

Multi-process (jax.distributed): every round, process 0 makes the plan (cancellations,
admissions with each request's prompt and settings, stop) and broadcasts it; every process
applies it and runs the same programs, so the others follow process 0's schedule and only
process 0 takes requests. Stop strings are met on the decoded text by the HTTP server
(jax_sp/server.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import queue
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax_sp.config import SamplingParams
from jax_sp.generate import Static
from jax_sp.runner import MIN_BUCKET, bucket, pow2_at_least
from jax_sp.runtime import round_up, to_host
from jax_sp.slots import (admit_fn, chunk_size, extend_fn, insert_row, join_first,
                          prefill_groups, slots_step_fn)
from models.cache import KVCache
from models.decode_attention import BLOCK_S

_DONE = object()


def slot_count(llm, max_batch: int) -> int:
    """The decode slots of an engine of `max_batch`: a power of two, padded as Runner.batch
    pads a batch (and so is each admission group, one stage)."""
    return round_up(pow2_at_least(max_batch), llm.runner.row_unit)


def _temperature(sampling: SamplingParams) -> float:
    """A row's temperature as the sampling programs take it: 0 greedy, else kept off 0 as
    `generate` keeps it (`SamplingParams.scalars`; 1e-38 would overflow the logits)."""
    return float(sampling.scalars()[0]) if sampling.temperature > 0 else 0.0


class EngineStopped(RuntimeError):
    """`Engine.submit` after the engine has shut down or stopped on a fault."""


@dataclasses.dataclass(eq=False)
class Request:
    """One request in the engine: iterate it for its new token ids as they come (blocks), or
    `result()` for all of them."""

    id: int
    prompt: list[int]
    sampling: SamplingParams
    stop_ids: tuple[int, ...]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    # with sampling.logprobs: per new token (its log-probability, [(id, log-probability)] of
    # the sampling.logprobs most likely)
    logprobs: list[tuple[float, list[tuple[int, float]]]] = dataclasses.field(
        default_factory=list)
    finish_reason: str | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_s: float | None = None  # time to the first token
    finished: float | None = None  # time.perf_counter() when it ended
    _out: queue.Queue = dataclasses.field(default_factory=queue.Queue, repr=False)
    _done: threading.Event = dataclasses.field(default_factory=threading.Event, repr=False)
    _lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)
    _async: tuple | None = dataclasses.field(default=None, repr=False)  # (loop, asyncio.Queue)

    def __iter__(self):
        while True:
            item = self._out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def stream(self):
        """The new token ids as they come, for asyncio code: the engine's thread hands each
        one to this event loop (no thread per wait). Iterate it or `stream` it, not both."""
        import asyncio

        feed: asyncio.Queue = asyncio.Queue()
        with self._lock:  # what came before this call, then everything after it
            while not self._out.empty():
                feed.put_nowait(self._out.get_nowait())
            self._async = (asyncio.get_running_loop(), feed)
        while True:
            item = await feed.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def _put(self, item):
        with self._lock:
            if self._async is None:
                self._out.put(item)
            else:
                loop, feed = self._async
                try:
                    loop.call_soon_threadsafe(feed.put_nowait, item)
                except RuntimeError:  # its event loop has closed: no one reads it any more
                    pass

    def result(self, timeout: float | None = None) -> list[int]:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished after {timeout} s")
        if isinstance(self.finish_reason, BaseException):
            raise self.finish_reason
        return list(self.token_ids)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def _emit(self, token: int, logprobs=None):
        """A new token; logprobs: (its log-probability, the top log-probabilities [K], their
        ids [K]) as the program gives them, K >= sampling.logprobs."""
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - self.submitted
        if self.sampling.logprobs is not None and logprobs is not None:
            chosen, top, ids = logprobs
            n = self.sampling.logprobs
            self.logprobs.append((float(chosen), [(int(i), float(v))
                                                  for i, v in zip(ids[:n], top[:n])]))
        self.token_ids.append(token)
        self._put(token)

    def _finish(self, reason):
        with self._lock:  # once: a fault's sweep and a submit racing it may both end it
            if self._done.is_set():
                return
            self.finish_reason, self.finished = reason, time.perf_counter()
            self._done.set()
        self._put(reason if isinstance(reason, BaseException) else _DONE)


@dataclasses.dataclass
class _Chunked:
    """A request whose prompt is prefilled in chunks into its reserved slot."""

    request: Request
    slot: int
    done: int = 0  # prompt tokens prefilled so far


class Engine:
    """Continuous batching over an LLM's compiled programs (see the module docstring)."""

    def __init__(self, llm, max_batch: int = 8, steps_per_launch: int = 4,
                 max_prefill_tokens: int = 2048, prefill_chunk: int | None = 2048):
        runner = llm.runner
        for name, value in (("max_batch", max_batch), ("steps_per_launch", steps_per_launch),
                            ("max_prefill_tokens", max_prefill_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if prefill_chunk is not None and (isinstance(prefill_chunk, bool) or not isinstance(
                prefill_chunk, int) or prefill_chunk < MIN_BUCKET):
            raise ValueError(f"prefill_chunk must be an integer of at least {MIN_BUCKET} tokens "
                             f"(or None: every prompt prefilled whole), got {prefill_chunk!r}")
        if llm.parallel.cfg > 1:
            raise ValueError("the serving engine runs without classifier-free guidance: build "
                             "the LLM with ParallelConfig(cfg=1) to serve it")
        self.llm, self.runner = llm, runner
        tp, stages = llm.parallel.tp, runner.stages
        self.decode_sp = llm.parallel.sp == "on" and tp > 1
        self.slots = slot_count(llm, max_batch)
        # with the Pallas decode kernel, whole blocks of its keys: a length that is only a
        # multiple of 16 (784 = 16 x 49) made it walk every row 16 keys a block
        # (models/decode_attention.py); the other backends take any multiple of 16
        pallas = any(st.runtime.decode_attention.name == "pallas" for st in stages)
        self.cache_len = round_up(llm.max_seq_len, BLOCK_S if pallas else 16)
        # one cache per stage, its layers' rows of every slot
        self._empty = [jax.jit(lambda rt=st.runtime: rt.empty_cache(self.slots, self.cache_len),
                               out_shardings=KVCache(st.runtime.cache_sharding(),
                                                     st.runtime.cache_sharding()))
                       for st in stages]
        self.caches = [empty() for empty in self._empty]
        self._insert = jax.jit(insert_row, donate_argnums=0)
        # the launch's settings when some running request samples (True) or none does: the
        # greedy form has no sampling work, and neither form data-dependent control flow
        # (jax_sp.sampling.sample_rows), so a launch returns before the device has run it
        self.statics = {sampled: dataclasses.replace(
            Static.of(stages[0].runtime, "decode", self.decode_sp), greedy=not sampled, top_k=0)
            for sampled in (False, True)}
        b = self.slots
        self._clear_rows()
        self.active: list[Request | None] = [None] * b
        # the slots' rows on each stage's devices, advanced there by every step; put again from
        # the host arrays above when a round changed them (an admission, a slot freed)
        self._rows: list[tuple | None] = [None] * len(stages)
        self._tokens = None  # the last launched step's tokens, on the device
        self._inflight = None  # (tokens, the slots' requests) of a step launched, not yet read
        self._join = jax.jit(join_first)
        # admission groups whose first tokens stay on the device (one stage, one process):
        # joined into the next launch's inputs there, then read after the previous launch's
        # tokens, so no admission waits for the device before that launch is issued
        self._joining: list[tuple] = []  # (group, first tokens, keys, logprobs, slots) to join
        self._welcoming: list[tuple] = []  # joined into the launch just issued, to be read
        # one step launched ahead of the host needs the tokens to stay on one stage's devices
        # of one process; pipelines and multi-process jobs read each step before the next
        self._ahead = len(stages) == 1 and jax.process_count() == 1
        # decode steps per launch: the host's work per launch (reading tokens, ending requests,
        # the launch itself) is shared by this many steps; a pipeline's stages hand tokens
        # through the host, one step a launch
        self.steps_per_launch = steps_per_launch if len(stages) == 1 else 1
        # admissions prefilled together up to this many padded tokens (one stage)
        self.max_prefill_tokens = max_prefill_tokens
        # one stage: a prompt longer than this is prefilled in chunks of it, one chunk a round
        # while the other slots decode (None: whole; pipelines prefill whole)
        self.chunk = (chunk_size(prefill_chunk)
                      if prefill_chunk is not None and len(stages) == 1 else None)
        self._chunking: list[_Chunked] = []  # in order: the first gets a chunk each round
        # long prompts taken from `waiting` while one is prefilled in chunks: they wait here
        # (ahead of `waiting`) without holding a slot, and shorter requests pass them
        self._deferred: collections.deque[Request] = collections.deque()
        self.chunks = 0  # prefill chunks run
        self.prefill_sizes: collections.Counter = collections.Counter()  # group size -> count
        self._held = 0  # hold(): no admissions while > 0
        self.waiting: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._wake = threading.Condition()
        self._stop = False
        self._draining = False  # shutdown(drain=True): stop once nothing is left
        self._failures = 0  # rounds whose programs failed (`_fail_running`)
        self._multi = jax.process_count() > 1
        # multi-process: a failure this round caught on this process (`_agree`)
        self._round_error: BaseException | None = None
        # request id -> (request, finish reason), from any thread
        self._cancelled: dict[int, tuple[Request, str]] = {}
        self._pending: dict[int, Request] = {}  # admitted by the plan, not yet applied
        # multi-process: process 0 takes the requests and plans; the others follow its plan
        self.leader = jax.process_index() == 0
        self.steps = 0  # decode steps run
        # what stopped the loop, if a fault its guards do not catch (a bug) did: see `_run`
        self.fault: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="jax-sp-engine", daemon=True)
        self._thread.start()

    # -- the API's edge ------------------------------------------------------------------------

    def submit(self, prompt, sampling: SamplingParams | None = None, *,
               chat: bool = True) -> Request:
        """Queue one prompt (a string, token ids or a conversation, as `generate` takes);
        returns its Request at once. Bad input raises here."""
        if self._stop or self._draining:
            raise EngineStopped(f"the engine stopped on a fault: {self.fault!r}" if self.fault
                                is not None else "the engine is shut down" if self._stop else
                                "the engine is shutting down (draining its requests)")
        if not self.leader:
            raise RuntimeError(f"process {jax.process_index()} follows process 0's schedule; "
                               f"submit requests to process 0")
        sampling = self.llm._sampling(sampling)
        if sampling.guided:
            raise ValueError("the serving engine does not run classifier-free guidance "
                             "(guidance_scale); use LLM.generate(..., negative_prompts=...)")
        if sampling.logprobs is not None and len(self.runner.stages) > 1:
            raise ValueError("logprobs need a one-stage engine (pp=1): a pipeline's first "
                             "tokens come from the runner's prefill, which does not compute "
                             "them")
        job = self.llm._prepare([prompt], None, sampling, chat)  # checks length and ids
        request = Request(next(self._ids), [int(t) for t in job.inputs[0, :job.lengths[0]]],
                          sampling, tuple(self.llm._stop_ids(sampling)))
        self.waiting.put(request)
        if self._stop and (self.fault is not None or not self._thread.is_alive()):
            request._finish(self.fault or "abort")  # stopped meanwhile: the sweep missed it
        with self._wake:
            self._wake.notify()
        return request

    def cancel(self, request: Request, reason: str = "abort"):
        """End a request early (a client gone, a stop string met): its slot is freed before the
        next decode step; a request still waiting never runs. A request already ended is left
        as it is."""
        if request.done:
            return
        # the first reason stands (a stop string met, then the stream's end cancels again)
        self._cancelled.setdefault(request.id, (request, reason))
        with self._wake:
            self._wake.notify()

    @contextlib.contextmanager
    def hold(self):
        """While held, the engine admits no request (the running ones go on decoding); the
        requests submitted meanwhile are admitted together when the last hold ends."""
        self._held += 1
        try:
            yield self
        finally:
            self._held -= 1
            with self._wake:
                self._wake.notify()

    def join(self):
        """Wait for the loop to end (a follower process: until process 0 shuts down)."""
        self._thread.join()

    def shutdown(self, drain: bool = True):
        """Stop the loop: after every queued and running request ends (drain; `submit`
        refuses new ones meanwhile, and under `hold()` the drain waits for the hold to end) or
        at once (the unfinished ones end with finish_reason "abort"). In a multi-process job,
        call it on process 0: the others stop with it."""
        if drain:  # the loop stops once it finds nothing queued or running (`_plan`)
            self._draining = True
        else:
            self._stop = True
        with self._wake:
            self._wake.notify()
        self._thread.join()
        self._stop = True
        for r in self._unfinished():  # a request submitted as the loop stopped
            r._finish("abort")

    def _unfinished(self) -> list[Request]:
        """Every request submitted and not ended: queued, admitted, decoding or in chunks."""
        return ([r for r in self.active if r is not None] + list(self.waiting.queue)
                + list(self._deferred) + list(self._pending.values())
                + [job.request for job in self._chunking])

    @property
    def queued(self) -> int:
        """Requests submitted and not yet admitted."""
        return self.waiting.qsize() + len(self._deferred)

    @property
    def running(self) -> int:
        """Requests admitted and not yet ended: decoding, or prefilled in chunks."""
        return sum(r is not None for r in self.active) + len(self._chunking)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown(drain=exc[0] is None)

    # -- the loop ------------------------------------------------------------------------------

    def _run(self):
        """The loop's thread. A fault that the loop's guards do not catch (a bug: they catch a
        failing program) stops the engine rather than leaving its requests waiting forever:
        every unfinished request ends with it, `submit` names it, and `fault` holds it (the
        server's /health then answers 503)."""
        try:
            self._loop()
        except BaseException as e:
            self.fault, self._stop = e, True
            unfinished = self._unfinished()
            self.active = [None] * len(self.active)  # the gauges read nothing running by the
            self._chunking, self._pending = [], {}  # time a request's caller wakes
            self._deferred.clear()
            while not self.waiting.empty():
                self.waiting.get_nowait()
            for request in unfinished:
                request._finish(e)
            raise

    def _loop(self):
        """Each round: the plan (cancellations, admissions, stop) made by process 0 and, in a
        multi-process job, broadcast to every process, which all apply it and step alike.
        A round launches the next decode step before it reads the previous step's tokens, so
        the host's work for one step (reading tokens, ending requests, admitting) runs while
        the device computes the next: a request that ends at step n has its slot computed once
        more in step n + 1, and that token is dropped."""
        while True:
            plan = self._share(self._lead() if self.leader else None)
            if plan["stop"]:
                self._guard(self._collect)
                return
            self._apply(plan)
            if self._multi:  # before the launch, which every process must make alike
                self._agree()
            launched = self._guard(self._launch) if any(self.active) else None
            if self._ahead:  # read the previous step while this one runs
                failures = self._failures
                self._guard(self._collect)
                # a launch issued from the caches a failure dropped is dropped with them
                self._inflight = launched if self._failures == failures else None
                self._guard(self._welcome)  # the first tokens of this launch's admissions
            else:  # read this step now: the next one takes its tokens from the host
                self._inflight = launched
                self._guard(self._collect)
            if (launched is None and not any(self.active) and self.leader and not plan["admit"]
                    and not self._chunking):
                with self._wake:  # idle: until a request, a cancel or the stop (followers
                    # wait in the next broadcast)
                    self._wake.wait_for(lambda: self._stop or bool(self._cancelled) or (
                        not self._held and (self.queued or self._draining)), 0.1)

    def _new_caches(self) -> list[KVCache]:
        """Every stage's cache, empty. Those it replaces are deleted first (a failed request's
        traceback may still hold them), so that the engine never holds two."""
        for a in (a for cache in self.caches for a in (cache.k, cache.v)):
            if not a.is_deleted():
                a.delete()
        return [empty() for empty in self._empty]

    def _guard(self, step):
        """Run `step`; if it raises, fail every request in flight and go on serving."""
        try:
            return step()
        except Exception as e:  # noqa: BLE001 - fail the requests in flight, go on
            self._caught(e)
            self._fail_running(e)
            return None

    def _caught(self, e: BaseException):
        if self._multi:  # every process hears of it before the next launch (`_agree`)
            self._round_error = e

    def _lead(self) -> dict:
        """Process 0's plan. In a multi-process job, a plan that fails to be made first stops
        the other processes (they wait in its broadcast: nothing else has run this round),
        then stops this one (`_run`)."""
        try:
            return self._plan()
        except BaseException:
            if self._multi:
                self._share({"stop": True, "cancel": {}, "admit": []})
            raise

    def _agree(self):
        """A multi-process round, after its plan is applied and before its launch: every
        process learns whether any caught a failure since the last launch (the last round's
        launch or read, this round's admissions, on its own host); if one did, every process
        fails every request in flight and goes on from empty caches, so that all hold the same
        slots, rows and caches when they launch (one small all-gather a round)."""
        from jax.experimental import multihost_utils

        failed = np.asarray(multihost_utils.process_allgather(
            np.int32(self._round_error is not None)))
        error, self._round_error = self._round_error, None
        if failed.any():
            self._fail_running(error or RuntimeError(
                f"process {int(np.argmax(failed))} of this multi-process job failed its "
                f"part of this round; every process fails the requests in flight to stay in "
                f"step"))

    def _cache_lost(self, e: BaseException):
        """After an admission failed: if it took a stage's cache with it (a donated input is
        gone once the program has run), every running request's rows went too: they fail with
        `e`, and the cache starts anew. A failure the device reports only when an output is
        read fails them at that read (`_guard`)."""
        if any(a.is_deleted() for c in self.caches for a in (c.k, c.v)):
            self._fail_running(e)

    def _fail_running(self, e: BaseException):
        """Fail every request in flight with `e`; the engine goes on from empty caches (those
        the failed program read or wrote can fail every later program that reads them)."""
        self._failures += 1
        self._inflight = self._tokens = None
        self._rows = [None] * len(self._rows)
        self._joining, self._welcoming = [], []
        for slot, r in enumerate(self.active):
            if r is not None:
                r._finish(e)
                self._free(slot)
        for job in self._chunking:  # their cache rows went with the failed program's
            job.request._finish(e)
            self._free(job.slot)
        self._chunking = []
        self._clear_rows()  # a failure may have come between two rows' updates
        self.caches = self._new_caches()

    def _plan(self) -> dict:
        """Process 0's decisions for this round, as plain data."""
        running = ({r.id for r in self.active if r is not None}
                   | {job.request.id for job in self._chunking})
        for rid, (request, _) in list(self._cancelled.items()):
            if request.done:  # ended on its own as it was cancelled: nothing left to do (else
                # the idle loop, woken by any pending cancel, would never sleep)
                self._cancelled.pop(rid, None)
        cancel = {rid: self._cancelled.pop(rid)[1] for rid in list(self._cancelled)
                  if rid in running}
        # those not admitted yet (no other process knew them) end here, whether or not a slot
        # is free, and leave the queue (a cancel that came since `cancel` was made waits)
        for rid, (request, reason) in list(self._cancelled.items()):
            if rid in running or request.done:
                continue
            self._cancelled.pop(rid)
            with self.waiting.mutex:
                if request in self.waiting.queue:
                    self.waiting.queue.remove(request)
            if request in self._deferred:
                self._deferred.remove(request)
            request._finish(reason)
        reserved = {job.slot for job in self._chunking}  # prefilling in chunks
        free = [slot for slot, r in enumerate(self.active)
                if (r is None or r.id in cancel) and slot not in reserved]
        admit, deferred, long = [], [], bool(self._chunking)
        try:
            while free and not self._held and (self._deferred or not self.waiting.empty()):
                request = self._deferred.popleft() if self._deferred else self.waiting.get()
                try:
                    # cancelled before it ran: no process knew it
                    if request.id in self._cancelled:
                        request._finish(self._cancelled.pop(request.id)[1])
                        continue
                    # one prompt in chunks at a time: the next holds no slot meanwhile
                    if self.chunk is not None and len(request.prompt) > self.chunk:
                        if long:
                            deferred.append(request)
                            continue
                        long = True
                    admit.append({"slot": free[0], "id": request.id, "prompt": request.prompt,
                                  "sampling": dataclasses.asdict(request.sampling),
                                  "stop_ids": list(request.stop_ids)})
                except BaseException:  # a fault (it stops the engine: `_run`): back where
                    deferred.append(request)  # the sweep finds it
                    raise
                free.pop(0)
                self._pending[request.id] = request
        finally:
            self._deferred.extendleft(reversed(deferred))
        if self._draining and not (admit or self.queued or self.running):
            self._stop = True  # drained (here, on the loop's thread: nothing is in between)
        return {"stop": self._stop, "cancel": cancel, "admit": admit}

    def _share(self, plan):
        """The plan on every process (process 0's; one process: itself)."""
        if jax.process_count() == 1:
            return plan
        from jax.experimental import multihost_utils

        data = json.dumps(plan).encode() if self.leader else b""
        n = int(multihost_utils.broadcast_one_to_all(np.int32(len(data))))
        buf = np.frombuffer(data, np.uint8) if self.leader else np.zeros(n, np.uint8)
        buf = multihost_utils.broadcast_one_to_all(buf)
        return plan if self.leader else json.loads(np.asarray(buf).tobytes())

    def _apply(self, plan: dict):
        cancel = {int(k): v for k, v in plan["cancel"].items()}
        for slot, r in enumerate(self.active):
            if r is not None and r.id in cancel:
                r._finish(cancel[r.id])
                self._free(slot)
        for job in [job for job in self._chunking if job.request.id in cancel]:
            job.request._finish(cancel[job.request.id])
            self._chunking.remove(job)
            self._free(job.slot)
        admitted = []
        for a in plan["admit"]:
            request = self._pending.get(a["id"])  # dropped once seated (shutdown's drain)
            if request is None:  # a follower's copy of process 0's request
                fields = dict(a["sampling"])
                if fields.get("stop_token_ids") is not None:
                    fields["stop_token_ids"] = tuple(fields["stop_token_ids"])
                request = Request(a["id"], a["prompt"], SamplingParams(**fields),
                                  tuple(a["stop_ids"]))
            admitted.append((request, a["slot"]))
        if self.chunk is not None:  # long prompts: a chunk a round, their slots reserved
            for request, slot in [a for a in admitted if len(a[0].prompt) > self.chunk]:
                self._chunking.append(_Chunked(request, slot))
                self._seat_rows(request, slot)  # its slot's decode writes past the prompt
            admitted = [a for a in admitted if len(a[0].prompt) <= self.chunk]
            if self._chunking:
                self._next_chunk()
        if len(self.runner.stages) == 1:
            groups = prefill_groups([len(r.prompt) for r, _ in admitted],
                                    self.max_prefill_tokens, self.llm.parallel.tp,
                                    self.runner.row_unit)
            groups = [[admitted[i] for i in g] for g in groups]
        else:
            groups = [[one] for one in admitted]
        for group in groups:
            try:
                if len(self.runner.stages) == 1:
                    joined = self._prefill_group(group)
                else:
                    joined = self._prefill(*group[0])
            except Exception as e:  # noqa: BLE001 - these requests fail, the others go on
                self._caught(e)
                for request, _ in group:
                    request._finish(e)
                self._cache_lost(e)
                continue
            for request, slot in group:
                # a request joined on the device gets its first token (which may end it) once
                # the launch that takes it is issued (`_welcome`)
                if joined or not self._ended(request, slot):
                    self.active[slot] = request
        for a in plan["admit"]:
            self._pending.pop(a["id"], None)

    def _prefill_group(self, group: list, chunk: list | None = None,
                       start: int | None = None) -> bool | None:
        """One stage: the prefill of these (request, slot) pairs as one batch, their cache rows
        written into their slots and each first token sampled with its own settings. Launched
        ahead (one process), the first tokens and keys stay on the device, to be joined into
        the next launch (returns True); else they are read here and seated (False).
        chunk: one request's tokens from prompt position `start` (chunked prefill): the first
        chunk (start 0) is a fresh prefill into the slot, a later one extends the slot's cache
        row (`extend_fn`); a chunk that does not end its prompt only runs (returns None)."""
        st = self.runner.stages[0]
        prompts = [r.prompt for r, _ in group] if chunk is None else [chunk]
        job = self.runner.batch([np.array(p, np.int32) for p in prompts], 1, False)
        pad = job.batch - len(group)
        slots = np.array([slot for _, slot in group] + [self.slots] * pad, np.int32)
        settings = [r.sampling for r, _ in group] + [SamplingParams()] * pad
        starts = np.zeros(job.batch, np.int32)
        starts[:len(group)] = start or 0
        host = (job.inputs, job.kv_len + starts, slots,
                np.array([s.key_seed() for s in settings]),
                np.array([_temperature(s) for s in settings], np.float32),
                np.array([s.top_k for s in settings], np.int32),
                np.array([s.top_p for s in settings], np.float32))
        ends = chunk is None or start + len(chunk) == len(group[0][0].prompt)
        static = self._admit_static(*job.inputs.shape)
        logprobs = ends and any(r.sampling.logprobs is not None for r, _ in group)
        if start:  # a later chunk of a long prompt: over what the earlier chunks left
            args = (st.state, self.caches[0], *self.runner.put(0, (host[0], starts, *host[1:])))
            (tokens, keys, *extra), self.caches[0] = st.programs.run(
                "extend", lambda: extend_fn(st.runtime, static, self.cache_len, logprobs),
                static, args, variant=(self.cache_len, logprobs))
        else:
            args = (st.state, self.caches[0], *self.runner.put(0, host))
            (tokens, keys, *extra), self.caches[0] = st.programs.run(
                "admit", lambda: admit_fn(st.runtime, static, self.cache_len, logprobs),
                static, args, variant=(self.cache_len, logprobs))
        slots_dev = args[-5]
        if chunk is None:
            self.prefill_sizes[len(group)] += 1
        else:
            self.chunks += 1
        if not ends:
            return None
        if self._ahead:
            for request, slot in group:
                self._seat_rows(request, slot)
            self._joining.append((group, tokens, keys, extra, slots_dev))
            return True
        tokens, keys = to_host(tokens), to_host(keys)
        extra = [to_host(x)[0] for x in extra]  # [B], [B, K], [B, K]
        for i, (request, slot) in enumerate(group):
            self._seat(request, slot, int(tokens[i]), keys[i],
                       [x[i] for x in extra] if extra else None)
        return False

    def _next_chunk(self):
        """The next chunk of the first request prefilled in chunks (one chunk a round, while
        the other slots decode); its last chunk seats it as an admission does."""
        job = self._chunking[0]
        request = job.request
        piece = request.prompt[job.done:job.done + self.chunk]
        try:
            joined = self._prefill_group([(request, job.slot)], piece, job.done)
        except Exception as e:  # noqa: BLE001 - this request fails, the others go on
            self._caught(e)
            self._chunking.pop(0)
            request._finish(e)
            self._free(job.slot)
            self._cache_lost(e)
            return
        job.done += len(piece)
        if joined is None:  # more chunks to come
            return
        if joined or not self._ended(request, job.slot):
            self.active[job.slot] = request
        self._chunking.pop(0)  # after: shutdown's drain sees the request all along

    def _welcome(self):
        """The first tokens of the admission groups joined into the launch just issued (their
        prefills ran before it): each emitted, the keys kept on the host for the rows' next
        put; a request its first token ends frees its slot (its tokens of that launch are
        dropped)."""
        welcoming, self._welcoming = self._welcoming, []
        for group, tokens, keys, extra, _ in welcoming:
            tokens, keys = to_host(tokens), to_host(keys)
            extra = [to_host(x)[0] for x in extra]  # [B], [B, K], [B, K]
            for i, (request, slot) in enumerate(group):
                if self.active[slot] is not request:
                    continue
                self.tokens[slot], self.keys[slot] = tokens[i], keys[i]
                request._emit(int(tokens[i]), [x[i] for x in extra] if extra else None)
                self._ended(request, slot)

    def _seat(self, request: Request, slot: int, first: int, key, logprobs=None):
        """A prefilled request into its slot's host rows (its first token, position, step, key
        and settings), to be put before the next launch; the first token emitted."""
        self._seat_rows(request, slot)
        self.tokens[slot], self.keys[slot] = first, key
        request._emit(first, logprobs)

    def _seat_rows(self, request: Request, slot: int):
        """A prefilled request's position, step and settings into its slot's host rows, to be
        put before the next launch."""
        s = request.sampling
        self.pos[slot], self.step[slot] = len(request.prompt), 1
        self.temperature[slot] = _temperature(s)
        self.top_k[slot], self.top_p[slot] = s.top_k, s.top_p
        self._rows = [None] * len(self._rows)  # put again before the next step

    def _admit_static(self, b: int, t: int) -> Static:
        """The admission program's settings for a [b, t] group: SP as `generate` decides for
        b * t tokens; sampling per row (one form for greedy and sampled groups: next to a
        prefill the sampling costs little, and each form is one more program a shape)."""
        rt = self.runner.stages[0].runtime
        return dataclasses.replace(Static.of(rt, "prefill", self.llm.parallel.use_sp(b * t)),
                                   greedy=False, top_k=0)

    def warm(self) -> float:
        """Compile, before any request, every program this engine can meet: each admission
        group's shape ([b, t] for every bucket t a prompt can take whole, up to max_seq_len or
        the chunk's, and every batch b of a group within max_prefill_tokens), each later
        chunk's (every bucket up to the chunk's) and the decode launch for greedy and sampled
        (their forms without logprobs, which a request asking for them compiles when first
        met). Returns the seconds spent compiling.
        Without it each shape is compiled when first met, inside some request's time to first
        token. A pipeline's programs are compiled when first met."""
        if len(self.runner.stages) > 1:
            return 0.0
        st = self.runner.stages[0]
        rt, tp = st.runtime, self.llm.parallel.tp
        every = rt.sharding_of(())

        def spec(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=every)

        before = st.programs.total_compile_s()
        seed = np.asarray(SamplingParams().key_seed()).dtype
        joined = set()
        chunked = self.chunk is not None and self.chunk < self.llm.max_seq_len - 1
        for t in sorted({bucket(n, tp) for n in range(1, self.llm.max_seq_len)}):
            if chunked and t > bucket(self.chunk, tp):  # such prompts come in chunks
                break
            if chunked:
                b = self.runner.row_unit  # a later chunk of a long prompt (its last: t)
                rows = [spec((b,), d) for d in (jnp.int32, jnp.int32, jnp.int32, seed,
                                                jnp.float32, jnp.int32, jnp.float32)]
                static = self._admit_static(b, t)
                st.programs.compile(
                    "extend", lambda s=static: extend_fn(rt, s, self.cache_len), static,
                    (st.state, self.caches[0], spec((b, t), jnp.int32), *rows),
                    variant=(self.cache_len, False))
            n = 1
            # up to the largest group: a round admits up to every slot, and Runner.batch
            # pads n requests to a power of two, then to the row unit (9 to 18 at tp 3)
            while n <= pow2_at_least(self.slots) and (
                    n == 1 or round_up(n, self.runner.row_unit) * t <= self.max_prefill_tokens):
                b = round_up(n, self.runner.row_unit)  # as Runner.batch pads a group
                rows = [spec((b,), d) for d in (jnp.int32, jnp.int32, seed, jnp.float32,
                                                jnp.int32, jnp.float32)]
                static = self._admit_static(b, t)
                st.programs.compile(
                    "admit", lambda s=static: admit_fn(rt, s, self.cache_len), static,
                    (st.state, self.caches[0], spec((b, t), jnp.int32), *rows),
                    variant=(self.cache_len, False))
                if self._ahead and b not in joined:  # its first tokens' join into a launch
                    joined.add(b)
                    host = (np.zeros(self.slots, np.int32), np.zeros((self.slots, 2), np.uint32),
                            np.zeros(b, np.int32), np.zeros((b, 2), np.uint32),
                            np.full(b, self.slots, np.int32))
                    jax.block_until_ready(self._join(*self.runner.put(0, host)))
                n *= 2
        b, k = self.slots, self.steps_per_launch
        for static in self.statics.values():
            st.programs.compile(
                "slots_step", lambda s=static: slots_step_fn(rt, s, self.cache_len, k), static,
                (st.state, self.caches[0], spec((b,), jnp.int32), spec((b,), jnp.int32),
                 spec((b, 2), jnp.uint32), *[spec((b,), d) for d in (jnp.int32, jnp.float32,
                                                                      jnp.int32, jnp.float32)]),
                variant=(k, False))
        return st.programs.total_compile_s() - before

    def _prefill(self, request: Request, slot: int) -> bool:
        """A pipeline: the request's prefill on its own (the runner's: every stage, SP as
        `generate` decides), each stage's cache row written into the slot."""
        job = self.runner.batch([np.array(request.prompt, np.int32)], 1, False)
        # the prefill's cache holds the prompt's bucket only: its positions go into the slot
        job = dataclasses.replace(job, cache_len=job.inputs.shape[1])
        run = self.runner.prefill(job, request.sampling)
        self.prefill_sizes[1] += 1
        for i, rows in enumerate(run.caches):
            self.caches[i] = self._insert(self.caches[i], rows[0], np.int32(slot))
        self._seat(request, slot, int(to_host(run.tokens[0])[0]), to_host(run.keys[-1][0])[0])
        return False

    def _ended(self, request: Request, slot: int) -> bool:
        """Finish `request` if its last token ends it; frees its slot."""
        if request.token_ids[-1] in request.stop_ids:
            reason = "stop"
        elif len(request.token_ids) >= request.sampling.max_new_tokens:
            reason = "length"
        else:
            return False
        request._finish(reason)
        self._free(slot)
        return True

    def _clear_rows(self):
        """The slots' host rows as a new engine has them (every process alike: in a
        multi-process job each launch puts them, and jax checks that every process puts the
        same values)."""
        b = self.slots
        self.tokens = np.zeros(b, np.int32)
        self.pos = np.zeros(b, np.int32)
        self.step = np.zeros(b, np.int32)
        self.keys = np.zeros((b, 2), np.uint32)
        self.temperature = np.zeros(b, np.float32)
        self.top_k = np.zeros(b, np.int32)
        self.top_p = np.ones(b, np.float32)

    def _free(self, slot: int):
        """Slot `slot` free: its position 0 (put before the next launch), where its decode
        stays and attends over one key (`slots_step_fn`) until a request takes it."""
        self.active[slot] = None
        self.pos[slot] = 0
        self._rows = [None] * len(self._rows)

    def _launch(self):
        """Launch one decode step of every slot through every stage (not waited for); returns
        (its tokens on the device, the request each slot held)."""
        runner = self.runner
        # copies: on CPU a device array may share a numpy array's memory until the program
        # that reads it has run, and the host arrays change right after this launch
        put = lambda i, *arrays: runner.put(i, tuple(a.copy() for a in arrays))  # noqa: E731
        if self._tokens is None or not self._ahead:  # the tokens from the host
            (x,) = put(0, self.tokens)
        else:  # the last launch's, and admissions' first tokens joined below
            x = self._tokens
        logprobs = any(r is not None and r.sampling.logprobs is not None for r in self.active)
        static = self.statics[any(r is not None and r.sampling.temperature > 0
                                  for r in self.active)]
        for i, st in enumerate(runner.stages):
            if self._rows[i] is None:
                self._rows[i] = put(i, self.pos, self.keys, self.step, self.temperature,
                                    self.top_k, self.top_p)
            pos, keys, step, temperature, top_k, top_p = self._rows[i]
            for joining in self._joining:  # one stage: first tokens and keys from the device
                _, first, first_keys, _, slots = joining
                x, keys = self._join(x, keys, first, first_keys, slots)
            self._welcoming, self._joining = self._welcoming + self._joining, []
            args = (st.state, self.caches[i], x, pos, keys, step, temperature, top_k, top_p)
            x, self.caches[i], pos, step = st.programs.run(
                "slots_step", lambda: slots_step_fn(st.runtime, static,  # noqa: B023
                                                    self.cache_len, self.steps_per_launch,
                                                    logprobs),
                static, args, variant=(self.steps_per_launch, logprobs))
            self._rows[i] = (pos, keys, step, temperature, top_k, top_p)
            if i + 1 < len(runner.stages):
                x = runner.hop(x, i + 1, self.decode_sp)
        k = self.steps_per_launch
        self.steps += k
        for slot, request in enumerate(self.active):  # the host's copy, advanced alike
            if request is not None:
                self.pos[slot] = min(self.pos[slot] + k, self.cache_len - 1)
                self.step[slot] += k
        tokens, self._tokens, extra = x
        return tokens, extra, list(self.active)

    def _collect(self):
        """Read the step in flight (if any): each slot's token goes to the request that held
        the slot at launch, if it still does; requests that end free their slots."""
        if self._inflight is None:
            return
        x, extra, held = self._inflight
        self._inflight = None
        tokens = to_host(x)  # [steps, slots]
        extra = [to_host(e) for e in extra]  # [steps, slots], [steps, slots, K] x 2
        for slot, request in enumerate(held):
            if request is None or self.active[slot] is not request:
                continue  # free, or ended (or cancelled) since: its tokens are dropped
            self.tokens[slot] = tokens[-1, slot]
            for i, token in enumerate(tokens[:, slot]):  # after the request's end: dropped
                request._emit(int(token), [e[i, slot] for e in extra] if extra else None)
                if self._ended(request, slot):
                    break
