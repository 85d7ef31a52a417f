"""Continuous batching (jax_sp/serving.py): requests that join and leave a running decode batch
get the tokens `generate` gives each prompt alone."""

import asyncio
import collections
import contextlib
import dataclasses
import time

import pytest

import numpy as np
import torch

from conftest import hf_logits, random_prompts
from jax_sp import LLM, ParallelConfig, SamplingParams
from jax_sp.serving import Engine
from jax_sp.slots import prefill_groups


def alone(llm, prompt, sampling):
    return llm.generate([prompt], sampling)[0].token_ids


@pytest.fixture(scope="module")
def tiny(hf_models):
    model = hf_models("llama")
    return model, LLM.from_torch(model, max_seq_len=96)


@pytest.mark.parametrize("steps_per_launch", [1, 4, 5])
def test_concurrent_requests_get_what_generate_gives_each_alone(tiny, steps_per_launch):
    """Six requests of odd lengths over four slots (two wait for a free slot), greedy; one, four
    or five decode steps a launch (requests end inside a launch and slots are taken again)."""
    _, llm = tiny
    prompts = random_prompts(llm.cfg.vocab_size, (5, 17, 2, 30, 9, 12), seed=5)
    settings = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (7, 3, 12, 5, 1, 9)]
    with Engine(llm, max_batch=4, steps_per_launch=steps_per_launch) as engine:
        requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
        got = [r.result(timeout=120) for r in requests]
    assert got == [alone(llm, p, s) for p, s in zip(prompts, settings)]
    assert [r.finish_reason for r in requests] == ["length"] * 6


def test_prefill_groups_sort_by_length_and_keep_within_the_token_budget():
    # buckets (tp 1): 16, 32, 16, 32, 16, 16; sorted 2, 5, 9, 12 | 17, 30
    assert prefill_groups([5, 17, 2, 30, 9, 12], 64, 1) == [[2, 0, 4, 5], [1, 3]]
    assert prefill_groups([5, 17, 2, 30, 9, 12], 2048, 1) == [[2, 0, 4, 5, 1, 3]]
    assert prefill_groups([300, 5], 64, 1) == [[1], [0]]  # over the budget: alone
    assert prefill_groups([5, 9, 12], 16, 1) == [[0], [1], [2]]
    # rows padded to a multiple of 4 (attention groups) count as such against the budget
    assert prefill_groups([5, 9, 12, 30], 32, 1) == [[0, 1], [2], [3]]
    assert prefill_groups([5, 9, 12, 30], 32, 1, unit=4) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("budget", [64, 2048])
def test_admissions_prefilled_together_give_what_each_gives_alone(tiny, budget):
    """Six requests admitted in one round, greedy and seeded-sampled, prefilled in the groups
    `prefill_groups` makes. The longest prompt's bucket (128) passes the cache's length (96)."""
    _, llm = tiny
    lengths = (5, 17, 2, 30, 9, 70)
    prompts = random_prompts(llm.cfg.vocab_size, lengths, seed=9)
    settings = [SamplingParams(max_new_tokens=n, stop_token_ids=(), temperature=t, top_k=k,
                               top_p=p, seed=seed)
                for n, t, k, p, seed in [(6, 0, 0, 1, 0), (4, 0.9, 0, 1, 3), (8, 0, 0, 1, 0),
                                         (3, 1.2, 12, 0.8, 4), (5, 0.7, 0, 0.9, 5),
                                         (7, 0, 0, 1, 0)]]
    with Engine(llm, max_batch=8, max_prefill_tokens=budget) as engine:
        programs = engine.runner.stages[0].programs
        if budget == 64:  # every shape compiled up front: the requests meet no new one
            engine.warm()
            compiled = set(programs.compiled)
        with engine.hold():
            requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
        got = [r.result(timeout=120) for r in requests]
    if budget == 64:
        assert set(programs.compiled) == compiled
    groups = prefill_groups(list(lengths), budget, 1)
    assert engine.prefill_sizes == collections.Counter(len(g) for g in groups)
    assert got == [alone(llm, p, s) for p, s in zip(prompts, settings)]


def test_a_short_request_joins_a_running_batch_and_leaves_first(tiny):
    _, llm = tiny
    long_prompt, short_prompt = random_prompts(llm.cfg.vocab_size, (11, 6), seed=6)
    long_s = SamplingParams(max_new_tokens=80, stop_token_ids=())
    short_s = SamplingParams(max_new_tokens=3, stop_token_ids=())
    # one step a launch, and the short one's programs compiled before the race: its admission
    # takes one round while the long one has 78 left (a compile would take longer than those)
    with Engine(llm, max_batch=2, steps_per_launch=1) as engine:
        engine.submit(short_prompt, short_s).result(timeout=60)
        long_r = engine.submit(long_prompt, long_s)
        tokens = iter(long_r)
        next(tokens), next(tokens)  # the long one is decoding
        short_r = engine.submit(short_prompt, short_s)
        short_ids = short_r.result(timeout=60)
        assert not long_r.done  # it finished while the long one still decodes
        long_ids = long_r.result(timeout=120)
    assert short_ids == alone(llm, short_prompt, short_s)
    assert long_ids == alone(llm, long_prompt, long_s)  # the join changed none of its tokens


