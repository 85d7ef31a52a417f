"""Compute-only ceiling of a tensor-parallel layer: what one device computes per layer at tp N,
timed on one GPU with no communication at all.

Under TP and SP alike each device runs one layer's matmuls on all T tokens with 1/tp of the
heads and of the MLP width (SP moves the norms to T/tp rows, a small saving left out here), plus
its heads' attention. So a layer of the *shard-shaped* model (N/tp query heads, K/tp KV heads,
F/tp MLP width, D unchanged) run on one device is the time a tp-N layer would take if every
collective hid perfectly. `benchmarks/multi_gpu.py` measures TP's real time; TP / ceiling is the
most any overlap (SP collective matmul or overlapped TP) can win at that size.

One layer's time is a difference, as in multi_gpu.py: first pipeline stages (embedding + layers,
no LM head) of `--layers` and half as many layers, each the median over rounds of calls launched
back to back; (t(L) - t(L/2)) / (L - L/2). Weights are drawn on the device (normal * 0.02).
Also records the run's bf16 matmul peak (an 8192^3 dot) so the ceiling can be read as a share
of it. One JSON line per (shape, tp, tokens).

    python benchmarks/compute_ceiling.py [--shapes llama3-8b,llama3-70b] [--tp 2,4,8]
        [--tokens 1024,4096,16384] [--out benchmarks/results/compute_ceiling_h200.jsonl]
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from common import machine, timed_bursts  # noqa: E402  (and the repository on the path)


def shard_config(cfg, tp: int):
    """The model one device of a tp-N mesh computes: heads, KV heads and MLP width over tp (KV
    heads fewer than tp stay one per device, as TP replicates them)."""
    if cfg.num_heads % tp or cfg.intermediate_size % tp:
        raise ValueError(f"tp={tp} must divide the heads ({cfg.num_heads}) and the MLP width "
                         f"({cfg.intermediate_size})")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // tp,
                               num_kv_heads=max(1, cfg.num_kv_heads // tp),
                               intermediate_size=cfg.intermediate_size // tp, vocab_size=1024)


def device_state(rt, seed: int = 0):
    """Random parameters made on the device, in the runtime's layout (no host copy)."""
    import jax

    abstract = rt.abstract_state()
    leaves, tree = jax.tree.flatten(abstract)
    keys = jax.random.split(jax.random.key(seed), len(leaves))

    def draw(key, s):
        return jax.jit(lambda k: (0.02 * jax.random.normal(k, s.shape, "float32")).astype(
            s.dtype), out_shardings=s.sharding)(key)

    return jax.tree.unflatten(tree, [draw(k, s) for k, s in zip(keys, leaves)])


def matmul_peak(repeats: int, burst: int) -> float:
    """bf16 TFLOP/s of an 8192^3 dot on this device, in this run."""
    import jax
    import jax.numpy as jnp

    n = 8192
    a = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (n, n), jnp.bfloat16)
    dot = jax.jit(lambda a, b: a @ b)
    _, sec = timed_bursts(lambda: dot(a, b), repeats, burst)
    return 2 * n**3 / sec / 1e12


def layer_flops(cfg, tokens: int) -> float:
    """Matmul and causal-attention FLOPs of one layer of `cfg` over `tokens` tokens."""
    d, n, k, h, f = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                     cfg.intermediate_size)
    dense = 2 * tokens * (d * (n + 2 * k) * h + n * h * d + 3 * d * f)
    attention = 2 * 2 * n * h * tokens * tokens / 2  # QK^T and PV, half the pairs are causal
    return dense + attention


def main():
    import jax
    import numpy as np

    from jax_sp.config import ParallelConfig
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime, Stage

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--tp", default="2,4,8")
    ap.add_argument("--tokens", default="1024,4096,16384")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--burst", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    machine_name = machine()
    peak = matmul_peak(args.repeats, args.burst)
    rows = []
    hi, lo = args.layers, args.layers // 2
    for shape in args.shapes.split(","):
        for tp in (int(x) for x in args.tp.split(",")):
            cfg = shard_config(preset(shape), tp)
            stages = {n: Runtime(dataclasses.replace(cfg, num_layers=n),
                                 ParallelConfig(tp=1, sp="off"), args.dtype,
                                 stage=Stage(0, 2, 0, n)) for n in (lo, hi)}
            states = {n: device_state(rt) for n, rt in stages.items()}
            for t in (int(x) for x in args.tokens.split(",")):
                ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t)).astype("int32")
                lengths = np.array([t], "int32")
                got = {}
                for n, rt in stages.items():
                    got[n] = timed_bursts(lambda: rt.logits(states[n], ids, lengths,  # noqa: B023
                                                     False, out="last"),
                                   args.repeats, args.burst)[1]
                sec = (got[hi] - got[lo]) / (hi - lo)
                flops = layer_flops(cfg, t)
                row = {"bench": "compute_ceiling", "shape": shape, "tp": tp, "tokens": t,
                       "ceiling_ms": sec * 1e3,
                       # twice the layers not 25% slower: per-call costs dominate, the
                       # difference is noise (as multi_gpu.py marks its rows)
                       "host_bound": got[hi] < 1.25 * got[lo], "layer_tflop": flops / 1e12,
                       "tflops": flops / sec / 1e12, "matmul_peak_tflops": peak,
                       "attention": stages[hi].attention.name, "stage_ms": [got[lo] * 1e3,
                                                                        got[hi] * 1e3],
                       "machine": machine_name, "jax": jax.__version__}
                rows.append(row)
                print(json.dumps(row), flush=True)
            states.clear()
    if args.out:
        with open(args.out, "w") as fh:
            fh.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
