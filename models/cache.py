"""KVCache: a preallocated key/value cache as a pytree, updated functionally.

Shapes: k, v are [L, B, S, K, H] for the whole model. The layer loop carries the whole cache and
each layer writes its new keys at [layer, b, start_b:] and reads its own [B, S, K, H] slice (or,
in cuDNN decode steps, reads the whole cache as a paged pool: models/llama.py attend_paged; in
Pallas decode steps the kernel writes and reads the stacked arrays itself:
models/decode_attention.py), so
a donated cache is updated in place: a decode step writes B * K * H values per layer. Logical
axes (for the rules table): `CACHE_AXES`. Nothing is mutated; writes return a new cache (donate
the old one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim")


def cache_dtype(kv_cache_dtype: str, dtype):
    """The cache's element type: the model's dtype ("auto") or float8_e4m3fn ("fp8")."""
    return jnp.dtype(jnp.float8_e4m3fn) if kv_cache_dtype == "fp8" else jnp.dtype(dtype)


def to_cache(x, dtype):
    """x in the cache's dtype, finite: saturated at the dtype's largest finite value
    (float8_e4m3fn has no infinity: a plain conversion of anything past +-448 is NaN) and a
    NaN stored as 0. A cache row holds what its slot's earlier requests left past the current
    one's keys; attention gives those positions weight 0, and 0 times a NaN or an infinity
    left there would still be NaN (a request gone bad would spoil its slot's next ones)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating):  # in float32: a 16-bit x may not hold the bound
        top = float(jnp.finfo(dtype).max)
        x32 = x.astype(jnp.float32)
        x = jnp.where(x32 == x32, jnp.clip(x32, -top, top), 0)  # x != x: NaN
    return x.astype(dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, seq, kv_heads, head_dim, dtype):
        shape = (num_layers, batch, seq, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, layer, k_btkh, v_btkh, start_b, aligned: bool = False) -> "KVCache":
        """Store layer `layer`'s T new keys/values of each sequence b at positions
        [start_b, start_b + T). The caller guarantees start_b + T <= S (dynamic_update_slice
        would clamp otherwise). aligned: every sequence starts at start_b[0] (a prefill from
        position 0), so the write is one dynamic_update_slice of the [B, T] block, which XLA
        does in place, instead of a per-row scatter."""
        if aligned:
            at = (layer, 0, start_b[0], 0, 0)
            return KVCache(*(jax.lax.dynamic_update_slice(c, to_cache(new[None], c.dtype), at)
                             for c, new in ((self.k, k_btkh), (self.v, v_btkh))))

        def one(cache_lskh, new_tkh, start):
            return jax.lax.dynamic_update_slice(
                cache_lskh, to_cache(new_tkh[None], cache_lskh.dtype), (layer, start, 0, 0))
        write = jax.vmap(one, in_axes=(1, 0, 0), out_axes=1)
        return KVCache(write(self.k, k_btkh, start_b), write(self.v, v_btkh, start_b))

    def layer(self, layer) -> tuple[jax.Array, jax.Array]:
        """Layer `layer`'s keys and values, [B, S, K, H] each."""
        return (jax.lax.dynamic_index_in_dim(self.k, layer, 0, keepdims=False),
                jax.lax.dynamic_index_in_dim(self.v, layer, 0, keepdims=False))

    def paged(self, layer):
        """The whole cache as a paged KV pool, for kernels that take one (cuDNN's paged
        attention): k and v as [L * B, S, K, H] (page l * B + b is sequence b of layer l; a
        reshape, no copy) and the page table [B, 1, L, 1] of layer `layer`, whose first entry per
        sequence is its page. The pool must hold B * pages-per-sequence pages, so each row lists
        L pages, all the same; a kv length <= S keeps a kernel on the first."""
        n_layers, b, s, k, h = self.k.shape
        page_b = layer * b + jnp.arange(b, dtype=jnp.int32)
        table = jnp.broadcast_to(page_b[:, None, None, None], (b, 1, n_layers, 1))
        pool = (n_layers * b, s, k, h)
        return self.k.reshape(pool), self.v.reshape(pool), table

    @property
    def max_len(self) -> int:
        return self.k.shape[-3]
