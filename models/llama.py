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

from models import pdl
from models.add_norm import AddNorm, add_rms_norm, block as add_norm_block
from models.attention import XLA, Forward
from models.cache import KVCache
from models.config import ModelConfig
from models.layout import DENSE, Layout
from models.quant import (FP8, FP8_WEIGHTS, Fp8, embedding_rows, fp8_weights, is_scale, scale_of,
                          stored_order)

REMAT_POLICIES = {"full": jax.checkpoint_policies.nothing_saveable,
                  "selective": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _param(rngs, shape, names, dtype, scale=0.02):
    value = (scale * jax.random.normal(rngs.params(), shape)).astype(dtype)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _const(value, names):
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def _weight(module, name, rngs, shape, names, dtype, quantization):
    """A projection weight `name`; where the quantization stores it in FP8 (models/quant.py
    `fp8_weights`), in FP8 beside `s_<name>`, its per-output-channel scale."""
    if name not in fp8_weights(quantization):
        setattr(module, name, _param(rngs, shape, names, dtype))
        return
    contracted, scale_names = fp8_weights(quantization)[name]
    order = stored_order(len(shape), contracted)
    setattr(module, name, _param(rngs, tuple(shape[a] for a in order),
                                 tuple(names[a] for a in order), FP8))
    scale_shape = tuple(n for i, n in enumerate(shape) if i not in contracted)
    setattr(module, scale_of(name), _const(jnp.ones(scale_shape, jnp.float32), scale_names))


def _get(module, name, fwd=None, layer=None):
    """A projection weight as the layout's dot takes it: an array, or Fp8 (value, scale; with
    fwd.stacked_fp8 every layer's, and this layer's index)."""
    w = getattr(module, name)[...]
    scale = getattr(module, scale_of(name), None)
    if scale is None:
        return w
    return Fp8(w, scale[...], layer if fwd is not None and fwd.stacked_fp8 else None)


def _is_fp8(path, value) -> bool:
    """nnx filter: an FP8 weight or its scale (by parameter name)."""
    name = str(path[-1])
    return name in FP8_WEIGHTS or is_scale(name)


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


def _pad_rows(x_td, rows):
    """x_td with zero rows appended up to `rows`."""
    return jnp.pad(x_td, ((0, rows - x_td.shape[0]), (0, 0)))


QKV, GATE_UP, DOWN = "TD,DKCH->TKCH", "TD,DCF->TCF", "TF,FD->TD"


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quantization=None):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        # q, k and v fused by KV group (vLLM's QKVParallelLinear): C holds a group's G query
        # heads, then its k, then its v, so one matmul computes all three and splitting K over
        # tp gives each device whole groups (bridges/hf.py, sharding/padding.py)
        _weight(self, "w_qkv_dkch", rngs, (d, k, n // k + 2, h),
                ("embed", "qkv_heads", None, "head_dim"), dtype, quantization)
        _weight(self, "w_o_nhd", rngs, (n, h, d), ("heads", "head_dim", "embed"), dtype,
                quantization)
        self.qkv_bias = cfg.qkv_bias
        self.window = cfg.sliding_window
        if cfg.qkv_bias:
            self.b_qkv_kch = _const(jnp.zeros((k, n // k + 2, h), dtype),
                                    ("qkv_heads", None, "head_dim"))

    def __call__(self, x: Sum, fwd: Forward, cache, layer):
        """(output, the stream x.a + x.b, cache). x's rows may hold padding rows past the B*T
        tokens' (a one-token step's, see Llama); the output then has as many, zeros."""
        b, t = fwd.positions_bt.shape
        # the projection hands q/k/v straight to a fused decode attention (no bias to add)
        with pdl.followed_by_kernel(not self.qkv_bias
                                    and fwd.attention.kernel(fwd, cache, self.window)):
            qkv_tkch, x_td = _project(fwd, x, layer, QKV,
                                      _get(self, "w_qkv_dkch", fwd, layer))
        if self.qkv_bias:
            qkv_tkch = qkv_tkch + self.b_qkv_kch[...]
        out, cache = fwd.attention(qkv_tkch, fwd, cache, layer, self.window)
        # one contraction over N*H (a [T, N*H] x [N*H, D] matmul): with two contracting dims
        # XLA:GPU lowered one-token decode to a broadcast-multiply-reduce through [N, H, D]
        n, h = out.shape[-2:]
        w_o = _get(self, "w_o_nhd", fwd, layer)
        w_o = (w_o._replace(q=w_o.q.reshape(*w_o.q.shape[:-2], n * h))  # [(L,) D, N*H]
               if isinstance(w_o, Fp8) else w_o.reshape(n * h, -1))
        # N here is the flattened N*H: the letter says the contraction is over heads (split
        # as attention's heads are, which attention groups split differently from the MLP)
        # o_proj's sum goes to the add-and-norm, or to gate/up's kernel that adds and normalizes
        with pdl.followed_by_kernel(fwd.fused_norm):
            out_td = fwd.layout.row("TN,ND->TD",
                                    _pad_rows(out.reshape(b * t, n * h), x_td.shape[0]), w_o)
        return out_td, x_td, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quantization=None):
        d, f = cfg.hidden_size, cfg.intermediate_size
        # gate and up fused on C (0: gate, 1: up), vLLM's gate_up_proj: one matmul
        _weight(self, "w_gate_up_dcf", rngs, (d, 2, f), ("embed", None, "mlp"), dtype,
                quantization)
        _weight(self, "w_down_fd", rngs, (f, d), ("mlp", "embed"), dtype, quantization)

    def __call__(self, x: Sum, fwd: Forward, layer):
        """(output, the stream x.a + x.b)."""
        w_down = _get(self, "w_down_fd", fwd, layer)
        # silu(gate) * up: in the FP8 kernel's epilogue where it runs, which then hands h
        # straight to down_proj's; it does not signal: down_proj launched early into gate/up's
        # last wave made the step slower than no signal at all on an H100 (docs/performance.md)
        h_tf, x_td = _project(fwd, x, layer, GATE_UP, _get(self, "w_gate_up_dcf", fwd, layer),
                              glu=True)
        # down_proj's sum goes to the next layer's add-and-norm or q/k/v kernel (none after the
        # last layer)
        with pdl.followed_by_kernel(fwd.chained_layers, below=fwd.layers - 1):
            return fwd.layout.row(DOWN, h_tf, w_down), x_td


class Block(nnx.Module):
    """A decoder layer in vLLM's form: it takes and returns the residual stream as a pair
    (hidden, residual) whose sum is the stream, so a pipeline stage can hand both on exactly as
    vLLM's IntermediateTensors does. Layer 0 gets (embeddings, 0)."""

    def __init__(self, cfg: ModelConfig, dtype, rngs: nnx.Rngs, quantization=None):
        self.attn_norm = RMSNorm(cfg, dtype)
        self.attn = Attention(cfg, dtype, rngs, quantization)
        self.mlp_norm = RMSNorm(cfg, dtype)
        self.mlp = MLP(cfg, dtype, rngs, quantization)

    def __call__(self, hidden_td, residual_td, fwd: Forward, cache, layer):
        # each sublayer takes the stream as its two parts and adds and normalizes them itself
        # (`_project`), so that its first projection's kernel can; both sums in the residual
        # layout, as the block's output (with attention groups the partitioner otherwise kept
        # the loop's carries on each group's rows, because attention reads them there, and
        # gathered them again for the MLP)
        attn_td, x_td, cache = self.attn(Sum(hidden_td, residual_td, self.attn_norm), fwd,
                                         cache, layer)
        out_td, h_td = self.mlp(Sum(x_td, attn_td, self.mlp_norm), fwd, layer)
        return out_td, h_td, cache


class Sum(NamedTuple):
    """A sublayer's input: the residual stream's two parts, whose sum the sublayer normalizes
    with `norm` before its first projection (`_project`)."""

    a_td: jax.Array
    b_td: jax.Array
    norm: RMSNorm


def _project(fwd: Forward, x: Sum, layer, spec: str, w, glu: bool = False):
    """(the column-parallel projection of norm(a + b) onto w, with glu silu(gate) * up of it
    (`Layout.gated`); a + b): the add and the norm in the projection's FP8 kernel where the
    layout takes them there (add_norm="gemv": `Layout.norm_in_kernel`), else before it
    (`_add_norm`)."""
    layout, rows = fwd.layout, x.a_td.shape[0]
    if fwd.fused_norm and layout.norm_in_kernel(spec, rows, w, glu):
        return layout.add_norm_column(x.a_td, spec, w, AddNorm(
            x.b_td.astype(x.a_td.dtype), x.norm.scale[...], x.norm.eps, layer), glu)
    # the norm hands its rows straight to the FP8 kernel of the projection after it?
    with pdl.followed_by_kernel(layout.direct_kernel(spec, rows, w)):
        normed_td, s_td = _add_norm(fwd, x.a_td, x.b_td, x.norm, layer)
    return (layout.gated(normed_td, spec, w) if glu
            else layout.column(normed_td, (spec, w))[0]), s_td


def _add_norm(fwd: Forward, a_td, b_td, norm: RMSNorm, layer):
    """(norm(a + b), a + b), the sum in the residual layout: with fwd.fused_norm in one kernel
    per device (models/add_norm.py; each device holds whole rows) that reads the norm's scale
    from every layer's [L, D] (kept stacked: `fused_norm`), else as XLA fuses it."""
    if not fwd.fused_norm:
        s_td = fwd.layout.residual(a_td + b_td)
        return norm(s_td), s_td
    rows = ("act_tokens", "act_embed")
    return fwd.layout.local(
        lambda a, b, scale, i: add_rms_norm(a, b, scale, norm.eps, i),
        (rows, rows, ("layers", "norm"), ()), (rows, rows), a_td, b_td.astype(a_td.dtype),
        norm.scale[...], layer)


def fused_norm(layout: Layout, rows: int, features: int) -> bool:
    """Whether a forward of `rows` rows adds and normalizes in models/add_norm.py's kernel."""
    return layout.fused_norm(rows) and add_norm_block(
        features, jax.default_backend() != "gpu") is not None


def _is_norm_scale(path, value) -> bool:
    """nnx filter: a decoder layer's norm scale (kept stacked for the fused kernel)."""
    return len(path) >= 2 and str(path[-1]) == "scale" and str(path[-2]).endswith("_norm")


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
    a tied model that is not also first holds its own copy of the embedding, for the head.
    quantization="fp8": the layers' projections in FP8 (models/quant.py); "fp8-head": the LM head
    (or the tied embedding) too."""

    def __init__(self, cfg: ModelConfig, dtype=jnp.float32, *, rngs: nnx.Rngs,
                 num_layers: int | None = None, first: bool = True, last: bool = True,
                 quantization: str | None = None):
        self.cfg, self.first, self.last = cfg, first, last
        self.quantized = quantization in ("fp8", "fp8-head")
        v, d = cfg.vocab_size, cfg.hidden_size
        if first or (last and cfg.tie_word_embeddings):
            _weight(self, "embed_vd", rngs, (v, d), ("vocab", "embed"), dtype,
                    quantization if cfg.tie_word_embeddings else None)

        @nnx.split_rngs(splits=num_layers or cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked(r):
            return Block(cfg, dtype, r, quantization)

        self.layers = stacked(rngs)
        if last:
            self.final_norm = RMSNorm(cfg, dtype)
            if not cfg.tie_word_embeddings:
                _weight(self, "head_dv", rngs, (d, v), ("embed", "vocab"), dtype, quantization)

    def __call__(self, positions_bt, kv_len_b, *, tokens_bt=None, embeds_td=None, carry=None,
                 cache: KVCache | None = None, rows_r=None, layout: Layout = DENSE,
                 collect_residuals: bool = False, fresh: bool = False, attention=XLA,
                 unroll: int = 1, remat: str = "none") -> Output:
        """One forward over B sequences of T tokens each (padded; see `attend` for the mask).

        positions_bt: absolute position of each token; kv_len_b: valid keys per sequence after
        this forward. Input: token ids [B, T] or embeddings [B*T, D] (first stage), or the carry
        (hidden, residual) of the previous stage. rows_r selects the flattened rows whose logits
        are wanted (all rows when None).

        fresh: every sequence starts at position 0 (a prefill), so attention reads this
        forward's keys rather than the cache; attention: the backend every layer attends with
        (models/attention.py; default XLA's); unroll: the layer loop's unroll factor (>= its
        length: unrolled).
        """
        b, t = positions_bt.shape
        dtype = self.layers.attn_norm.scale.dtype
        if carry is None:
            if embeds_td is None:
                # vocab-parallel lookup
                embeds_td = embedding_rows(_get(self, "embed_vd"), tokens_bt.reshape(b * t),
                                           dtype)
            hidden_td = layout.residual(embeds_td.astype(dtype))
            residual_td = layout.residual(jnp.zeros_like(hidden_td))
        else:
            hidden_td, residual_td = (layout.residual(c.astype(dtype)) for c in carry)
        # FP8 weights that a kernel reads in place stay stacked outside the layer loop (a
        # slice of the stack passed to a kernel is a copy: models/fp8_gemv.py)
        stacked = self.quantized and layout.stacked_fp8(b * t)
        # the add-and-norm kernel has no gradient: forwards with a KV cache (inference) only
        fused = cache is not None and fused_norm(layout, b * t, self.cfg.hidden_size)
        layers = self.layers.attn_norm.scale.shape[0]
        # with nothing between one layer's down_proj and the next layer's first kernel
        chained = fused and not collect_residuals
        fwd = Forward(positions_bt, kv_len_b, rope_tables(self.cfg, positions_bt, dtype), fresh,
                      layout, attention, stacked, fused, chained, layers)
        if t == 1:
            # A one-token step carries the whole stream on the rows its projections run on (8
            # on GPU: sharding/layout.py `_einsum`), so the padding is made once, not before
            # each projection: XLA then fuses each residual add and norm into one kernel and
            # adds the residual in the o_proj and down_proj GEMVs, as it does for 8 sequences
            # (padding rows stay zeros; attention reads the B rows and pads its output back).
            gate_up = self.layers.mlp.w_gate_up_dcf
            rows = layout.rows(b, gate_up.size // gate_up.shape[0])  # one layer's size
            hidden_td, residual_td = (_pad_rows(x, rows) for x in (hidden_td, residual_td))

        # ... and so do the norms' scales that the fused add-and-norm kernel reads
        whole = [f for on, f in ((stacked, _is_fp8), (fused, _is_norm_scale)) if on]
        if whole:
            graphdef, whole_state, layer_state = nnx.split(self.layers, nnx.Any(*whole), ...)
        else:
            (graphdef, layer_state), whole_state = nnx.split(self.layers), None

        def body(carry, xs):
            hidden, residual, kv = carry
            state, layer = xs
            block = (nnx.merge(graphdef, whole_state, state) if whole
                     else nnx.merge(graphdef, state))
            hidden, residual, kv = block(hidden, residual, fwd, kv, layer)
            stream = (hidden + residual)[:b * t] if collect_residuals else None
            return (hidden, residual, kv), stream

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
        (hidden_td, residual_td, kv), residuals = jax.lax.scan(
            body, (hidden_td, residual_td, cache), (layer_state, jnp.arange(layers)),
            unroll=unroll)
        hidden_td, residual_td = hidden_td[:b * t], residual_td[:b * t]
        if not self.last:
            return Output(None, kv, IntermediateTensors(hidden_td, residual_td), residuals)

        x_td = self.final_norm(hidden_td + residual_td)  # on local tokens under SP
        if rows_r is not None:
            x_td = x_td[rows_r]
        if self.cfg.tie_word_embeddings:
            (logits,) = layout.column(x_td, ("TD,VD->TV", _get(self, "embed_vd")))
        else:
            (logits,) = layout.column(x_td, ("TD,DV->TV", _get(self, "head_dv")))
        return Output(logits, kv, None, residuals)
