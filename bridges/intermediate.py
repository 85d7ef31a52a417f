"""Exchange pipeline intermediates with a vLLM-style PyTorch PP peer, one dict per TP rank.

vLLM's GPU runner hands a stage's IntermediateTensors(hidden_states, residual) on per TP rank:
- hidden_states: rank r sends rows [r*L, (r+1)*L) (L = local_len = padded_T // tp) and the
  receiver all-gathers them, as `send_tensor_dict(all_gather_group=tp_group)` does;
- residual: token-scattered under SP (rank r holds its L rows), or the full [T, D] on every rank.

`to_torch_ranks` turns jax-sp's global (hidden, residual) into that list of per-rank dicts;
`from_torch_ranks` does the reverse onto a mesh, each device reading only its own rank's rows
(tp-rank-aware: rank r keeps rows [r*L, (r+1)*L) of a full residual, never [0, L)).

Any tensor layout is accepted (transposed, sliced, strided views, bf16). Nothing is ever written
into a caller's tensor, and returned tensors share no memory with inputs or jax buffers: a
non-contiguous tensor once crashed SGLang's all-reduce, and a naive fix for that silently dropped
in-place semantics that callers relied on, so this module relies on none.
"""

from __future__ import annotations

import jax
import ml_dtypes
import numpy as np
import torch
from jax.sharding import NamedSharding, PartitionSpec as P

from sharding.mesh import tp_axes, tp_size

KEYS = ("hidden_states", "residual")
RESIDUAL_MODES = ("scattered", "full")


def tensor_to_numpy(t: torch.Tensor) -> np.ndarray:
    """A host copy of any torch tensor (any strides, bf16 kept exact)."""
    t = t.detach().to("cpu")
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
    return t.contiguous().numpy().copy()


def numpy_to_tensor(x: np.ndarray) -> torch.Tensor:
    """A new torch tensor owning its memory (bf16 kept exact)."""
    x = np.ascontiguousarray(x)
    if x.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(x.copy())


def to_torch_ranks(hidden_td, residual_td, tp: int, residual: str = "scattered"):
    """Global [T, D] arrays -> [{"hidden_states": [L, D], "residual": [L, D] or [T, D]}] * tp."""
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    hidden, res = np.asarray(hidden_td), np.asarray(residual_td)
    if hidden.shape != res.shape or hidden.ndim != 2 or hidden.shape[0] % tp:
        raise ValueError(f"hidden {hidden.shape} and residual {res.shape} must both be [T, D] "
                         f"with T a multiple of tp={tp}")
    local = hidden.shape[0] // tp
    return [{"hidden_states": numpy_to_tensor(hidden[r * local:(r + 1) * local]),
             "residual": numpy_to_tensor(res[r * local:(r + 1) * local] if residual ==
                                         "scattered" else res)} for r in range(tp)]


def _check(ranks, tp: int, residual: str):
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"residual must be one of {RESIDUAL_MODES}, got {residual!r}")
    if not isinstance(ranks, (list, tuple)) or len(ranks) != tp:
        raise ValueError(f"expected a list of {tp} per-rank dicts (one per TP rank), got "
                         f"{len(ranks) if isinstance(ranks, (list, tuple)) else type(ranks)}")
    first = ranks[0].get("hidden_states") if isinstance(ranks[0], dict) else None
    if not isinstance(first, torch.Tensor) or first.dim() != 2:
        raise ValueError("rank 0: hidden_states must be a 2-D torch tensor [local_len, D]")
    local, width = first.shape
    want = {"hidden_states": (local, width),
            "residual": (local, width) if residual == "scattered" else (local * tp, width)}
    for r, d in enumerate(ranks):
        for key in KEYS:
            t = d.get(key) if isinstance(d, dict) else None
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"rank {r}: missing torch tensor {key!r}")
            if tuple(t.shape) != want[key]:
                raise ValueError(f"rank {r}: {key} has shape {tuple(t.shape)}, expected "
                                 f"{want[key]} ({residual} residual, tp={tp})")
            if t.dtype != first.dtype:
                raise ValueError(f"rank {r}: {key} is {t.dtype}, rank 0 sent {first.dtype}")
    return local, width


def from_torch_ranks(ranks, mesh, residual: str = "scattered", dtype=None):
    """Per-rank dicts -> (hidden [T, D], residual [T, D]) token-sharded on `mesh` ("tp" axis):
    device r of the tp axis gets rank r's rows and nothing else."""
    tp = tp_size(mesh)
    local, width = _check(ranks, tp, residual)
    total = local * tp
    sharding = NamedSharding(mesh, P(tp_axes(mesh), None))

    def place(key):
        def rows(index):
            rank = (index[0].start or 0) // local
            t = ranks[rank][key]
            if key == "residual" and residual == "full":
                t = t[rank * local:(rank + 1) * local]  # tp-rank-aware
            x = tensor_to_numpy(t)
            return x if dtype is None else x.astype(dtype)
        return jax.make_array_from_callback((total, width), sharding, rows)

    return place("hidden_states"), place("residual")
