"""Decode over long caches with the KV cache in 16 bits and in FP8
(`CompileOptions(kv_cache_dtype="fp8")`), side by side in one run: ms per token per batch and
context, the bytes a step reads (weights once, every sequence's keys and values up to its
position) against the copy bandwidth measured in the same run, and how many greedy tokens the
FP8 cache keeps (random weights in the model's shape; the first token comes from the prefill,
which reads no cache, so agreement is over the decoded ones). `--fp8-dots bfloat16` also runs
the FP8 cache with the decode kernel's blocks widened to bfloat16 rather than its own choice
(models/decode_attention.py `dot_dtype`, which CompileOptions does not expose: the kernel's
default is patched while that model compiles). Result:
benchmarks/results/kv_cache_speed_<machine>_<model>.jsonl (and .png).

    python benchmarks/kv_cache_speed.py --model llama3.2-1b --batches 8,32 --prompt 2048  # GPU
    python benchmarks/kv_cache_speed.py --tiny                                         # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import os
import statistics

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--prompt", type=int, default=2048, help="prompt tokens per sequence")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU plumbing)")
    ap.add_argument("--fp8-dots", default="",
                    help="also the FP8 cache with the attention kernel's dots in these dtypes, "
                         "comma-separated (bfloat16, float16)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.tiny:
        args.batches, args.prompt, args.new_tokens, args.dtype = "2", 40, 8, "float32"

    import jax
    import numpy as np

    from generation import hf_module
    from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
    from jax_sp.presets import preset

    cfg = preset(args.model)
    if args.tiny:
        cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=512, hidden_size=64,
                                  intermediate_size=128, num_heads=4, num_kv_heads=2,
                                  head_dim=16)
    gpu = jax.default_backend() == "gpu"
    module = hf_module(cfg, args.dtype, "cuda" if gpu else "cpu")
    tag = common.machine().split(" ", 1)[1].split()[-1].lower()
    out = args.out or os.path.join(
        common.RESULTS, f"kv_cache_speed_{tag}_{'tiny' if args.tiny else args.model}.jsonl")
    res = common.Results(out, machine=common.machine(), model=args.model, tiny=args.tiny,
                         dtype=args.dtype, prompt=args.prompt, new_tokens=args.new_tokens)
    bandwidth, _ = common.copy_bandwidth((1 << 30) if gpu else (1 << 24))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9})
    max_len = args.prompt + args.new_tokens
    # label -> (kv_cache_dtype, the attention kernel's dot_dtype over the FP8 cache)
    kinds = {"auto": ("auto", None), "fp8": ("fp8", None),
             **{f"fp8/dots={d}": ("fp8", d) for d in args.fp8_dots.split(",") if d}}
    llms = {label: LLM.from_torch(module, parallel=ParallelConfig(tp=1), dtype=args.dtype,
                                  max_seq_len=max_len, options=CompileOptions(kv_cache_dtype=kv))
            for label, (kv, _) in kinds.items()}
    del module
    weights = sum(x.nbytes for x in jax.tree.leaves(llms["auto"].state))
    weights -= common.unread_embedding_bytes(cfg, np.dtype(llms["auto"].runtime.dtype).itemsize)
    rng = np.random.default_rng(0)
    sampling = SamplingParams(max_new_tokens=args.new_tokens, stop_token_ids=())
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        tokens = {}
        for label, llm in llms.items():
            with dots(kinds[label][1]):  # compiles
                tokens[label] = [c.token_ids for c in llm.generate(prompts, sampling)]
            per = []
            for _ in range(args.repeats):
                llm.generate(prompts, sampling)
                per.append(llm.last_stats.decode_s / (args.new_tokens - 1))
            itemsize = np.dtype(llm.runtime.cache_dtype).itemsize
            # the mean context over the decoded tokens: prompt + half of them
            context = args.prompt + args.new_tokens / 2
            cache = 2 * cfg.num_layers * batch * context * cfg.num_kv_heads * cfg.head_dim
            read = weights + cache * itemsize
            ms = statistics.median(per)
            res.emit({"bench": "decode", "kv_cache_dtype": kinds[label][0],
                      "dot_dtype": kinds[label][1] or "auto", "batch": batch,
                      "ms_per_token": ms * 1e3, "spread_ms": [p * 1e3 for p in per],
                      "read_bytes": read, "cache_bytes": cache * itemsize,
                      "weight_bytes": weights, "of_copy": read / ms / bandwidth})
        for label in list(kinds)[1:]:
            same = np.concatenate([np.asarray(a[1:]) == np.asarray(b[1:])
                                   for a, b in zip(tokens["auto"], tokens[label])])
            first = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
                     for a, b in zip(tokens["auto"], tokens[label])]
            res.emit({"bench": "agreement", "batch": batch, "dot_dtype": kinds[label][1] or "auto",
                      "decoded_tokens_equal": float(same.mean()),
                      "first_difference_median": float(np.median(first))})
    plot(res.rows, out.replace(".jsonl", ".png"))


@contextlib.contextmanager
def dots(dot_dtype):
    """The attention kernel's dots over an FP8 cache in `dot_dtype` while a program traces
    (None: the kernel's own choice)."""
    from models import decode_attention as da

    kernel = da.decode_attention
    if dot_dtype:
        da.decode_attention = functools.partial(kernel, dot_dtype=dot_dtype)
    try:
        yield
    finally:
        da.decode_attention = kernel


def plot(rows, path):
    plt = common.pyplot()
    dec = [r for r in rows if r["bench"] == "decode" and r.get("dot_dtype", "auto") == "auto"]
    if plt is None or not dec:
        return
    batches = sorted({r["batch"] for r in dec})
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, kv in enumerate(("auto", "fp8")):
        ms = [next(r["ms_per_token"] for r in dec if r["batch"] == b and r["kv_cache_dtype"] == kv)
              for b in batches]
        ax.bar([j + 0.4 * i for j in range(len(batches))], ms, 0.4,
               label={"auto": "16-bit cache", "fp8": "FP8 cache"}[kv])
    ax.set_xticks([j + 0.2 for j in range(len(batches))], [f"batch {b}" for b in batches])
    ax.set_ylabel("ms per token")
    ax.legend()
    ax.set_title(f"{rows[0]['machine']}, {rows[0]['model']}: decode after "
                 f"{rows[0]['prompt']} tokens", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
