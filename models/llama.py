"""Llama-family decoder in Flax NNX: Llama 2/3, Mistral, Qwen2 (q/k/v bias), SmolLM.

Model math only. Parameters carry logical axis names (`embed`, `heads`, `qkv_heads`, `head_dim`,
`mlp`, `vocab`, `layers`; None for the C axis of the fused q/k/v and gate/up weights); the three
layout boundaries of Megatron TP/SP go through a `Layout` (see `models/layout.py`). There is no
mesh, no collective and no parallel-mode branch here.

The residual stream is flattened over the batch: `x_td` has T = B * T_seq rows (a one-token step
carries it on the rows its projections run on, `Layout.rows`: the B rows, then zeros). Attention
reshapes to [B, T_seq, ...] because each sequence attends to its own keys. Layers are stacked on a leading
L axis (nnx.vmap at creation) and run with `jax.lax.scan`, so compile time does not grow with L.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from models.cache import CACHE_AXES, KVCache
from models.config import ModelConfig
from models.layout import DENSE, Layout

REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "selective": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_MASKED = -1e30  # finite, so a row whose keys are all masked gives a uniform softmax, not NaN


def _param(rngs, shape, names, dtype, scale=0.02):
    value = (scale * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _const(value, names):
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype):
        self.eps = cfg.rms_norm_eps
        self.scale = _const(jnp.ones((cfg.hidden_size,), dtype), ("norm",))

    def __call__(self, x_td):
        x32 = x_td.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * y.astype(x_td.dtype)  # HF order: cast, then scale


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [H/2], with llama3 scaling when configured (HF `rope_type="llama3"`)."""
    h = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h))
    rs = cfg.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position / rs.low_freq_factor
    high_wavelen = rs.original_max_position / rs.high_freq_factor
    wavelen = 2 * jnp.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def rope_tables(cfg: ModelConfig, positions_bt, dtype):
    freqs = positions_bt[..., None].astype(jnp.float32) * rope_inv_freq(cfg)  # [B, T, H/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)  # rotate-half convention: [B, T, H]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x_btnh, cos_bth, sin_bth):
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]


Q_CHUNK = 512  # queries per attention step in long forwards: bounds the [T, S] score buffer
# "pallas": one-token decode steps without a sliding window run models/decode_attention.py (RoPE,
# cache write and attention in one kernel); every other forward attends as "xla"
ATTENTION = ("xla", "cudnn", "pallas")
# cuDNN decode steps read the stacked cache as a paged pool (attend_paged); False: slice the
# layer out first, as before (kept for benchmarks/profile_decode.py --sliced-cache)
PAGED_DECODE: bool = True


def attend_fresh(q_btnh, k_btkh, v_btkh, positions_bt, kv_len_b, window=0, impl="xla"):
    """Causal attention of a forward that starts every sequence at position 0 over its own keys.
    impl="cudnn" is cuDNN's fused flash attention (GPU, 16-bit dtypes): no [T, S] score buffer."""
    if impl == "cudnn":
        return jax.nn.dot_product_attention(
            q_btnh, k_btkh, v_btkh, is_causal=True, key_value_seq_lengths=kv_len_b,
            local_window_size=(window - 1, 0) if window else None, implementation="cudnn")
    return attend(q_btnh, k_btkh, v_btkh, positions_bt, positions_bt, kv_len_b, window)


def attend_cached(q_btnh, cache, layer, positions_bt, kv_len_b, window=0, impl="xla"):
    """Attention of T new tokens per sequence over layer `layer` of the cache (slot s holds
    position s). impl="cudnn" serves one-token decode steps without a sliding window: a padding
    mask (kv_len) is the whole mask there, as the new token is each sequence's last key."""
    b, t = positions_bt.shape
    if impl == "cudnn" and t == 1 and not window and PAGED_DECODE:
        return attend_paged(q_btnh, cache, layer, kv_len_b)
    k_bskh, v_bskh = cache.layer(layer)
    if impl == "cudnn" and t == 1 and not window:
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh,
                                            key_value_seq_lengths=kv_len_b,
                                            implementation="cudnn")
    kpos_bs = jnp.broadcast_to(jnp.arange(k_bskh.shape[1]), (b, k_bskh.shape[1]))
    return attend(q_btnh, k_bskh, v_bskh, positions_bt, kpos_bs, kv_len_b, window)


