"""Minimal case: an SP MLP (all-gather -> up/down matmuls -> reduce-scatter) compiled for a
mocked 8-GPU mesh with XLA's windowed einsum enabled. Reports whether XLA:GPU compiles it and
whether the optimized HLO contains windowed-einsum loops.

    python benchmarks/xla_windowed_einsum_repro.py [--threshold-mib 0] [--tokens 4096]

Needs a GPU build of jax (one GPU is enough: the 8-GPU topology is mocked; nothing runs).
Autotuning is off (`xla_gpu_autotune_level=0`): under a mocked topology it hangs.
"""

import argparse
import json

import jax

ap = argparse.ArgumentParser()
ap.add_argument("--threshold-mib", type=int, default=0)
ap.add_argument("--tokens", type=int, default=4096)
ap.add_argument("--d", type=int, default=4096)
ap.add_argument("--f", type=int, default=14336)
ap.add_argument("--multi-streamed", action="store_true")
args = ap.parse_args()

jax.config.update("jax_mock_gpu_topology", "1x8x1")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

mesh = jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Auto,))
rows = NamedSharding(mesh, P("tp", None))  # token-sharded activations
cols = NamedSharding(mesh, P(None, "tp"))
x = jax.ShapeDtypeStruct((args.tokens, args.d), jnp.bfloat16, sharding=rows)
w_up = jax.ShapeDtypeStruct((args.d, args.f), jnp.bfloat16, sharding=cols)
w_down = jax.ShapeDtypeStruct((args.f, args.d), jnp.bfloat16,
                              sharding=NamedSharding(mesh, P("tp", None)))


def mlp(x, w_up, w_down):
    x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))  # all-gather tokens
    h = jax.nn.silu(x @ w_up)
    return jax.lax.with_sharding_constraint(h @ w_down, rows)  # reduce-scatter tokens


options = {"xla_gpu_threshold_for_windowed_einsum_mib": args.threshold_mib,
           "xla_gpu_autotune_level": 0}
if args.multi_streamed:
    options["xla_gpu_multi_streamed_windowed_einsum"] = True
result = {"jax": jax.__version__, "options": options, "tokens": args.tokens, "d": args.d,
          "f": args.f}
try:
    hlo = jax.jit(mlp).lower(x, w_up, w_down).compile(options).as_text()
    result.update(compiled=True,
                  windowed_ag=hlo.count("windowed_dot_general_body_ag"),
                  windowed_rs=hlo.count("windowed_dot_general_body_rs"),
                  all_gathers=hlo.count(" all-gather-start(") + hlo.count(" all-gather("),
                  reduce_scatters=hlo.count(" reduce-scatter(") + hlo.count("reduce-scatter-start"))
except Exception as e:  # noqa: BLE001
    result.update(compiled=False, error=str(e)[:2000])
print(json.dumps(result))
