"""Placing externally computed token rows (prompt embeddings) in the residual layout.

When the embedding is not part of the graph (prompt embeds, multimodal encoders), the caller's
[T, D] rows must land in the layout the first layer expects. Under SP that is token-sharded:
device r of the tp axis keeps rows [r*T/tp, (r+1)*T/tp). vLLM once gave every rank rows
[0, T/tp) and produced wrong output; `rows_for_rank` exists so a test can reproduce that slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from sharding.mesh import tp_size
from sharding.rules import named, rules_for


def tp_rank_rows(rank: int, local_len: int) -> slice:
    return slice(rank * local_len, (rank + 1) * local_len)


def place_token_rows(x_td: np.ndarray, mesh: Mesh, sp: bool, rows_for_rank=tp_rank_rows):
    """[T, D] host rows -> a device array in residual layout (T a multiple of tp under SP)."""
    sharding = named(mesh, ("act_tokens", "act_embed"), rules_for(sp, mesh))
    if not sp:
        return jax.device_put(x_td, sharding)
    tp = tp_size(mesh)
    if x_td.shape[0] % tp:
        raise ValueError(f"{x_td.shape[0]} token rows cannot be split over tp={tp}; pad to a "
                         f"multiple of {tp}")
    local_len = x_td.shape[0] // tp

    def rows(index):  # index: this device's block of the global array, as slices
        rank = (index[0].start or 0) // local_len
        return x_td[rows_for_rank(rank, local_len)]

    return jax.make_array_from_callback(x_td.shape, sharding, rows)
