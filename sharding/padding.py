"""Make a model's head and vocabulary counts divisible by tp without changing its outputs.

Heads (N query, K key/value, G = N / K per group). Every device must hold whole query groups
together with the key/value heads they read:
- KV heads fewer than tp: replicate each KV head r times and give each replica G / r of its
  group's query heads (query head j reads replica j // (G / r), i.e. original head j // G, as
  before). Query order is unchanged.
- Query heads not divisible by tp (9 query / 3 KV at tp 2, 4, 8): append whole zero KV groups:
  zero q/k/v weights and zero o_proj rows, so the extra heads add exactly 0 to the output.
The plan picks the fewest query heads, then the fewest KV heads.

Vocabulary: the vocab-parallel embedding and LM head are padded with zero rows/columns up to a
multiple of tp; the engine drops the padded logits before anyone sees them. The MLP width gets
zero gate/up columns and zero down_proj rows (silu(0) * 0 = 0) for the same reason.

The fused q/k/v weight is stored by KV group (`qkv_heads` axis, then a C axis: the group's G
query heads, then its k, then its v), so one column split gives each device whole groups.
Padding appends zero groups and, with KV heads replicated r times, regroups each group's G query
heads as r replicas of G / r (each with a copy of k and v): [K, G + 2] -> [K'', G / r + 2].

Padding is applied to parameters by logical axis name, so every weight source shares it.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

log = logging.getLogger("jax_sp")


@dataclasses.dataclass(frozen=True)
class PaddingPlan:
    num_heads: int  # N as given
    num_kv_heads: int  # K as given
    vocab_size: int  # V as given
    kv_groups: int  # K_p >= K: KV groups after zero groups are appended
    kv_repeat: int  # r: replicas of each KV head
    padded_vocab: int  # V' >= V, a multiple of tp
    mlp_size: int  # F as given
    padded_mlp: int  # F' >= F, a multiple of tp

    @property
    def padded_heads(self) -> int:  # N''
        return self.kv_groups * (self.num_heads // self.num_kv_heads)

    @property
    def padded_kv_heads(self) -> int:  # K''
        return self.kv_groups * self.kv_repeat

    def describe(self) -> str:
        return (f"query heads {self.num_heads}->{self.padded_heads}, KV heads "
                f"{self.num_kv_heads}->{self.padded_kv_heads} ({self.kv_groups - self.num_kv_heads}"
                f" zero group{'s' * (self.kv_groups - self.num_kv_heads != 1)}, each KV head "
                f"x{self.kv_repeat}), vocab {self.vocab_size}->"
                f"{self.padded_vocab}, MLP {self.mlp_size}->{self.padded_mlp}")


_NOTED: set = set()


def plan_padding(num_heads: int, num_kv_heads: int, vocab_size: int, mlp_size: int,
                 tp: int, head_tp: int | None = None) -> PaddingPlan:
    """The plan for tp devices whose heads are split over head_tp of them (default tp;
    tp / attn_dp with attention groups, whose heads split within a group)."""
    head_tp = head_tp or tp
    group = num_heads // num_kv_heads
    best = None
    for kv_groups in range(num_kv_heads, num_kv_heads + head_tp + 1):
        for repeat in range(1, head_tp + 1):
            if group % repeat or (kv_groups * repeat) % head_tp:
                continue
            cost = (kv_groups * group, kv_groups * repeat)
            if best is None or cost < best[0]:
                best = (cost, kv_groups, repeat)
            break  # larger repeats only add KV heads
    _, kv_groups, repeat = best  # kv_groups = a multiple of tp with repeat 1 always qualifies
    plan = PaddingPlan(num_heads, num_kv_heads, vocab_size, kv_groups, repeat,
                       -(-vocab_size // tp) * tp, mlp_size, -(-mlp_size // tp) * tp)
    if (plan, tp) in _NOTED:  # one notice a process, not one per pipeline stage or program
        return plan
    _NOTED.add((plan, tp))
    if plan.padded_heads != num_heads:
        log.warning("tp=%d: %s; attention does %.2fx the work and the KV cache holds %.2fx the "
                    "heads", tp, plan.describe(), plan.padded_heads / num_heads,
                    plan.padded_kv_heads / num_kv_heads)
    elif plan.kv_repeat > 1 or (plan.padded_vocab, plan.padded_mlp) != (vocab_size, mlp_size):
        log.info("tp=%d: %s", tp, plan.describe())
    return plan


def unpadded_size(name: str, size: int, plan: PaddingPlan) -> int:
    """The length of axis `name` before padding (`size`: its padded length)."""
    return {"heads": plan.num_heads, "kv_heads": plan.num_kv_heads, "qkv_heads":
            plan.num_kv_heads, "vocab": plan.vocab_size, "mlp": plan.mlp_size}.get(name, size)


def index_map(name: str, size: int, plan: PaddingPlan | None) -> np.ndarray:
    """The padding of one axis: for each position of axis `name` after padding, the position of
    the unpadded axis (of length `size`) that it copies, or -1 where it holds zeros.

    The one description of the padding: `pad_param`, `unpad_param` and the checkpoint streamer
    (bridges/streaming.py, which reads each device's rows of a padded parameter straight from
    disk) all read it. "qkv_heads" maps the flattened [K, G + 2] of the fused q/k/v weight to
    the flattened [K'', G / r + 2]: replica j of KV group g holds the group's query heads
    j*G/r ... (j+1)*G/r - 1, then the group's k and v."""
    if plan is None:
        return np.arange(size)
    group = plan.num_heads // plan.num_kv_heads
    if name == "heads":
        at = np.arange(plan.kv_groups * group)
        return np.where(at < plan.num_heads, at, -1)
    if name == "kv_heads":
        g = np.repeat(np.arange(plan.kv_groups), plan.kv_repeat)
        return np.where(g < plan.num_kv_heads, g, -1)
    if name in ("vocab", "mlp"):
        at = np.arange(plan.padded_vocab if name == "vocab" else plan.padded_mlp)
        return np.where(at < size, at, -1)
    if name == "qkv_heads":
        r, per = plan.kv_repeat, group // plan.kv_repeat
        g, j = np.divmod(np.arange(plan.padded_kv_heads), r)  # replica kk = g * r + j
        c = np.arange(per + 2)
        part = np.where(c < per, j[:, None] * per + c, group + c - per)  # within [G + 2]
        flat = g[:, None] * (group + 2) + part
        return np.where((g < plan.num_kv_heads)[:, None], flat, -1).reshape(-1)
    return np.arange(size)


