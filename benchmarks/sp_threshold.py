"""Where does SP start to pay? Prefill with sp off vs on over token counts, side by side.

For each padded token count T: the per-layer collective census, XLA's per-device temporary
memory, and the median wall time of a prefill (last-token logits, as generation runs it) with
each mode, measured alternately in one run. Prints one JSON line per (T, mode) and writes a PNG.

    python benchmarks/sp_threshold.py --model smollm2 --tp 4 [--devices 8]

On simulated CPU devices the collectives are memory copies inside one process, so the timing
says what SP costs in extra ops and saves in norm work, not what a network would do.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--tokens", default="16,32,64,128,256,512,1024,2048,4096")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--replot", help="only redraw the plot of a JSONL file this script wrote")
    args = ap.parse_args()
    if args.replot:
        rows = [json.loads(line) for line in open(args.replot)]
        r = rows[0]
        plot(rows, args.replot.replace(".jsonl", ".png"),
             f"{r['model']} ({r['layers']} layers), tp={r['tp']}, {r['machine']}")
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from jax_sp.cli import ensure_devices

    ensure_devices(args.tp)
    import dataclasses

    import jax
    import numpy as np

    from jax_sp.config import ParallelConfig
    from jax_sp.inspect import memory_of
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime, random_params
    from sharding.hlo import census, summarize

    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    rt = Runtime(cfg, ParallelConfig(tp=args.tp))
    state = rt.place(random_params(cfg))
    machine = f"{platform.node()} {jax.devices()[0].device_kind} x{len(jax.devices())}"
    rows = []
    for t in (int(x) for x in args.tokens.split(",")):
        ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (1, t)).astype(np.int32)
        pos = np.arange(t, dtype=np.int32)[None]
        lengths = np.array([t], np.int32)
        fns, result = {}, {}
        for sp in (False, True):
            compiled = rt.prefill_logits(sp, False, True).lower(state, ids, pos, lengths).compile()
            fns[sp] = compiled
            summary = summarize(census(compiled.as_text(), cfg.num_layers), cfg.num_layers)
            result[sp] = {"memory": memory_of(compiled), "layer": summary.get("layer", {}),
                          "times": []}
            compiled(state, ids, pos, lengths)[0].block_until_ready()  # warm up
        for _ in range(args.repeats):  # alternate modes so drift hits both alike
            for sp in (False, True):
                t0 = time.perf_counter()
                fns[sp](state, ids, pos, lengths)[0].block_until_ready()
                result[sp]["times"].append(time.perf_counter() - t0)
        for sp in (False, True):
            r = result[sp]
            row = {"bench": "sp_threshold", "model": args.model, "layers": cfg.num_layers,
                   "tp": args.tp, "tokens": t, "sp": "on" if sp else "off",
                   "median_ms": 1e3 * statistics.median(r["times"]),
                   "min_ms": 1e3 * min(r["times"]), "max_ms": 1e3 * max(r["times"]),
                   "temp_mib": r["memory"]["temp_size"] / 2**20,
                   "layer_collectives": {k: v["count"] for k, v in r["layer"].items()},
                   "layer_wire_mib": sum(v["wire_bytes"] for v in r["layer"].values()) / 2**20,
                   "machine": machine}
            rows.append(row)
            print(json.dumps(row), flush=True)
        off, on = rows[-2], rows[-1]
        print(json.dumps({"bench": "sp_threshold_ratio", "tokens": t,
                          "time_on_over_off": on["median_ms"] / off["median_ms"],
                          "memory_on_over_off": on["temp_mib"] / off["temp_mib"]}), flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"sp_threshold_{args.model}_tp{args.tp}_"
                                  f"{jax.devices()[0].platform}")
    with open(stem + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    plot(rows, stem + ".png", f"{args.model} ({cfg.num_layers} layers), tp={args.tp}, {machine}")


def plot(rows, path, title):
    """Left: median prefill time, sp on / off. Right: per-device temp memory, sp on / off."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    by = {(r["tokens"], r["sp"]): r for r in rows}
    tokens = sorted({r["tokens"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "median_ms", "prefill time, sp on / off"),
                           (axes[1], "temp_mib", "temp memory per device, sp on / off")):
        ax.plot(tokens, [by[t, "on"][key] / by[t, "off"][key] for t in tokens], "o-")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("padded tokens of the forward")
        ax.set_title(label)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
