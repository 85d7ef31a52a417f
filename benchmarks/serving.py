"""Continuous batching against static batches: a mixed-length workload arriving at several
request rates, served by jax_sp.serving.Engine and by `generate` on batches of whatever has
arrived (the static way: a batch starts when the previous one ends and returns when its
longest request ends).

Per mode and rate: output tokens per second over the whole run, time to the first token,
time per output token and end-to-end latency (p50 / p99 over the requests), and the engine's
mean slot occupancy. Static batches are credited with their first tokens at the end of their
prefill (`last_stats.prefill_s`) and each request with its last token at its own step of the
batch's decode, although `generate` returns them all at its end. Static batches form by arrival
times, so each rate runs them once unmeasured first to compile the shapes they meet; the
engine's shapes do not depend on the arrivals (`Engine.warm()` compiles every admission), so
each engine setting warms once. A measured run can still meet a new shape: the compile time
inside it is reported with it (`compile_s_inside`). With several rates, the throughput at
equal p99 latency (the vLLM paper's comparison): at each static point, the engine's throughput
at the static batches' p99 time to first token and p99 latency there, interpolated along the
engine's own rates (`at_equal_latency`), and a plot of throughput against p99 latency. The
limits, measured in the same run: every slot busy, tokens per second of the engine's decode
steps (prefills excluded); the engine's step in milliseconds, with its host work and launched
back to back without it; `generate`'s decode step on a batch of the same size and cache length.
Random weights in the model's shape, greedy, no stop ids (each request decodes exactly its
output length). Result: benchmarks/results/serving_<machine>_<model>.jsonl.

    python benchmarks/serving.py --model llama3-8b --rates 1,4,16 --requests 128   # GPU
    python benchmarks/serving.py --tiny                                            # CPU plumbing
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import time

import common


def workload(rng, n, rate, prompt_lens, output_lens, vocab):
    """n requests: (arrival s, prompt ids, output length), Poisson arrivals at `rate`/s."""
    t, out = 0.0, []
    for _ in range(n):
        t += rng.exponential(1 / rate)
        prompt = rng.integers(0, vocab, rng.integers(*prompt_lens, endpoint=True)).tolist()
        out.append((t, prompt, int(rng.integers(*output_lens, endpoint=True))))
    return out


def pct(values, q):
    """The q-quantile by nearest rank: the smallest value with at least q of them at or
    below it (p99 of 100 values is the 99th, p50 of an even count the lower median)."""
    values = sorted(values)
    return values[max(0, math.ceil(q * len(values)) - 1)] if values else None


def continuous(llm, jobs, max_batch, steps_per_launch=4, max_prefill_tokens=2048,
               prefill_chunk=2048):
    from jax_sp import SamplingParams
    from jax_sp.serving import Engine

    with Engine(llm, max_batch=max_batch, steps_per_launch=steps_per_launch,
                max_prefill_tokens=max_prefill_tokens, prefill_chunk=prefill_chunk) as engine:
        engine.warm()  # every admission shape: none compiles inside the measured run
        steps0, compiled0 = engine.steps, llm.runner.compile_s()
        start, requests = time.perf_counter(), []
        for arrival, prompt, n in jobs:
            delay = start + arrival - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            requests.append(engine.submit(prompt, SamplingParams(max_new_tokens=n,
                                                                 stop_token_ids=())))
        for r in requests:
            r.result()
        finish = max(r.finished for r in requests)
        steps = engine.steps - steps0
        compiled = llm.runner.compile_s() - compiled0
    tokens = sum(len(r.token_ids) for r in requests)
    # from each request's arrival, as the static batches are timed (a submit that came late,
    # the loop busy, counts against the engine)
    arrived = [start + arrival for arrival, _, _ in jobs]
    first = [r.submitted + r.first_token_s for r in requests]
    tpot = [(r.finished - f) / (len(r.token_ids) - 1)
            for r, f in zip(requests, first) if len(r.token_ids) > 1]
    return {"tokens": tokens, "seconds": finish - start,
            "ttft": [f - a for f, a in zip(first, arrived)], "tpot": tpot,
            "latency": [r.finished - a for r, a in zip(requests, arrived)],
            "compile_s": compiled,  # inside the measured run (after the engine's warm())
            "occupancy": (tokens - len(requests)) / max(steps, 1) / engine.slots,
            "steps": steps,
            "prefill_chunks": engine.chunks,
            "prefill_groups": {str(k): v for k, v in sorted(engine.prefill_sizes.items())}}


def static(llm, jobs, max_batch):
    from jax_sp import SamplingParams

    start, i, ttft, tpot, latency, tokens = time.perf_counter(), 0, [], [], [], 0
    while i < len(jobs):
        now = time.perf_counter() - start
        if jobs[i][0] > now:
            time.sleep(jobs[i][0] - now)
            now = jobs[i][0]
        batch = [j for j in jobs[i:i + max_batch] if j[0] <= now] or [jobs[i]]
        i += len(batch)
        longest = max(n for _, _, n in batch)
        t0 = time.perf_counter() - start
        llm.generate([p for _, p, _ in batch],
                     SamplingParams(max_new_tokens=longest, stop_token_ids=()))
        t1 = time.perf_counter() - start
        first = t0 + llm.last_stats.prefill_s
        step = (t1 - first) / max(longest - 1, 1)
        for arrival, _, n in batch:
            ttft.append(first - arrival)
            # credited with its own last token, not with the batch's end, when generate
            # returns it
            latency.append(first + (n - 1) * step - arrival)
            if n > 1:
                tpot.append(step)
            tokens += n
    return {"tokens": tokens, "seconds": time.perf_counter() - start, "ttft": ttft,
            "tpot": tpot, "latency": latency, "occupancy": None}


def ceiling(llm, max_batch, steps_per_launch=4, steps=32, temperature=0.0):
    """The engine with every slot decoding, prefills excluded: tokens per second over `steps`
    steps once every slot holds a request of 4 prompt tokens (the throughput limit of the
    engine), next to `generate`'s decode of a batch of the same size (prompts of 128 tokens,
    so it attends 130-160 keys a step against the engine's 5-40, in a cache of its own), and
    the engine's step program launched back to back without the host's per-step work (device
    time)."""
    from jax_sp import SamplingParams
    from jax_sp.serving import Engine

    steps = min(steps, (llm.max_seq_len - 8) // 3)
    with Engine(llm, max_batch=max_batch, steps_per_launch=steps_per_launch) as engine:
        device_ms = step_device_ms(engine, steps)
        sampling = SamplingParams(max_new_tokens=steps + 2, stop_token_ids=(),
                                  temperature=temperature, top_k=50 if temperature else 0,
                                  top_p=0.9 if temperature else 1.0)
        # a launch in this form first, so that its compile falls outside the measurement
        engine.submit([1, 2, 3, 4], dataclasses.replace(
            sampling, max_new_tokens=steps_per_launch + 1)).result()
        with engine.hold():  # admitted together: every slot starts decoding at one step
            requests = [engine.submit([1, 2, 3, 4], sampling) for _ in range(engine.slots)]
        while not all(r.token_ids for r in requests):  # every prefill done
            time.sleep(0.001)
        t0, n0 = time.perf_counter(), sum(len(r.token_ids) for r in requests)
        for r in requests:  # the rest decode together, every slot busy; waited on, not polled
            r.result()
        t1 = max(r.finished for r in requests)
        tokens = sum(len(r.token_ids) for r in requests) - n0
        slots = engine.slots
    prompts = [[1 + i % 7] * min(128, llm.max_seq_len - steps - 2) for i in range(slots)]
    llm.generate(prompts, SamplingParams(max_new_tokens=steps + 1, stop_token_ids=()))
    llm.generate(prompts, SamplingParams(max_new_tokens=steps + 1, stop_token_ids=()))
    gen_ms = llm.last_stats.decode_s / steps * 1e3
    step_ms = (t1 - t0) / (tokens / slots) * 1e3
    return {"all_slots_tokens_per_s": tokens / (t1 - t0), "slots": slots,
            "engine_step_ms": step_ms, "engine_step_device_ms": device_ms,
            "generate_step_ms": gen_ms, "cache_len": engine.cache_len}


@contextlib.contextmanager
def traced(python_tracer: bool = False):
    """jax.profiler over the block; the list it yields holds the trace (ProfileData) after."""
    import glob
    import tempfile

    import jax
    from jax.profiler import ProfileData

    folder, out = tempfile.mkdtemp(), []
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = int(python_tracer)
    with jax.profiler.trace(folder, profiler_options=options):
        yield out
    out.append(ProfileData.from_file(glob.glob(os.path.join(folder, "**", "*.xplane.pb"),
                                               recursive=True)[0]))


def profile(llm, max_batch, steps_per_launch=4, steps=64, python_tracer=True):
    """Where the engine's step goes with every slot decoding: a jax.profiler trace of `steps`
    steps after a warm round, read per launch: the engine thread's time
    in each of its functions (`_launch` issues a launch, `_collect` reads the one before, and
    waits for it in `to_host`; `_plan` / `_apply` are the round's bookkeeping) and, on the
    device, each executed program's time, the kernels' busy time and the idle gaps between
    them. The Python tracer slows the host (its times are upper bounds, and it can open gaps
    on the device that an untraced run does not have): `python_tracer=False` traces the
    device alone."""
    import collections

    from jax_sp import SamplingParams
    from jax_sp.serving import Engine

    steps = min(steps, (llm.max_seq_len - 8) // 3)
    sampling = SamplingParams(max_new_tokens=steps + 2, stop_token_ids=())
    with Engine(llm, max_batch=max_batch, steps_per_launch=steps_per_launch) as engine:
        for tracing in (False, True):  # a warm round, then the traced one
            steps0 = engine.steps
            with engine.hold():  # admitted together: every slot decodes from one step on
                requests = [engine.submit([1, 2, 3, 4], sampling) for _ in range(engine.slots)]
            with (traced(python_tracer) if tracing else contextlib.nullcontext()) as trace:
                t0 = time.perf_counter()
                for r in requests:
                    r.result()
                wall = time.perf_counter() - t0
        launches = (engine.steps - steps0) // steps_per_launch
    data = trace[0]
    host = collections.defaultdict(lambda: [0, 0])
    for plane in data.planes:
        if plane.name != "/host:CPU":
            continue
        for line in plane.lines:
            for ev in line.events:
                name = ev.name.split(" ")[-1]
                if (ev.name.startswith("$serving.py") and name.startswith("_")
                        or name == "to_host"):  # the engine thread's functions
                    host[name][0] += ev.duration_ns
                    host[name][1] += 1
    lines, kernels = device_kernels(data)
    busy, idle, _ = busy_and_gaps(kernels)
    end = max((b for _, b, _ in kernels), default=0)
    span = (end - min(a for a, _, _ in kernels)) if kernels else 0
    return {"steps_per_launch": steps_per_launch, "slots": engine.slots,
            "python_tracer": python_tracer, "traced_wall_s": wall,
            "launches": launches,
            "host_ms_per_launch": {k: v[0] / 1e6 / max(launches, 1) for k, v in host.items()},
            "host_calls": {k: v[1] for k, v in host.items()},
            "device_lines": lines,
            # the device's kernels over the traced steps: busy and idle ms per launch, and the
            # idle gaps of over 50 us (where the device waited for the host)
            "device_busy_ms_per_launch": busy / 1e6 / max(launches, 1),
            "device_span_ms_per_launch": span / 1e6 / max(launches, 1),
            "device_idle_gaps_over_50us": {
                "count": sum(g > 50e3 for g in idle),
                "total_ms": sum(g for g in idle if g > 50e3) / 1e6,
                "largest_ms": max(idle, default=0) / 1e6}}


def device_kernels(data):
    """The kernels of a trace (jax.profiler.ProfileData): ({line: events}, [(start ns, end ns,
    program)]), program being the kernel's XLA module (jit_<name>: jax_sp.runtime names each
    program's). On GPU the device planes' stream lines; where there are none (XLA:CPU) the
    host threads' events that name an XLA module."""
    lines, kernels = {}, []

    def add(plane, line, events):
        lines[f"{plane.name} {line.name}"] = len(events)
        for ev in events:
            stats = dict(ev.stats)
            kernels.append((ev.start_ns, ev.start_ns + ev.duration_ns,
                            str(stats.get("hlo_module", "?"))))

    for plane in data.planes:
        if plane.name.startswith("/device:"):
            for line in plane.lines:
                if line.name.startswith("Stream"):
                    add(plane, line, list(line.events))
    if not kernels:
        for plane in data.planes:
            if plane.name == "/host:CPU":
                for line in plane.lines:
                    if line.name.startswith("tf_XLA"):
                        add(plane, line, [ev for ev in line.events
                                          if any(k == "hlo_module" for k, _ in ev.stats)])
    return lines, kernels


def busy_and_gaps(kernels, over_ns=50e3):
    """The union of the kernels' spans (busy ns), every idle gap between them (ns), and the
    gaps longer than `over_ns` as (ns, program before, program after)."""
    busy, idle, long, end, before = 0, [], [], None, None
    for a, b, name in sorted(kernels):
        if end is not None and a > end:
            idle.append(a - end)
            if a - end > over_ns:
                long.append((a - end, before, name))
        if end is None or a > end:
            busy += b - a
            end, before = b, name
        elif b > end:
            busy += b - end
            end, before = b, name
    return busy, idle, long


def workload_trace(llm, jobs, max_batch, steps_per_launch=4, max_prefill_tokens=2048,
                   prefill_chunk=2048):
    """Where a workload's time goes: `continuous` once to compile and warm, then again under
    jax.profiler (the Python tracer off), read per program from the device's kernels: each
    program's kernel time, the device's busy time against the run's wall time, and the idle
    gaps over 50 us by the programs on either side (a gap before an admission is the host
    planning it; after a launch, the host reading its tokens). The trace spans the engine's
    start too (its cache made, `warm()`'s one run of its join program): a few ms. One device's
    kernels (on several, their timelines would be merged)."""
    import collections

    run = functools.partial(continuous, steps_per_launch=steps_per_launch,
                            max_prefill_tokens=max_prefill_tokens, prefill_chunk=prefill_chunk)
    run(llm, jobs, max_batch)
    with traced() as trace:
        r = run(llm, jobs, max_batch)
    _, kernels = device_kernels(trace[0])
    busy, idle, long = busy_and_gaps(kernels)
    per = collections.defaultdict(lambda: [0, 0])
    for a, b, name in kernels:
        per[name][0] += b - a
        per[name][1] += 1
    gaps = collections.defaultdict(lambda: [0, 0])
    for ns, before, after in long:
        gaps[f"{before} -> {after}"][0] += ns
        gaps[f"{before} -> {after}"][1] += 1
    step = per.get("jit_slots_step", [0])[0] / 1e6 / max(r["steps"], 1)
    return {"requests": len(jobs), "tokens": r["tokens"], "wall_s": r["seconds"],
            "tokens_per_s": r["tokens"] / r["seconds"], "occupancy": r["occupancy"],
            "steps": r["steps"], "slots_step_device_ms_per_step": step,
            "prefill_groups": r["prefill_groups"], "kernels": len(kernels),
            "device_busy_s": busy / 1e9, "device_idle_s": sum(idle) / 1e9,
            "program_kernel_s": {k: round(v[0] / 1e9, 4) for k, v in
                                 sorted(per.items(), key=lambda kv: -kv[1][0])},
            "program_kernels": {k: v[1] for k, v in per.items()},
            "idle_gaps_over_50us": {k: {"s": round(v[0] / 1e9, 4), "count": v[1]} for k, v in
                                    sorted(gaps.items(), key=lambda kv: -kv[1][0])}}


def slots_launcher(engine):
    """A launch of the engine's step program (greedy form, one stage) outside its loop, with
    the slots' rows put on the device once: launch(tokens) -> (tokens [steps, B], the last
    [B]), the engine's cache updated in place."""
    from jax_sp.slots import slots_step_fn

    runner, k = engine.runner, engine.steps_per_launch
    st, static = runner.stages[0], engine.statics[False]
    rows = runner.put(0, (engine.pos, engine.keys, engine.step, engine.temperature,
                          engine.top_k, engine.top_p))

    def launch(x):
        (tokens, x, _), engine.caches[0], *_ = st.programs.run(
            "slots_step", lambda: slots_step_fn(st.runtime, static, engine.cache_len, k),
            static, (st.state, engine.caches[0], x, *rows), variant=(k, False))
        return tokens, x
    return launch


def step_device_ms(engine, n):
    """The engine's step program on every slot, about `n` steps launched back to back with the
    inputs already on the device and one wait at the end: ms per step (one-stage models; None
    otherwise)."""
    import jax

    if len(engine.runner.stages) != 1:
        return None
    one, k = slots_launcher(engine), engine.steps_per_launch
    x = engine.runner.put(0, engine.tokens)

    def launch(x, count):
        for _ in range(count):
            _, x = one(x)
        return jax.block_until_ready(x)

    x = launch(x, 2)  # compiled, warm
    launches = max(1, n // k)
    t0 = time.perf_counter()
    launch(x, launches)
    return (time.perf_counter() - t0) / (launches * k) * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--rates", default="1,4,16", help="requests per second")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--prompt-lens", default="16,1024")
    ap.add_argument("--output-lens", default="16,256")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quantization", default=None,
                    help="fp8 or fp8-head: the model's projections (and LM head) in FP8, "
                         "docs/fp8.md; file name suffix _<quantization>")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model, CPU-sized workload")
    ap.add_argument("--layers", type=int, default=None,
                    help="the model's first N layers only (a profile's shorter load)")
    ap.add_argument("--tag", default="", help="file name suffix (a second workload)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps-per-launch", default="4",
                    help="Engine(steps_per_launch=...), one or more (comma-separated)")
    ap.add_argument("--max-prefill-tokens", default="2048",
                    help="Engine(max_prefill_tokens=...), one or more (comma-separated; 1: "
                         "each request prefilled alone)")
    ap.add_argument("--prefill-chunk", default="2048",
                    help="Engine(prefill_chunk=...), one or more (comma-separated; 0: every "
                         "prompt whole)")
    ap.add_argument("--temperatures", default="0",
                    help="the limits' requests at each of these temperatures (above 0: sampled "
                         "with top-k 50 and top-p 0.9, the engine's sampling form; 0: greedy)")
    ap.add_argument("--limits-only", action="store_true",
                    help="only the limits: the engine's step against generate's")
    ap.add_argument("--profile", action="store_true",
                    help="only a profile of the engine's steps with every slot busy "
                         "(`profile`)")
    ap.add_argument("--trace-workload", action="store_true",
                    help="only a trace of the engine serving the workload (at the first rate "
                         "and the first value of each engine setting): device time per "
                         "program and the idle gaps between them (`workload_trace`)")
    args = ap.parse_args()
    if args.tiny:
        args.rates, args.requests, args.max_batch = "20,80", 24, 8
        args.prompt_lens, args.output_lens, args.dtype = "4,40", "2,16", "float32"

    import jax
    import numpy as np

    from generation import hf_module
    from jax_sp import LLM, ParallelConfig
    from jax_sp.presets import preset
    from jax_sp.serving import slot_count

    cfg = preset(args.model)
    if args.tiny:
        cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=1024, hidden_size=64,
                                  intermediate_size=128, num_heads=4, num_kv_heads=2,
                                  head_dim=16)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    module = hf_module(cfg, args.dtype, device)
    plens = [int(x) for x in args.prompt_lens.split(",")]
    olens = [int(x) for x in args.output_lens.split(",")]
    llm = LLM.from_torch(module, parallel=ParallelConfig(tp=1), dtype=args.dtype,
                         max_seq_len=plens[1] + olens[1] + 16, quantization=args.quantization)
    del module
    tag = common.machine().split(" ", 1)[1].split()[-1].lower()
    args.tag = args.tag or ("_profile" if args.profile else
                            "_trace" if args.trace_workload else "")
    quant = f"_{args.quantization}" if args.quantization else ""
    name = f"serving_{tag}_{'tiny' if args.tiny else args.model}{quant}{args.tag}.jsonl"
    out = args.out or os.path.join(common.RESULTS, name)
    res = common.Results(out, machine=common.machine(), model=args.model, tiny=args.tiny,
                         max_batch=args.max_batch, prompt_lens=plens, output_lens=olens,
                         quantization=args.quantization)
    launches = [int(k) for k in args.steps_per_launch.split(",")]
    if args.profile:
        for k in launches:
            for python_tracer in (False, True):
                res.emit({"bench": "profile", **profile(llm, args.max_batch, k,
                                                        python_tracer=python_tracer)})
        return
    if args.trace_workload:
        rate = float(args.rates.split(",")[0])
        jobs = workload(np.random.default_rng(0), args.requests, rate, plens, olens,
                        cfg.vocab_size)
        chunk = int(args.prefill_chunk.split(",")[0]) or None
        res.emit({"bench": "workload_trace", "rate": rate, "steps_per_launch": launches[0],
                  "max_prefill_tokens": int(args.max_prefill_tokens.split(",")[0]),
                  "prefill_chunk": chunk,
                  **workload_trace(llm, jobs, args.max_batch, launches[0],
                                   int(args.max_prefill_tokens.split(",")[0]), chunk)})
        return
    for k in launches:
        for temperature in [float(t) for t in args.temperatures.split(",")]:
            res.emit({"bench": "limits", "steps_per_launch": k, "temperature": temperature,
                      **ceiling(llm, args.max_batch, k, temperature=temperature)})
    if args.limits_only:
        return
    rates = [float(r) for r in args.rates.split(",")]
    budgets = [int(b) for b in args.max_prefill_tokens.split(",")]
    chunks = [int(c) or None for c in args.prefill_chunk.split(",")]
    modes = [("continuous", k, b, c, functools.partial(
                 continuous, steps_per_launch=k, max_prefill_tokens=b, prefill_chunk=c))
             for k in launches for b in budgets for c in chunks]
    modes.append(("static", None, None, None, static))
    # the engine's shapes do not depend on the arrivals (Engine.warm() compiles every
    # admission): each setting warms once, on the first requests of the highest rate's workload
    for _, _, _, _, run in modes[:-1]:
        run(llm, workload(np.random.default_rng(0), args.requests, max(rates), plens, olens,
                          cfg.vocab_size)[:4 * args.max_batch], args.max_batch)
    served = []
    slots = slot_count(llm, args.max_batch)  # static batches: up to as many requests
    for rate in rates:
        jobs = workload(np.random.default_rng(0), args.requests, rate, plens, olens,
                        cfg.vocab_size)
        for mode, k, budget, chunk, run in modes:
            if mode == "static":  # its batch shapes form by arrival times: every rate warms
                run(llm, jobs, slots)
            c0 = llm.runner.compile_s()
            r = run(llm, jobs, slots if mode == "static" else args.max_batch)
            # shapes the warm run did not meet (the engine's own count excludes its warm())
            r.setdefault("compile_s", llm.runner.compile_s() - c0)
            served.append(res.emit({
                "bench": "serving", "mode": mode, "steps_per_launch": k,
                "max_prefill_tokens": budget, "prefill_chunk": chunk, "rate": rate,
                "requests": len(jobs), "tokens_per_s": r["tokens"] / r["seconds"],
                "ttft_p50_s": pct(r["ttft"], 0.5), "ttft_p99_s": pct(r["ttft"], 0.99),
                "tpot_p50_s": pct(r["tpot"], 0.5), "tpot_p99_s": pct(r["tpot"], 0.99),
                "latency_p50_s": pct(r["latency"], 0.5),
                "latency_p99_s": pct(r["latency"], 0.99),
                "occupancy": r["occupancy"], "seconds": r["seconds"],
                "prefill_groups": r.get("prefill_groups"),
                "prefill_chunks": r.get("prefill_chunks"),
                "compile_s_inside": r["compile_s"]}))
    if len(rates) > 1:
        for row in at_equal_latency(served):
            res.emit(row)
        plot(served, out.replace(".jsonl", ".png"))


