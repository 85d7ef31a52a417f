"""GPU: decode-sized projections (a few rows times a weight) by weight layout.

A decode step multiplies B rows by each weight once, so it runs at the rate the matmul kernel
streams the weight. This times x[M, K] @ W for Llama-3.2-1B's projection shapes with the weight
stored [K, N] (in-features major, jax-sp's parameter layout) and [N, K] (out-features major,
PyTorch's nn.Linear layout, contracted on its minor axis), inside a jitted loop over 16 stacked
layers with the decode programs' compiler options, and reports the weight-streaming rate of the
matmul kernels alone (their device time in a jax.profiler trace, summed per product) next to the
loop's wall time per product (which adds the loop's own small kernels).

    python benchmarks/decode_gemv_layout.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
MATMUL_KERNELS = ("nvjet", "gemm", "gemv", "cutlass", "cublas", "reduce")

SHAPES = {"q_proj": (2048, 2048), "kv_proj": (2048, 1024), "o_proj": (2048, 2048),
          "gate_up_proj": (2048, 16384), "down_proj": (8192, 2048),
          "qkv_proj": (2048, 3072)}  # q, k and v as one weight (vLLM's QKVParallelLinear)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,32")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--calls", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="projections to time")
    ap.add_argument("--xla-option", action="append", default=[],
                    help="KEY=VALUE compiler option replacing the decode defaults (repeatable)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from profile_decode import kernel_times, parse_options
    from sharding.layout import _einsum
    from sharding.xla_options import INFERENCE

    options = INFERENCE if jax.default_backend() == "gpu" else {}
    if args.xla_option:
        options = parse_options(args.xla_option)
    rows = []
    for name in args.shapes.split(","):
        k, n = SHAPES[name]
        key = jax.random.key(k * n)
        w_kn = jax.random.normal(key, (args.layers, k, n), jnp.bfloat16)
        w_nk = jnp.swapaxes(w_kn, 1, 2).copy()
        for m in [int(r) for r in args.rows.split(",")]:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            variants = [("KN", w_kn, "MK,KN->MN", 8), ("NK", w_nk, "MK,NK->MN", 8)]
            if m == 1:  # XLA's own vector-matrix path (multiply + reduce fusions)
                variants += [("KN-unpadded", w_kn, "MK,KN->MN", 1),
                             ("NK-unpadded", w_nk, "MK,NK->MN", 1)]
            for layout, w, spec, pad in variants:
                def loop(x, w, spec=spec, pad=pad):
                    def body(i, acc):
                        # rows padded to 8 as the decode programs do (sharding/layout.py)
                        y = _einsum(spec, x + acc[:, :1].astype(x.dtype), w[i % args.layers], pad)
                        return acc + y[:, :1].astype(jnp.float32)
                    return jax.lax.fori_loop(0, args.calls, body, jnp.zeros((m, 1), jnp.float32))
                fn = jax.jit(loop).lower(x, w).compile(options)
                fn(x, w).block_until_ready()
                times = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    fn(x, w).block_until_ready()
                    times.append((time.perf_counter() - t0) / args.calls)
                t = statistics.median(times)
                with tempfile.TemporaryDirectory() as d:
                    with jax.profiler.trace(d):
                        fn(x, w).block_until_ready()
                    totals = kernel_times(d)
                mm = {kn: v for kn, v in totals.items() if any(p in kn for p in MATMUL_KERNELS)}
                kt = sum(v[0] for v in mm.values()) / 1e9 / args.calls
                row = {"bench": "decode-gemv-layout", "proj": name, "k": k, "n": n, "rows": m,
                       "weight_layout": layout, "loop_us": t * 1e6, "kernel_us": kt * 1e6,
                       "kernel_weight_gb_s": k * n * 2 / kt / 1e9 if kt else None,
                       "kernels": {kn[:60]: round(v[1] / args.calls, 2) for kn, v in mm.items()},
                       "xla_options": options,
                       "device": jax.devices()[0].device_kind, "jax": jax.__version__}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        kind = jax.devices()[0].device_kind.lower().replace("nvidia ", "").split()[0]
        tag = "".join(f"_{k.removeprefix('xla_gpu_')}-{v}" for k, v in parse_options(
            args.xla_option).items())
        with open(os.path.join(args.out, f"decode_gemv_layout_{kind}{tag}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
