"""Collective matmul: all-gather + matmul and matmul + reduce-scatter as ppermute rings.

Under SP every all-gather sits right before a matmul and every reduce-scatter right after one.
These kernels (bodies for `jax.shard_map` over the "tp" axis, n = tp devices) split the
collective into n - 1 neighbour exchanges and multiply the chunk in hand while the next one
travels, so the communication hides under the computation on any backend.

Shapes per device (T = n * L tokens, D model width, F output features of all devices):

  all_gather_matmul      x In[T_tp, D] = [L, D], w In[D, F_tp] = [D, F/n]  ->  Out[T, F_tp]
  matmul_reduce_scatter  x In[T, F_tp] = [T, F/n], w In[F_tp, D]            ->  Out[T_tp, D]

Unidirectional rings take n - 1 steps, each sending one [L, *] chunk to the next device.
Bidirectional rings send full chunks both ways, each direction covering half the ring:
ceil((n - 1) / 2) steps, the same bytes per device, both link directions busy.
`all_gather_matmul` takes several weights so one gathered input feeds q/k/v (or gate/up) and
the activations move once.

`matmul_reduce_scatter` sums in the order the ring visits devices, so float results differ from a
plain all-reduce in the last bits (reassociation), as any reduce-scatter does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "tp"


def _perm(n: int, shift: int):
    return [(j, (j + shift) % n) for j in range(n)]


def _split(n: int, bidirectional: bool) -> tuple[int, int]:
    """Chunks that arrive going forward (from lower ranks) and backward (from higher ranks)."""
    if not bidirectional:
        return n - 1, 0
    return n // 2, (n - 1) // 2


def all_gather_matmul(x_ld, ws, *, bidirectional: bool = False, axis: str = AXIS):
    """x_ld [L, D] (this device's token rows), ws: [D, F_i] local weight shards ->
    list of [n*L, F_i]: every token times this device's features. Call inside shard_map."""
    n = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    rows = x_ld.shape[0]
    outs = [jnp.zeros((n, rows, w.shape[1]), jnp.result_type(x_ld, w)) for w in ws]

    def put(outs, chunk_ld, src):  # products of chunk `src` go to rows [src*L, (src+1)*L)
        return [o.at[src].set(chunk_ld @ w) for o, w in zip(outs, ws)]

    fwd, bwd = _split(n, bidirectional)
    ahead, behind = x_ld, x_ld
    for step in range(1, max(fwd, bwd) + 1):
        # start the next transfers first; the product of the chunk in hand overlaps them
        nxt_ahead = jax.lax.ppermute(ahead, axis, _perm(n, 1)) if step <= fwd else None
        nxt_behind = jax.lax.ppermute(behind, axis, _perm(n, -1)) if step <= bwd else None
        if step == 1:
            outs = put(outs, x_ld, r)
        if nxt_ahead is not None:  # after s forward hops we hold the chunk of rank r - s
            ahead = nxt_ahead
            outs = put(outs, ahead, (r - step) % n)
        if nxt_behind is not None:
            behind = nxt_behind
            outs = put(outs, behind, (r + step) % n)
    if n == 1:
        outs = put(outs, x_ld, r)
    return [o.reshape(n * rows, -1) for o in outs]


def matmul_reduce_scatter(x_tf, w_fd, *, bidirectional: bool = False, axis: str = AXIS):
    """x_tf [n*L, F/n], w_fd [F/n, D] -> [L, D]: this device's token rows of x @ w summed over
    all devices. Call inside shard_map."""
    n = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    rows = x_tf.shape[0] // n

    def part(c):  # this device's contribution to token chunk c
        return jax.lax.dynamic_slice_in_dim(x_tf, c * rows, rows) @ w_fd

    out = part(r)
    fwd, bwd = _split(n, bidirectional)
    # The forward accumulator of chunk c starts on rank c - fwd and gathers one contribution
    # per hop until it reaches c; the backward one comes from c + bwd the other way.
    for hops, shift in ((fwd, 1), (bwd, -1)):
        acc = None
        for i in range(hops):
            c = (r + shift * (hops - i)) % n
            acc = part(c) if acc is None else acc + part(c)
            acc = jax.lax.ppermute(acc, axis, _perm(n, shift))
        if acc is not None:
            out = out + acc
    return out


def _specs(letters: str, sharded: str):
    return P(*("tp" if c == sharded else None for c in letters))


def ring_column(mesh, spec: str, x_td, w, *more, bidirectional: bool = True):
    """Column-parallel projections of token-sharded x as one ring, e.g. spec "TD,DNH->TNH" for
    q with w [D, N, H] split over N. `more`: further (spec, w) pairs sharing the gathered x."""
    projections = [(spec, w), *more]
    parsed = []
    for s, weight in projections:
        ins, out = s.split("->")
        rhs = ins.split(",")[1]
        feature = next(c for c in rhs if c not in "DC")  # the dimension tp splits (C: fused
        # parts, e.g. "DCF" for gate/up, stay whole on every device)
        parsed.append((rhs, out, feature))

    def body(x_ld, *ws):
        flat = [(jnp.moveaxis(wl, rhs.index("D"), 0)).reshape(wl.shape[rhs.index("D")], -1)
                for wl, (rhs, _, _) in zip(ws, parsed)]
        ys = all_gather_matmul(x_ld, flat, bidirectional=bidirectional)
        return tuple(y.reshape(y.shape[0], *[wl.shape[rhs.index(c)] for c in out[1:]])
                     for y, wl, (rhs, out, _) in zip(ys, ws, parsed))

    fn = jax.shard_map(
        body, mesh=mesh, in_specs=(P("tp", None), *[_specs(rhs, f) for rhs, _, f in parsed]),
        out_specs=tuple(_specs(out, f) for _, out, f in parsed), check_vma=False)
    return list(fn(x_td, *[p[1] for p in projections]))


def ring_row(mesh, spec: str, h, w, *, bidirectional: bool = True):
    """Row-parallel projection ending token-sharded, e.g. "TNH,NHD->TD" with h split over N."""
    lhs, rhs = spec.split("->")[0].split(",")
    feature = lhs[1]

    def body(h_local, w_local):
        rows = h_local.shape[0]
        return matmul_reduce_scatter(h_local.reshape(rows, -1),
                                     w_local.reshape(-1, w_local.shape[-1]),
                                     bidirectional=bidirectional)

    fn = jax.shard_map(body, mesh=mesh, in_specs=(_specs(lhs, feature), _specs(rhs, feature)),
                       out_specs=P("tp", None), check_vma=False)
    return fn(h, w)