def throughput_at(points, latency):
    """The throughput a mode sustains with its p99 latency at most `latency`, from its
    [(p99 s, tokens/s)] in rising rate order: the most of the rates while the p99 stays within
    and of the linear interpolation to the first rate past it. (tokens/s, False), or (the most
    measured, True) when no rate passes `latency` (a lower bound), or (None, False) when the
    lowest rate already does."""
    prev, best = None, None
    for lat, tps in points:
        if lat > latency:
            if prev is None:
                return None, False
            return max(best, prev[1] + (tps - prev[1]) * (latency - prev[0])
                       / (lat - prev[0])), False
        prev, best = (lat, tps), tps if best is None else max(best, tps)
    return best, True


def setting(r):
    return (r["steps_per_launch"], r["max_prefill_tokens"], r["prefill_chunk"])


def at_equal_latency(rows):
    """Throughput at equal p99 latency (the comparison of the vLLM paper): at each rate the
    static batches were measured at, each engine setting's throughput at the static batches'
    p99 time to first token and p99 end-to-end latency there, interpolated along the engine's
    own rates (`throughput_at`), and the ratio."""
    static = sorted((r for r in rows if r["mode"] == "static"), key=lambda r: r["rate"])
    out = []
    for key in dict.fromkeys(setting(r) for r in rows if r["mode"] == "continuous"):
        engine = sorted((r for r in rows if r["mode"] == "continuous" and setting(r) == key),
                        key=lambda r: r["rate"])
        for metric in ("ttft_p99_s", "latency_p99_s"):
            points = [(r[metric], r["tokens_per_s"]) for r in engine]
            for s in static:
                tps, bound = throughput_at(points, s[metric])
                out.append({"bench": "at_equal_latency", "metric": metric,
                            "steps_per_launch": key[0], "max_prefill_tokens": key[1],
                            "prefill_chunk": key[2], "rate": s["rate"],
                            "latency_s": s[metric], "static_tokens_per_s": s["tokens_per_s"],
                            "continuous_tokens_per_s": tps, "at_least": bound,
                            "ratio": tps / s["tokens_per_s"] if tps else None})
    return out


def plot(rows, path):
    """Tokens per second against p99 time to first token and p99 latency, a line per mode
    (each point a rate)."""
    plt = common.pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in zip(axes, ("ttft_p99_s", "latency_p99_s"),
                                 ("p99 time to first token, s", "p99 end-to-end latency, s")):
        for key in dict.fromkeys((r["mode"], setting(r)) for r in rows):
            pts = sorted((r for r in rows if (r["mode"], setting(r)) == key),
                         key=lambda r: r["rate"])
            name = ("static generate batches" if key[0] == "static" else
                    f"continuous, {key[1][0]} steps a launch")
            ax.plot([r[metric] for r in pts], [r["tokens_per_s"] for r in pts], "o-",
                    label=name)
            for r in pts:
                ax.annotate(f"{r['rate']:g}/s", (r[metric], r["tokens_per_s"]),
                            textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("output tokens/s")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{rows[0]['machine']}, {rows[0]['model']}: throughput against p99 latency "
                 "(a point per request rate)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
