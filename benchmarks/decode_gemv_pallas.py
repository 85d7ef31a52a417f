"""GPU: decode-sized projections, a Pallas (Triton) GEMV kernel against cuBLAS.

Times x[M, K] @ W for Llama-3.2-1B's projection shapes, W one layer of 16 stacked [L, K, N]
weights, in a jitted program that runs the 16 layers' products one after another (each product's
input depends on the last, as in a decode step). Reports each product's matmul-kernel device time
from a jax.profiler trace, the bytes other kernels copied (a weight slice copied for a kernel
that cannot read it in place shows up here) and the weight-streaming rate. Variants:
  cublas       the decode programs' path: rows padded to 8, XLA's cuBLAS GEMV on w[i]
  pallas       the kernel below reading layer i of the stacked weight where it lies
  pallas-slice the kernel below given the slice w[i] (does XLA copy it first?)
--sweep tries block shapes and warps for the Pallas kernel first and keeps the best per shape.

    python benchmarks/decode_gemv_pallas.py --sweep --out benchmarks/results
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = {"q_proj": [(2048, 2048)], "kv_proj": [(2048, 1024)],
          "q+kv_proj": [(2048, 2048), (2048, 1024)], "o_proj": [(2048, 2048)],
          "gate_up_proj": [(2048, 16384)], "down_proj": [(8192, 2048)],
          "lm_head": [(2048, 128256)]}
MATMUL = ("decode_gemv", "nvjet", "gemm", "gemv", "cutlass")


# -- the kernel under test ------------------------------------------------------------------
# One program per block_n output columns loops over K in block_k rows: with dot=False it
# accumulates x * w on CUDA cores (one [block_k, block_n] fp32 accumulator per row of x); with
# dot=True it loads x as 16 rows (masked) and runs one tensor-core dot per tile. A stacked
# [L, K, N] weight is read at a layer index the kernel loads at run time, so every layer shares
# one compiled kernel and nothing is sliced; several weights sharing x run in one launch.

@dataclasses.dataclass(frozen=True)
class GemvConfig:
    block_n: int = 32  # output columns per program
    block_k: int = 128  # rows of the weight per loop step
    num_warps: int = 4
    num_stages: int = 3
    dot: bool = False  # tensor cores: x padded to 16 rows (masked loads) and one dot per tile


MAX_ROWS = 16  # more rows than this: a matmul kernel does better
DOT_ROWS = 16  # the smallest M of a Triton dot


def supported(m: int, k: int, n: int, cfg: GemvConfig = GemvConfig()) -> bool:
    return 0 < m <= MAX_ROWS and k % cfg.block_k == 0 and n % cfg.block_n == 0


def _compiler_params(cfg: GemvConfig):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _kernel(layer_ref, x_ref, *refs, stacked, blocks, cfg):
    """Program j computes output columns of the weight that `blocks` (cumulative program
    counts per weight) assigns it; a stacked weight i is read at layer layer_ref[i]."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    ws, outs = refs[: len(stacked)], refs[len(stacked):]
    j = pl.program_id(0)
    m, k = x_ref.shape
    bk, bn = cfg.block_k, cfg.block_n
    for idx, (w_ref, o_ref, start, stop) in enumerate(zip(ws, outs, blocks[:-1], blocks[1:])):
        @pl.when((j >= start) & (j < stop))
        def _(w_ref=w_ref, o_ref=o_ref, idx=idx, start=start):
            cols = pl.ds(pl.multiple_of((j - start) * bn, bn), bn)
            layer = layer_ref[idx] if stacked[idx] else None

            def tile(i):
                rows = pl.ds(pl.multiple_of(i * bk, bk), bk)
                return rows, (w_ref[rows, cols] if layer is None else w_ref[layer, rows, cols])

            if cfg.dot:
                def dot_step(i, acc):
                    rows, w = tile(i)
                    x = plgpu.load(x_ref.at[pl.ds(0, DOT_ROWS), rows],
                                   mask=(jnp.arange(DOT_ROWS) < m)[:, None], other=0)
                    return acc + plgpu.dot(x.astype(w.dtype), w)

                acc = jax.lax.fori_loop(0, k // bk, dot_step,
                                        jnp.zeros((DOT_ROWS, bn), jnp.float32))
                plgpu.store(o_ref.at[pl.ds(0, DOT_ROWS), cols], acc.astype(o_ref.dtype),
                            mask=(jnp.arange(DOT_ROWS) < m)[:, None])
                return

            def step(i, acc):
                rows, w = tile(i)
                w = w.astype(jnp.float32)
                return tuple(a + x_ref[r, rows].astype(jnp.float32)[:, None] * w
                             for r, a in enumerate(acc))

            acc = jax.lax.fori_loop(0, k // bk, step,
                                    tuple(jnp.zeros((bk, bn), jnp.float32) for _ in range(m)))
            for r, a in enumerate(acc):
                o_ref[r, cols] = jnp.sum(a, axis=0).astype(o_ref.dtype)