def _take(x: np.ndarray, axis: int, index: np.ndarray) -> np.ndarray:
    """x's positions `index` along axis, zeros where index is -1."""
    if len(index) == x.shape[axis] and np.array_equal(index, np.arange(len(index))):
        return x
    out = np.take(x, np.maximum(index, 0), axis=axis)
    if (index < 0).any():
        shape = [1] * x.ndim
        shape[axis] = len(index)
        out = np.where((index >= 0).reshape(shape), out, np.zeros((), x.dtype))
    return out


def _first_copies(index: np.ndarray, size: int) -> np.ndarray:
    """For each of `size` unpadded positions, the first padded position that copies it."""
    values, first = np.unique(index, return_index=True)
    out = np.full(size, -1)
    out[values[values >= 0]] = first[values >= 0]
    return out


def pad_param(x: np.ndarray, names: tuple, plan: PaddingPlan) -> np.ndarray:
    """Apply the plan to one parameter, axis by axis, by its logical names (`index_map`)."""
    for axis, name in enumerate(names):
        if name == "qkv_heads":  # [K, G + 2] -> [K'', G / r + 2], one map over both axes
            index = index_map(name, x.shape[axis], plan)
            flat = _take(x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:]), axis, index)
            x = flat.reshape(*x.shape[:axis], plan.padded_kv_heads, -1, *x.shape[axis + 2:])
        else:
            x = _take(x, axis, index_map(name, x.shape[axis], plan))
    return x


def unpad_param(x: np.ndarray, names: tuple, plan: PaddingPlan) -> np.ndarray:
    """The inverse of `pad_param`: each unpadded position from the first padded position that
    copies it (a replicated KV head's first replica)."""
    group = plan.num_heads // plan.num_kv_heads
    for axis, name in enumerate(names):
        size = unpadded_size(name, x.shape[axis], plan)
        if name == "qkv_heads":
            first = _first_copies(index_map(name, size, plan), size * (group + 2))
            flat = np.take(x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:]), first, axis)
            x = flat.reshape(*x.shape[:axis], size, group + 2, *x.shape[axis + 2:])
        elif size != x.shape[axis] or name in ("kv_heads", "heads"):
            x = np.take(x, _first_copies(index_map(name, size, plan), size), axis)
    return x
