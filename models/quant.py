"""FP8 projections: weights in float8_e4m3fn with one scale per output channel, activations
quantized per token on the fly (vLLM's dynamic per-token FP8, "fp8" W8A8).

Shapes: a projection `spec` such as "TD,DKCH->TKCH" takes x [T, X] (2-D: the model flattens
every projection input) and a weight whose contracted letters are x's X; the weight's scale has
the weight's other (output) dimensions. With x ~ xq · sx (sx [T], per token) and w ~ wq · sw
(sw per output channel),

    y[t, o] = sum_x x[t, x] w[x, o] ~ sx[t] · sw[o] · sum_x xq[t, x] wq[x, o],

one FP8 matmul (accumulated in float32, written in the activations' dtype) and two scalings
after it: XLA:GPU runs FP8 dots as cuBLASLt FP8 GEMMs on Hopper; XLA:CPU upcasts them.

Few rows (decode steps, short prompts: at most WEIGHT_ONLY_ROWS) can run weight-only instead
(W8A16, `weight_only`; on GPU by default 1-16 rows, CompileOptions.fp8_gemv): the activations stay
in 16 bits and the FP8 weight is widened as it is read, by the Pallas kernel of models/fp8_gemv.py
on GPU (with cuBLASLt's FP8 GEMMs at such sizes FP8 decode ran slower than bf16: docs/fp8.md) or
by XLA. Such a product is the weight rounding's alone, so it is closer to the 16-bit model than
the W8A8 one. "pallas-w8a8" runs them W8A8 through the same kernel instead (FP8 operands in its
tensor-core dot; Triton runs it on Hopper as float16 after widening both), so that every size is
W8A8, as with "off"; "pallas-f16" runs every few-row product weight-only, 2-64 rows rounded to
float16 (clipped to its range) so that the kernel's tile widens the weight to float16, which
Hopper does in one instruction a pair of values (to bfloat16 in three): the widening W8A8's tile
runs, without quantizing the activations; "pallas-mixed" runs 1-16 rows weight-only (2-16 in
float16, where that is as fast as W8A8) and 17-64 rows W8A8 (the rows a program runs, after any
padding: tp pads a batch to a multiple of tp).

Under SP the tokens are quantized on their own device, right after the norm: the all-gather
before a column-parallel projection then moves one byte per value and a float32 scale per token.
A row-parallel projection's per-token scale is the maximum over all of its input features,
whatever splits them (one small all-reduce of [T] under tp), so every layout computes the same
quantized values as one device.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# "fp8": the layers' projections in FP8; "fp8-head": the LM head too (a tied model's embedding,
# which is its LM head: its rows are then looked up in FP8 and widened)
QUANTIZATIONS = (None, "fp8", "fp8-head")
WEIGHT_ONLY_ROWS = 64  # FP8 projections of at most this many rows run as few rows (`weight_only`)
# how they run (CompileOptions.fp8_gemv): "pallas" the kernel (interpreted off GPU), "xla" an
# XLA dot on the widened weight, "off" W8A8 as longer inputs, "pallas-w8a8" W8A8 through the
# kernel (its tensor-core dot on FP8 operands), "pallas-f16" the kernel weight-only with 2-64
# rows in float16, "pallas-mixed" the kernel weight-only at 1-F16_ROWS rows (float16 from 2)
# and W8A8 above; "auto": pallas-mixed on GPU, else xla
FP8_GEMV_MODES = ("auto", "pallas", "xla", "off", "pallas-w8a8", "pallas-mixed", "pallas-f16")
# the modes that run few rows through the kernel
KERNEL_GEMV = ("pallas", "pallas-w8a8", "pallas-mixed", "pallas-f16")
F16_MAX = float(jnp.finfo(jnp.float16).max)  # 65504
# "pallas-mixed" runs up to this many rows weight-only (float16 from 2 rows): on an H200 the
# kernel's 16-row tile took as long with float16 rows as with W8A8's FP8 ones, its 32- and
# 64-row tiles 1.18x and 1.40x longer (benchmarks/results/fp8_gemv_f16_rows_h200.jsonl)
F16_ROWS = 16


def w8a8_rows(gemv: str, rows: int) -> bool:
    """Whether a few-row product (`weight_only`) of `rows` rows quantizes its activations."""
    return gemv == "pallas-w8a8" or (gemv == "pallas-mixed" and rows > F16_ROWS)


def to_float16(x):
    """x rounded to float16, clipped to its range (in float32: bfloat16 has no 65504)."""
    return jnp.clip(x.astype(jnp.float32), -F16_MAX, F16_MAX).astype(jnp.float16)


def f16_rows(gemv: str, rows: int) -> bool:
    """Whether a few-row product (`weight_only`) of `rows` rows takes its activations in float16
    (the kernel's tensor-core tile; one row runs on CUDA cores in float32 either way)."""
    return rows > 1 and (gemv == "pallas-f16" or (gemv == "pallas-mixed" and rows <= F16_ROWS))


# The weights stored in FP8, by parameter name (within a layer), with the axes their scales
# reduce over (the contracted ones) and the logical names of the scale they get. The
# embedding, the norms, the biases and (unless "fp8-head") the LM head stay in the model's dtype.
# An FP8 weight is stored with its contracted axes last (`stored_order`: [K, C, H, D] for
# w_qkv_dkch): cuBLASLt's FP8 GEMM takes its second operand only with the contracted dimension
# contiguous, and a weight in the 16-bit layout made XLA transpose (copy) it on every call.
FP8_WEIGHTS = {
    "w_qkv_dkch": ((0,), ("qkv_heads", None, "head_dim")),
    "w_o_nhd": ((0, 1), ("embed",)),
    "w_gate_up_dcf": ((0,), (None, "mlp")),
    "w_down_fd": ((0,), ("embed",)),
}
# "fp8-head": the LM head, one scale per vocabulary entry (a tied embedding's rows)
FP8_HEAD_WEIGHTS = {
    "head_dv": ((0,), ("vocab",)),
    "embed_vd": ((1,), ("vocab",)),
}


def fp8_weights(quantization) -> dict:
    """The weights a quantization stores in FP8 (by name, as FP8_WEIGHTS)."""
    if quantization == "fp8-head":
        return {**FP8_WEIGHTS, **FP8_HEAD_WEIGHTS}
    return FP8_WEIGHTS if quantization == "fp8" else {}


def fp8_axes(quantization, name: str, stacked: bool) -> tuple[int, ...]:
    """The contracted axes of FP8 weight `name` (its scale holds one value for each position
    of the others), counted in a layer stack when `stacked`."""
    return tuple(a + stacked for a in fp8_weights(quantization)[name][0])


def embedding_rows(table, ids, dtype):
    """Rows `ids` of an embedding table in `dtype`: a 16-bit table's own, an FP8 one's widened
    and scaled (a tied model's embedding under "fp8-head")."""
    if not isinstance(table, Fp8):
        return table[ids].astype(dtype)
    return (table.q[ids].astype(jnp.float32) * table.scale[ids][:, None]).astype(dtype)


def scale_of(path: str) -> str:
    """The parameter an FP8 weight's scale lives in, beside it: "layers/mlp/w_down_fd" ->
    "layers/mlp/s_w_down_fd" (a name alone works too)."""
    head, _, name = path.rpartition("/")
    return f"{head}/s_{name}" if head else f"s_{name}"


def is_scale(path: str) -> bool:
    name = path.rpartition("/")[2]
    return name.startswith("s_") and name[2:] in {**FP8_WEIGHTS, **FP8_HEAD_WEIGHTS}


def stored_order(ndim: int, contracted: tuple[int, ...]) -> list[int]:
    """The axes of a weight in the order an FP8 weight stores them: output axes, contracted."""
    return [a for a in range(ndim) if a not in contracted] + list(contracted)


class Fp8(NamedTuple):
    """A weight in FP8: value ~ q * scale, scale over the output dimensions; q stored with its
    contracted axes last. With `layer` (an int32 scalar), q [L, ...] and scale [L, ...] are
    every layer's, and the weight is layer `layer`'s: a kernel reads it in place
    (models/fp8_gemv.py), anything else takes `unstacked()`."""

    q: jax.Array  # float8_e4m3fn, [(L,) outputs..., contracted...]
    scale: jax.Array  # float32, [(L,)] the weight's output dimensions
    layer: jax.Array | None = None

    @property
    def size(self) -> int:
        return self.q.size if self.layer is None else self.q.size // self.q.shape[0]

    def unstacked(self) -> "Fp8":
        if self.layer is None:
            return self
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, self.layer, 0, False)  # noqa: E731
        return Fp8(pick(self.q), pick(self.scale))


