"""Collective matmul: all-gather + matmul and matmul + reduce-scatter as ppermute rings.

Under SP every all-gather sits right before a matmul and every reduce-scatter right after one.
These kernels (bodies for `jax.shard_map` over the "tp" axis, n = tp devices) split the
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
    fwd, bwd = _split(n, bidirectional)
    ahead, behind = x_ld, x_ld
    in_hand = [(x_ld, r)]  # (chunk, the rank whose token rows it holds)
    for step in range(1, max(fwd, bwd) + 1):
        # send the chunks on while the products of those in hand are computed (the product
        # of chunk `src` goes to rows [src*L, (src+1)*L)); the barrier makes this step's
        # transfers and products one group, so the next transfers wait for these products:
        # without it XLA's scheduler ran every transfer of the ring before any matmul
        sends = ([jax.lax.ppermute(ahead, axis, _perm(n, 1))] if step <= fwd else []) + (
            [jax.lax.ppermute(behind, axis, _perm(n, -1))] if step <= bwd else [])
        for chunk, src in in_hand:
            outs = [o.at[src].set(chunk @ w) for o, w in zip(outs, ws)]
        sends, outs = jax.lax.optimization_barrier((sends, outs))
        in_hand = []  # after s hops forward we hold rank r - s's chunk, backward r + s's
        if step <= fwd:
            ahead = sends.pop(0)
            in_hand.append((ahead, (r - step) % n))
        if step <= bwd:
            behind = sends.pop(0)
            in_hand.append((behind, (r + step) % n))
    for chunk, src in in_hand:
        outs = [o.at[src].set(chunk @ w) for o, w in zip(outs, ws)]
    return [o.reshape(n * rows, -1) for o in outs]


def matmul_reduce_scatter(x_tf, w_fd, *, bidirectional: bool = False, axis: str = AXIS):
    """x_tf [n*L, F/n], w_fd [F/n, D] -> [L, D]: this device's token rows of x @ w summed over
    all devices. Call inside shard_map."""
    n = jax.lax.axis_size(axis)
    r = jax.lax.axis_index(axis)
    rows = x_tf.shape[0] // n

    def part(c):  # this device's contribution to token chunk c
        return jax.lax.dynamic_slice_in_dim(x_tf, c * rows, rows) @ w_fd

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