def test_a_free_slot_decodes_at_position_0_and_stays_there(hf_models):
    """A slot whose request ended goes back to position 0 on the device and stays there while
    the other slot decodes on (so its attention reads one key, not its last request's whole
    row); a request then takes the slot and gets generate's tokens."""
    from jax_sp.runtime import to_host

    llm = LLM.from_torch(hf_models("llama"), max_seq_len=512)
    long_prompt, short_prompt, after = random_prompts(llm.cfg.vocab_size, (11, 6, 5), seed=16)
    short_s = SamplingParams(max_new_tokens=9, stop_token_ids=())

    # once the long one has `tokens` more, as the device has it (read from this thread: no
    # slot is freed meanwhile, so the rows are not put again between the check and the read)
    def device_pos(engine, tokens):
        until = len(long_r.token_ids) + tokens
        while len(long_r.token_ids) < until or engine._rows[0] is None:
            assert not long_r.done
            time.sleep(0.005)
        return to_host(engine._rows[0][0])

    with Engine(llm, max_batch=2, steps_per_launch=2) as engine:
        long_r = engine.submit(long_prompt, SamplingParams(max_new_tokens=490,
                                                           stop_token_ids=()))
        next(iter(long_r))
        engine.submit(short_prompt, short_s).result(timeout=60)
        running = engine.active.index(long_r)
        pos = [device_pos(engine, 8), device_pos(engine, 8)]  # launches after the end
        after_r = engine.submit(after, short_s)
        assert after_r.result(timeout=60) == alone(llm, after, short_s)
        engine.cancel(long_r)
    assert [p[1 - running] for p in pos] == [0, 0], pos
    assert pos[0][running] > len(long_prompt) + short_s.max_new_tokens
    assert pos[1][running] > pos[0][running]  # it decoded on (launches run ahead of reads)


def test_a_cancel_that_comes_after_the_end_leaves_the_engine_idle(tiny):
    """Cancelling a request that has ended (a stop string found after its last token, a client
    leaving as it ends) changes nothing: it keeps its tokens and finish reason, and no cancel
    stays pending, which would keep the idle loop from ever sleeping. A cancel recorded as the
    request ended (the race: `done` read just before) is dropped at the next round."""
    _, llm = tiny
    (prompt,) = random_prompts(llm.cfg.vocab_size, (6,), seed=21)
    s = SamplingParams(max_new_tokens=3, stop_token_ids=())
    with Engine(llm, max_batch=2) as engine:
        first = engine.submit(prompt, s)
        tokens = first.result(timeout=60)
        engine.cancel(first)
        assert (first.token_ids, first.finish_reason) == (tokens, "length")
        second = engine.submit(prompt, s)
        second.result(timeout=60)
        engine._cancelled[second.id] = (second, "abort")  # as `cancel` records it
        engine.cancel(engine.submit(prompt, s))  # a round runs (and this one ends)
        deadline = time.time() + 10
        while engine._cancelled and time.time() < deadline:
            time.sleep(0.01)
        assert not engine._cancelled and second.finish_reason == "length"


def test_a_first_token_that_ends_a_request_frees_its_slot_for_the_next(tiny):
    """A request joins a running batch with its first token still on the device; when that token
    is a stop id (or max_new_tokens is 1) the request ends with it alone, and the next request
    takes the slot; the running request's tokens do not change (on a fast device it may end
    first: the slots' reuse is what is checked)."""
    _, llm = tiny
    long_prompt, stopped, one, after = random_prompts(llm.cfg.vocab_size, (13, 7, 4, 9), seed=8)
    long_s = SamplingParams(max_new_tokens=80, stop_token_ids=())
    first = alone(llm, stopped, SamplingParams(max_new_tokens=1, stop_token_ids=()))[0]
    stop_s = SamplingParams(max_new_tokens=10, stop_token_ids=(first,))
    one_s = SamplingParams(max_new_tokens=1, stop_token_ids=())
    after_s = SamplingParams(max_new_tokens=6, stop_token_ids=())
    with Engine(llm, max_batch=2, steps_per_launch=4) as engine:  # one slot beside the long one
        long_r = engine.submit(long_prompt, long_s)
        tokens = iter(long_r)
        next(tokens)  # the long one is decoding
        requests = [engine.submit(p, s) for p, s in ((stopped, stop_s), (one, one_s),
                                                     (after, after_s))]
        got = [r.result(timeout=120) for r in requests]
        long_ids = long_r.result(timeout=120)
    assert got == [[first], alone(llm, one, one_s), alone(llm, after, after_s)]
    assert [r.finish_reason for r in requests] == ["stop", "length", "length"]
    assert long_ids == alone(llm, long_prompt, long_s)