def attend_paged(q_btnh, cache, layer, kv_len_b):
    """cuDNN flash attention of one-token steps reading layer `layer` of the stacked cache where
    it lies. Slicing the layer out (`cache.layer`) makes XLA copy it before the cuDNN call, a copy
    that grows with the cache (14% of a batch-32 step on an H100); `cache.paged` hands cuDNN the
    whole cache as its paged pool and this layer's page table instead.
    `jax.nn.dot_product_attention` takes no page tables; `paged_attention` is the cuDNN wrapper
    beside the one it calls."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, paged_attention

    k_pool, v_pool, table = cache.paged(layer)
    b, h = q_btnh.shape[0], q_btnh.shape[-1]
    return paged_attention(q_btnh, k_pool, v_pool, jnp.ones((b,), jnp.int32),
                           kv_len_b.astype(jnp.int32), table, table, scale=h ** -0.5,
                           mask_type=MaskType.PADDING)


def attend(q_btnh, k_bskh, v_bskh, qpos_bt, kpos_bs, kv_len_b, window=0):
    """Grouped-query causal attention; key s is visible to a query at position p iff
    kpos[s] <= p and kpos[s] < kv_len (the padding mask), and p - kpos[s] < window when a sliding
    window is set. Softmax in fp32. Long forwards run Q_CHUNK queries at a time, so scores take
    [B, N, Q_CHUNK, S] rather than [B, N, T, S]."""
    b, t, n, h = q_btnh.shape
    if t > Q_CHUNK and t % Q_CHUNK == 0:
        chunks = t // Q_CHUNK
        q_cbqnh = q_btnh.reshape(b, chunks, Q_CHUNK, n, h).swapaxes(0, 1)
        qpos_cbq = qpos_bt.reshape(b, chunks, Q_CHUNK).swapaxes(0, 1)
        out = jax.lax.map(lambda qp: _attend(qp[0], k_bskh, v_bskh, qp[1], kpos_bs, kv_len_b,
                                             window), (q_cbqnh, qpos_cbq))
        return out.swapaxes(0, 1).reshape(b, t, n, h)
    return _attend(q_btnh, k_bskh, v_bskh, qpos_bt, kpos_bs, kv_len_b, window)


def _attend(q_btnh, k_bskh, v_bskh, qpos_bt, kpos_bs, kv_len_b, window):
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q = q_btnh.reshape(b, t, k, n // k, h)  # [B, T, K, G, H]
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q, k_bskh,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    visible = (kpos_bs[:, None, :] <= qpos_bt[:, :, None]) & (
        kpos_bs < kv_len_b[:, None])[:, None, :]  # [B, T, S]
    if window:
        visible &= kpos_bs[:, None, :] > qpos_bt[:, :, None] - window
    scores = jnp.where(visible[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v_bskh)
    return out.reshape(b, t, n, h)


def _pad_rows(x_td, rows):
    """x_td with zero rows appended up to `rows`."""
    return jnp.pad(x_td, ((0, rows - x_td.shape[0]), (0, 0)))


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v fused by KV group (vLLM's QKVParallelLinear): C holds a group's G query
        # heads, then its k, then its v, so one matmul computes all three and splitting K over
        # tp gives each device whole groups (bridges/hf.py, sharding/padding.py)
        self.w_qkv_dkch = _param(rngs, (d, k, n // k + 2, h),
                                 ("embed", "qkv_heads", None, "head_dim"), dtype)
        self.w_o_nhd = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype)
        self.qkv_bias = cfg.qkv_bias
        self.window = cfg.sliding_window
        if cfg.qkv_bias:
            self.b_qkv_kch = _const(jnp.zeros((k, n // k + 2, h), dtype),
                                    ("qkv_heads", None, "head_dim"))

    def __call__(self, x_td, rope, positions_bt, kv_len_b, cache, layer, layout: Layout,
                 fresh: bool, impl: str):
        """x_td may hold padding rows past the B*T tokens' (a one-token step's, see Llama); the
        output then has as many, zeros."""
        b, t = positions_bt.shape
        kernel = impl == "pallas" and t == 1 and not fresh and cache is not None and not self.window
        # the kernel reads its B rows where the projection left them (padding rows included)
        (qkv_tkch,) = layout.column(x_td, ("TD,DKCH->TKCH", self.w_qkv_dkch[...]))
        if self.qkv_bias:
            qkv_tkch = qkv_tkch + self.b_qkv_kch[...]
        if kernel:
            out, cache = self._decode_kernel(qkv_tkch, rope, positions_bt, kv_len_b, cache,
                                             layer, layout)
        else:
            out, cache = self._attend(qkv_tkch, rope, positions_bt, kv_len_b, cache, layer,
                                      fresh, "xla" if impl == "pallas" else impl)
        # one contraction over N*H (a [T, N*H] x [N*H, D] matmul): with two contracting dims
        # XLA:GPU lowered one-token decode to a broadcast-multiply-reduce through [N, H, D]
        n, h = out.shape[-2:]
        w_o = self.w_o_nhd[...]
        out_td = layout.row("TF,FD->TD", _pad_rows(out.reshape(b * t, n * h), x_td.shape[0]),
                            w_o.reshape(n * h, -1))
        return out_td, cache

    def _attend(self, qkv_tkch, rope, positions_bt, kv_len_b, cache, layer, fresh, impl):
        """Rotate, write the cache and attend in XLA (or cuDNN): [B, T, N, H] and the cache."""
        b, t = positions_bt.shape
        if qkv_tkch.shape[0] > b * t:  # the barrier keeps the slice out of the projection
            qkv_tkch = jax.lax.optimization_barrier(qkv_tkch)[:b * t]
        g = qkv_tkch.shape[2] - 2  # query heads per KV head
        q_tnh = qkv_tkch[:, :, :g].reshape(b * t, -1, qkv_tkch.shape[-1])  # head k*G + j
        k_tkh, v_tkh = qkv_tkch[:, :, g], qkv_tkch[:, :, g + 1]
        q = apply_rope(q_tnh.reshape(b, t, *q_tnh.shape[1:]), *rope)  # [B, T, N, H]
        k = apply_rope(k_tkh.reshape(b, t, *k_tkh.shape[1:]), *rope)  # [B, T, K, H]
        v = v_tkh.reshape(b, t, *v_tkh.shape[1:])
        if cache is not None:
            cache = cache.write(layer, k, v, positions_bt[:, 0], aligned=fresh)
        if fresh or cache is None:  # this forward's keys are all the keys
            out = attend_fresh(q, k, v, positions_bt, kv_len_b, self.window, impl)
        else:
            out = attend_cached(q, cache, layer, positions_bt, kv_len_b, self.window, impl)
        return out, cache

    def _decode_kernel(self, qkv_tkch, rope, positions_bt, kv_len_b, cache, layer, layout):
        """A one-token step through models/decode_attention.py, per device on its KV heads:
        [B, N, H] and the cache."""
        from models.decode_attention import decode_attention

        qkv_names = ("act_gathered", "qkv_heads", None, "head_dim")
        # causal: the step's token sees keys up to its own position (attend_cached's mask)
        kv_len_b = jnp.minimum(kv_len_b, positions_bt[:, 0] + 1)
        out_bnh, k, v = layout.local(
            decode_attention, (qkv_names, (None, None), (None, None), CACHE_AXES, CACHE_AXES,
                               (None,), (None,), (None,)),
            ((None, "heads", "head_dim"), CACHE_AXES, CACHE_AXES),
            qkv_tkch, rope[0][:, 0], rope[1][:, 0], cache.k, cache.v,
            jnp.reshape(layer, (1,)).astype(jnp.int32), positions_bt[:, 0], kv_len_b)
        return out_bnh, KVCache(k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        # gate and up fused on C (0: gate, 1: up), vLLM's gate_up_proj: one matmul
        self.w_gate_up_dcf = _param(rngs, (d, 2, f), ("embed", None, "mlp"), dtype)
        self.w_down_fd = _param(rngs, (f, d), ("mlp", "embed"), dtype)

    def __call__(self, x_td, layout: Layout):
        (gate_up_tcf,) = layout.column(x_td, ("TD,DCF->TCF", self.w_gate_up_dcf[...]))
        h_tf = jax.nn.silu(gate_up_tcf[:, 0]) * gate_up_tcf[:, 1]
        return layout.row("TF,FD->TD", h_tf, self.w_down_fd[...])


class Block(nnx.Module):
    """A decoder layer in vLLM's form: it takes and returns the residual stream as a pair
    (hidden, residual) whose sum is the stream, so a pipeline stage can hand both on exactly as
    vLLM's IntermediateTensors does. Layer 0 gets (embeddings, 0)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg, dtype)
        self.attn = Attention(cfg, dtype, rngs)
        self.mlp_norm = RMSNorm(cfg, dtype)
        self.mlp = MLP(cfg, dtype, rngs)

    def __call__(self, hidden_td, residual_td, rope, positions_bt, kv_len_b, cache, layer,
                 layout: Layout, fresh: bool, impl: str):
        x_td = hidden_td + residual_td
        attn_td, cache = self.attn(self.attn_norm(x_td), rope, positions_bt, kv_len_b, cache,
                                   layer, layout, fresh, impl)
        h_td = x_td + attn_td
        return self.mlp(self.mlp_norm(h_td), layout), h_td, cache


