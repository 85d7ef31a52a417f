"""Which instructions the Pallas (Triton) kernels' dots and conversions become on this GPU: each
kernel variant compiled once with XLA's dump on, and the PTX of each program counted for its
tensor-core instructions (`mma.sync` by operand type, `wgmma`) and its FP8 conversions. Answers
whether a dot that takes FP8 operands in Triton's IR runs on FP8 tensor cores (on Hopper,
Triton's `mma.sync` path widens FP8 operands to float16 first: docs/fp8.md), and what widening
an FP8 block to float16 or bfloat16 costs in instructions. Result:
benchmarks/results/ptx_census_<machine>.jsonl.

    python benchmarks/ptx_census.py    # GPU
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile

import common

# instruction patterns counted in each program's PTX
PATTERNS = {
    "mma_f16": r"mma\.sync\.aligned\.\S+\.f32\.f16\.f16\.f32",
    "mma_bf16": r"mma\.sync\.aligned\.\S+\.f32\.bf16\.bf16\.f32",
    "mma_e4m3": r"mma\.sync\.aligned\.\S+\.e4m3\.e4m3",
    "wgmma": r"wgmma\.mma_async",
    "cvt_e4m3x2_to_f16x2": r"cvt\.rn\.f16x2\.e4m3x2",
    "cvt_f16_to_bf16": r"cvt\.(rn\.)?bf16\.f16",
    "cvt_f16_to_f32": r"cvt\.f32\.f16",
    "cvt_f32_to_bf16": r"cvt\.rn\.bf16\.f32",
    "cvt_to_e4m3x2": r"cvt\.rn\.satfinite\.e4m3x2",
}
KERNELS = ("fp8_gemv", "decode_attention")  # the Pallas kernels' entry names contain these


def entries(text: str) -> dict:
    """PTX (or LLVM IR) text -> {kernel name: its body}, one per `.entry` (`define`)."""
    if re.search(r"^\s*(?:\.visible\s+)?\.entry\s", text, flags=re.M):
        parts = re.split(r"^\s*(?:\.visible\s+)?\.entry\s+", text, flags=re.M)[1:]
        return {part.split("(", 1)[0].strip(): part for part in parts}
    parts = re.split(r"^define\s", text, flags=re.M)[1:]
    return {m.group(1): part for part in parts if (m := re.search(r"@([\w.$]+)\(", part))}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dump = tempfile.mkdtemp(prefix="ptx_census_")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump}")

    import jax
    import jax.numpy as jnp

    from models import decode_attention as da
    from models.cache import to_cache
    from models.fp8_gemv import fp8_gemv

    tag = common.machine().split()[2].lower()  # "1x NVIDIA H100 80GB HBM3" -> h100
    out = args.out or os.path.join(common.RESULTS, f"ptx_census_{tag}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)
    key = jax.random.key(0)
    f8 = jnp.float8_e4m3fn
    wq = jax.random.normal(key, (2, 1024, 4096), jnp.float32).astype(f8)
    scale = jnp.ones((2, 1024), jnp.float32)
    # fp8_gemv's tensor-core tile (32 and 64 rows: wgmma takes 64) with its rows in bf16
    # ("pallas"), float16 ("pallas-f16") and FP8 ("pallas-w8a8"); the decode-attention kernel
    # over an FP8 cache with its blocks widened to float16 (its default) and to bfloat16
    cases = {}
    for rows in (32, 64):
        x = jax.random.normal(key, (rows, 4096), jnp.bfloat16)
        cases.update({
            f"gemv_tile{rows}_bf16": lambda x=x: fp8_gemv(x, wq, scale, 1),
            f"gemv_tile{rows}_f16": lambda x=x: fp8_gemv(x.astype(jnp.float16), wq, scale, 1,
                                                          out_dtype=jnp.bfloat16),
            f"gemv_tile{rows}_w8a8": lambda x=x: fp8_gemv(
                x.astype(f8), wq, scale, 1, x_scale=jnp.ones((x.shape[0],), jnp.float32),
                out_dtype=jnp.bfloat16)})
    shape = (2, 8, 1024, 8, 128)
    cache = to_cache(jax.random.normal(key, shape, jnp.bfloat16), f8)
    qkv = jax.random.normal(key, (8, 8, 6, 128), jnp.bfloat16)
    trig = jnp.ones((8, 128), jnp.float32)
    pos = jnp.full((8,), 1000, jnp.int32)
    for dot in ("float16", "bfloat16"):
        cases[f"attention_fp8_cache_{dot}"] = (
            lambda dot=dot: da.decode_attention(qkv, trig, trig * 0, cache, cache, 1, pos,
                                                pos + 1, dot_dtype=dot)[0])
    for name, fn in cases.items():
        before = set(glob.glob(os.path.join(dump, "*")))
        jax.block_until_ready(jax.jit(fn)())
        made = set(glob.glob(os.path.join(dump, "*"))) - before
        # the program's PTX; else its optimized LLVM IR (Triton writes its mma as inline PTX)
        new = (sorted(p for p in made if p.endswith(".ptx"))
               or sorted(p for p in made if p.endswith("ir-with-opt.ll")))
        counts, names = collections.Counter(), []
        for path in new:  # the Pallas kernels' entries only, not XLA's own fusions
            for entry, body in entries(open(path).read()).items():
                if any(k in entry for k in KERNELS):
                    names.append(entry)
                    for k, pattern in PATTERNS.items():
                        counts[k] += len(re.findall(pattern, body))
        res.emit({"bench": "ptx", "case": name, "files": [os.path.basename(p) for p in new],
                  "entries": names, **{k: counts[k] for k in PATTERNS}})
    if not any(r["entries"] for r in res.rows):
        print(f"no kernel entry in the dump ({dump}): {sorted(os.listdir(dump))[:20]}",
              file=sys.stderr)


if __name__ == "__main__":
    main()