def _scale(amax):
    # an all-zero channel or token (tp padding, a padding row) gets scale 1: its values are 0
    return jnp.where(amax > 0, amax / FP8_MAX, 1.0).astype(jnp.float32)


def quantize_weight(w, contracted: tuple[int, ...], scale=None) -> Fp8:
    """w -> FP8 with one scale per output channel (the max magnitude over `contracted`),
    stored with the contracted axes last. scale: the channels' scales where they are given
    (> 0; an FP8 checkpoint's, so its values come back as stored), the max elsewhere."""
    w32 = w.astype(jnp.float32)
    amax = _scale(jnp.max(jnp.abs(w32), axis=contracted))
    scale = amax if scale is None else jnp.where(scale > 0, scale, amax).astype(jnp.float32)
    q = jnp.clip(w32 / jnp.expand_dims(scale, contracted), -FP8_MAX, FP8_MAX).astype(FP8)
    return Fp8(jnp.transpose(q, stored_order(w.ndim, contracted)), scale)


def quantize_tokens(x_tx, reduce=None):
    """x [T, X] -> (FP8 values [T, X], scale [T]): one scale per token. reduce: applied to the
    per-token maxima before they set the scale (a pmax over the devices that split X)."""
    x32 = x_tx.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x32), axis=-1)
    scale = _scale(amax if reduce is None else reduce(amax))
    return jnp.clip(x32 / scale[:, None], -FP8_MAX, FP8_MAX).astype(FP8), scale


