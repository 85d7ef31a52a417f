"""Minimal case: an SP MLP (all-gather -> up/down matmuls -> reduce-scatter) compiled for a
mocked 8-GPU mesh with XLA's windowed einsum enabled. Reports whether XLA:GPU compiles it,
how many windowed-einsum loops the optimized HLO holds, and from the schedule
(`sharding/schedule.py`) how many of each loop kind's collective-permutes run beside a GEMM.

--placement input: the input is constrained gathered before the up matmul (jax-sp before this
change: XLA then all-gathers it whole and windows only the reduce-scatter); output: the input
stays token-sharded and only the up matmul's product is constrained (the form XLA's dot handler
windows on both sides).

--layers N runs N residual layers through `lax.scan` over stacked weights, --blocks B puts B
such MLP blocks in each layer (a Llama layer has two SP blocks: attention's q/k/v..o and the
MLP), --norm puts an RMSNorm before each block, --attention makes each layer's first block
causal attention, --gated fuses the MLP's gate and up into one weight as the model does,
--barrier puts each norm's output through an optimization barrier as the model does. These walk the stand-alone MLP toward the
model's layer loop, to find the smallest program whose reduce-scatter loops leave permutes
exposed (`--sweep` compiles the whole ladder and prints one JSON line per rung).

    python benchmarks/xla_windowed_einsum_repro.py [--threshold-mib 0] [--tokens 4096]
        [--placement output|input] [--single-stream] [--layers N] [--blocks B] [--norm]
        [--attention] [--gated] [--barrier] [--sweep] [--out FILE]

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
ap.add_argument("--layers", type=int, default=0,
                help="residual layers in a lax.scan over stacked weights (0: one bare MLP)")
ap.add_argument("--blocks", type=int, default=1, help="MLP blocks per layer")
ap.add_argument("--norm", action="store_true", help="an RMSNorm before each block")
ap.add_argument("--attention", action="store_true",
                help="the first block of each layer is causal attention (q/k/v, o)")
ap.add_argument("--gated", action="store_true", help="the MLP's gate and up as one fused weight")
ap.add_argument("--barrier", action="store_true",
                help="an optimization barrier on each norm's output (the model's)")
ap.add_argument("--sweep", action="store_true",
                help="compile the ladder bare MLP -> layer loop -> two blocks -> norms")
ap.add_argument("--out", help="also append the JSON lines to this file")
args = ap.parse_args()

jax.config.update("jax_mock_gpu_topology", "1x8x1")
import jax.numpy as jnp  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P  # noqa: E402

from sharding.schedule import overlaps  # noqa: E402

mesh = jax.make_mesh((8,), ("tp",), axis_types=(AxisType.Auto,))
rows = NamedSharding(mesh, P("tp", None))  # token-sharded activations
cols = NamedSharding(mesh, P(None, "tp"))
options = {"xla_gpu_threshold_for_windowed_einsum_mib": args.threshold_mib,
           "xla_gpu_multi_streamed_windowed_einsum": not args.single_stream,
           "xla_gpu_autotune_level": 0}


def mlp(x, w_up, w_down, placement, gated=False):
    if placement == "input":
        x = jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P()))  # all-gather tokens
    if gated:  # fused gate/up [D, 2, F]: silu(gate) * up, as the model's MLP
        h = jax.lax.with_sharding_constraint(
            jnp.einsum("td,dgf->tgf", x, w_up), NamedSharding(mesh, P(None, None, "tp")))
        h = jax.nn.silu(h[:, 0]) * h[:, 1]
    else:
        h = jax.nn.silu(jax.lax.with_sharding_constraint(x @ w_up, cols))
    return jax.lax.with_sharding_constraint(h @ w_down, rows)  # reduce-scatter


def attention(x, w_qkv, w_o, heads=32):
    """Causal self-attention as the model's first SP block: q/k/v from the gathered tokens
    (heads split over tp), softmax attention per head, o_proj reduce-scattered."""
    t, d = x.shape
    qkv = jax.lax.with_sharding_constraint(
        jnp.einsum("td,dshk->tshk", x, w_qkv),
        NamedSharding(mesh, P(None, None, "tp", None)))  # [T, 3, heads, head]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    a = jax.nn.dot_product_attention(q[None], k[None], v[None], is_causal=True)[0]
    return jax.lax.with_sharding_constraint(jnp.einsum("thk,hkd->td", a, w_o), rows)


def rms(x):
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype)


def program(layers, blocks, norm, placement, attn=False, gated=False, barrier=False):
    """(function, abstract arguments): a bare MLP (layers 0) or `layers` residual layers of
    `blocks` blocks each, scanned over stacked weights; with `attn` the first block of a layer
    is causal attention (q/k/v, o), with `gated` the MLP's gate and up are one fused weight,
    with `barrier` each norm's output passes an optimization barrier (as the model's does)."""
    x = jax.ShapeDtypeStruct((args.tokens, args.d), jnp.bfloat16, sharding=rows)
    stack = (max(layers, 1), blocks)
    up = (args.d, 2, args.f) if gated else (args.d, args.f)
    w_up = jax.ShapeDtypeStruct(stack + up, jnp.bfloat16, sharding=NamedSharding(
        mesh, P(*(None,) * (len(stack) + len(up) - 1), "tp")))
    w_down = jax.ShapeDtypeStruct(stack + (args.f, args.d), jnp.bfloat16,
                                  sharding=NamedSharding(mesh, P(None, None, "tp", None)))
    heads, head = 32, args.d // 32
    w_qkv = jax.ShapeDtypeStruct((max(layers, 1), args.d, 3, heads, head), jnp.bfloat16,
                                 sharding=NamedSharding(mesh, P(None, None, None, "tp", None)))
    w_o = jax.ShapeDtypeStruct((max(layers, 1), heads, head, args.d), jnp.bfloat16,
                               sharding=NamedSharding(mesh, P(None, "tp", None, None)))

    def layer(x, ws):
        for b in range(blocks):
            h = rms(x) if norm else x
            if barrier:
                h = jax.lax.optimization_barrier(h)
            if attn and b == 0:
                x = x + attention(h, ws[2], ws[3])
            else:
                x = x + mlp(h, ws[0][b], ws[1][b], placement, gated)
        return x, None

    def run(x, w_up, w_down, w_qkv, w_o):
        if layers == 0:
            return mlp(rms(x) if norm else x, w_up[0, 0], w_down[0, 0], placement, gated)
        return jax.lax.scan(layer, x, (w_up, w_down, w_qkv, w_o))[0]

    return run, (x, w_up, w_down, w_qkv, w_o)


def compile_one(layers, blocks, norm, placement, attn=False, gated=False, barrier=False):
    result = {"jax": jax.__version__, "options": options, "tokens": args.tokens, "d": args.d,
              "f": args.f, "placement": placement, "layers": layers, "blocks": blocks,
              "norm": norm, "attention": attn, "gated": gated, "barrier": barrier}
    run, abstract = program(layers, blocks, norm, placement, attn, gated, barrier)
    try:
        hlo = jax.jit(run).lower(*abstract).compile(options).as_text()
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
    line = json.dumps(result)
    print(line, flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(line + "\n")


if args.sweep:
    for rung in ((0, 1, False), (2, 1, False), (2, 2, False), (2, 2, True),
                 (2, 2, True, True), (2, 2, True, False, True), (2, 2, True, True, True),
                 (2, 2, True, True, True, True)):
        compile_one(*rung[:3], args.placement, *rung[3:])
else:
    compile_one(args.layers, args.blocks, args.norm, args.placement, args.attention, args.gated,
                args.barrier)
