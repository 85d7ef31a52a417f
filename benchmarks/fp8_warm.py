"""Warming the next projection's weight into L2 from the FP8 GEMV's tail (models/fp8_gemv.py
`warm`): one row through Llama-3-8B layers as decode runs them (q/k/v, o_proj plus the
residual, a norm, gate/up, SiLU x up, down_proj plus the residual; each product the weight-only
kernel on the stacked weights, each kernel's output the next one's input), with the first `MB`
of the next projection's weight read into L2 by programs appended to each kernel's grid, against
the same chain without them.

Settings: warmed megabytes a kernel (0: none), the kernels' own weight loads marked evict_first
or not, CompileOptions.launch_dependents on or off (models/pdl.py), and a control that warms as
many bytes of a layer the chain reads only much later (what the warming reads costs, without
what the next kernel's hits save). All are compiled first, then
timed in alternating rounds; medians of the rounds. The limit, the copy bandwidth, is measured
in the same run; "of_copy" is the weight bytes over the time against it. The outputs of every
setting are checked equal to the plain chain's. Result: benchmarks/results/fp8_warm_<card>.jsonl.

    python benchmarks/fp8_warm.py [--layers 8] [--mb 0,4,8,16,32] [--other 0,1] [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics

import common
from fp8_gemv import SHAPES, TINY


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mb", default="0,4,8,16,32", help="megabytes warmed a kernel")
    ap.add_argument("--evict", default="0,1", help="evict_first on the kernels' own loads")
    ap.add_argument("--pdl", default="0,1", help="launch_dependents off / on")
    ap.add_argument("--other", default="0,1", help="warm the next weight (0) or, as a "
                    "control, the same bytes of a layer not read soon after (1)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import pdl
    from models.fp8_gemv import fp8_gemv
    from models.quant import quantize_weight

    gpu = jax.default_backend() == "gpu"
    kind = jax.devices()[0].device_kind
    card = next((c.lower() for c in ("H200", "H100") if gpu and c in kind), jax.default_backend())
    out = args.out or os.path.join(common.RESULTS, f"fp8_warm_{card}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)
    shapes = TINY if args.tiny else SHAPES
    L = args.layers
    bandwidth, kinds = common.copy_bandwidth((1 << 30) if not args.tiny else (1 << 22))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()}})

    key = jax.random.key(0)
    fp8 = {}
    for i, (name, (n, k)) in enumerate(shapes.items()):
        w = jax.random.normal(jax.random.fold_in(key, i), (L, k, n), jnp.bfloat16) * 0.02
        fp8[name] = jax.vmap(lambda w: quantize_weight(w, (0,)))(w)  # q [L, N, K]
    jax.block_until_ready(fp8)
    nbytes = sum(q.q.nbytes for q in fp8.values())
    d = shapes["o"][0]
    f = shapes["down"][1]
    x0 = jax.random.normal(jax.random.fold_in(key, 99), (1, d), jnp.bfloat16)

    def chain(ws, x, mb, evict, other):
        order = list(shapes)  # qkv, o, gate_up, down

        def gemv(name, h, l):
            nxt = order[(order.index(name) + 1) % 4]
            nl = l + 1 if name == "down" else l  # past the last layer: nothing warmed
            if other:  # the control: as many bytes of a layer the chain reads much later
                nl = (nl + L // 2) % L
            k_next = shapes[nxt][1]
            warm = (ws[nxt].q, nl, (mb << 20) // k_next) if mb else None
            return fp8_gemv(h, ws[name].q, ws[name].scale, l, warm=warm, evict_first=evict)

        def norm(h):
            h32 = h.astype(jnp.float32)
            return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + 1e-6)
                    ).astype(h.dtype)

        h = x
        for l in range(L):
            qkv = gemv("qkv", norm(h), l)
            h = h + gemv("o", qkv[:, :d], l)
            gu = gemv("gate_up", norm(h), l)
            h = h + gemv("down", jax.nn.silu(gu[:, :f]) * gu[:, f:], l)
        return h

    def ints(text):
        return [int(v) for v in text.split(",")]

    settings = [(mb, bool(ev), bool(sig), bool(oth)) for mb, ev, sig, oth in itertools.product(
        ints(args.mb), ints(args.evict), ints(args.pdl), ints(args.other))
        if mb or not (ev or oth)]  # evict_first and the control: only where something is warmed
    compiled = {}
    for mb, evict, signal, other in settings:
        with pdl.signalling(signal):
            fn = jax.jit(lambda ws, x, mb=mb, evict=evict, other=other: chain(ws, x, mb, evict,
                                                                              other))
            compiled[mb, evict, signal, other] = fn.lower(fp8, x0).compile()
    ref = np.asarray(compiled[settings[0]](fp8, x0).astype(jnp.float32))
    same = {s: bool((np.asarray(c(fp8, x0).astype(jnp.float32)) == ref).all())
            for s, c in compiled.items()}
    times = {s: [] for s in compiled}
    for _ in range(args.rounds):
        for s, c in compiled.items():
            times[s].append(common.timed_bursts(lambda c=c: c(fp8, x0), 3, 10)[1])
    base = {s[2]: statistics.median(times[s]) for s in settings if s[0] == 0}
    for (mb, evict, signal, other), ts in times.items():
        per = statistics.median(ts)
        res.emit({"bench": "warm", "layers": L, "warm_mb": mb, "evict_first": evict,
                  "launch_dependents": signal, "control": other, "ms": per * 1e3,
                  "us_per_layer": per * 1e6 / L, "rounds_ms": [t * 1e3 for t in ts],
                  "weight_bytes": nbytes, "of_copy": nbytes / per / bandwidth,
                  "same_output": same[mb, evict, signal, other],
                  "speedup_vs_unwarmed": (base[signal] / per) if signal in base else None})


if __name__ == "__main__":
    main()