def weight_only_rows(w, rows: int, gemv: str) -> bool:
    """Whether a product of `rows` rows with weight w runs as few rows (`weight_only`)."""
    return isinstance(w, Fp8) and rows <= WEIGHT_ONLY_ROWS and gemv != "off"


def dot(spec: str, x_tx, w, gemv: str = "xla"):
    """einsum(spec, x, w) for a plain weight; for an Fp8 weight the FP8 matmul above, in x's
    dtype: weight-only for few rows (`gemv`: "pallas" or "xla"; "pallas-f16": 2-64 rows in
    float16), W8A8 always ("off"), W8A8 with few rows through the kernel ("pallas-w8a8"), or
    the kernel weight-only at 1-16 rows (float16 from 2) and W8A8 at more ("pallas-mixed")."""
    if not isinstance(w, Fp8):
        return jnp.einsum(spec, x_tx, w)
    if weight_only_rows(w, x_tx.shape[0], gemv):
        return weight_only(spec, x_tx, w, gemv)
    w = w.unstacked()
    xq, sx = quantize_tokens(x_tx)
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    stored = stored_letters(lhs, rhs)
    return scaled_product(f"{lhs},{stored}->{out}", xq, sx, w, x_tx.dtype)


def scaled_product(spec: str, xq, sx, w: Fp8, dtype):
    """einsum(spec) of per-token FP8 activations (values xq [T, ...], scales sx [T]) and an
    FP8 weight, times both scales, in `dtype`: accumulated in float32 and written in `dtype`
    (bf16 in serving: a row-parallel product's partial sums then cross devices in 16 bits, as
    they do unquantized; float16 models: in float32, `product_dtype`)."""
    acc = product_dtype(dtype)
    y = jnp.einsum(spec, xq, w.q, preferred_element_type=acc)
    sx = sx.reshape(sx.shape + (1,) * (y.ndim - 1)).astype(acc)
    return (y * sx * w.scale.astype(acc)).astype(dtype)


def product_dtype(dtype):
    """The dtype an FP8 x FP8 product is written in before its scales: the activations' own,
    but float32 for float16, whose range (65504) the unscaled sums exceed: each operand spans
    +-448, so one product alone reaches 2e5."""
    return jnp.float32 if jnp.dtype(dtype) == jnp.float16 else dtype