def test_a_stream_whose_event_loop_has_closed_leaves_the_engine_serving(tiny):
    """A request streamed in an event loop that has since closed (`asyncio.run` gave up before
    its first token) has its tokens dropped, not the engine's thread killed: it still ends
    with its tokens, and the next request is served."""
    _, llm = tiny
    prompt, other = random_prompts(llm.cfg.vocab_size, (7, 5), seed=3)
    s = SamplingParams(max_new_tokens=6, stop_token_ids=())

    async def abandon(request):  # starts reading the stream, then leaves
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(anext(request.stream()), 0.05)

    with Engine(llm, max_batch=2) as engine:
        with engine.hold():  # no token comes before the loop has closed
            request = engine.submit(prompt, s)
            asyncio.run(abandon(request))
        assert request.result(timeout=60) == alone(llm, prompt, s)
        assert engine.submit(other, s).result(timeout=60) == alone(llm, other, s)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_program_that_fails_with_the_cache_leaves_the_engine_serving(tiny, monkeypatch):
    """A decode launch that fails after taking the cache with it (a device fault: the donated
    cache is gone, and a failed program's outputs fail whatever reads them) fails the requests
    it was running; the engine goes on from an empty cache, and the next request gets
    `generate`'s tokens."""
    _, llm = tiny
    first_prompt, prompt = random_prompts(llm.cfg.vocab_size, (6, 9), seed=15)
    s = SamplingParams(max_new_tokens=6, stop_token_ids=())
    with Engine(llm, max_batch=2) as engine:
        programs = engine.runner.stages[0].programs
        run, failed = programs.run, []

        def failing(name, build, static, args, **kwargs):
            if name == "slots_step" and not failed:
                failed.append(name)
                args[1].k.delete()
                args[1].v.delete()
                raise RuntimeError("a device fault")
            return run(name, build, static, args, **kwargs)
        monkeypatch.setattr(programs, "run", failing)
        first = engine.submit(first_prompt, s)
        with pytest.raises(RuntimeError, match="a device fault"):
            first.result(timeout=60)
        assert engine.submit(prompt, s).result(timeout=60) == alone(llm, prompt, s)


def test_a_fault_the_loop_does_not_catch_ends_every_request_with_it(tiny, monkeypatch):
    """A bug in the loop (here its planning raises, in the first round after a request's first
    token, once it has queued another) stops the engine rather than leaving requests waiting
    forever: the decoding and the queued request end with the fault, `fault` holds it,
    `submit` names it, the gauges read nothing left, and shutdown returns."""
    _, llm = tiny
    first, second = random_prompts(llm.cfg.vocab_size, (9, 4), seed=21)
    s = SamplingParams(max_new_tokens=80, stop_token_ids=())
    fault = RuntimeError("a bug in the plan")
    engine = Engine(llm, max_batch=2)
    plan, submitted = engine._plan, []

    def faulty():
        if submitted and submitted[0].token_ids:  # decoding: queue one more, then fail
            submitted.append(engine.submit(second, s))
            raise fault
        return plan()

    monkeypatch.setattr(engine, "_plan", faulty)
    submitted.append(engine.submit(first, s))
    while len(submitted) < 2:
        time.sleep(0.01)
    for request in submitted:
        with pytest.raises(RuntimeError, match="a bug in the plan"):
            request.result(timeout=60)
    assert engine.fault is fault and engine.queued == engine.running == 0
    with pytest.raises(RuntimeError, match=r"the engine stopped on a fault: "
                                           r"RuntimeError\('a bug in the plan'\)"):
        engine.submit(second, s)
    engine.shutdown()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_fault_while_admitting_ends_every_request_of_the_round(tiny, monkeypatch):
    """A fault in the middle of a round's admissions (here reading the third request's
    sampling) ends every request the round took from the queue: the long prompt admitted to
    run in chunks, the long prompt it deferred (one prompt in chunks at a time) and the one
    being admitted. None is lost between the queue and the slots."""
    import jax_sp.serving

    _, llm = tiny
    prompts = random_prompts(llm.cfg.vocab_size, (20, 24, 4), seed=22)
    s, broken = (SamplingParams(max_new_tokens=4, stop_token_ids=()) for _ in range(2))
    asdict = jax_sp.serving.dataclasses.asdict

    def failing(obj, *args, **kwargs):  # only the marked request's sampling fails
        if obj is broken:
            raise RuntimeError("unreadable sampling")
        return asdict(obj, *args, **kwargs)

    monkeypatch.setattr(jax_sp.serving.dataclasses, "asdict", failing)
    engine = Engine(llm, max_batch=3, prefill_chunk=16)
    with engine.hold():  # all three taken in one round
        requests = [engine.submit(p, sampling) for p, sampling in zip(prompts, (s, s, broken))]
    for request in requests:
        with pytest.raises(RuntimeError, match="unreadable sampling"):
            request.result(timeout=60)
    assert engine.queued == engine.running == 0
    engine.shutdown()


