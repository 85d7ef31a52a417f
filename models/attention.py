"""Attention of one layer, and the data all layers of a forward share.

`Forward` is what the layers of one forward (B sequences of T tokens) share: positions, kv
lengths, RoPE tables, whether it is a prefill, the layout and the attention backend. A backend
is a callable chosen once per program (jax_sp/attention.py picks it):

    backend(qkv_tkch, fwd, cache, layer, window) -> (out [.., N, H] of B*T rows, cache)

qkv_tkch is the layer's fused q/k/v projection [T', K, G + 2, H] (per KV head its G query
heads, then k, then v, un-rotated), whose first B*T rows are the tokens' (a one-token step may
carry padding rows after them). `Xla` here is the reference: it splits q/k/v, rotates them,
writes the cache and attends with einsums and a softmax, over this forward's keys (`fresh`, a
prefill from position 0) or the cache's. The other backends (cuDNN's flash attention, the fused
Pallas decode kernel) live in jax_sp/attention.py and are tested against this one.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

Q_CHUNK = 512  # queries per attention step in long forwards: bounds the [T, S] score buffer
_MASKED = -1e30  # finite, so a row whose keys are all masked gives a uniform softmax, not NaN


class Forward(NamedTuple):
    """What every layer of one forward shares. fresh: every sequence starts at position 0 (a
    prefill), so attention reads this forward's keys rather than the cache."""

    positions_bt: jax.Array  # absolute position of each token
    kv_len_b: jax.Array  # valid keys per sequence after this forward
    rope: tuple[jax.Array, jax.Array]  # cos, sin [B, T, H]
    fresh: bool
    layout: Any  # models.layout.Layout
    attention: Any  # a backend: Xla() or one of jax_sp/attention.py
    # the layers' FP8 weights stay stacked [L, ...] and each projection reads its layer's
    # (models/quant.py Fp8.layer): what a kernel needs to read them in place
    stacked_fp8: bool = False
    # each residual add and the norm after it in one kernel (models/add_norm.py)
    fused_norm: bool = False
    # a layer's last kernel (down_proj's) hands the stream straight to the next layer's first
    # (the add-and-norm, or q/k/v's kernel that adds and normalizes), except after the last of
    # `layers` (models/pdl.py)
    chained_layers: bool = False
    layers: int = 0


def apply_rope(x_btnh, cos_bth, sin_bth):
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    return x_btnh * cos_bth[:, :, None] + rotated * sin_bth[:, :, None]


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


class Xla:
    """The reference backend: rotate, write the cache and attend in XLA. Subclasses change how
    a prefill (`fresh`) or a step over the cache (`cached`) attends."""

    name = "xla"

    def kernel(self, fwd: Forward, cache, window) -> bool:
        """Whether this forward attends in one kernel that reads q/k/v as the projection wrote
        them (so that the projection may signal it early: models/pdl.py)."""
        return False

    def __call__(self, qkv_tkch, fwd: Forward, cache, layer, window):
        b, t = fwd.positions_bt.shape
        if qkv_tkch.shape[0] > b * t:  # the barrier keeps the slice out of the projection
            qkv_tkch = jax.lax.optimization_barrier(qkv_tkch)[:b * t]
        g = qkv_tkch.shape[2] - 2  # query heads per KV head
        q_tnh = qkv_tkch[:, :, :g].reshape(b * t, -1, qkv_tkch.shape[-1])  # head k*G + j
        k_tkh, v_tkh = qkv_tkch[:, :, g], qkv_tkch[:, :, g + 1]
        q = apply_rope(q_tnh.reshape(b, t, *q_tnh.shape[1:]), *fwd.rope)  # [B, T, N, H]
        k = apply_rope(k_tkh.reshape(b, t, *k_tkh.shape[1:]), *fwd.rope)  # [B, T, K, H]
        v = v_tkh.reshape(b, t, *v_tkh.shape[1:])
        if cache is not None:
            k_new = k
            if jnp.dtype(cache.k.dtype).itemsize == 1:  # FP8: rotated in float32 and rounded
                # once, as the decode kernel stores it (a 16-bit rotation first would round
                # twice: 1 in 32 values one e4m3 step off)
                k_new = apply_rope(k_tkh.reshape(b, t, *k_tkh.shape[1:]).astype(jnp.float32),
                                   *fwd.rope)
            cache = cache.write(layer, k_new, v, fwd.positions_bt[:, 0], aligned=fwd.fresh)
        if fwd.fresh or cache is None:  # this forward's keys are all the keys
            return self.fresh(q, k, v, fwd, window), cache
        return self.cached(q, cache, layer, fwd, window), cache

    def fresh(self, q_btnh, k_btkh, v_btkh, fwd: Forward, window):
        """Causal attention of a forward that starts every sequence at position 0."""
        return attend(q_btnh, k_btkh, v_btkh, fwd.positions_bt, fwd.positions_bt, fwd.kv_len_b,
                      window)

    def cached(self, q_btnh, cache, layer, fwd: Forward, window):
        """Attention of T new tokens per sequence over layer `layer` of the cache (slot s holds
        position s). An FP8 cache is widened to q's dtype as it is read."""
        b = q_btnh.shape[0]
        k_bskh, v_bskh = (c.astype(q_btnh.dtype) for c in cache.layer(layer))
        kpos_bs = jnp.broadcast_to(jnp.arange(k_bskh.shape[1]), (b, k_bskh.shape[1]))
        return attend(q_btnh, k_bskh, v_bskh, fwd.positions_bt, kpos_bs, fwd.kv_len_b, window)


XLA = Xla()
