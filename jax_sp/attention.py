"""Attention backends beyond XLA's, and the choice of a program's backends.

Each backend is the reference `models.attention.Xla` with one part replaced (see there for the
call), chosen once per program by `choose`:

- `Cudnn`: cuDNN's fused flash attention (GPU, 16-bit): prefills, and one-token decode steps
  without a sliding window, where a padding mask (kv_len) is the whole mask since the new token
  is each sequence's last key. With `paged` a decode step hands cuDNN the whole stacked cache
  as its paged pool and this layer's page table, instead of slicing the layer out first (XLA
  copies the slice before the call: 14% of a batch-32 step on an H100).
- `PallasDecode`: one-token decode steps without a sliding window through
  models/decode_attention.py (RoPE, the cache write and flash-decoding attention in one launch),
  per device on its own KV heads (`Layout.local`); everything else through XLA's backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from models.attention import XLA, Forward, Xla
from models.cache import CACHE_AXES, KVCache

class Cudnn(Xla):
    name = "cudnn"

    def __init__(self, paged: bool = True):
        self.paged = paged

    def fresh(self, q_btnh, k_btkh, v_btkh, fwd: Forward, window):
        return jax.nn.dot_product_attention(
            q_btnh, k_btkh, v_btkh, is_causal=True, key_value_seq_lengths=fwd.kv_len_b,
            local_window_size=(window - 1, 0) if window else None, implementation="cudnn")

    def cached(self, q_btnh, cache, layer, fwd: Forward, window):
        if q_btnh.shape[1] != 1 or window or cache.k.dtype != q_btnh.dtype:
            # (cuDNN reads 16-bit caches only: an FP8 one is widened by XLA's attention)
            return super().cached(q_btnh, cache, layer, fwd, window)
        if self.paged:
            return _paged(q_btnh, cache, layer, fwd.kv_len_b)
        k_bskh, v_bskh = cache.layer(layer)
        return jax.nn.dot_product_attention(q_btnh, k_bskh, v_bskh,
                                            key_value_seq_lengths=fwd.kv_len_b,
                                            implementation="cudnn")


def _paged(q_btnh, cache: KVCache, layer, kv_len_b):
    """cuDNN flash attention of one-token steps reading layer `layer` of the stacked cache where
    it lies. `jax.nn.dot_product_attention` takes no page tables; `paged_attention` is the cuDNN
    wrapper beside the one it calls (not public API: this is the only private import)."""
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, paged_attention

    k_pool, v_pool, table = cache.paged(layer)
    b, h = q_btnh.shape[0], q_btnh.shape[-1]
    return paged_attention(q_btnh, k_pool, v_pool, jnp.ones((b,), jnp.int32),
                           kv_len_b.astype(jnp.int32), table, table, scale=h ** -0.5,
                           mask_type=MaskType.PADDING)


class PallasDecode:
    name = "pallas"

    def __init__(self, fallback: Xla = XLA):
        self.fallback = fallback

    def kernel(self, fwd: Forward, cache, window) -> bool:
        return (fwd.positions_bt.shape[1] == 1 and not fwd.fresh and cache is not None
                and not window)

    def __call__(self, qkv_tkch, fwd: Forward, cache, layer, window):
        if not self.kernel(fwd, cache, window):
            return self.fallback(qkv_tkch, fwd, cache, layer, window)
        from models.decode_attention import decode_attention

        # the kernel reads its B rows where the projection left them (padding rows included)
        qkv_names = ("attn_tokens", "qkv_heads", None, "head_dim")
        # causal: the step's token sees keys up to its own position (Xla.cached's mask)
        kv_len_b = jnp.minimum(fwd.kv_len_b, fwd.positions_bt[:, 0] + 1)
        out_bnh, k, v = fwd.layout.local(
            decode_attention, (qkv_names, ("cache_batch", None), ("cache_batch", None),
                               CACHE_AXES, CACHE_AXES, (None,), ("cache_batch",),
                               ("cache_batch",)),
            (("attn_tokens", "heads", "head_dim"), CACHE_AXES, CACHE_AXES),
            qkv_tkch, fwd.rope[0][:, 0], fwd.rope[1][:, 0], cache.k, cache.v,
            jnp.reshape(layer, (1,)).astype(jnp.int32), fwd.positions_bt[:, 0], kv_len_b)
        return out_bnh, KVCache(k, v)


def choose(mode: str, platform: str, dtype, head_dim: int, paged: bool = True):
    """The backends of (prefill, one-token decode steps) for `mode` (CompileOptions.attention)
    on this platform and dtype; a mode that cannot run here is a ValueError naming why."""
    from models.decode_attention import supported

    sixteen = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    fits = platform == "gpu" and sixteen and head_dim % 8 == 0 and head_dim <= 128
    if mode == "cudnn" and not fits:
        raise ValueError(f"attention='cudnn' needs a GPU, dtype bfloat16 or float16 and "
                         f"head_dim a multiple of 8 up to 128 (have {platform}, "
                         f"{jnp.dtype(dtype).name}, head_dim {head_dim}); "
                         f"use attention='auto' or 'xla'")
    # on GPU the kernel's dots are tensor-core dots of 16-bit values (fp32 would run as tf32);
    # it compiles for GPU or runs interpreted as the default backend is one or not
    gpu = platform == "gpu"
    kernel = (supported(head_dim, interpret=not gpu) and (sixteen or not gpu)
              and gpu == (jax.default_backend() == "gpu"))
    if mode == "pallas" and not kernel:
        raise ValueError(f"attention='pallas' needs head_dim a power of two, and on GPU at "
                         f"least 32 with dtype bfloat16 or float16 (have head_dim {head_dim}, "
                         f"{jnp.dtype(dtype).name} on {platform}); use attention='auto' "
                         f"or 'xla'")
    prefill = Cudnn(paged) if mode == "cudnn" or (mode in ("auto", "pallas") and fits) else XLA
    if mode == "pallas" or (mode == "auto" and fits and kernel):
        return prefill, PallasDecode()
    return prefill, prefill