def test_seeded_sampling_is_the_request_s_own_whatever_shares_the_batch(tiny):
    _, llm = tiny
    prompt, *others = random_prompts(llm.cfg.vocab_size, (8, 13, 4, 21), seed=7)
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=20, top_p=0.9, seed=11,
                             stop_token_ids=())
    with Engine(llm, max_batch=4) as engine:
        by_itself = engine.submit(prompt, sampled).result(timeout=60)
        crowd = [engine.submit(p, SamplingParams(max_new_tokens=12, temperature=1.3, seed=i,
                                                 stop_token_ids=())) for i, p in enumerate(others)]
        shared = engine.submit(prompt, sampled)
        assert shared.result(timeout=60) == by_itself
        [r.result(timeout=60) for r in crowd]
    assert by_itself == alone(llm, prompt, sampled)


def test_odd_settings_sample_what_generate_samples(tiny):
    """Settings at the edges of what SamplingParams takes: numpy numbers (plain Python ones
    from then on: a multi-process engine sends them as JSON), a top_k past the vocabulary's
    size (top_k 0's tokens; an int32 row would overflow, which stopped the engine for a prompt
    in chunks) and a temperature so small that dividing the logits by it overflows them
    (`generate` keeps it off 0 at 1e-6: the same draws), beside each other in one batch."""
    _, llm = tiny
    short, long_ = random_prompts(llm.cfg.vocab_size, (9, 21), seed=12)
    numpy = SamplingParams(max_new_tokens=6, temperature=np.float32(0.5),
                           top_p=np.float64(0.9), top_k=np.int32(7), seed=np.int64(4),
                           stop_token_ids=())
    assert [type(getattr(numpy, f)) for f in ("temperature", "top_p", "top_k", "seed")] == [
        float, float, int, int]
    wide = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=2 ** 40, seed=5,
                          stop_token_ids=())
    cold = SamplingParams(max_new_tokens=6, temperature=1e-37, seed=6, stop_token_ids=())
    jobs = [(short, numpy), (long_, wide), (short, cold)]
    with Engine(llm, max_batch=4, prefill_chunk=16) as engine:
        got = [r.result(timeout=60) for r in [engine.submit(p, s) for p, s in jobs]]
    assert got == [alone(llm, p, s) for p, s in jobs]
    assert got[1] == alone(llm, long_, dataclasses.replace(wide, top_k=0))


def test_a_cancelled_request_that_waits_ends_at_once(tiny):
    """A request cancelled while it waits (here the engine held: no admissions, as when every
    slot is busy) ends at the next round and leaves the queue; the one running goes on to
    its own tokens."""
    _, llm = tiny
    long_prompt, prompt = random_prompts(llm.cfg.vocab_size, (8, 5), seed=13)
    long_s = SamplingParams(max_new_tokens=60, stop_token_ids=())
    with Engine(llm, max_batch=1) as engine:
        long_r = engine.submit(long_prompt, long_s)
        next(iter(long_r))  # it holds the one slot
        with engine.hold():
            waiting = engine.submit(prompt, SamplingParams(max_new_tokens=4))
            engine.cancel(waiting)
            assert waiting.result(timeout=10) == [] and waiting.finish_reason == "abort"
            assert engine.queued == 0
            deadline = time.time() + 10
            while engine._cancelled and time.time() < deadline:  # nothing left pending
                time.sleep(0.01)
            assert not engine._cancelled
        assert long_r.result(timeout=60) == alone(llm, long_prompt, long_s)


def test_shutdown_drains_a_request_the_loop_is_admitting(tiny, monkeypatch):
    """shutdown(drain=True) while the loop holds a request it took from the queue (neither
    queued nor running then; here until the drain has begun): the loop decides when nothing
    is left, so the request is served, not aborted; submit refuses new ones."""
    from jax_sp.serving import EngineStopped

    _, llm = tiny
    (prompt,) = random_prompts(llm.cfg.vocab_size, (7,), seed=14)
    s = SamplingParams(max_new_tokens=5, stop_token_ids=())
    engine = Engine(llm, max_batch=2)
    get = engine.waiting.get

    def get_as_the_drain_begins(*args, **kwargs):
        item = get(*args, **kwargs)
        deadline = time.time() + 10
        while not (getattr(engine, "_draining", False) or engine._stop) and (
                time.time() < deadline):
            time.sleep(0.005)
        return item
    monkeypatch.setattr(engine.waiting, "get", get_as_the_drain_begins)
    request = engine.submit(prompt, s)
    engine.shutdown(drain=True)
    assert (request.token_ids, request.finish_reason) == (alone(llm, prompt, s), "length")
    with pytest.raises(EngineStopped, match="shut down"):
        engine.submit(prompt, s)


