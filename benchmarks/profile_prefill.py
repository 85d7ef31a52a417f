"""Where a prefill's time goes, and what the layer loop and the compiler options change.

Compiles the generation-form prefill (last-token logits, `Runtime.prefill_logits`) of random
weights for each variant — the layer loop rolled or unrolled, XLA's default gemm options or the
decode programs' (cuBLAS only, dynamic-slice fusion, no dot merger) — times it (median of rounds
of calls launched back to back), then traces one call and sums its kernels: device busy time,
kernel count and the copies (kernels whose names say copy/memcpy/dynamic-slice), which is where
a rolled loop pays for slicing each layer's weights out of the stacked arrays.

    python benchmarks/profile_prefill.py --model llama3.2-1b --shapes 1x2048,8x2048
    python benchmarks/profile_prefill.py --api     # LLM.generate(max_new_tokens=1) instead

--api times what a user waits for the first token: `LLM.generate` with one new token (the
prompt checks, the KV cache, the prefill that writes it, sampling, the token back on the host),
and splits the traced call's wall time (`timeline`): before the first kernel, the largest gaps
between kernels, after the last one, and the python calls inside it that took >= 200 us.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

COPY_WORDS = ("copy", "memcpy", "dynamic_slice", "dynamic-slice")


def timeline(trace_dir: str, func: str = "generate", gaps: int = 5, slow_us: int = 200) -> dict:
    """Where the wall time of the traced call of `func` (the last python event of that name)
    went: before the first device kernel, between kernels (the largest gaps, with the kernels
    around them), after the last one, and the python calls inside it that took >= slow_us."""
    from jax.profiler import ProfileData

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
    calls, kernels, slow = [], [], []
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                for ev in line.events:
                    if ev.name.endswith(f" {func}"):
                        calls.append((ev.start_ns, ev.end_ns))
            elif plane.name.startswith("/device:") and "stream" in line.name.lower():
                kernels += [(ev.start_ns, ev.end_ns, ev.name) for ev in line.events]
    if not calls:
        return {}
    start, end = calls[-1]
    for plane in data.planes:
        for line in plane.lines:
            if line.name == "python":
                slow += [(ev.start_ns, ev.duration_ns, ev.name) for ev in line.events
                         if start < ev.start_ns and ev.end_ns <= end
                         and ev.duration_ns >= slow_us * 1000]
    kernels = sorted(k for k in kernels if start <= k[0] and k[1] <= end)
    out = {"wall_ms": (end - start) / 1e6,
           "python_calls_over_%dus" % slow_us: [
               {"at_ms": (t - start) / 1e6, "ms": ns / 1e6, "name": n[:80]}
               for t, ns, n in sorted(slow)][:40]}
    if kernels:
        holes = sorted(((b[0] - a[1], a[2], b[2], a[1]) for a, b in zip(kernels, kernels[1:])),
                       reverse=True)[:gaps]
        out.update({"before_first_kernel_ms": (kernels[0][0] - start) / 1e6,
                    "after_last_kernel_ms": (end - max(k[1] for k in kernels)) / 1e6,
                    "kernel_span_ms": (max(k[1] for k in kernels) - kernels[0][0]) / 1e6,
                    "largest_gaps": [{"at_ms": (at - start) / 1e6, "ms": ns / 1e6,
                                      "after": a[:60], "before": b[:60]}
                                     for ns, a, b, at in holes]})
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default="1x2048,8x2048", help="BxT,...")
    ap.add_argument("--unroll", default="1,L", help="layer-loop unroll factors; L: every layer")
    ap.add_argument("--options", default="default,decode",
                    help="default: XLA's; decode: sharding.xla_options.INFERENCE (the defaults since)")
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (CPU plumbing)")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--burst", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    ap.add_argument("--api", action="store_true",
                    help="time LLM.generate(max_new_tokens=1), cache writes and sampling included")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import dataclasses

    import jax
    import numpy as np

    import jax_sp.generate
    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime, random_params
    from profile_decode import kernel_times, write_jsonl
    from sharding.xla_options import INFERENCE

    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    host = random_params(cfg)
    # matmul flops of the layers (the lookup and one LM-head row per sequence left out)
    flops_per_token = 2 * sum(v.size for k, v in host.items() if k.startswith("layers/"))
    rows = []
    for opt_name in args.options.split(","):
        options = {"default": {}, "decode": dict(INFERENCE)}[opt_name]
        parallel = ParallelConfig(tp=1, xla_options=options)
        if args.api:
            llm = LLM(cfg, host, parallel=parallel, dtype=args.dtype,
                      max_seq_len=max(int(s.split("x")[1]) for s in args.shapes.split(",")) + 8)
            rt = llm.runtime
        else:
            rt = Runtime(cfg, parallel, args.dtype)
            state = rt.place(host)
        for u in args.unroll.split(","):
            unroll = cfg.num_layers if u == "L" else int(u)
            if args.api:  # what generate's prefill programs use
                jax_sp.generate.PREFILL_UNROLL = unroll
            else:
                fn = rt.prefill_logits(False, False, True, unroll=unroll)
            for shape in args.shapes.split(","):
                b, t = (int(x) for x in shape.split("x"))
                rng = np.random.default_rng(0)
                ids_bt = rng.integers(0, cfg.vocab_size, (b, t)).astype("int32")
                if args.api:
                    prompts, one = ids_bt.tolist(), SamplingParams(max_new_tokens=1)
                    call = lambda: llm.generate(prompts, one)  # noqa: E731, B023
                    wait = lambda outs: None  # noqa: E731 - tokens come back on the host
                    burst = 1  # each call waits for its token
                else:
                    ids, pos, lengths = (jax.device_put(x) for x in (
                        ids_bt, np.tile(np.arange(t, dtype="int32"), (b, 1)),
                        np.full((b,), t, "int32")))
                    call = lambda: fn(state, ids, pos, lengths)  # noqa: E731, B023
                    wait, burst = jax.block_until_ready, args.burst
                t0 = time.perf_counter()
                wait(call())
                first = time.perf_counter() - t0
                rounds = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    wait([call() for _ in range(burst)])
                    rounds.append((time.perf_counter() - t0) / burst)
                with tempfile.TemporaryDirectory() as d:
                    with jax.profiler.trace(d):
                        wait(call())
                    totals = kernel_times(d)
                    where = timeline(d) if args.api else {}
                busy = sum(ns for ns, _ in totals.values()) / 1e6
                copies = {n: v for n, v in totals.items()
                          if any(w in n.lower() for w in COPY_WORDS)}
                med = statistics.median(rounds)
                row = {"bench": "profile-prefill", "model": args.model, "batch": b, "tokens": t,
                       "unroll": unroll, "options": opt_name, "api": args.api,
                       "median_ms": med * 1e3,
                       "min_ms": min(rounds) * 1e3, "max_ms": max(rounds) * 1e3,
                       "layer_tflops": flops_per_token * b * t / med / 1e12, "first_call_s": first,
                       "busy_ms": busy, "kernels": sum(c for _, c in totals.values()),
                       "copy_ms": sum(ns for ns, _ in copies.values()) / 1e6,
                       "copy_kernels": sum(c for _, c in copies.values()),
                       "top": [{"name": n[:90], "ms": ns / 1e6, "calls": c} for n, (ns, c) in
                               sorted(totals.items(), key=lambda kv: -kv[1][0])[:args.top]],
                       "attention": rt.attention, "device": jax.devices()[0].device_kind,
                       **({"timeline": where} if where else {})}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        write_jsonl(args.out, f"profile_prefill_{args.model}{'_api' if args.api else ''}.jsonl",
                    rows)


if __name__ == "__main__":
    main()
