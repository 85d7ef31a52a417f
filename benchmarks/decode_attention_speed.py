"""Decode attention's speed: the fused Pallas kernel (models/decode_attention.py: RoPE, the cache
write and flash-decoding attention of one token per sequence) over a stacked Llama-3-8B cache
(8 KV heads of 128, 4 query heads each), per batch and context length, for a sweep of its
tiling: programs targeted (how far the keys are split), the most splits per sequence and head,
keys per block and pipeline stages.

Each timing is one jitted program over `--layers` layers, unrolled as a decode step runs them,
the cache donated (written in place), launched back to back. "of_copy": the cache bytes the
step reads (every sequence's keys and values up to its length) over the time, against the copy
bandwidth measured in the same run. `--kv-dtypes bfloat16,float8_e4m3fn` times each setting
with a 16-bit and an FP8 cache (rel_err_vs_first: against the point's first setting and dtype).
Result: benchmarks/results/decode_attention_speed_<machine>.jsonl.

    python benchmarks/decode_attention_speed.py            # GPU
    python benchmarks/decode_attention_speed.py --tiny     # CPU plumbing (interpreted)
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import time

import common

# (target programs, most splits) x keys per block x stages (the module's tiling: `default`)
SPLITS = [(256, 16), (1024, 16), (1024, 64), (4096, 64)]
BLOCKS = [32, 64, 128]
STAGES = [2, 3]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--points", default="1x512,8x512,32x256,32x768,32x2048,1x4096",
                    help="batch x context, comma-separated")
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--kv-dtypes", default="bfloat16",
                    help="the cache's dtypes, comma-separated (float8_e4m3fn: an FP8 cache, "
                         "CompileOptions(kv_cache_dtype='fp8'))")
    ap.add_argument("--fp8-dots", default="auto",
                    help="with an FP8 cache, the dtypes its blocks are widened to for the "
                         "dots, comma-separated (auto: the module's choice; float16, "
                         "bfloat16)")
    ap.add_argument("--default-only", action="store_true",
                    help="only the module's tiling (`default`), no sweep")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from models import decode_attention as da
    from models.cache import to_cache

    gpu = jax.default_backend() == "gpu"
    tag = "h200" if gpu and "H200" in jax.devices()[0].device_kind else jax.default_backend()
    out = args.out or os.path.join(common.RESULTS, f"decode_attention_speed_{tag}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)
    kv, g, h = (2, 2, 16) if args.tiny else (8, 4, 128)
    points = ([(2, 40), (3, 64)] if args.tiny else
              [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")])
    settings = ([(256, 16, 32, 2), (1024, 64, 16, 2)] if args.tiny else
                [(t, m, b, s) for (t, m), b, s in itertools.product(SPLITS, BLOCKS, STAGES)])
    dtypes = [jnp.dtype(d) for d in args.kv_dtypes.split(",")]
    bandwidth, kinds = common.copy_bandwidth((1 << 30) if not args.tiny else (1 << 22))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()}})
    L, key = args.layers, jax.random.key(0)
    for batch, context in points:
        s = max(64, 1 << (context - 1).bit_length())  # the cache: a power of two >= context
        shape = (L, batch, s, kv, h)
        qkv = jax.random.normal(key, (batch, kv, g + 2, h), jnp.bfloat16)
        cos = jnp.ones((batch, h), jnp.float32)
        sin = jnp.zeros((batch, h), jnp.float32)
        pos = jnp.full((batch,), context - 1, jnp.int32)
        length = pos + 1
        ref = None
        default = (da.TARGET_PROGRAMS, da.MAX_SPLITS, da.BLOCK_S, da.stages(batch, kv))
        todo = [default] if args.default_only else settings
        dots = args.fp8_dots.split(",")
        for (target, most, block, stages), dtype, dot in itertools.product(todo, dtypes, dots):
            if dtype.itemsize > 1 and dot != dots[0]:
                continue  # a 16-bit cache's dots take q's dtype: once
            dot = None if dot == "auto" or dtype.itemsize > 1 else dot
            read = 2 * L * batch * context * kv * h * dtype.itemsize  # keys and values
            def step(kc, vc, t=target, m=most, b=block, st=stages, d=dot):
                outs = []
                for layer in range(L):
                    o, kc, vc = da.decode_attention(
                        qkv, cos, sin, kc, vc, layer, pos, length, block_s=b, max_splits=m,
                        target_programs=t, num_stages=st, dot_dtype=d)
                    outs.append(o)
                return jnp.stack(outs), kc, vc

            fn = jax.jit(step, donate_argnums=(0, 1))
            kc, vc = (to_cache(jax.random.normal(jax.random.fold_in(key, i), shape,
                                                 jnp.bfloat16), dtype) for i in (1, 2))
            row = {"bench": "decode_attention", "batch": batch, "context": context,
                   "cache_len": s, "layers": L, "target_programs": target, "max_splits": most,
                   "block_s": block, "num_stages": stages, "kv_dtype": dtype.name,
                   "dot_dtype": dot or "auto",
                   "default": (target, most, block, stages) == default}
            try:
                o, kc, vc = fn(kc, vc)
                jax.block_until_ready(o)
            except Exception as e:  # noqa: BLE001 - a tiling the compiler refuses: recorded
                res.emit({**row, "error": str(e).splitlines()[0][:200]})
                continue
            ref = o if ref is None else ref
            err = float(jnp.linalg.norm((o - ref).astype(jnp.float32))
                        / jnp.linalg.norm(ref.astype(jnp.float32)))
            rounds = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(10):
                    o, kc, vc = fn(kc, vc)
                jax.block_until_ready((o, kc, vc))
                rounds.append((time.perf_counter() - t0) / 10)
            per = statistics.median(rounds)
            res.emit({**row, "us_per_layer": per / L * 1e6, "read_bytes": read,
                      "of_copy": read / per / bandwidth, "rel_err_vs_first": err})
            del kc, vc


if __name__ == "__main__":
    main()