def test_stop_ids_end_a_request_and_bad_input_is_refused_at_submit(tiny):
    _, llm = tiny
    prompt = random_prompts(llm.cfg.vocab_size, (9,), seed=8)[0]
    free = alone(llm, prompt, SamplingParams(max_new_tokens=8, stop_token_ids=()))
    stop = SamplingParams(max_new_tokens=8, stop_token_ids=(free[3],))
    with Engine(llm, max_batch=2) as engine:
        with pytest.raises(ValueError, match="exceeds max_seq_len=96"):
            engine.submit(prompt, SamplingParams(max_new_tokens=90))
        with pytest.raises(TypeError, match="sampling must be a SamplingParams"):
            engine.submit(prompt, {"max_new_tokens": 3})
        r = engine.submit(prompt, stop)  # the engine kept serving
        assert r.result(timeout=60) == free[: free.index(free[3]) + 1] == alone(llm, prompt, stop)
        assert r.finish_reason == "stop"
    with pytest.raises(RuntimeError, match="shut down"):
        engine.submit(prompt, stop)


def test_logprobs_are_the_torch_model_s_and_leave_the_tokens_alone(tiny):
    """Each token's log-probability and its top ones are log_softmax of the HF model's logits
    at that position (teacher-forced on the tokens the engine gave), for a greedy and a sampled
    request in one batch with one that asks for none (and whose tokens stay generate's)."""
    model, llm = tiny
    prompts = random_prompts(llm.cfg.vocab_size, (9, 14, 5), seed=12)
    settings = [SamplingParams(max_new_tokens=6, stop_token_ids=(), logprobs=3),
                SamplingParams(max_new_tokens=5, stop_token_ids=(), temperature=0.9, seed=2,
                               logprobs=0),
                SamplingParams(max_new_tokens=7, stop_token_ids=())]
    with Engine(llm, max_batch=4, steps_per_launch=2) as engine:
        with engine.hold():
            requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
        [r.result(timeout=120) for r in requests]
    for prompt, s, r in zip(prompts, settings, requests):
        assert r.token_ids == alone(llm, prompt, dataclasses.replace(s, logprobs=None))
        if s.logprobs is None:
            assert r.logprobs == []
            continue
        full = prompt + r.token_ids
        ref = torch.log_softmax(torch.tensor(hf_logits(model, [full])[0]), -1).numpy()
        assert len(r.logprobs) == len(r.token_ids)
        for j, (token, (lp, top)) in enumerate(zip(r.token_ids, r.logprobs)):
            want = ref[len(prompt) + j - 1]
            np.testing.assert_allclose(lp, want[token], atol=1e-4)
            assert len(top) == s.logprobs
            order = np.argsort(-want)[: s.logprobs]
            np.testing.assert_allclose([v for _, v in top], want[order], atol=1e-4)
            assert [i for i, _ in top] == order.tolist()
            if s.temperature == 0:
                assert top[0][0] == token


def test_logprobs_bad_values_and_where_they_are_not_served(tiny):
    model, llm = tiny
    with pytest.raises(ValueError, match=r"logprobs must be None or an integer in \[0, 20\]"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="served by the continuous-batching engine"):
        llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2, logprobs=1))
    piped = LLM.from_torch(model, parallel=ParallelConfig(pp=2), max_seq_len=96)
    with Engine(piped, max_batch=2) as engine:
        with pytest.raises(ValueError, match="logprobs need a one-stage engine"):
            engine.submit([1, 2, 3], SamplingParams(max_new_tokens=2, logprobs=1))


def test_sp_on_a_split_mesh_gives_the_single_device_tokens(tiny):
    model, llm = tiny
    sharded = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"), max_seq_len=96)
    prompts = random_prompts(llm.cfg.vocab_size, (7, 19, 3), seed=9)
    s = SamplingParams(max_new_tokens=6, stop_token_ids=())
    with Engine(sharded, max_batch=2) as engine:
        got = [r.result(timeout=120) for r in [engine.submit(p, s) for p in prompts]]
    assert got == [alone(llm, p, s) for p in prompts]


