"""Collective matmul: all-gather + matmul and matmul + reduce-scatter as ppermute rings.

Under SP every all-gather sits right before a matmul and every reduce-scatter right after one.
These kernels (bodies for `jax.shard_map` over the tensor-parallel axis, n = tp devices; the
axis is "tp", or with attention groups "attn_tp" or both group axes) split the
collective into n - 1 neighbour exchanges and multiply the chunk in hand while the next one
travels, so the communication hides under the computation on any backend.

Shapes per device (T = n * L tokens, D model width, F output features of all devices):

  all_gather_matmul      x In[T_tp, D] = [L, D], w In[D, F_tp] = [D, F/n]  ->  Out[T, F_tp]
  matmul_reduce_scatter  x In[T, F_tp] = [T, F/n], w In[F_tp, D]            ->  Out[T_tp, D]

Unidirectional rings take n - 1 steps, each sending one [L, *] chunk to the next device.
Each step's transfers and the products computed meanwhile are tied by an optimization barrier,
so that the next transfer cannot start before those products: left free, XLA:GPU's scheduler
ran all of a ring's transfers first and the matmuls after them, hiding nothing
(`benchmarks/mock_gpu_compile.py`, the schedule census of `sharding/schedule.py`).
Bidirectional rings send full chunks both ways, each direction covering half the ring:
ceil((n - 1) / 2) steps, the same bytes per device, both link directions busy.
`all_gather_matmul` takes several weights so one gathered input feeds q/k/v (or gate/up) and
the activations move once.

`matmul_reduce_scatter` sums in the order the ring visits devices, so float results differ from a
plain all-reduce in the last bits (reassociation), as any reduce-scatter does.

FP8 weights (models/quant.py `Fp8`): the column ring quantizes this device's tokens once, per
token, and passes the FP8 values with their scales around the ring (one byte per value on the
wire, as the XLA path's gather); the row ring quantizes each token over its whole input, the
scale's maximum taken over tp (a [T] all-reduce), so both compute the W8A8 products one device
computes, each chunk's an FP8 matmul written in the activations' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from models.quant import Fp8, quantize_tokens, scaled_product, stored_letters

AXIS = "tp"


def _fp8_matmul(dtype):
    """chunk (FP8 values [L, D], per-token scale [L]) times an Fp8 weight flattened to [F, D]
    with its scale [F]: the scaled FP8 product [L, F] in `dtype`."""
    def matmul(chunk, w):
        xq, sx = chunk
        return scaled_product("ld,fd->lf", xq, sx, w, dtype)
    return matmul


def _send(tree, axis, perm):
    return jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), tree)


def _perm(n: int, shift: int):
    return [(j, (j + shift) % n) for j in range(n)]


def _split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Chunks that arrive going forward (from lower ranks) and backward (from higher ranks)."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def all_gather_matmul(x_ld, ws, *, bidirectional: bool = False, axis: str = AXIS,
                      matmul=jnp.matmul):
    """x_ld [L, D] (this device's token rows), ws: [D, F_i] local weight shards ->
    list of [n*L, F_i]: every token times this device's features. Call inside shard_map.
    matmul(chunk, w): the product of a chunk (x_ld or any pytree of [L, ...] arrays, all sent
    around the ring) and a weight; default chunk @ w."""
    n = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    rows = jax.tree.leaves(x_ld)[0].shape[0]
    outs = [jnp.zeros((n,) + o.shape, o.dtype)
            for o in (jax.eval_shape(matmul, x_ld, w) for w in ws)]
    fwd, bwd = _split(n, bidirectional)
    ahead, behind = x_ld, x_ld
    in_hand = [(x_ld, r)]  # (chunk, the rank whose token rows it holds)
    for step in range(1, max(fwd, bwd) + 1):
        # send the chunks on while the products of those in hand are computed (the product
        # of chunk `src` goes to rows [src*L, (src+1)*L)); the barrier makes this step's
        # transfers and products one group, so the next transfers wait for these products:
        # without it XLA's scheduler ran every transfer of the ring before any matmul
        sends = ([_send(ahead, axis, _perm(n, 1))] if step <= fwd else []) + (
            [_send(behind, axis, _perm(n, -1))] if step <= bwd else [])
        for chunk, src in in_hand:
            outs = [o.at[src].set(matmul(chunk, w)) for o, w in zip(outs, ws)]
        sends, outs = jax.lax.optimization_barrier((sends, outs))
        in_hand = []  # after s hops forward we hold rank r - s's chunk, backward r + s's
        if step <= fwd:
            ahead = sends.pop(0)
            in_hand.append((ahead, (r - step) % n))
        if step <= bwd:
            behind = sends.pop(0)
            in_hand.append((behind, (r + step) % n))
    for chunk, src in in_hand:
        outs = [o.at[src].set(matmul(chunk, w)) for o, w in zip(outs, ws)]
    return [o.reshape(n * rows, -1) for o in outs]


def matmul_reduce_scatter(x_tf, w_fd, *, bidirectional: bool = False, axis: str = AXIS,
                          matmul=jnp.matmul):
    """x_tf [n*L, F/n], w_fd [F/n, D] -> [L, D]: this device's token rows of x @ w summed over
    all devices. Call inside shard_map. matmul(rows of x, w) as in `all_gather_matmul` (x_tf
    any pytree of [n*L, ...] arrays)."""
    n = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    rows = jax.tree.leaves(x_tf)[0].shape[0] // n

    def part(c):  # this device's contribution to token chunk c
        return matmul(jax.tree.map(
            lambda a: jax.lax.dynamic_slice_in_dim(a, c * rows, rows), x_tf), w_fd)

    fwd, bwd = _split(n, bidirectional)
    # The forward accumulator of chunk c starts on rank c - fwd and gathers one contribution
    # per hop until it reaches c; the backward one comes from c + bwd the other way. Both
    # rings step together.
    chains = [(hops, shift) for hops, shift in ((fwd, 1), (bwd, -1)) if hops]
    sent: dict[int, jax.Array] = {}  # accumulators in flight, by direction
    for i in range(max((hops for hops, _ in chains), default=0)):
        parts = {shift: part((r + shift * (hops - i)) % n) for hops, shift in chains if i < hops}
        # the accumulators travel while this hop's contributions are computed
        sent, parts = jax.lax.optimization_barrier((sent, parts))
        for shift, p in parts.items():
            acc = p if i == 0 else sent[shift] + p
            sent[shift] = jax.lax.ppermute(acc, axis, _perm(n, shift))
    sent, out = jax.lax.optimization_barrier((sent, part(r)))
    for acc in sent.values():
        out = out + acc
    return out


def _specs(letters: str, sharded: str, axis=AXIS, rows=None):
    """Letters -> PartitionSpec: `axis` at the sharded letter, `rows` at T, None elsewhere."""
    return P(*(axis if c == sharded else rows if c == "T" else None for c in letters))


def column_feature(rhs: str) -> str:
    """The letter of a column-parallel weight's dimensions that tp splits, e.g. "N" of "DNH"
    (C, the fused q/k/v or gate/up parts, stays whole on every device)."""
    return next(c for c in rhs if c not in "DC")


def ring_column(mesh, spec: str, x_td, w, *more, bidirectional: bool = True, axis=AXIS,
                tokens=AXIS, rows=None):
    """Column-parallel projections of token-sharded x as one ring, e.g. spec "TD,DNH->TNH" for
    q with w [D, N, H] split over N. `more`: further (spec, w) pairs sharing the gathered x.
    FP8 weights (all of them or none): the ring carries x quantized per token.

    axis: the mesh axis (or axes) the features are split over and the ring runs along;
    tokens: the axes x's rows are split over; rows: the axes the output's rows stay split over.
    Plain TP/SP: all three "tp" except rows, None (every device ends with every row). With
    attention groups (sharding/rules.py attn_dp_rules), q/k/v ring over "attn_tp" with x's rows
    over ("attn_dp", "attn_tp") and the output's over "attn_dp": each group gathers its own
    sequences' tokens."""
    projections = [(spec, w), *more]
    fp8 = isinstance(w, Fp8)
    parsed = []
    for s, weight in projections:
        ins, out = s.split("->")
        lhs, rhs = ins.split(",")
        feature = column_feature(rhs)
        parsed.append((stored_letters(lhs, rhs) if fp8 else rhs, out, feature))

    def body(x_ld, *ws):
        if fp8:  # stored [outputs..., D]: flattened to [F, D]
            flat = [Fp8(wl.q.reshape(-1, wl.q.shape[-1]), wl.scale.reshape(-1)) for wl in ws]
            ys = all_gather_matmul(quantize_tokens(x_ld), flat, bidirectional=bidirectional,
                                   axis=axis, matmul=_fp8_matmul(x_ld.dtype))
            dims = [wl.q.shape[:-1] for wl in ws]
        else:
            flat = [jnp.moveaxis(wl, rhs.index("D"), 0).reshape(wl.shape[rhs.index("D")], -1)
                    for wl, (rhs, _, _) in zip(ws, parsed)]
            ys = all_gather_matmul(x_ld, flat, bidirectional=bidirectional, axis=axis)
            dims = [[wl.shape[rhs.index(c)] for c in out[1:]]
                    for wl, (rhs, out, _) in zip(ws, parsed)]
        return tuple(y.reshape(y.shape[0], *d) for y, d in zip(ys, dims))

    def weight_spec(letters, feature):
        if fp8:  # the scale has the weight's output letters
            return Fp8(_specs(letters, feature, axis), _specs(letters[:-1], feature, axis))
        return _specs(letters, feature, axis)

    fn = jax.shard_map(
        body, mesh=mesh,
        in_specs=(P(tokens, None), *[weight_spec(letters, f) for letters, _, f in parsed]),
        out_specs=tuple(_specs(out, f, axis, rows) for _, out, f in parsed), check_vma=False)
    return list(fn(x_td, *[p[1] for p in projections]))


def ring_row(mesh, spec: str, h, w, *, bidirectional: bool = True, axis=AXIS, tokens=AXIS,
             rows=None):
    """Row-parallel projection ending token-sharded, e.g. "TNH,NHD->TD" with h split over N.
    An FP8 weight (stored [D, F]) takes h quantized per token over all of its features.
    axis: the axes h's features are split over (the ring's); rows: the axes h's rows are split
    over; tokens: the output's rows (as `ring_column`: o_proj of attention groups rings over
    "attn_tp", its rows over "attn_dp", its output over both)."""
    lhs, rhs = spec.split("->")[0].split(",")
    feature = lhs[1]
    fp8 = isinstance(w, Fp8)

    def body(h_local, w_local):
        rows = h_local.shape[0]
        h_local = h_local.reshape(rows, -1)
        if fp8:
            chunk = quantize_tokens(h_local, reduce=lambda a: jax.lax.pmax(a, axis))
            flat = Fp8(w_local.q.reshape(w_local.q.shape[0], -1), w_local.scale)
            return matmul_reduce_scatter(chunk, flat, bidirectional=bidirectional, axis=axis,
                                         matmul=_fp8_matmul(h_local.dtype))
        return matmul_reduce_scatter(h_local, w_local.reshape(-1, w_local.shape[-1]),
                                     bidirectional=bidirectional, axis=axis)

    w_spec = (Fp8(_specs(stored_letters(lhs, rhs), feature, axis), P(None)) if fp8
              else _specs(rhs, feature, axis))
    fn = jax.shard_map(body, mesh=mesh, in_specs=(_specs(lhs, feature, axis, rows), w_spec),
                       out_specs=P(tokens, None), check_vma=False)
    return fn(h, w)
