"""One decode row's MLP in FP8 (Llama-3-8B: gate/up 2x14336x4096, down 4096x14336) over a stack
of layers: the fused kernel (models/fp8_mlp.py, one kernel a layer) against the separate path
the model ran before it (models/fp8_gemv.py on gate/up, XLA's SiLU·up, the kernel on down:
three kernels a layer) and bf16 (XLA's GEMVs), each one jitted program over every layer,
weights stacked [L, ...] as the model holds them, layers unrolled as decode runs them.

The limit, the copy bandwidth, is measured in the same run; "of_copy" is (FP8 weight bytes /
time) / copy bandwidth. `rel_err` compares each path with the separate one (the same
roundings: the fused kernel adds its partial sums in the separate kernel's order). `--sweep`
times the fused kernel's tiles, programs per multiprocessor, warps and stages.
Result: benchmarks/results/fp8_mlp_<machine>.jsonl.

    python benchmarks/fp8_mlp.py [--layers 8] [--sweep] [--tiny]
"""

from __future__ import annotations

import argparse
import itertools
import os

import common


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tiny", action="store_true", help="small shapes (a CPU smoke run)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the fused kernel's settings")
    ap.add_argument("--joint", action="store_true",
                    help="sweep tiles and pipeline stages together (stages matter only where "
                         "a tile's contracted block leaves several steps)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default=None, help="suffix of the result file")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from models.fp8_gemv import fp8_gemv
    from models.fp8_mlp import default_programs, fp8_mlp, workspace_size
    from models.quant import quantize_weight

    gpu = jax.default_backend() == "gpu"
    card = jax.devices()[0].device_kind
    tag = next((c.lower() for c in ("H200", "H100") if gpu and c in card), jax.default_backend())
    out = args.out or os.path.join(
        common.RESULTS, f"fp8_mlp_{tag}{'_' + args.tag if args.tag else ''}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)
    d, i = (256, 1536) if args.tiny else (4096, 14336)
    L = args.layers

    bandwidth, kinds = common.copy_bandwidth((1 << 22) if args.tiny else (1 << 30))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()},
              "sms": getattr(jax.devices()[0], "core_count", None)})

    key = jax.random.key(0)
    gu16 = jax.random.normal(jax.random.fold_in(key, 1), (L, 2, i, d), jnp.bfloat16) * 0.02
    dn16 = jax.random.normal(jax.random.fold_in(key, 2), (L, d, i), jnp.bfloat16) * 0.02
    gu = jax.vmap(lambda w: quantize_weight(w, (2,)))(gu16)  # q [L, 2, I, D], scale [L, 2, I]
    dn = jax.vmap(lambda w: quantize_weight(w, (1,)))(dn16)  # q [L, D, I], scale [L, D]
    x = jax.random.normal(jax.random.fold_in(key, 3), (1, d), jnp.bfloat16)
    jax.block_until_ready((gu16, dn16, gu, dn, x))
    fp8_bytes = gu.q.nbytes + dn.q.nbytes
    ws = jnp.zeros((workspace_size(d, i),), jnp.int32)

    def separate(gu, dn, x):
        ys = []
        for l in range(L):
            g_u = fp8_gemv(x, gu.q.reshape(L, 2 * i, d), gu.scale.reshape(L, 2 * i), l)
            h = jax.nn.silu(g_u[:, :i]) * g_u[:, i:]
            ys.append(fp8_gemv(h, dn.q, dn.scale, l))
        return ys

    def fused(gu, dn, x, ws, **settings):
        return [fp8_mlp(x, gu.q, gu.scale, dn.q, dn.scale, l, ws, **settings) for l in range(L)]

    def bf16(gu16, dn16, x):
        ys = []
        for l in range(L):
            g_u = jnp.einsum("td,cfd->tcf", x, gu16[l])
            ys.append((jax.nn.silu(g_u[:, 0]) * g_u[:, 1]) @ dn16[l].T)
        return ys

    def flat(ys):
        return jnp.concatenate([y.astype(jnp.float32).ravel() for y in ys])

    def run(name, fn, *operands, weight_bytes=fp8_bytes, ref=None, **cfg):
        row = {"bench": name, "rows": 1, "layers": L, **cfg}
        try:
            compiled = jax.jit(fn).lower(*operands).compile()
            _, per = common.timed_bursts(lambda: compiled(*operands), 5, 10)
        except Exception as e:  # a setting the compiler refuses is a result too
            res.emit({**row, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"})
            return None, None
        y = flat(compiled(*operands))
        err = None if ref is None else float(jnp.linalg.norm(y - ref) / jnp.linalg.norm(ref))
        res.emit({**row, "ms": per * 1e3, "us_per_layer": per * 1e6 / L,
                  "weight_bytes": weight_bytes, "of_copy": weight_bytes / per / bandwidth,
                  "rel_err_vs_separate": err})
        return per, y

    _, ref = run("separate", separate, gu, dn, x)
    run("bf16", bf16, gu16, dn16, x, weight_bytes=gu16.nbytes + dn16.nbytes, ref=ref)
    sms = getattr(jax.devices()[0], "core_count", None) or 132
    base = {"programs": default_programs() if gpu else 2}
    run("fused", lambda *a: fused(*a, **base), gu, dn, x, ws, ref=ref, **base)

    def fused_at(**settings):
        size = workspace_size(d, i, **{k: v for k, v in settings.items()
                                       if k in ("block_i", "block_d", "block_n", "chunk")})
        w = jnp.zeros((size,), jnp.int32)
        return run("fused-sweep", lambda *a: fused(*a, **settings), gu, dn, x, w, ref=ref,
                   **settings)[0]

    if args.joint:
        for programs, bi, bd, stages in itertools.product((4 * sms, 8 * sms), (8, 16),
                                                          (512, 1024, 2048), (2, 3, 4)):
            fused_at(programs=programs, block_i=bi, block_d=bd, block_n=16, chunk=2048,
                     num_stages=stages)

    if args.sweep:

        # programs per SM first, then tiles, then warps and stages, each around the best
        best = dict(programs=base["programs"])
        timed = {}
        for per_sm in (1, 2, 4, 8, 16):
            timed[per_sm] = fused_at(programs=per_sm * sms)
        per_sm = min((k for k in timed if timed[k]), key=timed.get, default=4)
        best = {"programs": per_sm * sms}
        results = {}
        for bi, bd, bn, ch in itertools.product((8, 16), (1024, 2048, 4096), (8, 16),
                                                (1024, 2048)):
            tiles = dict(block_i=bi, block_d=bd, block_n=bn, chunk=ch)
            t = fused_at(**best, **tiles)
            if t:
                results[tuple(tiles.items())] = t
        if results:
            best.update(dict(min(results, key=results.get)))
        for warps, stages in itertools.product((2, 4, 8), (1, 2, 3)):
            fused_at(**best, num_warps=warps, num_stages=stages)


if __name__ == "__main__":
    main()
