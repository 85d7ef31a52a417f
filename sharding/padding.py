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
                 tp: int) -> PaddingPlan:
    group = num_heads // num_kv_heads
    best = None
    for kv_groups in range(num_kv_heads, num_kv_heads + tp + 1):
        for repeat in range(1, tp + 1):
            if group % repeat or (kv_groups * repeat) % tp:
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


def _pad_axis(x: np.ndarray, axis: int, size: int) -> np.ndarray:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return np.pad(x, widths)


def pad_qkv(x: np.ndarray, axis: int, plan: PaddingPlan) -> np.ndarray:
    """[..., K, G + 2, ...] (axis: K) -> [..., K'', G / r + 2, ...]: zero groups appended, each
    group's query heads split over its r KV replicas in order (replica j of group g takes query
    heads g*G + j*G/r ... + G/r - 1, as `heads`/`kv_heads` padding orders them)."""
    group, r = plan.num_heads // plan.num_kv_heads, plan.kv_repeat
    q, kv = np.split(_pad_axis(x, axis, plan.kv_groups), [group], axis=axis + 1)
    q = q.reshape(*q.shape[:axis], plan.kv_groups * r, group // r, *q.shape[axis + 2:])
    return np.concatenate([q, np.repeat(kv, r, axis=axis)], axis=axis + 1)


def unpad_qkv(x: np.ndarray, axis: int, plan: PaddingPlan) -> np.ndarray:
    """The inverse of `pad_qkv`: [..., K'', G / r + 2, ...] -> [..., K, G + 2, ...] (the first
    replica's k and v)."""
    group, r = plan.num_heads // plan.num_kv_heads, plan.kv_repeat
    q, kv = np.split(x, [group // r], axis=axis + 1)
    q = q.reshape(*q.shape[:axis], plan.kv_groups, group, *q.shape[axis + 2:])
    kv = np.take(kv, np.arange(0, plan.kv_groups * r, r), axis=axis)
    keep = np.arange(plan.num_kv_heads)
    return np.concatenate([np.take(q, keep, axis=axis), np.take(kv, keep, axis=axis)],
                          axis=axis + 1)


def pad_param(x: np.ndarray, names: tuple, plan: PaddingPlan) -> np.ndarray:
    """Apply the plan to one parameter, axis by axis, by its logical names."""
    group = plan.num_heads // plan.num_kv_heads
    for axis, name in enumerate(names):
        if name == "qkv_heads":
            x = pad_qkv(x, axis, plan)
        elif name == "heads":
            x = _pad_axis(x, axis, plan.kv_groups * group)
        elif name == "kv_heads":
            x = np.repeat(_pad_axis(x, axis, plan.kv_groups), plan.kv_repeat, axis=axis)
        elif name == "vocab":
            x = _pad_axis(x, axis, plan.padded_vocab)
        elif name == "mlp":
            x = _pad_axis(x, axis, plan.padded_mlp)
    return x
