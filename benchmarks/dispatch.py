"""Whether launching a program returns before the device has run it: the serving engine's
step launch and the programs it is made of, timed from the call to its return (dispatch) and to
its outputs being ready. An asynchronous launch returns in well under the program's time; one
that returns only when its outputs are ready leaves the host's work between launches exposed.

Cases, each launched back to back (every launch's inputs the previous one's outputs):
- engine: the serving engine's loop with every slot decoding, each `_launch` timed and whether
  its tokens were ready when it returned (`is_ready()` right after the call);
- slots_step: the engine's step program (KV cache donated), called directly;
- slots_step, no donation: the same function jitted without donating the cache;
- decode_step: `generate`'s per-token step program (cache donated).

Random weights in the model's shape (`--layers` fewer layers keep the load short; dispatch
does not depend on the depth). Result: benchmarks/results/dispatch_<machine>_<model>.jsonl.

    python benchmarks/dispatch.py --model llama3-8b --layers 8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import common


def timed(call, n):
    """[(ms to return, ms to ready, ready at return)] of n chained calls; call(prev) -> out,
    whose first leaf is waited on."""
    import jax

    out, rows = call(None), []
    jax.block_until_ready(out)
    for _ in range(n):
        t0 = time.perf_counter()
        out = call(out)
        t1 = time.perf_counter()
        leaf = jax.tree.leaves(out)[0]
        ready_at_return = leaf.is_ready()
        jax.block_until_ready(out)
        rows.append(((t1 - t0) * 1e3, (time.perf_counter() - t0) * 1e3, ready_at_return))
    return rows


def summary(rows):
    ret, ready, flags = zip(*rows)
    return {"return_ms_median": statistics.median(ret), "ready_ms_median": statistics.median(ready),
            "ready_at_return": sum(flags) / len(flags), "launches": len(rows)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--slots", type=int, default=32)
    ap.add_argument("--steps-per-launch", type=int, default=4)
    ap.add_argument("--launches", type=int, default=20)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import numpy as np

    from generation import hf_module
    from serving import slots_launcher
    from jax_sp import LLM, SamplingParams
    from jax_sp.generate import Static, decode_step_fn
    from jax_sp.presets import preset
    from jax_sp.sampling import row_keys
    from jax_sp.serving import Engine
    from jax_sp.slots import slots_step_fn

    cfg = dataclasses.replace(preset(args.model), num_layers=args.layers)
    device = "cuda" if jax.default_backend() == "gpu" else "cpu"
    llm = LLM.from_torch(hf_module(cfg, args.dtype, device), dtype=args.dtype, max_seq_len=512)
    tag = common.machine().split(" ", 1)[1].split()[-1].lower()
    out = args.out or os.path.join(common.RESULTS, f"dispatch_{tag}_{args.model}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__, model=args.model,
                         layers=args.layers, slots=args.slots, dtype=args.dtype,
                         steps_per_launch=args.steps_per_launch)
    k = args.steps_per_launch

    with Engine(llm, max_batch=args.slots, steps_per_launch=k) as engine:
        launches = []
        original = engine._launch

        def launch():
            t0 = time.perf_counter()
            result = original()
            t1 = time.perf_counter()
            launches.append(((t1 - t0) * 1e3, result[0].is_ready()))
            return result

        engine._launch = launch
        sampling = SamplingParams(max_new_tokens=k * (args.launches + 4), stop_token_ids=())
        for _ in range(2):  # a warm round, then the measured one
            launches.clear()
            with engine.hold():
                requests = [engine.submit([1, 2, 3, 4], sampling) for _ in range(engine.slots)]
            t0 = time.perf_counter()
            for r in requests:
                r.result()
            wall = time.perf_counter() - t0
        steady = launches[2:-2]
        res.emit({"case": "engine", "return_ms_median": statistics.median(t for t, _ in steady),
                  "ready_at_return": sum(f for _, f in steady) / len(steady),
                  "launches": len(steady), "step_ms": wall / (k * len(launches)) * 1e3})

        st = engine.runner.stages[0]
        rows = engine.runner.put(0, (engine.pos, engine.keys, engine.step, engine.temperature,
                                     engine.top_k, engine.top_p))
        tokens = engine.runner.put(0, engine.tokens)
        launch = slots_launcher(engine)

        def step(prev):
            return launch(tokens if prev is None else prev[1])

        res.emit({"case": "slots_step", **summary(timed(step, args.launches))})

        plain = jax.jit(slots_step_fn(st.runtime, engine.statics[False], engine.cache_len, k))
        cache = engine.caches[0]

        def undonated(prev):
            x = tokens if prev is None else prev[1]
            (t, x, _), _, *_ = plain(st.state, cache, x, *rows)
            return t, x

        res.emit({"case": "slots_step, no donation", **summary(timed(undonated, args.launches))})

    rt, state = llm.runner.stages[0].runtime, llm.runner.stages[0].state
    b = args.slots
    static = Static.of(rt, "decode", False)
    cache = rt.abstract_cache(b, 512)
    cache = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), cache)
    consts = llm.runner.put(0, (np.zeros(b, np.int32), np.full(b, 8, np.int32),
                                np.asarray(row_keys(0, b)), np.int32(1), np.float32(1),
                                np.float32(1)))
    holder = {"cache": cache}

    def decode(prev):
        token = consts[0] if prev is None else prev[0]
        pos = consts[1] if prev is None else prev[2]
        out, holder["cache"], pos, step = rt.programs.run(
            "decode_step", lambda: decode_step_fn(rt, static), static,
            (state, holder["cache"], token, pos, consts[2], consts[3], consts[4], consts[5]))
        return out, holder["cache"], pos

    res.emit({"case": "decode_step", **summary(timed(decode, args.launches))})


if __name__ == "__main__":
    main()
