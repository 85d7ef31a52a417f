"""Token sampling on device: greedy, temperature, top-k, top-p.

`greedy` and `top_k` are static (they change shapes and control flow); temperature and top_p
are traced scalars, so changing them does not recompile. Each row b at step i draws with
`fold_in(fold_in(PRNGKey(seed), i), b)`: the same seed gives the same draws whatever the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(key, step, batch):
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda b: jax.random.fold_in(step_key, b))(jnp.arange(batch))


def sample(logits_bv, key, step, temperature, top_p, *, greedy: bool, top_k: int):
    """Next token of each row, [B] int32, from float32 logits [B, V]."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: keep the smallest set of tokens whose probability reaches top_p (at least one)
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    keep = jnp.sum(cum - jax.nn.softmax(sorted_desc, axis=-1) < top_p, axis=-1)  # [B] >= 1
    cutoff = jnp.take_along_axis(sorted_desc, keep[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    keys = row_keys(key, step, logits.shape[0])
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