def test_warm_compiles_the_largest_group_when_slots_are_no_power_of_two(hf_models):
    """tp 3 with SP: 4 slots asked for become 6 (rows in threes), and a round that admits 5
    requests is one group padded to 9 rows (8, a power of two, in threes): warm() compiles it
    too, so those requests meet no new program, and each gets `generate`'s tokens."""
    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=3, sp="on"),
                         max_seq_len=32)
    prompts = random_prompts(llm.cfg.vocab_size, (4, 5, 3, 6, 4), seed=16)
    s = SamplingParams(max_new_tokens=4, stop_token_ids=())
    with Engine(llm, max_batch=4) as engine:
        assert engine.slots == 6
        engine.warm()
        programs = engine.runner.stages[0].programs
        compiled = set(programs.compiled)
        with engine.hold():
            requests = [engine.submit(p, s) for p in prompts]
        got = [r.result(timeout=120) for r in requests]
        assert set(programs.compiled) == compiled
    assert engine.prefill_sizes == collections.Counter({5: 1})
    assert got == [alone(llm, p, s) for p in prompts]


def test_an_admission_holds_its_prompts_cache_not_a_whole_row_per_request(hf_models):
    """An admission's prefill makes a cache of its prompts' positions only, not of the engine's
    cache length (at 8B, 16 rows of 8192 positions would be 17 GB on top of the engine's
    cache), and writes those positions alone into its slots: short prompts taken into slots
    that long requests left get `generate`'s tokens."""
    llm = LLM.from_torch(hf_models("llama"), max_seq_len=8192)
    long_prompts = random_prompts(llm.cfg.vocab_size, (40, 33), seed=21)
    short_prompts = random_prompts(llm.cfg.vocab_size, (3, 5), seed=22)
    long_s = SamplingParams(max_new_tokens=30, stop_token_ids=())
    short_s = SamplingParams(max_new_tokens=12, stop_token_ids=())
    with Engine(llm, max_batch=2) as engine:
        for prompts, s in ((long_prompts, long_s), (short_prompts, short_s)):
            with engine.hold():  # each pair admitted together into the two slots
                requests = [engine.submit(p, s) for p in prompts]
            assert [r.result(timeout=120) for r in requests] == [alone(llm, p, s)
                                                                 for p in prompts]
        admits = {key: c for key, c in engine.runner.stages[0].programs.compiled.items()
                  if key[0] == "admit"}
        cache = engine.caches[0].k
    assert engine.prefill_sizes == collections.Counter({2: 2})
    # keys and values of two rows at the engine's cache length
    rows_bytes = 2 * cache.nbytes * 2 // cache.shape[1]
    assert len(admits) == 2
    for key, compiled in admits.items():
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < rows_bytes / 4, (key[1], temp, rows_bytes)


def test_a_request_gone_nan_leaves_its_slot_fit_for_the_next(hf_models):
    """A request whose activations turn NaN (here a token whose embedding is NaN) leaves its
    keys and values in its slot past what a shorter prompt admitted there next writes; the
    cache stores them finite, so the masked positions add nothing and the next request gets
    `generate`'s tokens (0 times a NaN would make its every logit NaN)."""
    import copy

    model = copy.deepcopy(hf_models("llama"))
    bad_token = 7
    with torch.no_grad():
        model.model.embed_tokens.weight[bad_token] = float("nan")
    llm = LLM.from_torch(model, max_seq_len=96)
    bad, short = random_prompts(llm.cfg.vocab_size, (60, 4), seed=23)
    bad[0] = bad_token
    short = [t if t != bad_token else t + 1 for t in short]
    s = SamplingParams(max_new_tokens=10, stop_token_ids=())
    with Engine(llm, max_batch=1) as engine:  # one slot: the next request takes the same
        engine.submit(bad, s).result(timeout=120)
        got = engine.submit(short, s).result(timeout=120)
    assert got == alone(llm, short, s)


@pytest.mark.parametrize("kind,parallel", [("qwen2", ParallelConfig(tp=3, sp="auto")),
                                           ("mistral", ParallelConfig(tp=2)),
                                           ("llama", ParallelConfig(tp=4, attn_dp=2, sp="on"))])
