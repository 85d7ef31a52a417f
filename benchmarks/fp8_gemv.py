"""Decode's projections in FP8: the weight-only Pallas kernel (models/fp8_gemv.py) against the
paths it could replace, on a stack of Llama-3-8B layers' four projections (q/k/v 6144x4096,
o 4096x4096, gate/up 28672x4096, down 4096x14336) at 1, 8 and 32 rows.

Variants, each one jitted program over every layer's four projections, weights stacked [L, ...]
as the model holds them and the layers unrolled as decode runs them:
  bf16        x @ w in 16 bits (the model's 16-bit path; weights [K, N]);
  w8a8-xla    models/quant.py's dot at every size (gemv="off"): tokens quantized, an FP8 dot
              (XLA picks cuBLASLt's FP8 GEMM or a Triton GEMM fusion). Runs before 2026-12-05
              named this "w8a8" and called `dot` with its default, which sends at most 64 rows
              weight-only: what they timed was XLA's weight-only path, not an FP8 dot;
  w8a16-xla   x @ convert(wq) * scale, left to XLA (does it widen the weights in a fusion of
              its own, writing a 16-bit copy, or inside the GEMM?);
  pallas      the kernel on each layer's weight, sliced from the stack by XLA;
  pallas-layer  the kernel on the whole stack with the layer index (no slice);
  pallas-w8a8   the same, W8A8: each row quantized (one XLA fusion, timed with it) and the
              kernel's tensor-core dot on FP8 operands (CompileOptions(fp8_gemv="pallas-w8a8"));
  pallas-f16    the same, weight-only with the rows rounded to float16 (one XLA fusion, timed
              with it), so the tile widens the weight to float16 (fp8_gemv="pallas-f16");
plus a sweep of the kernel's tiles (`--sweep`; tensor-core tiles for both operand kinds). The
limit, the copy bandwidth, is measured in the same run; "of_copy" is (weight bytes / time) /
copy bandwidth. Result:
benchmarks/results/fp8_gemv_<machine>.jsonl.

    python benchmarks/fp8_gemv.py [--layers 8] [--tiny]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os

import common

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}  # [N, K] per layer, Llama-3-8B
TINY = {"qkv": (384, 256), "o": (256, 256), "gate_up": (1024, 256), "down": (256, 512)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rows", default="1,2,4,8,32")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the kernel's tiles")
    ap.add_argument("--variants", default=None, help="only these variants (comma-separated)")
    ap.add_argument("--fma-sweep", action="store_true",
                    help="sweep one row's CUDA-core tiles in both fma modes")
    ap.add_argument("--shape-sweep", action="store_true",
                    help="sweep one row's tiles and splits per projection")
    ap.add_argument("--out", default=None)
    ap.add_argument("--hlo-dir", default=None, help="write each variant's compiled program here")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from models.fp8_gemv import fp8_gemv
    from models.quant import dot, quantize_tokens, quantize_weight, to_float16

    gpu = jax.default_backend() == "gpu"
    tag = "h200" if gpu and "H200" in jax.devices()[0].device_kind else jax.default_backend()
    out = args.out or os.path.join(common.RESULTS, f"fp8_gemv_{tag}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)
    shapes = TINY if args.tiny else SHAPES
    L = args.layers

    # the limit, measured here (common.copy_bandwidth)
    bandwidth, kinds = common.copy_bandwidth((1 << 30) if not args.tiny else (1 << 22))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()}})

    key = jax.random.key(0)
    bf16, fp8 = {}, {}
    for i, (name, (n, k)) in enumerate(shapes.items()):
        w = jax.random.normal(jax.random.fold_in(key, i), (L, k, n), jnp.bfloat16) * 0.02
        bf16[name] = w
        q = jax.vmap(lambda w: quantize_weight(w, (0,)))(w)
        fp8[name] = q  # q [L, N, K], scale [L, N]
    jax.block_until_ready((bf16, fp8))
    bytes16 = sum(w.nbytes for w in bf16.values())
    bytes8 = sum(q.q.nbytes for q in fp8.values())

    def inputs(rows):
        return {name: jax.random.normal(jax.random.fold_in(key, 100 + rows), (rows, k),
                                        jnp.bfloat16) for name, (n, k) in shapes.items()}

    def over_layers(per):
        return jax.jit(lambda ws, xs: [per(name, ws[name], l, xs[name])
                                       for l in range(L) for name in shapes])

    def w8a16_xla(name, q, l, x):
        return (jnp.einsum("tk,nk->tn", x, q.q[l].astype(x.dtype))
                * q.scale[l].astype(x.dtype))

    def w8a8_kernel(name, q, l, x, **tile):
        xq, sx = quantize_tokens(x)
        return fp8_gemv(xq, q.q, q.scale, l, x_scale=sx, out_dtype=x.dtype, **tile)

    def f16_kernel(name, q, l, x, **tile):  # as fp8_gemv="pallas-f16": one row as it is
        x16 = to_float16(x) if x.shape[0] > 1 else x
        return fp8_gemv(x16, q.q, q.scale, l, out_dtype=x.dtype, **tile)

    variants = {
        "bf16": (bf16, bytes16, over_layers(lambda name, w, l, x: x @ w[l])),
        "w8a8-xla": (fp8, bytes8, over_layers(
            lambda name, q, l, x: dot("TK,KN->TN", x, q._replace(q=q.q[l], scale=q.scale[l]),
                                      gemv="off"))),
        "w8a16-xla": (fp8, bytes8, over_layers(w8a16_xla)),
        "pallas": (fp8, bytes8, over_layers(
            lambda name, q, l, x: fp8_gemv(x, q.q[l], q.scale[l]))),
        "pallas-layer": (fp8, bytes8, over_layers(
            lambda name, q, l, x: fp8_gemv(x, q.q, q.scale, l))),
        "pallas-w8a8": (fp8, bytes8, over_layers(w8a8_kernel)),
        "pallas-f16": (fp8, bytes8, over_layers(f16_kernel)),
    }
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    rows_list = [int(r) for r in args.rows.split(",")]
    ref = {}
    for rows in rows_list:
        xs = inputs(rows)
        for variant, (ws, nbytes, fn) in variants.items():
            try:
                compiled = fn.lower(ws, xs).compile()
            except Exception as e:  # a variant the compiler refuses is a result too
                res.emit({"bench": "variant", "variant": variant, "rows": rows, "layers": L,
                          "error": f"{type(e).__name__}: {str(e)[:400]}"})
                continue
            text = compiled.as_text() if gpu else ""
            if args.hlo_dir and rows == rows_list[0]:
                with open(os.path.join(args.hlo_dir, f"{variant}.hlo.txt"), "w") as f:
                    f.write(compiled.as_text())
            first, per = common.timed_bursts(lambda: compiled(ws, xs), 5, 10)
            ys = compiled(ws, xs)
            y = jnp.concatenate([v.astype(jnp.float32).ravel() for v in ys])
            if variant == "bf16":
                ref[rows] = y
            err = (float(jnp.linalg.norm(y - ref[rows]) / jnp.linalg.norm(ref[rows]))
                   if rows in ref else None)
            res.emit({"bench": "variant", "variant": variant, "rows": rows, "layers": L,
                      "ms": per * 1e3, "weight_bytes": nbytes,
                      "of_copy": nbytes / per / bandwidth, "rel_err_vs_bf16": err,
                      "hlo": census(text) if gpu else None})

    if args.fma_sweep:
        xs = inputs(1)
        # each projection alone (its L layers), default tiles: which shapes fall short
        for name in shapes:
            fn = jax.jit(lambda q, x: [fp8_gemv(x, q.q, q.scale, l) for l in range(L)])
            _, per = common.timed_bursts(lambda: fn(fp8[name], xs[name]), 5, 10)
            res.emit({"bench": "projection", "rows": 1, "projection": name,
                      "shape_nk": list(shapes[name]), "ms": per * 1e3,
                      "of_copy": fp8[name].q.nbytes / per / bandwidth})
        for mode, (bn, bk, stages) in itertools.product(
                ("reduce", "tile"), [(32, 512, 3), (32, 256, 4), (16, 256, 4), (64, 128, 4),
                                     (32, 128, 4), (32, 1024, 2), (64, 512, 3), (16, 1024, 3)]):
            kernel = functools.partial(fp8_gemv, block_n=bn, block_k=bk, num_stages=stages,
                                       fma=mode)
            fn = over_layers(lambda name, q, l, x, kernel=kernel: kernel(x, q.q, q.scale, l))
            cfg = {"bench": "fma-sweep", "rows": 1, "fma": mode, "block_n": bn, "block_k": bk,
                   "num_stages": stages}
            try:
                _, per = common.timed_bursts(lambda: fn(fp8, xs), 5, 10)
            except Exception as e:  # a tile the compiler refuses is a result too
                res.emit({**cfg, "error": str(e).splitlines()[0][:200]})
                continue
            res.emit({**cfg, "ms": per * 1e3, "of_copy": bytes8 / per / bandwidth})

    if args.shape_sweep:  # one row: each projection alone over tiles and contracted splits
        xs = inputs(1)
        for name, (n, k) in shapes.items():
            def run(bn, bk, sp, stages, warps):
                """One projection's L layers at this tile: its time and share of the copy
                bandwidth (or the refusal) emitted; seconds or None."""
                cfg = {"bench": "shape-sweep", "rows": 1, "projection": name,
                       "shape_nk": [n, k], "block_n": bn, "block_k": bk, "splits": sp,
                       "num_stages": stages, "num_warps": warps}
                tile = dict(block_n=bn, block_k=bk, splits=sp, num_stages=stages,
                            num_warps=warps)
                fn = jax.jit(lambda q, x: [fp8_gemv(x, q.q, q.scale, l, **tile)  # noqa: B023
                                           for l in range(L)])
                try:
                    _, per = common.timed_bursts(lambda: fn(fp8[name], xs[name]), 5, 10)
                except Exception as e:  # a tile the compiler (or plan) refuses is a result too
                    res.emit({**cfg, "error": str(e).splitlines()[0][:200]})
                    return None
                res.emit({**cfg, "ms": per * 1e3, "of_copy": fp8[name].q.nbytes / per / bandwidth})
                return per

            timed = {}
            for bn, bk, sp in itertools.product((4, 8, 16, 32), (512, 1024, 2048), (1, 2, 4)):
                per = run(bn, bk, sp, 3, 4)
                if per is not None:
                    timed[bn, bk, sp] = per
            if timed:  # stages and warps around the best tile
                best = min(timed, key=timed.get)
                for stages, warps in [(2, 4), (4, 4), (3, 2), (3, 8)]:
                    run(*best, stages, warps)

    if args.sweep:  # tiles: CUDA-core configurations at few rows, tensor-core ones at more
        xs_all = {rows: inputs(rows) for rows in rows_list}
        few = [r for r in rows_list if r <= 4]
        more = [r for r in rows_list if r > 4]
        tensor = [(32, 256, 4, 4), (128, 256, 4, 4), (64, 128, 4, 4), (64, 512, 4, 3),
                  (64, 256, 4, 3), (128, 128, 4, 4), (128, 512, 8, 3), (32, 512, 4, 3)]
        configs = ([(few, c, False) for c in [(16, 256, 4, 4), (32, 128, 4, 4), (32, 512, 4, 3),
                                              (64, 128, 4, 4), (32, 256, 8, 4), (32, 256, 2, 4)]]
                   + [(more, c, w8a8) for w8a8 in (False, True) for c in tensor])
        for rows_of, (bn, bk, warps, stages), w8a8 in configs:
            tile = dict(block_n=bn, block_k=bk, num_warps=warps, num_stages=stages)
            if w8a8:
                fn = over_layers(functools.partial(w8a8_kernel, **tile))
            else:
                kernel = functools.partial(fp8_gemv, **tile)
                fn = over_layers(lambda name, q, l, x, kernel=kernel: kernel(x, q.q, q.scale, l))
            for rows in rows_of:
                cfg = {"bench": "sweep", "rows": rows, "block_n": bn, "block_k": bk,
                       "num_warps": warps, "num_stages": stages, "w8a8": w8a8}
                try:
                    _, per = common.timed_bursts(lambda: fn(fp8, xs_all[rows]), 5, 10)
                except Exception as e:  # a tile the compiler refuses is a result too
                    res.emit({**cfg, "error": str(e).splitlines()[0][:200]})
                    continue
                res.emit({**cfg, "ms": per * 1e3, "of_copy": bytes8 / per / bandwidth})


def census(text: str) -> dict:
    """What the compiled GPU program runs: FP8 GEMMs, other GEMMs, Triton fusions, Pallas
    kernels, and fusions or copies that write an FP8 weight widened to 16 bits."""
    import re

    lines = text.splitlines()
    return {
        "cublas_f8": sum("__cublas$lt$matmul$f8" in x for x in lines),
        "cublas": sum('"__cublas$gemm"' in x or '"__cublas$lt$matmul"' in x for x in lines),
        "triton_gemm": sum('"kind":"__triton_gemm"' in x
                           or '"kind":"__triton_nested_gemm_fusion"' in x for x in lines),
        "pallas": sum("fp8_gemv" in x and "custom-call(" in x for x in lines),
        # fusions in the entry computation writing a weight-sized 16-bit array (or tuple of
        # them): the weights widened in memory before a GEMM reads them
        "widened_weights": sum(bool(re.match(r"\s*%?\S+ = \(?bf16\[[\d,]*\d{4,},\d{4,}\]", x))
                               and " fusion(" in x for x in lines),
        "copies": sum(" copy(" in x or "copy-start" in x for x in lines),
    }


if __name__ == "__main__":
    main()