def stored_letters(lhs: str, rhs: str) -> str:
    """The letters of an FP8 weight as stored: its output letters, then the contracted ones."""
    return "".join(c for c in rhs if c not in lhs) + "".join(c for c in rhs if c in lhs)


def weight_only(spec: str, x_tx, w: Fp8, gemv: str = "xla", reduce=None, glu: bool = False,
                add_norm=None):
    """einsum(spec, x, w) with x in its own dtype and w's FP8 values widened to it (exact:
    e4m3 fits in bf16 and f16), accumulated in float32, scaled per output channel and written in
    x's dtype, as the fp8_gemv mode `gemv` runs x's rows: through models/fp8_gemv.py's Pallas
    kernel (KERNEL_GEMV) where it takes the shapes, else (and off it) an XLA dot on the widened
    weight; W8A8 (`w8a8_rows`): x quantized per token first (`quantize_tokens`, `reduce` over
    the devices that split its features) and the FP8 values multiplied (the kernel's dot takes
    them as they are), then both scales; float16 rows (`f16_rows`): x rounded to float16 first
    (clipped to its range), so that the weight is widened to float16 (still exact); the result
    is in x's own dtype. glu: the weight's first output dimension is (gate, up), and the result
    drops it: silu(gate) * up (models/fp8_gemv.py `swiglu`; in the kernel's epilogue where the
    kernel runs). add_norm (models/add_norm.py `AddNorm`, b in x's dtype): x is one part of the
    residual stream, the product is of the normalized stream, and the result is (product,
    stream), all in the kernel, which must take that (models/fp8_gemv.py `takes_add_norm`;
    the layout checks: sharding/layout.py `norm_in_kernel`)."""
    ins, out = spec.split("->")
    lhs, rhs = ins.split(",")
    outputs = "".join(c for c in rhs if c not in lhs)
    if out != lhs[0] + outputs or x_tx.ndim != 2:
        raise ValueError(f"weight_only: spec {spec!r} must read [T, X] -> [T, outputs in the "
                         f"weight's order]")
    rows = x_tx.shape[0]
    # [(L,) N, K] and [(L,) N]: the output dimensions flattened (a stack's L kept)
    lead = w.q.shape[:1] if w.layer is not None else ()
    out_dims = w.q.shape[len(lead):len(lead) + len(outputs)]
    if glu and out_dims[0] != 2:
        raise ValueError(f"weight_only: glu needs the weight's first output dimension to be "
                         f"(gate, up), of size 2, not {out_dims}")
    q_nk = w.q.reshape(*lead, math.prod(out_dims), -1)
    scale_n = w.scale.reshape(*lead, -1)
    w8a8 = w8a8_rows(gemv, rows)
    x, sx = quantize_tokens(x_tx, reduce) if w8a8 else (x_tx, None)
    if f16_rows(gemv, rows):  # clipped in float32: bfloat16 rounds 65504 up to an inf
        x = to_float16(x)
    from models.fp8_gemv import fp8_gemv, plan, swiglu

    n, k = q_nk.shape[-2:]
    if add_norm is not None:
        y, stream = fp8_gemv(x, q_nk, scale_n, w.layer, glu=glu,
                             add_norm=(add_norm.b_td, add_norm.scale, add_norm.eps))
        return y.reshape(rows, *out_dims[glu:]), stream
    if gemv in KERNEL_GEMV and plan(rows, n // 2 if glu else n, k,
                                    interpret=jax.default_backend() != "gpu") is not None:
        return fp8_gemv(x, q_nk, scale_n, w.layer, x_scale=sx, out_dtype=x_tx.dtype,
                        glu=glu).reshape(rows, *out_dims[glu:])
    q_nk, scale_n = Fp8(q_nk, scale_n, w.layer).unstacked()[:2]
    y = jnp.einsum("tk,nk->tn", x, q_nk.astype(x.dtype), preferred_element_type=jnp.float32)
    y = y * scale_n if sx is None else y * scale_n * sx[:, None]
    if glu:
        return swiglu(y[:, :n // 2], y[:, n // 2:], x_tx.dtype).reshape(rows, *out_dims[1:])
    return y.astype(x_tx.dtype).reshape(rows, *out_dims)
