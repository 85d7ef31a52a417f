"""FP8 projections: weights in float8_e4m3fn with one scale per output channel, activations
quantized per token on the fly (vLLM's dynamic per-token FP8, "fp8" W8A8).

Shapes: a projection `spec` such as "TD,DKCH->TKCH" takes x [T, X] (2-D: the model flattens
every projection input) and a weight whose contracted letters are x's X; the weight's scale has
the weight's other (output) dimensions. With x ~ xq · sx (sx [T], per token) and w ~ wq · sw
(sw per output channel),

    y[t, o] = sum_x x[t, x] w[x, o] ~ sx[t] · sw[o] · sum_x xq[t, x] wq[x, o],

one FP8 matmul (accumulated in float32, written in the activations' dtype) and two scalings
after it: XLA:GPU runs FP8 dots as cuBLASLt FP8 GEMMs on Hopper; XLA:CPU upcasts them.

Under SP the tokens are quantized on their own device, right after the norm: the all-gather
before a column-parallel projection then moves one byte per value and a float32 scale per token.
A row-parallel projection's per-token scale is the maximum over all of its input features,
whatever splits them (one small all-reduce of [T] under tp), so every layout computes the same
quantized values as one device.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
QUANTIZATIONS = (None, "fp8")

# The weights stored in FP8, by parameter name (within a layer), with the axes their scales
# reduce over (the contracted ones) and the logical names of the scale they get. The
# embedding, the norms, the biases and the LM head stay in the model's dtype. An FP8 weight is
# stored with its contracted axes last (`stored_order`: [K, C, H, D] for w_qkv_dkch): cuBLASLt's
# FP8 GEMM takes its second operand only with the contracted dimension contiguous, and a weight
# in the 16-bit layout made XLA transpose (copy) it on every call.
FP8_WEIGHTS = {
    "w_qkv_dkch": ((0,), ("qkv_heads", None, "head_dim")),
    "w_o_nhd": ((0, 1), ("embed",)),
    "w_gate_up_dcf": ((0,), (None, "mlp")),
    "w_down_fd": ((0,), ("embed",)),
}


def scale_of(path: str) -> str:
    """The parameter an FP8 weight's scale lives in, beside it: "layers/mlp/w_down_fd" ->
    "layers/mlp/s_w_down_fd" (a name alone works too)."""
    head, _, name = path.rpartition("/")
    return f"{head}/s_{name}" if head else f"s_{name}"


def is_scale(path: str) -> bool:
    return path.rpartition("/")[2].startswith("s_w_")


def stored_order(ndim: int, contracted: tuple[int, ...]) -> list[int]:
    """The axes of a weight in the order an FP8 weight stores them: output axes, contracted."""
    return [a for a in range(ndim) if a not in contracted] + list(contracted)


class Fp8(NamedTuple):
    """A weight in FP8: value ~ q * scale, scale over the output dimensions; q stored with its
    contracted axes last."""

    q: jax.Array  # float8_e4m3fn, [outputs..., contracted...]
    scale: jax.Array  # float32, the weight's output dimensions

    @property
    def size(self) -> int:
        return self.q.size


def _scale(amax):
    # an all-zero channel or token (tp padding, a padding row) gets scale 1: its values are 0
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)


def quantize_weight(w, contracted: tuple[int, ...]) -> Fp8:
    """w -> FP8 with one scale per output channel (the max magnitude over `contracted`),
    stored with the contracted axes last."""
    w32 = w.astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(w32), axis=contracted))
    q = jnp.clip(w32 / jnp.expand_dims(scale, contracted), -FP8_MAX, FP8_MAX).astype(FP8)
    return Fp8(jnp.transpose(q, stored_order(w.ndim, contracted)), scale)


def quantize_tokens(x_tx):
    """x [T, X] -> (FP8 values [T, X], scale [T]): one scale per token."""
    x32 = x_tx.astype(jnp.float32)
    scale = _scale(jnp.max(jnp.abs(x32), axis=-1))
    return jnp.clip(x32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def dot(spec: str, x_tx, w):
    """einsum(spec, x, w) for a plain weight; for an Fp8 weight the FP8 matmul above, in x's
    dtype."""
    if not isinstance(w, Fp8):
        return jnp.einsum(spec, x_tx, w)
    xq, sx = quantize_tokens(x_tx)
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    stored = "".join(c for c in rhs if c not in lhs) + "".join(c for c in rhs if c in lhs)
    # accumulated in float32 and written in x's dtype (bf16 in serving): a row-parallel
    # product's partial sums then cross devices in 16 bits, as they do unquantized
    y = jnp.einsum(f"{lhs},{stored}->{out}", xq, w.q, preferred_element_type=x_tx.dtype)
    sx = sx.reshape(sx.shape + (1,) * (y.ndim - 1)).astype(x_tx.dtype)
    return y * sx * w.scale.astype(x_tx.dtype)