def test_long_prompts_prefilled_in_chunks_get_generate_s_tokens(hf_models, kind, parallel):
    """Prompts longer than prefill_chunk (16) come in chunks of 16, one a round, each attending
    over what the earlier ones left in the slot's cache (a sliding window shorter than the
    prompt, with mistral), beside whole prefills: greedy and seeded sampling give `generate`'s
    tokens, and the log-probabilities of a chunked prompt's tokens are those of the same
    engine without chunks. After warm() nothing compiles (but the log-probabilities' forms)."""
    model = hf_models(kind)
    llm = LLM.from_torch(model, parallel=parallel, max_seq_len=96)
    lengths = (70, 5, 33, 17, 16)
    prompts = random_prompts(llm.cfg.vocab_size, lengths, seed=13)
    settings = [SamplingParams(max_new_tokens=n, stop_token_ids=(), temperature=t, seed=seed,
                               logprobs=lp)
                for n, t, seed, lp in [(9, 0, 0, 2), (12, 0, 0, None), (6, 0.8, 4, None),
                                       (7, 0.9, 1, 1), (5, 0, 0, None)]]
    runs = {}
    for chunk in (16, None):
        with Engine(llm, max_batch=4, prefill_chunk=chunk) as engine:
            if chunk:
                engine.warm()
                programs = engine.runner.stages[0].programs
                compiled = set(programs.compiled)
            requests = [engine.submit(p, s) for p, s in zip(prompts, settings)]
            [r.result(timeout=120) for r in requests]
            runs[chunk] = requests
            if chunk:  # (logprobs' program forms compile when first met)
                assert {k for k in programs.compiled if not k[2][-1]} == compiled
                # 70, 33 and 17 tokens: 5 + 3 + 2 chunks; 16 fits one
                assert engine.chunks == 10 and engine.chunk == 16
    for p, s, r, whole in zip(prompts, settings, runs[16], runs[None]):
        assert r.token_ids == whole.token_ids == alone(llm, p, dataclasses.replace(
            s, logprobs=None))
        assert len(r.logprobs) == len(whole.logprobs) == (len(r.token_ids) if s.logprobs
                                                          is not None else 0)
        for (lp, top), (want_lp, want_top) in zip(r.logprobs, whole.logprobs):
            np.testing.assert_allclose(lp, want_lp, atol=1e-4)
            assert [i for i, _ in top] == [i for i, _ in want_top]


def test_decoding_goes_on_between_a_long_prompt_s_chunks(tiny):
    """A 80-token prompt arrives while a request decodes: its five chunks run one a round with
    a decode launch between each two (the engine's step count, read as each chunk starts,
    grows from chunk to chunk); both requests get `generate`'s tokens. Cancelled while its
    chunks run (as its second chunk starts), a request runs no more of them and frees its slot
    for the next."""
    _, llm = tiny
    running, long_prompt, cancelled, after = random_prompts(llm.cfg.vocab_size,
                                                            (6, 80, 75, 11), seed=14)
    run_s = SamplingParams(max_new_tokens=60, stop_token_ids=())
    long_s = SamplingParams(max_new_tokens=4, stop_token_ids=())
    with Engine(llm, max_batch=2, steps_per_launch=1, prefill_chunk=16) as engine:
        engine.warm()
        steps_at_chunk, next_chunk, cancel = [], engine._next_chunk, []

        def counted():  # the engine's own method, with the step count it starts at
            steps_at_chunk.append(engine.steps)
            if len(steps_at_chunk) == 7:  # the second chunk of the third long prompt
                engine.cancel(cancel[0])
            next_chunk()
        engine._next_chunk = counted
        run_r = engine.submit(running, run_s)
        next(iter(run_r))  # decoding
        long_r = engine.submit(long_prompt, long_s)
        assert long_r.result(timeout=60) == alone(llm, long_prompt, long_s)
        assert len(steps_at_chunk) == 5
        assert all(b > a for a, b in zip(steps_at_chunk, steps_at_chunk[1:])), steps_at_chunk
        with engine.hold():  # admitted once it is in `cancel`
            cancel.append(engine.submit(cancelled, long_s))
        gone = cancel[0]
        assert gone.result(timeout=60) == [] and gone.finish_reason == "abort"
        after_r = engine.submit(after, long_s)  # takes the freed slot
        assert after_r.result(timeout=60) == alone(llm, after, long_s)
        assert run_r.result(timeout=120) == alone(llm, running, run_s)
    assert engine.chunks == 7  # the cancelled prompt's last three chunks did not run


def test_one_prompt_in_chunks_at_a_time_and_the_next_waits_without_a_slot(tiny):
    """Two long prompts and a short one arrive together at two slots: the first long prompt
    holds a slot for its chunks, the second waits without one, so the short request takes the
    other slot and ends before the first long one has its first token; all get `generate`'s
    tokens."""
    _, llm = tiny
    first, second, short = random_prompts(llm.cfg.vocab_size, (70, 50, 5), seed=15)
    long_s = SamplingParams(max_new_tokens=5, stop_token_ids=())
    short_s = SamplingParams(max_new_tokens=3, stop_token_ids=())
    with Engine(llm, max_batch=2, prefill_chunk=16) as engine:
        with engine.hold():
            requests = [engine.submit(p, s) for p, s in ((first, long_s), (second, long_s),
                                                         (short, short_s))]
        got = [r.result(timeout=120) for r in requests]
        assert engine.chunks == 5 + 4
    a, _, c = requests
    assert c.finished < a.submitted + a.first_token_s
    assert got == [alone(llm, p, s) for p, s in ((first, long_s), (second, long_s),
                                                 (short, short_s))]