def gemv_multi(x_mk, weights, layers=None, cfg: GemvConfig = GemvConfig(),
               interpret: bool = False):
    """[x @ w for w in weights] in one kernel launch. Each weight is [K, N_i], or [L, K, N_i]
    read at its entry of `layers` (an int or an int32 scalar, traced or not: the kernel reads
    the index at run time, so every layer shares one compiled kernel). Outputs [M, N_i] in
    x's dtype."""
    from jax.experimental import pallas as pl

    layers = tuple(layers) if layers is not None else (None,) * len(weights)
    m, k = x_mk.shape
    counts, shapes = [], []
    for w, layer in zip(weights, layers):
        kk, n = w.shape[-2:]
        if (w.ndim == 3) != (layer is not None) or kk != k:
            raise ValueError(f"gemv: weight {w.shape} (layer {layer}) does not fit x {x_mk.shape}")
        if not supported(m, k, n, cfg):
            raise ValueError(f"gemv: x {x_mk.shape} @ [{k}, {n}] needs <= {MAX_ROWS} rows, K a "
                             f"multiple of {cfg.block_k} and N of {cfg.block_n}")
        counts.append(n // cfg.block_n)
        shapes.append(jax.ShapeDtypeStruct((m, n), x_mk.dtype))
    blocks = (0, *itertools.accumulate(counts))
    stacked = tuple(layer is not None for layer in layers)
    layer_idx = jnp.stack([jnp.asarray(0 if layer is None else layer, jnp.int32)
                           for layer in layers])
    kernel = functools.partial(_kernel, stacked=stacked, blocks=blocks, cfg=cfg)
    return pl.pallas_call(
        kernel, out_shape=tuple(shapes), grid=(blocks[-1],), interpret=interpret,
        compiler_params=None if interpret else _compiler_params(cfg),
        name="decode_gemv")(layer_idx, x_mk, *weights)


def gemv(x_mk, w, layer=None, cfg: GemvConfig = GemvConfig(), interpret: bool = False):
    """x [M, K] @ w ([K, N], or [L, K, N] at `layer`) -> [M, N]."""
    (out,) = gemv_multi(x_mk, (w,), None if layer is None else (layer,), cfg, interpret)
    return out


# -- the benchmark --------------------------------------------------------------------------


def run_variant(variant, x, ws, cfg, layers, repeats):
    from profile_decode import kernel_times
    from sharding.layout import _einsum
    from sharding.xla_options import INFERENCE

    interpret = jax.default_backend() != "gpu"  # CPU plumbing runs

    def program(x, ws):
        acc = jnp.zeros((x.shape[0], 1), jnp.float32)
        for i in range(layers):
            xi = x + acc.astype(x.dtype)
            if variant == "cublas":
                ys = [_einsum("MK,KN->MN", xi, w[i], 8) for w in ws]
            elif variant == "pallas":
                ys = gemv_multi(xi, ws, (i,) * len(ws), cfg, interpret)
            else:
                ys = gemv_multi(xi, [w[i] for w in ws], None, cfg, interpret)
            acc = acc + sum(y[:, :1].astype(jnp.float32) for y in ys)
        return acc

    options = INFERENCE if jax.default_backend() == "gpu" else {}
    fn = jax.jit(program).lower(x, ws).compile(options)
    fn(x, ws).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x, ws).block_until_ready()
        times.append((time.perf_counter() - t0) / layers)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            fn(x, ws).block_until_ready()
        totals = kernel_times(d)
    mm = sum(t for n, (t, _) in totals.items() if any(p in n for p in MATMUL)) / layers / 1e3
    other = sum(t for n, (t, _) in totals.items() if not any(p in n for p in MATMUL))
    copies = sum(t for n, (t, _) in totals.items() if "memcpy" in n.lower())
    return {"loop_us": statistics.median(times) * 1e6, "kernel_us": mm,
            "other_kernels_us": other / layers / 1e3, "copy_us": copies / layers / 1e3,
            "kernels": {n[:50]: round(c / layers, 2) for n, (_, c) in totals.items()}}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-dot", default="true,false", type=lambda v: [
        {"true": True, "false": False}[t] for t in v.split(",")],
                    help="kernel forms to sweep: tensor-core dot (true), CUDA-core FMA (false)")
    ap.add_argument("--variants", default="cublas,pallas,pallas-slice")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    sweep = [GemvConfig(bn, bk, nw, ns, dot) for dot, bn, bk, nw, ns in
             itertools.product(args.sweep_dot, (16, 32, 64), (64, 128, 256), (4, 8), (3, 5))
             if dot or ns == 3]
    rows = []
    for name in args.shapes.split(","):
        dims = SHAPES[name]
        k = dims[0][0]
        ws = [jax.random.normal(jax.random.key(n), (args.layers, k, n), jnp.bfloat16)
              for _, n in dims]
        nbytes = sum(k * n * 2 for _, n in dims)
        for m in [int(r) for r in args.rows.split(",")]:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            best = GemvConfig()
            if args.sweep:
                tried = []
                for cfg in sweep:
                    if not all(supported(m, k, n, cfg) for _, n in dims):
                        continue
                    try:
                        r = run_variant("pallas", x, ws, cfg, args.layers, 2)
                    except Exception as e:  # a config Triton cannot compile
                        print(json.dumps({"sweep": name, "config": cfg.__dict__,
                                          "error": str(e)[:200]}), flush=True)
                        continue
                    tried.append((r["kernel_us"], cfg))
                best = min(tried, key=lambda t: t[0])[1]
                print(json.dumps({"sweep": name, "rows": m, "best": best.__dict__,
                                  "tried": [(round(t, 2), c.__dict__) for t, c in
                                            sorted(tried, key=lambda t: t[0])[:6]]}),
                      flush=True)
            for variant in args.variants.split(","):
                r = run_variant(variant, x, ws, best, args.layers, args.repeats)
                row = {"bench": "decode-gemv-pallas", "proj": name, "rows": m,
                       "weights": [list(d) for d in dims], "variant": variant,
                       "config": best.__dict__ if variant != "cublas" else None,
                       "weight_gb_s": nbytes / r["kernel_us"] / 1e3 if r["kernel_us"] else None,
                       **r, "device": jax.devices()[0].device_kind, "jax": jax.__version__}
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        kind = jax.devices()[0].device_kind.lower().replace("nvidia ", "").split()[0]
        with open(os.path.join(args.out, f"decode_gemv_pallas_{kind}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
