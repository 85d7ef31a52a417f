"""Training activation memory per device: sp off/on x remat none/full/selective.

Compiles the train step (jax_sp/train.py) for a Llama-3.2-1B-shaped model on tp simulated CPU
devices with abstract parameters (no weights are made) and reads XLA's compiled memory analysis:
temporary bytes per device (activations kept for the backward pass plus workspace). Next to it,
Korthikanti et al. (2022), "Reducing Activation Recomputation in Large Transformer Models",
per-layer activation bytes with 16-bit activations: TP sbh(10 + 24/t + 5as/(ht)); TP+SP
sbh/t (34 + 5as/h); selective recomputation drops the 5as/h attention term; full recomputation
keeps 2sbh (TP) or 2sbh/t (SP) per layer.

    python benchmarks/train_memory.py [--tp 8] [--tokens 2048,8192] [--layers 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

from common import pyplot, write_jsonl  # noqa: E402  (and the repository on the path)


def paper_bytes(s, b, h, a, t, layers, sp, remat):
    """Korthikanti et al.'s activation memory per device, all layers, 16-bit activations."""
    if remat == "full":
        per = 2 * s * b * h / (t if sp else 1)
    elif sp:
        per = s * b * h / t * (34 + (0 if remat == "selective" else 5 * a * s / h))
    else:
        per = s * b * h * (10 + 24 / t + (0 if remat == "selective" else 5 * a * s / (h * t)))
    return per * layers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--tokens", default="2048,8192")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    from jax_sp.cli import ensure_devices

    ensure_devices(args.tp)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import time

    from jax_sp import ParallelConfig
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime
    from jax_sp.train import TrainConfig, Trainer

    cfg = dataclasses.replace(preset("llama3.2-1b"), num_layers=args.layers)
    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        for remat in ("none", "selective", "full"):
            for sp in (False, True):
                rt = Runtime(cfg, ParallelConfig(tp=args.tp), args.dtype)
                t0 = time.perf_counter()
                compiled = Trainer(rt, TrainConfig(remat=remat), sp).lower(1, t).compile()
                mem = compiled.memory_analysis()
                row = {"bench": "train_memory", "model": "llama3.2-1b", "layers": args.layers,
                       "tp": args.tp, "tokens": t, "sp": sp, "remat": remat,
                       "dtype": args.dtype, "temp_bytes": mem.temp_size_in_bytes,
                       "argument_bytes": mem.argument_size_in_bytes,
                       "paper_activation_bytes": paper_bytes(
                           t, 1, cfg.hidden_size, cfg.num_heads, args.tp, args.layers, sp,
                           remat),
                       "compile_s": time.perf_counter() - t0}
                rows.append(row)
                print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_memory_tp{args.tp}_cpu")
    write_jsonl(stem + ".jsonl", rows)
    plot(rows, stem + ".png")


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return

    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(tokens), figsize=(6 * len(tokens), 4), squeeze=False)
    for ax, t in zip(axes[0], tokens):
        labels, measured, paper = [], [], []
        for remat in ("none", "selective", "full"):
            for sp in (False, True):
                r = next(x for x in rows if x["tokens"] == t and x["remat"] == remat
                         and x["sp"] == sp)
                labels.append(f"{'TP+SP' if sp else 'TP'}\n{remat}")
                measured.append(r["temp_bytes"] / 2 ** 30)
                paper.append(r["paper_activation_bytes"] / 2 ** 30)
        xs = range(len(labels))
        ax.bar([x - 0.2 for x in xs], measured, 0.4, label="jax-sp: XLA temp bytes / device")
        ax.bar([x + 0.2 for x in xs], paper, 0.4, label="Korthikanti et al. formula")
        ax.set_xticks(list(xs), labels, fontsize=8)
        ax.set_ylabel("GiB per device")
        ax.set_title(f"Llama-3.2-1B shape, {t} tokens, tp {rows[0]['tp']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