@pytest.mark.parametrize("parallel", [ParallelConfig(tp=2, pp=2, sp="on"),
                                      ParallelConfig(tp=1, pp=3, microbatches=2)])
def test_a_pipeline_gives_the_single_device_tokens(tiny, parallel):
    """Each stage keeps its layers' cache rows of every slot; a decode step hands the carry
    from stage to stage (SP's scattered residual gathered as generate gathers it)."""
    model, llm = tiny
    piped = LLM.from_torch(model, parallel=parallel, max_seq_len=96)
    prompts = random_prompts(llm.cfg.vocab_size, (7, 19, 3), seed=10)
    settings = [SamplingParams(max_new_tokens=n, stop_token_ids=()) for n in (5, 2, 8)]
    with Engine(piped, max_batch=2) as engine:
        got = [r.result(timeout=120) for r in
               [engine.submit(p, s) for p, s in zip(prompts, settings)]]
    assert got == [alone(llm, p, s) for p, s in zip(prompts, settings)]


def test_a_bad_slot_count_is_refused(tiny):
    with pytest.raises(ValueError, match="max_batch must be a positive integer, got 0"):
        Engine(tiny[1], max_batch=0)
    with pytest.raises(ValueError, match="steps_per_launch must be a positive integer, got 0"):
        Engine(tiny[1], steps_per_launch=0)
    with pytest.raises(ValueError, match="max_prefill_tokens must be a positive integer"):
        Engine(tiny[1], max_prefill_tokens=-1)
    for chunk in (8, 0, 16.0, True):
        with pytest.raises(ValueError, match="prefill_chunk must be an integer of at least 16"):
            Engine(tiny[1], prefill_chunk=chunk)


def test_sample_rows_draws_what_sample_draws_for_each_row():
    """Rows of mixed settings (greedy, temperature, top-k below, at and past the vocabulary,
    top-p) over logits with ties at the top-k cut: each row's token is `sample`'s for that row
    alone with the same key and step; sampled=False is argmax."""
    import jax.numpy as jnp

    from jax_sp.sampling import row_keys, sample, sample_rows

    vocab = 97
    rng = np.random.default_rng(3)
    settings = [(0.0, 0, 1.0), (0.7, 0, 1.0), (1.3, 5, 1.0), (0.9, 0, 0.6), (1.1, 12, 0.8),
                (0.8, vocab, 0.9), (1.0, vocab + 7, 1.0), (0.0, 5, 0.5), (2.0, 1, 1.0)]
    temperature = np.array([s[0] for s in settings], np.float32)
    top_k = np.array([s[1] for s in settings], np.int32)
    top_p = np.array([s[2] for s in settings], np.float32)
    for trial in range(12):
        logits = rng.normal(size=(len(settings), vocab)).astype(np.float32)
        logits[:, 3:9] = logits[:, 2:3]  # ties, some at the top-k cut
        logits = jnp.asarray(np.round(logits, 1))
        keys = row_keys(trial, len(settings))
        steps = np.arange(len(settings), dtype=np.int32) + trial
        got = np.asarray(sample_rows(logits, keys, steps, temperature, top_k, top_p,
                                     sampled=True))
        want = [int(sample(logits[b:b + 1], keys[b:b + 1], int(steps[b]), float(t), float(p),
                           greedy=t == 0, top_k=int(k))[0])
                for b, (t, k, p) in enumerate(settings)]
        assert got.tolist() == want, trial
        greedy = sample_rows(logits, keys, steps, temperature, top_k, top_p, sampled=False)
        assert np.asarray(greedy).tolist() == np.argmax(np.asarray(logits), -1).tolist()


def test_engine_programs_have_no_data_dependent_control_flow(tiny):
    """Every program the engine launches (admissions, and decode launches for greedy and for
    sampled requests) is straight-line apart from loops of known trip count: on GPU a
    conditional or a loop whose predicate lives on the device is read back by the host, which
    then cannot run a launch ahead of the device."""
    _, llm = tiny
    with Engine(llm, max_batch=2) as engine:
        for sampling in (SamplingParams(max_new_tokens=5, stop_token_ids=()),
                         SamplingParams(max_new_tokens=5, temperature=0.8, stop_token_ids=())):
            engine.submit([3, 4, 5], sampling).result(timeout=120)
        programs = engine.runner.stages[0].programs.compiled
        # the decode launch in its greedy and its sampled form (key[1]: the Static)
        assert {key[1].greedy for key in programs if key[0] == "slots_step"} == {True, False}
        assert any(key[0] == "admit" for key in programs)
        for key, compiled in programs.items():
            if key[0] not in ("slots_step", "admit"):
                continue
            text = compiled.as_text()
            assert " conditional(" not in text, key[:2]
            loops = [line for line in text.splitlines() if " while(" in line]
            assert all("known_trip_count" in line for line in loops), key[:2]
