"""Per-op timing of SP's two collective matmuls on N devices, side by side in one run.

  column: x In[T_tp, D] -> all-gather -> @ w In[D, F_tp]   (q/k/v, gate/up)
  row:    h In[T, F_tp] @ w In[F_tp, D] -> reduce-scatter -> Out[T_tp, D]   (o_proj, down_proj)

Variants: "xla" (XLA's all-gather / reduce-scatter next to the dot, no windowed einsum),
"xla-windowed" (the same with jax-sp's windowed-einsum options; GPU only), "ring" and
"ring-bidi" (sharding/collective_matmul.py). Each result is checked against the plain product
first, then timed: median and spread of --repeats runs after a warm-up, compile time apart.
Prints JSON lines and writes a PNG.

    python benchmarks/collective_matmul.py --shapes llama3-8b,llama3-70b --tokens 256,1024,4096
    python benchmarks/collective_matmul.py --cpu-devices 8 --shapes tiny   # plumbing on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from common import Results, machine, pyplot  # (and the repository on the import path)

SHAPES = {"tiny": (256, 896), "llama3-8b": (4096, 14336), "llama3-70b": (8192, 28672)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--repeats", type=int, default=10, help="timed rounds (median)")
    ap.add_argument("--burst", type=int, default=4, help="calls per round, waited for once")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cpu-devices", type=int, default=0, help="simulate N CPU devices")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    from jax_sp.cli import ensure_devices  # before the backend starts

    if args.cpu_devices:
        ensure_devices(args.cpu_devices)
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec as P

    from sharding.collective_matmul import all_gather_matmul, matmul_reduce_scatter
    from sharding.mesh import make_mesh
    from sharding.xla_options import WINDOWED_EINSUM

    n = len(jax.devices())
    mesh = make_mesh(n)
    platform = jax.devices()[0].platform
    machine_name = machine()
    dtype = jnp.dtype(args.dtype)
    rows_s, cols_s = NamedSharding(mesh, P("tp", None)), NamedSharding(mesh, P(None, "tp"))
    full = NamedSharding(mesh, P())

    def xla_column(x, w):
        return jax.lax.with_sharding_constraint(x, full) @ w

    def xla_row(h, w):
        return jax.lax.with_sharding_constraint(h @ w, rows_s)

    def ring(kind, bidi):
        if kind == "column":
            body = lambda x, w: all_gather_matmul(x, [w], bidirectional=bidi)[0]  # noqa: E731
            specs = (P("tp", None), P(None, "tp")), P(None, "tp")
        else:
            body = lambda h, w: matmul_reduce_scatter(h, w, bidirectional=bidi)  # noqa: E731
            specs = (P(None, "tp"), P("tp", None)), P("tp", None)
        return jax.shard_map(body, mesh=mesh, in_specs=specs[0], out_specs=specs[1],
                             check_vma=False)

    def normal(key, shape, scale, sharding):
        draw = jax.jit(lambda k: (scale * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                       out_shardings=sharding)
        return draw(key)

    variants = {"xla": {}, "ring": None, "ring-bidi": None}
    if platform == "gpu":
        variants["xla-windowed"] = WINDOWED_EINSUM
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"collective_matmul_{platform}_{n}dev")
    results = Results(stem + ".jsonl")  # written as it goes: a cut-off run keeps its rows
    emit, rows = results.emit, results.rows

    for shape in args.shapes.split(","):
        d, f = SHAPES[shape]
        for t in (int(v) for v in args.tokens.split(",")):
            t = -(-t // n) * n
            keys = jax.random.split(jax.random.key(0), 4)
            x = normal(keys[0], (t, d), 0.1, rows_s)  # drawn on the devices, already sharded
            w_col = normal(keys[1], (d, f), 0.02, cols_s)
            h = normal(keys[2], (t, f), 0.1, cols_s)
            w_row = normal(keys[3], (f, d), 0.02, NamedSharding(mesh, P("tp", None)))
            for kind, operands, twin in (("column", (x, w_col), xla_column),
                                         ("row", (h, w_row), xla_row)):
                want = jax.jit(twin)(*operands).astype(jnp.float32)  # compared on device
                scale = float(jnp.abs(want).max())
                for name, options in variants.items():
                    fn = twin if name.startswith("xla") else ring(kind, name == "ring-bidi")
                    t0 = time.perf_counter()
                    try:
                        compiled = jax.jit(fn).lower(*operands).compile(options or None)
                    except Exception as e:  # noqa: BLE001 - report and go on
                        row = {"shape": shape, "op": kind, "variant": name, "tokens": t,
                               "error": str(e).splitlines()[0][:300]}
                        emit(row)
                        continue
                    compile_s = time.perf_counter() - t0
                    got = compiled(*operands).astype(jnp.float32)
                    err = float(jnp.abs(got - want).max()) / max(scale, 1e-6)
                    del got
                    times = []  # rounds of calls launched back to back, waited for once
                    for _ in range(args.repeats):
                        t0 = time.perf_counter()
                        jax.block_until_ready([compiled(*operands) for _ in range(args.burst)])
                        times.append((time.perf_counter() - t0) / args.burst)
                    flops = 2 * t * d * f
                    med = statistics.median(times)
                    hlo = compiled.as_text()
                    row = {"bench": "collective_matmul", "shape": shape, "d": d, "f": f,
                           "tokens": t, "op": kind, "variant": name, "devices": n,
                           "dtype": args.dtype, "median_us": med * 1e6,
                           "min_us": min(times) * 1e6, "max_us": max(times) * 1e6,
                           "tflops_per_device": flops / n / med / 1e12,
                           "compile_s": compile_s, "max_rel_err": err,
                           "windowed_einsum": ("windowed_dot_general_body" in hlo),
                           "machine": machine_name}
                    emit(row)
    plot([r for r in rows if "median_us" in r], stem + ".png", machine_name)


def plot(rows, path, machine):
    plt = pyplot()
    if plt is None:
        return
    keys = sorted({(r["shape"], r["op"]) for r in rows})
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 4), squeeze=False)
    for ax, (shape, op) in zip(axes[0], keys):
        for variant in sorted({r["variant"] for r in rows}):
            pts = sorted((r["tokens"], r["median_us"]) for r in rows
                         if (r["shape"], r["op"], r["variant"]) == (shape, op, variant))
            if pts:
                ax.plot(*zip(*pts), "o-", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("tokens")
        ax.set_ylabel("median time (us)")
        ax.set_title(f"{shape} {op}")
        ax.legend()
    fig.suptitle(machine)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
