"""Pipeline-stage boundaries: how (hidden, residual) crosses from one stage's mesh to the next.

A stage leaves both tensors token-sharded on its (1, tp) mesh: device r of the tp axis holds
rows [r*L, (r+1)*L), L = local_len = padded_T // tp. `send` copies each device's rows to the
device with the same tp rank on the next stage, so each device sends 1/tp of every tensor.

Two receive policies (identical outputs):
- "scattered" (native): keep both tensors token-sharded. Under SP that is already the layout the
  next stage's first norm wants; under plain TP the stage all-gathers them itself.
- "gather" (vLLM's GPU runner, `sync_and_gather_intermediate_tensors`): the receiver all-gathers
  hidden_states (sent in 1/tp slices, as `send_tensor_dict(all_gather_group=...)` does) and the
  residual, each rank contributing `v[:local_len]` of its receive buffer; then, under SP, each
  rank keeps its own rows again. The two knobs `rows_for_rank` and `gather_residual` exist so
  tests can reproduce the two bugs vLLM had here (rows [0, L) on every rank; slicing the local
  buffer instead of gathering it) and show that they change the output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from sharding.mesh import tp_axes
from sharding.tokens import tp_rank_rows
from sharding.transfer import move

POLICIES = ("scattered", "gather")


def send(carry, sharding):
    """Move each token-sharded tensor of `carry` (hidden, residual) onto the next stage's
    devices; the result has the same type as carry."""
    return type(carry)(*(move(c, sharding) for c in carry))


@functools.cache
def vllm_receive_fn(mesh: Mesh, sp: bool, rows_for_rank=tp_rank_rows, gather_residual=True):
    """jit((hidden, residual) token-sharded) -> (hidden, residual) in the receiver's residual
    layout (token-sharded under SP, replicated otherwise), by vLLM's gather-on-receive."""
    tp = tp_axes(mesh)  # "tp", or ("attn_dp", "attn_tp") for attention groups

    def body(hidden_ld, residual_ld):  # per device: its L rows of each
        local_len = hidden_ld.shape[0]
        rank = jax.lax.axis_index(tp)
        hidden_td = jax.lax.all_gather(hidden_ld, tp, tiled=True)  # [T, D]
        buffer_td = jnp.zeros_like(hidden_td).at[:local_len].set(residual_ld)  # receive buffer
        if gather_residual:
            residual_td = jax.lax.all_gather(buffer_td[:local_len], tp, tiled=True)
        else:  # bug: treat the local buffer as if it held the whole residual
            residual_td = buffer_td
        if not sp:
            return hidden_td, residual_td
        start = rows_for_rank(rank, local_len).start  # traced: rank is the device's tp index
        return (jax.lax.dynamic_slice_in_dim(hidden_td, start, local_len),
                jax.lax.dynamic_slice_in_dim(residual_td, start, local_len))

    out = P(tp, None) if sp else P()
    fn = jax.shard_map(body, mesh=mesh, in_specs=(P(tp, None), P(tp, None)),
                       out_specs=(out, out), check_vma=False)
    return jax.jit(fn)


def receive(carry, mesh: Mesh, sp: bool, policy: str, rows_for_rank=tp_rank_rows,
            gather_residual=True):
    if policy == "scattered":
        return carry
    return type(carry)(*vllm_receive_fn(mesh, sp, rows_for_rank, gather_residual)(*carry))
