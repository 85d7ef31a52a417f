"""Token sampling on device: greedy, temperature, top-k, top-p.

`greedy` and `top_k` are static (they change shapes and control flow); temperature and top_p
are traced scalars, so changing them does not recompile. Row b of the batch draws at step i
with `fold_in(fold_in(PRNGKey(seed), b), i)` (the prefill program makes the per-row keys with
`row_keys`): a row's draws depend on its place in the whole batch only, so the same seed gives
the same tokens whatever the mesh and however a pipeline splits the batch into micro-batches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def row_keys(seed, batch: int, first_row=0):
    """The sampling keys of rows first_row .. first_row + batch of a batch, [batch, 2]:
    fold_in(PRNGKey(seed), b). seed: `SamplingParams.key_seed`; traceable, so a prefill
    program makes its rows' keys itself instead of a launch of its own."""
    base = jax.random.PRNGKey(seed)
    return jax.vmap(lambda b: jax.random.fold_in(base, b))(first_row + jnp.arange(batch))


def sample(logits_bv, keys_b, step, temperature, top_p, *, greedy: bool, top_k: int):
    """Next token of each row, [B] int32, from float32 logits [B, V]; keys_b: the rows' keys
    (`row_keys`; a micro-batch's rows from its first_row on)."""
    if greedy:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv / temperature
    if top_k and top_k < logits.shape[-1]:  # k >= V keeps every token
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]  # [B, 1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    # top-p: keep the smallest set of tokens whose probability reaches top_p (at least one)
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    keep = jnp.sum(cum - jax.nn.softmax(sorted_desc, axis=-1) < top_p, axis=-1)  # [B] >= 1
    cutoff = jnp.take_along_axis(sorted_desc, keep[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(keys_b)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


def sample_rows(logits_bv, keys_b, step_b, temperature_b, top_k_b, top_p_b, *, sampled: bool):
    """`sample` with every setting per row (continuous batching: each row a request of its
    own): temperature 0 is greedy, top_k 0 keeps every token. A row draws exactly what `sample`
    draws for it with the same key, step and settings.

    sampled (static): whether any row samples; False is argmax for every row. The program has
    no data-dependent control flow: on GPU a `lax.cond` on a device value makes XLA copy the
    predicate to the host, so the launch returns only once the device reached it and the host
    cannot run ahead (the engine's launches were synchronous with two such conds a step). One
    sort serves top-k and top-p: the top-k cut of the sorted row is the sorted cut row."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    if not sampled:
        return greedy
    vocab = logits_bv.shape[-1]
    logits = logits_bv / jnp.where(temperature_b > 0, temperature_b, 1.0)[:, None]
    sorted_desc = jnp.sort(logits, axis=-1)[:, ::-1]
    limited = ((top_k_b > 0) & (top_k_b < vocab))[:, None]
    kth = jnp.take_along_axis(sorted_desc, jnp.clip(top_k_b - 1, 0, vocab - 1)[:, None], axis=-1)
    logits = jnp.where(limited & (logits < kth), -jnp.inf, logits)
    sorted_desc = jnp.where(limited & (sorted_desc < kth), -jnp.inf, sorted_desc)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = jnp.sum(jnp.cumsum(probs, axis=-1) - probs < top_p_b[:, None], axis=-1)  # >= 1
    cutoff = jnp.take_along_axis(sorted_desc, keep[:, None] - 1, axis=-1)
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    keys = jax.vmap(jax.random.fold_in)(keys_b, step_b)
    drawn = jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
    return jnp.where(temperature_b > 0, drawn, greedy)


def token_logprobs(logits_bv, token_b, k: int):
    """Each row's log-probability of `token_b` and its k most likely tokens (log-probabilities
    [B, k] in descending order, ids [B, k]) under softmax(logits): the model's distribution
    before temperature and filters."""
    logp = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(logp, token_b[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(logp, k)
    return chosen, top, ids.astype(jnp.int32)
