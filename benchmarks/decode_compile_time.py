"""What unrolling the decode layer loop costs in compile time.

Compiles one decode step (greedy, batch 8, cache 1024, tp 1, bf16) ahead of time from abstract
shapes — no weights are allocated, so 70B-shaped models fit anywhere — with the layer loop rolled
(unroll 1) and fully unrolled (the GPU default, jax_sp.generate.decode_unroll), and records
lowering and compile seconds. JSON lines on stdout and in --out; a bar chart next to it.

    python benchmarks/decode_compile_time.py --models smollm2,llama3.2-1b,llama3-8b,llama3-70b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def compile_times(model: str, batch: int, max_len: int):
    import jax

    from jax_sp.config import ParallelConfig
    from jax_sp.generate import Static, abstract_decode_step_args, decode_step_fn
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime

    cfg = preset(model)
    rt = Runtime(cfg, ParallelConfig(tp=1, sp="off"), dtype="bfloat16")
    args = abstract_decode_step_args(rt, batch, max_len)
    for unroll in (1, cfg.num_layers):
        fn = decode_step_fn(rt, Static(sp=False, greedy=True, top_k=0, unroll=unroll))
        t0 = time.perf_counter()
        lowered = jax.jit(fn, donate_argnums=(1,)).lower(*args)
        t1 = time.perf_counter()
        lowered.compile(rt.xla_options(False))
        t2 = time.perf_counter()
        yield {"bench": "decode-compile-time", "model": model, "layers": cfg.num_layers,
               "unroll": unroll, "batch": batch, "cache": max_len, "lower_s": t1 - t0,
               "compile_s": t2 - t1, "platform": jax.devices()[0].platform,
               "device": jax.devices()[0].device_kind, "jax": jax.__version__}


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for k, (label, pick) in enumerate((("layer loop", lambda r: r["unroll"] == 1),
                                       ("unrolled", lambda r: r["unroll"] == r["layers"]))):
        vals = [next(r["compile_s"] for r in rows if r["model"] == m and pick(r)) for m in models]
        ax.bar([i + 0.4 * k for i in range(len(models))], vals, 0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(models))],
                  [f"{m}\n{next(r['layers'] for r in rows if r['model'] == m)} layers"
                   for m in models])
    ax.set_ylabel("compile s, one decode step")
    ax.set_title(f"decode step compile time ({rows[0]['platform']}, batch {rows[0]['batch']}, "
                 f"cache {rows[0]['cache']})", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="smollm2,llama3.2-1b,llama3-8b,llama3-70b")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--cache", type=int, default=1024)
    ap.add_argument("--out", default=None, help="JSON-lines file (and a .png beside it)")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        for row in compile_times(model, args.batch, args.cache):
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        plot(rows, args.out.replace(".jsonl", ".png"))


if __name__ == "__main__":
    main()
