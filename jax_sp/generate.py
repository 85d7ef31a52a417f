"""The programs: prefill, one decode step, and the on-device decode loop.

Each is a pure function of (parameter state, KV cache, inputs) built for one stage's Runtime and
compiled ahead of time per static setting and input shape by the runtime's program cache
(`jax_sp.runtime.Programs`), so compile time is measured apart from run time and the
executables that ran can be inspected. The prefill (one program, in a generation form and three
logits forms) makes the cache, the positions and the rows' sampling keys itself, so it is one
launch; every later program takes the cache donated and returns it updated.

A one-stage generation decodes every new token in one call: a `lax.while_loop` that stops when
every row has hit a stop token or the budget. Streaming and pipeline stages call the one-step
program once per token.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from jax_sp.runtime import Runtime
from jax_sp.sampling import row_keys, sample

# XLA:CPU cannot reuse donated buffers and says so on every call; donation still matters on GPU.
warnings.filterwarnings("ignore", message="Some donated buffers were not usable")


def decode_unroll(rt: Runtime) -> int:
    """The layer loop's unroll factor in decode programs: CompileOptions.decode_unroll when
    set, else every layer unrolled on GPU and a loop elsewhere. On GPU a rolled loop slices each
    layer's weights at a loop-dependent offset, and the dynamic-slice fusion that lets cuBLAS
    read them in place does host work per call (per projection, per layer): with SmolLM2-sized
    layers the host cannot keep up (an H100 busy 1.28 ms of a 2.2 ms step at batch 8).
    Unrolled, the slices are static. Measured side by side (benchmarks/generation.py --unroll
    1,L): Llama-3.2-1B 1.67/1.58/1.84 -> 1.63/1.42/1.61 ms/token at batch 1/8/32, SmolLM2-135M
    batch 8 and 32 1.62 -> 1.09 and 1.95 -> 1.28 (batch 1 1.30 -> 1.43 in that run, 1.21 both
    ways in benchmarks/profile_decode.py); a first call, compile included, took 2-5 s either
    way."""
    if rt.options.decode_unroll is not None:
        return rt.options.decode_unroll
    return rt.cfg.num_layers if rt.mesh.devices.flat[0].platform == "gpu" else 1


@dataclasses.dataclass(frozen=True)
class Static:
    """What a compiled program is specialised on besides shapes."""

    sp: bool
    greedy: bool
    top_k: int
    unroll: int = 1  # the layer loop's unroll factor (an int: 1 == True would alias keys)
    # classifier-free guidance scale (None: none): the batch's first half are the conditional
    # rows, the second half their unconditional twins (see `guide`)
    guidance: float | None = None

    @classmethod
    def of(cls, rt: Runtime, phase: str, sp: bool, sampling=None) -> "Static":
        """The settings of a "prefill" or "decode" program (the layer loop's unroll factor
        from the runtime's CompileOptions), sampling as `sampling` says (None: greedy)."""
        unroll = rt.options.prefill_unroll if phase == "prefill" else decode_unroll(rt)
        if sampling is None:
            return cls(sp, True, 0, unroll)
        guidance = float(sampling.guidance_scale) if sampling.guided else None
        return cls(sp, sampling.temperature == 0, sampling.top_k, unroll, guidance)


def _forward(rt: Runtime, st: Static, state, cache, positions_bt, kv_len_b, rows_r=None,
             fresh=False, collect_residuals=False, **inputs):
    model = nnx.merge(rt.graphdef, state)
    return model(positions_bt, kv_len_b, cache=cache, rows_r=rows_r, layout=rt.layout(st.sp),
                 fresh=fresh, attention=rt.attention if fresh else rt.decode_attention,
                 unroll=st.unroll, collect_residuals=collect_residuals, **inputs)


def _logits(rt: Runtime, out):
    """The f32 logits of the real vocabulary."""
    return out.logits[:, : rt.cfg.vocab_size].astype(jnp.float32)


FEEDS = {"tokens": "tokens_bt", "embeds": "embeds_td", "carry": "carry"}
OUTS = ("token", "last", "all", "residuals")


def prefill_fn(rt: Runtime, st: Static, feed: str, out: str = "token", cache_len: int = 0):
    """The prefill program: every row starts at position 0 and the program makes the positions
    itself. inputs: token ids [B, T], embeddings [B*T, D] or the previous stage's carry (feed).
    A stage that is not the last returns its carry (with the cache and keys for "token"). On
    the last stage, `out`:

    - "token": (state, inputs, kv_len_b, seed, first_row, temperature, top_p) -> (the first new
      token [B], cache, keys_b): a generation's prefill. It makes its cache (cache_len slots)
      and its rows' sampling keys (rows first_row.. of the whole batch, from `key_seed`), so a
      prefill is one launch after one batched host-to-device copy.
    - "last" / "all": (state, inputs, kv_len_b) -> f32 logits of each sequence's last token
      [B, V] / of every row [B*T, V], replicated (every process can be handed the same copy).
    - "residuals": (state, inputs, kv_len_b) -> the stream after each layer [L, B*T, D], as
      sharded."""
    def run(state, inputs, kv_len_b, seed=None, first_row=None, temperature=None, top_p=None):
        b = kv_len_b.shape[0]
        x = jax.tree.leaves(inputs)[0]
        t = x.shape[1] if feed == "tokens" else x.shape[0] // b
        positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if out == "token":
            keys = row_keys(seed, b, first_row)
        rows = None
        if rt.stage.last and out in ("token", "last"):
            rows = jnp.arange(b) * t + kv_len_b - 1  # each sequence's last real token
        cache = rt.empty_cache(b, cache_len) if cache_len else None
        result = _forward(rt, st, state, cache, positions_bt, kv_len_b, rows, fresh=True,
                          collect_residuals=out == "residuals", **{FEEDS[feed]: inputs})
        if out == "residuals":
            return result.residuals
        if out == "token":
            if not rt.stage.last:
                return rt.constrain_carry(result.carry), result.cache, keys
            token = _sample(rt, st, _logits(rt, result), keys, 0, temperature, top_p)
            return token, result.cache, keys
        if not rt.stage.last:
            return rt.constrain_carry(result.carry)
        # vocab-parallel first, so that the replication below gathers the [T, V] logits and
        # not the [D, V] LM head
        logits = jax.lax.with_sharding_constraint(result.logits,
                                                  rt.sharding_of((None, "vocab")))
        logits = logits[:, : rt.cfg.vocab_size].astype(jnp.float32)
        return jax.lax.with_sharding_constraint(logits, rt.sharding_of(()))
    return run


def guide(logits_bv, scale: float):
    """Classifier-free guidance (transformers' UnbatchedClassifierFreeGuidanceLogitsProcessor):
    rows [0, B/2) conditional, [B/2, B) their unconditional twins -> the guided scores of the
    first half, scale * (log_softmax(cond) - log_softmax(uncond)) + log_softmax(uncond)."""
    half = logits_bv.shape[0] // 2
    cond = jax.nn.log_softmax(logits_bv[:half], axis=-1)
    uncond = jax.nn.log_softmax(logits_bv[half:], axis=-1)
    return scale * (cond - uncond) + uncond


def _sample(rt, st, logits_bv, keys_b, step, temperature, top_p):
    """The next token of every row; under guidance the conditional rows' tokens, sampled from
    the guided scores with their keys, given to both halves (the unconditional context is
    followed by the tokens generated). The logits are replicated first: with the branches on
    two device halves (ParallelConfig(cfg=2)) that is the step's one collective, an all-gather
    of [B, V], after which every device combines and samples alike."""
    if st.guidance is None:
        return sample(logits_bv, keys_b, step, temperature, top_p, greedy=st.greedy,
                      top_k=st.top_k)
    every = rt.sharding_of(())
    logits_bv = jax.lax.with_sharding_constraint(logits_bv, every)
    half = logits_bv.shape[0] // 2
    scores = jax.lax.with_sharding_constraint(guide(logits_bv, st.guidance), every)
    token = sample(scores, keys_b[:half], step, temperature, top_p, greedy=st.greedy,
                   top_k=st.top_k)
    token = jax.lax.with_sharding_constraint(token, every)
    return jax.lax.with_sharding_constraint(jnp.concatenate([token, token]), every)


def _step(rt, st, state, cache, inputs, pos_b, key, step, temperature, top_p):
    feed = {"tokens_bt": inputs[:, None]} if rt.stage.first else {"carry": inputs}
    out = _forward(rt, st, state, cache, pos_b[:, None], pos_b + 1, **feed)
    if not rt.stage.last:
        return rt.constrain_carry(out.carry), out.cache
    return _sample(rt, st, _logits(rt, out), key, step, temperature, top_p), out.cache


def decode_step_fn(rt: Runtime, st: Static):
    """(state, cache, inputs, pos_b, keys_b, step, temperature, top_p)
    -> (out, cache, pos_b + 1, step + 1): one decode step of this stage at positions pos_b;
    inputs are the tokens [B] (first stage) or the previous stage's carry; out is the next
    token (last stage) or this stage's carry. The next step's positions and step number come
    back with it, so a caller keeps them on device: no host copy or extra launch per token."""
    def run(state, cache, inputs, pos_b, key, step, temperature, top_p):
        out, cache = _step(rt, st, state, cache, inputs, pos_b, key, step, temperature, top_p)
        return out, cache, pos_b + 1, step + 1
    return run


def abstract_decode_step_args(rt: Runtime, batch: int, max_len: int) -> tuple:
    """Arguments of `decode_step_fn` as ShapeDtypeStructs, for compiling a first-stage decode
    step ahead of time without weights (abstract state, cache of max_len slots)."""
    rows = jax.ShapeDtypeStruct((batch,), jnp.int32)
    scalar = jax.ShapeDtypeStruct((), jnp.float32)
    return (rt.abstract_state(), rt.abstract_cache(batch, max_len), rows, rows,
            jax.eval_shape(lambda: row_keys(0, batch)), jax.ShapeDtypeStruct((), jnp.int32),
            scalar, scalar)


def decode_loop_fn(rt: Runtime, st: Static, max_steps: int):
    """(state, cache, token_b, pos_b, active_b, n_steps, stop_ids, keys_b, temperature, top_p)
    -> (tokens [B, max_steps] with -1 after a row stops, cache). Runs until n_steps or until
    every active row has stopped (given a stop id, the first token included). For a
    single-stage model (pp=1): the whole decode is one call."""
    def run(state, cache, token_b, pos_b, active_b, n_steps, stop_ids, key, temperature, top_p):
        out = jnp.full((token_b.shape[0], max_steps), -1, jnp.int32)

        def cond(carry):
            i, _, _, _, done, _ = carry
            return (i < n_steps) & ~jnp.all(done)

        def body(carry):
            i, out, token, pos, done, cache = carry
            token, cache = _step(rt, st, state, cache, token, pos, key, i + 1, temperature, top_p)
            out = out.at[:, i].set(jnp.where(done, -1, token))
            done = done | jnp.isin(token, stop_ids)
            return i + 1, out, token, pos + 1, done, cache

        done = ~active_b | jnp.isin(token_b, stop_ids)
        carry = (jnp.int32(0), out, token_b, pos_b, done, cache)
        _, out, _, _, _, cache = jax.lax.while_loop(cond, body, carry)
        return out, cache
    return run
