"""Minimal case: an SP MLP (all-gather -> up/down matmuls -> reduce-scatter) compiled for a
mocked 8-GPU mesh with XLA's windowed einsum enabled. Reports whether XLA:GPU compiles it,
how many windowed-einsum loops the optimized HLO holds, and from the schedule
(`sharding/schedule.py`) how many of each loop kind's collective-permutes run beside a GEMM.

--placement input: the input is constrained gathered before the up matmul (jax-sp before this
change: XLA then all-gathers it whole and windows only the reduce-scatter); output: the input
stays token-sharded and only the up matmul's product is constrained (the form XLA's dot handler
windows on both sides).

    python benchmarks/xla_windowed_einsum_repro.py [--threshold-mib 0] [--tokens 4096]
        [--placement output|input] [--single-stream]

Needs a GPU build of jax (one GPU is enough: the 8-GPU topology is mocked; nothing runs).
Autotuning is off (`xla_gpu_autotune_level=0`): under a mocked topology it hangs.
"""

import argparse
import collections
import json

import jax

import common  # noqa: E402,F401  (the repository on the import path)

ap = argparse.ArgumentParser()
ap.add_argument("--threshold-mib", type=int, default=0)
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--d", type=int, default=4096)
ap.add_argument("--f", type=int, default=14336)
ap.add_argument("--placement", choices=("output", "input"), default="output")
ap.add_argument("--single-stream", action="store_true",
                help="xla_gpu_multi_streamed_windowed_einsum=False (its default is True)")
args = ap.parse_args()

jax.config.update("jax_mock_gpu_topology", "1x8x1")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from sharding.schedule import overlaps  # noqa: E402

mesh = jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Auto,))
rows = NamedSharding(mesh, P("tp", None))  # token-sharded activations
cols = NamedSharding(mesh, P(None, "tp"))
x = jax.ShapeDtypeStruct((args.tokens, args.d), jnp.bfloat16, sharding=rows)
w_up = jax.ShapeDtypeStruct((args.d, args.f), jnp.bfloat16, sharding=cols)
w_down = jax.ShapeDtypeStruct((args.f, args.d), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("tp", None)))


def mlp(x, w_up, w_down):
    if args.placement == "input":
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))  # all-gather tokens
    h = jax.lax.with_sharding_constraint(x @ w_up, cols)
    return jax.lax.with_sharding_constraint(jax.nn.silu(h) @ w_down, rows)  # reduce-scatter


options = {"xla_gpu_threshold_for_windowed_einsum_mib": args.threshold_mib,
           "xla_gpu_multi_streamed_windowed_einsum": not args.single_stream,
           "xla_gpu_autotune_level": 0}
result = {"jax": jax.__version__, "options": options, "tokens": args.tokens, "d": args.d,
          "f": args.f, "placement": args.placement}
try:
    hlo = jax.jit(mlp).lower(x, w_up, w_down).compile(options).as_text()
    schedule = collections.Counter(
        ("ag" if "_ag" in o.computation else "rs" if "_rs" in o.computation else "outside",
         o.collective.kind, o.status) for o in overlaps(hlo))
    result.update(compiled=True,
                  windowed_ag=sum("windowed_dot_general_body_ag" in ln and "{" in ln
                                  for ln in hlo.splitlines() if not ln.startswith(" ")),
                  windowed_rs=sum("windowed_dot_general_body_rs" in ln and "{" in ln
                                  for ln in hlo.splitlines() if not ln.startswith(" ")),
                  schedule={" ".join(k): v for k, v in sorted(schedule.items())})
except Exception as e:  # noqa: BLE001
    result.update(compiled=False, error=str(e)[:2000])
print(json.dumps(result))
