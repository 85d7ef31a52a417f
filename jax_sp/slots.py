"""The serving engine's compiled programs (jax_sp/serving.py schedules them): a launch of `steps`
decode steps of every slot, an admission's prefill written into its slots, a later chunk of a long
prompt extending its slot's rows, and the two small programs that move an admission's first tokens
into the next launch's inputs and a pipeline stage's prefilled row into its slot; with the grouping
of admissions into prefill batches. The programs that write the engine's cache return it written
(jax_sp/serving.py donates it, so the writes land in place); none has data-dependent control flow
(on GPU a conditional's predicate is read back to the host, and the launch would wait for the
device).

Shapes: B slots (or an admission group's rows), T a prompt's or chunk's tokens, L layers of this
stage, S the engine's cache length, K kv heads, H head dim; the cache is [L, B, S, K, H].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_sp.config import MAX_LOGPROBS
from jax_sp.generate import Static, _forward, _logits
from jax_sp.runner import bucket, pow2_at_least
from jax_sp.runtime import round_up
from jax_sp.sampling import row_keys, sample_rows, token_logprobs
from models.cache import KVCache


def slots_step_fn(rt, st: Static, cache_len: int, steps: int = 1, logprobs: bool = False):
    """(state, cache, inputs, pos_b, keys_b, step_b, temperature_b, top_k_b, top_p_b)
    -> (out, cache, pos_b, step_b): `steps` decode steps of every slot, each at its own
    position, through this stage. inputs: the slots' tokens [B] (first stage) or the previous
    stage's carry (steps 1); out: on the last stage (tokens [steps, B], the last of them [B]),
    each row sampled with its own settings, else this stage's carry; pos_b and step_b advanced
    by `steps` (positions held below cache_len, so that a stale row never writes past its
    cache; a free slot's, 0, held there), to stay on the device for the next launch. More than
    one step needs the whole model in one stage: each step's tokens feed the next inside the
    program. logprobs: the last stage's out gains the tokens' log-probabilities ([steps, B],
    the top ones [steps, B, K], their ids [steps, B, K]; K = min(MAX_LOGPROBS, vocabulary));
    else ()."""
    def one(state, cache, inputs, pos_b, step_b, keys_b, settings):
        feed = {"tokens_bt": inputs[:, None]} if rt.stage.first else {"carry": inputs}
        out = _forward(rt, st, state, cache, pos_b[:, None], pos_b + 1, **feed)
        # a free slot's position is 0 (no request's is: a prompt has a token): it stays
        # there, so its attention reads one key however long its last request ran
        advanced = jnp.where(pos_b > 0, jnp.minimum(pos_b + 1, cache_len - 1), 0), step_b + 1
        if not rt.stage.last:
            return rt.constrain_carry(out.carry), out.cache, advanced
        logits = _logits(rt, out)
        token = sample_rows(logits, keys_b, step_b, *settings, sampled=not st.greedy)
        extra = (token_logprobs(logits, token, min(MAX_LOGPROBS, logits.shape[-1]))
                 if logprobs else ())
        return (token, extra), out.cache, advanced

    def replicated(*xs):  # as the host puts them: the next launch takes these as they are
        return tuple(jax.lax.with_sharding_constraint(x, rt.sharding_of(())) for x in xs)

    def last_out(tokens, last, extra):  # (tokens [steps, B], last [B], logprobs or ())
        tokens, last, *extra = replicated(tokens, last, *extra)
        return tokens, last, tuple(extra)

    def run(state, cache, inputs, pos_b, keys_b, step_b, temperature_b, top_k_b, top_p_b):
        settings = (temperature_b, top_k_b, top_p_b)
        if steps == 1:
            out, cache, advanced = one(state, cache, inputs, pos_b, step_b, keys_b, settings)
            if rt.stage.last:
                token, extra = out
                out = last_out(token[None], token, tuple(x[None] for x in extra))
            return (out, cache) + replicated(*advanced)

        def body(carry, _):
            cache, token, pos, step = carry
            (token, extra), cache, (pos, step) = one(state, cache, token, pos, step, keys_b,
                                                     settings)
            return (cache, token, pos, step), (token, extra)

        (cache, last, pos_b, step_b), (tokens, extra) = jax.lax.scan(
            body, (cache, inputs, pos_b, step_b), None, length=steps)
        return last_out(tokens, last, extra), cache, *replicated(pos_b, step_b)
    return run


def admit_fn(rt, st: Static, cache_len: int, logprobs: bool = False):
    """(state, cache, tokens_bt, kv_len_b, slots_b, seeds_b, temperature_b, top_k_b, top_p_b)
    -> ((first tokens [B], keys [B, 2]), cache): the prefill of B prompts (one stage, the whole
    model), each first token sampled with its own settings and the key `generate` gives row 0
    of a batch with its seed, and each row's cache written into slot slots_b[i] of the engine's
    (donated; a slot past the end, a padding row's, is dropped). logprobs: the first tokens'
    log-probabilities follow the keys, as `slots_step_fn` gives them for one step ([1, B]...)."""
    def run(state, cache, tokens_bt, kv_len_b, slots_b, seeds_b, temperature_b, top_k_b,
            top_p_b):
        b, t = tokens_bt.shape
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        rows = jnp.arange(b) * t + kv_len_b - 1  # each prompt's last token
        # the forward's cache holds the prompts' T positions only (not cache_len: at 8B, 16
        # rows of 8192 would be 17 GB), and they alone are written into the slots; what a
        # slot's last request left past them is masked (weight 0: past a row's position, and
        # a decode step writes its key before it reads it) and finite (models/cache.py
        # to_cache), so it adds nothing
        out = _forward(rt, st, state, rt.empty_cache(b, t), positions_bt, kv_len_b, rows,
                       fresh=True, tokens_bt=tokens_bt)
        return _into_slots(rt, out, cache, cache_len, logprobs, slots_b, seeds_b,
                           temperature_b, top_k_b, top_p_b)
    return run


def _into_slots(rt, out, cache: KVCache, cache_len: int, logprobs: bool, slots_b, seeds_b,
                temperature_b, top_k_b, top_p_b):
    """An admission's or a chunk's outputs: each row's token sampled from its logits with its
    own settings and the key `generate` gives row 0 of a batch with its seed (and with
    logprobs its log-probabilities), replicated, and the forward's cache rows (up to
    cache_len; an admission's, its T) written into slots slots_b of the engine's from
    position 0 (a slot past the end is dropped; a bucket past cache_len holds padding there)."""
    keys_b = jax.vmap(lambda seed: row_keys(seed, 1)[0])(seeds_b)
    logits = _logits(rt, out)
    token = sample_rows(logits, keys_b, jnp.zeros(logits.shape[0], jnp.int32), temperature_b,
                        top_k_b, top_p_b, sampled=True)
    extra = (tuple(x[None] for x in token_logprobs(
        logits, token, min(MAX_LOGPROBS, logits.shape[-1]))) if logprobs else ())

    def put(big, small):
        n = min(small.shape[2], cache_len)
        big = big.at[:, slots_b, :n].set(small[:, :, :n].astype(big.dtype), mode="drop")
        return jax.lax.with_sharding_constraint(big, rt.cache_sharding())

    every = rt.sharding_of(())
    return (tuple(jax.lax.with_sharding_constraint(x, every) for x in (token, keys_b, *extra)),
            KVCache(put(cache.k, out.cache.k), put(cache.v, out.cache.v)))


def extend_fn(rt, st: Static, cache_len: int, logprobs: bool = False):
    """(state, cache, tokens_bt, start_b, kv_len_b, slots_b, seeds_b, temperature_b, top_k_b,
    top_p_b) -> ((tokens [B], keys [B, 2], logprobs...), cache): one chunk of a long prompt's
    prefill (chunked prefill). Row i's T tokens sit at positions start_b[i].. of slot
    slots_b[i] and attend over what the earlier chunks left in that slot's cache row and over
    themselves; the rows are written back in place (donated; a padding row's slot, past the
    end, is dropped). kv_len_b: start plus the chunk's real tokens. Each row's token is
    sampled after its last real token as `admit_fn` samples a first token: on a prompt's last
    chunk it is the request's first."""
    def run(state, cache, tokens_bt, start_b, kv_len_b, slots_b, seeds_b, temperature_b,
            top_k_b, top_p_b):
        b, t = tokens_bt.shape
        positions_bt = start_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
        rows = jnp.arange(b) * t + kv_len_b - start_b - 1  # each chunk's last real token
        slots = jnp.minimum(slots_b, cache.k.shape[1] - 1)  # padding rows read a real one

        def take(big):  # the rows' cache, with room past the end for a padded chunk's keys
            return jnp.pad(big[:, slots], ((0, 0), (0, 0), (0, t), (0, 0), (0, 0)))
        out = _forward(rt, st, state, KVCache(take(cache.k), take(cache.v)), positions_bt,
                       kv_len_b, rows, tokens_bt=tokens_bt)
        return _into_slots(rt, out, cache, cache_len, logprobs, slots_b, seeds_b,
                           temperature_b, top_k_b, top_p_b)
    return run


def chunk_size(prefill_chunk: int) -> int:
    """The tokens of a long prompt's chunk: the largest power of two within `prefill_chunk`
    (>= MIN_BUCKET), so that a chunk fills its compile bucket (jax_sp.runner.bucket) but for
    the rounding to a multiple of tp."""
    return 1 << (prefill_chunk.bit_length() - 1)


def prefill_groups(lengths: list[int], budget: int, tp: int, unit: int = 1) -> list[list[int]]:
    """Indices of prompts of these lengths in prefill groups: sorted by length, a group grows
    while its padded size (its row count rounded up to a power of two and to a multiple of
    `unit`, as `Runner.batch` pads it, times the bucket of its longest prompt) stays within
    `budget` tokens; a prompt over the budget alone."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        rows = round_up(pow2_at_least(len(groups[-1]) + 1), unit) if groups else 0
        if groups and rows * bucket(lengths[i], tp) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def join_first(tokens, keys, first, first_keys, slots):
    """The next launch's tokens [B] and keys [B, 2] with an admission group's first tokens and
    keys (as its program left them on the device) in its slots; a padding row's slot, past the
    end, is dropped."""
    return (tokens.at[slots].set(first.astype(tokens.dtype), mode="drop"),
            keys.at[slots].set(first_keys.astype(keys.dtype), mode="drop"))


def insert_row(cache: KVCache, rows: KVCache, slot):
    """Row 0 of a prefill's cache (its prompt's bucket of positions) into slot `slot` of the
    engine's from position 0 (in place: donated; a bucket longer than the engine's cache holds
    only padding past it)."""
    put = lambda big, small: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
        big, small[:, :1, :big.shape[2]].astype(big.dtype), slot, axis=1)
    return KVCache(put(cache.k, rows.k), put(cache.v, rows.v))