class IntermediateTensors(NamedTuple):
    """What leaves a pipeline stage (vLLM's name): the stream is hidden_states + residual."""

    hidden_states: jax.Array  # [T, D]
    residual: jax.Array  # [T, D]


class Output(NamedTuple):
    logits: jax.Array | None  # [R, V] on the last stage
    cache: KVCache | None
    carry: IntermediateTensors | None  # leaving a stage that is not the last
    residuals: jax.Array | None  # the stream after each layer [L, T, D], when collected


class Llama(nnx.Module):
    """The decoder, or one pipeline stage of it: `num_layers` consecutive layers (default: all),
    with the embedding when `first` and the final norm and LM head when `last`. A last stage of
    a tied model that is not also first holds its own copy of the embedding, for the head."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs,
                 num_layers: int | None = None, first: bool = True, last: bool = True):
        self.cfg, self.first, self.last = cfg, first, last
        v, d = cfg.vocab_size, cfg.hidden_size
        if first or (last and cfg.tie_word_embeddings):
            self.embed_vd = _param(rngs, (v, d), ("vocab", "embed"), dtype)

        @nnx.split_rngs(splits=num_layers or cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked(r):
            return Block(cfg, dtype, r)

        self.layers = stacked(rngs)
        if last:
            self.final_norm = RMSNorm(cfg, dtype)
            if not cfg.tie_word_embeddings:
                self.head_dv = _param(rngs, (d, v), ("embed", "vocab"), dtype)

    def __call__(self, positions_bt, kv_len_b, *, tokens_bt=None, embeds_td=None, carry=None,
                 cache: KVCache | None = None, rows_r=None, layout: Layout = DENSE,
                 collect_residuals: bool = False, fresh: bool = False, attention: str = "xla",
                 unroll: int = 1, remat: str = "none") -> Output:
        """One forward over B sequences of T tokens each (padded; see `attend` for the mask).

        positions_bt: absolute position of each token; kv_len_b: valid keys per sequence after
        this forward. Input: token ids [B, T] or embeddings [B*T, D] (first stage), or the carry
        (hidden, residual) of the previous stage. rows_r selects the flattened rows whose logits
        are wanted (all rows when None).

        fresh: every sequence starts at position 0 (a prefill), so attention reads this
        forward's keys rather than the cache; attention: "xla", "cudnn" (flash attention on
        GPU, for fresh forwards and one-token steps without a sliding window) or "pallas"
        (one-token steps without a sliding window through models/decode_attention.py, the rest
        as "xla"); unroll: the layer
        loop's unroll factor (>= its length: unrolled).
        """
        b, t = positions_bt.shape
        dtype = self.layers.mlp.w_down_fd.dtype
        if carry is None:
            if embeds_td is None:
                embeds_td = self.embed_vd[...][tokens_bt.reshape(b * t)]  # vocab-parallel lookup
            hidden_td = layout.residual(embeds_td.astype(dtype))
            residual_td = layout.residual(jnp.zeros_like(hidden_td))
        else:
            hidden_td, residual_td = (layout.residual(c.astype(dtype)) for c in carry)
        rope = rope_tables(self.cfg, positions_bt, dtype)
        if t == 1:
            # A one-token step carries the whole stream on the rows its projections run on (8
            # on GPU: sharding/layout.py `_einsum`), so the padding is made once, not before
            # each projection: XLA then fuses each residual add and norm into one kernel and
            # adds the residual in the o_proj and down_proj GEMVs, as it does for 8 sequences
            # (padding rows stay zeros; attention reads the B rows and pads its output back).
            gate_up = self.layers.mlp.w_gate_up_dcf
            rows = layout.rows(b, gate_up.size // gate_up.shape[0])
            hidden_td, residual_td = (_pad_rows(x, rows) for x in (hidden_td, residual_td))

        graphdef, layer_state = nnx.split(self.layers)

        def body(carry, xs):
            hidden, residual, kv = carry
            state, layer = xs
            hidden, residual, kv = nnx.merge(graphdef, state)(
                hidden, residual, rope, positions_bt, kv_len_b, kv, layer, layout, fresh,
                attention)
            stream = (hidden + residual)[:b * t] if collect_residuals else None
            return (hidden, residual, kv), stream

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        layers = jnp.arange(jax.tree.leaves(layer_state)[0].shape[0])
        (hidden_td, residual_td, kv), residuals = jax.lax.scan(
            body, (hidden_td, residual_td, cache), (layer_state, layers), unroll=unroll)
        hidden_td, residual_td = hidden_td[:b * t], residual_td[:b * t]
        if not self.last:
            return Output(None, kv, IntermediateTensors(hidden_td, residual_td), residuals)

        x_td = self.final_norm(hidden_td + residual_td)  # on local tokens under SP
        if rows_r is not None:
            x_td = x_td[rows_r]
        if self.cfg.tie_word_embeddings:
            (logits,) = layout.column(x_td, ("TD,VD->TV", self.embed_vd[...]))
        else:
            (logits,) = layout.column(x_td, ("TD,DV->TV", self.head_dv[...]))
        return Output(logits, kv, None, residuals)
