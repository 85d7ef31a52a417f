"""KVCache: a preallocated key/value cache as a pytree, updated functionally.

Shapes: k, v are [L, B, S, K, H] for the whole model; `jax.lax.scan` over layers hands each block
its [B, S, K, H] slice. Logical axes (for the rules table): `CACHE_AXES`. Writes use
`dynamic_update_slice` and return a new cache; nothing is mutated in place (donate the old one).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

CACHE_AXES = ("layers", "cache_batch", "cache_seq", "kv_heads", "head_dim")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, num_layers, batch, seq, kv_heads, head_dim, dtype):
        shape = (num_layers, batch, seq, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    def write(self, k_btkh, v_btkh, start_b) -> "KVCache":
        """Store T new keys/values of each sequence b at positions [start_b, start_b + T).
        The caller guarantees start_b + T <= S (dynamic_update_slice would clamp otherwise)."""
        def one(cache_skh, new_tkh, start):
            return jax.lax.dynamic_update_slice(cache_skh, new_tkh.astype(cache_skh.dtype),
                                                (start, 0, 0))
        return KVCache(jax.vmap(one)(self.k, k_btkh, start_b), jax.vmap(one)(self.v, v_btkh, start_b))

    @property
    def max_len(self) -> int:
        return self.k.shape[-3]
