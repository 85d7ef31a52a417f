"""The residual add and the RMSNorm after it as one Pallas (Triton) kernel, for decode.

A decoder layer adds each sublayer's output to the residual stream and normalizes the sum for
the next sublayer: s = a + b, y = scale * (s * rsqrt(mean(s^2) + eps)) (models/llama.py
`RMSNorm`, HF's order: the product cast to the model's dtype before the scale). XLA runs that
as two kernels, because its fusions cannot both reduce a row and scale the same row by the
result: an add-and-mean-square (writing s) and a multiply (writing y). In a one-token decode
step of the Llama-3-8B shape in FP8 each of the two takes 1.3-2.5 us on an H100, for rows of 8 KB
(docs/fp8.md): four small kernels a layer. Here program t owns row t: it adds, writes s and sums
the squares block by block, then computes the inverse RMS and writes y, re-reading a and b (from
L1 or L2). The model uses it for every norm of a decode step (models/llama.py `Block`) with
CompileOptions(add_norm="pallas"), and with "gemv" (the GPU default with the FP8 kernel) where
the FP8 GEMV kernel after the norm takes the rows as they are but cannot fold the norm into its
product itself (models/fp8_gemv.py `add_norm`: one row only): the norm then feeds that kernel
directly, which lets it signal the GEMV early (models/pdl.py; docs/fp8.md has what was
measured). `AddNorm` hands an add and norm to the projection after it.

Numerics: the same operations in the same dtypes as `RMSNorm` (the add in the model's dtype, the
mean square and the inverse RMS in float32, the cast, then the scale). Interpreted on CPU with
XLA's excess precision off, the values are XLA's exactly (tests/test_add_norm.py); on GPU the
squares are summed in another order, so the inverse RMS may differ in its last bits and a value
of y by a unit in the last place. `interpret=True` runs the same kernel through Pallas'
interpreter (the tests use it on CPU). The kernel executes `griddepcontrol.launch_dependents` as
each program starts when models/pdl.py's signalling is on.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from models import pdl

MAX_BLOCK = 4096  # columns a program handles at once (a row of 4096 bf16 values: 32 a thread)


def block(d: int, interpret: bool = False) -> int | None:
    """The columns a program takes at once for rows of d features: d itself when interpreted or
    a power of two up to MAX_BLOCK, else its largest power-of-two divisor up to MAX_BLOCK (a
    Triton block's size is a power of two); None when that is below 16 (the kernel then does not
    take the rows: the caller keeps XLA's norm)."""
    if interpret:
        return d
    bd = min(d & -d, MAX_BLOCK)
    return bd if bd >= 16 else None


class AddNorm(NamedTuple):
    """The residual add and the RMSNorm before a projection, handed to it (models/fp8_gemv.py
    `add_norm`): the product is then of scale * RMSNorm(a + b) for rows a (b in a's dtype), and
    the projection also returns a + b. scale: the norm's [D], or every layer's [L, D] and
    `layer` the index."""

    b_td: jax.Array
    scale: jax.Array
    eps: float
    layer: Any = None


def reference(a_td, b_td, scale_d, eps):
    """What the kernel computes, in XLA: (y, s) as models/llama.py `RMSNorm` gives them."""
    s = a_td + b_td
    x32 = s.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale_d * y.astype(s.dtype), s


def add_rms_norm(a_td, b_td, scale_d, eps: float, layer=None, *, num_warps: int = 4,
                 interpret: bool | None = None):
    """(y, s) for rows a_td, b_td [T, D] and scale [D] (all in one dtype): s = a + b and
    y = scale * RMSNorm(s), as `reference`, in one kernel. With `layer` (an int or an int32
    scalar array), scale is every layer's [L, D] and the kernel reads row `layer` where it lies
    (XLA copies a slice of a stack that it passes to a kernel: models/fp8_gemv.py). Raises
    ValueError where `block` refuses D or the shapes or dtypes do not match (callers check
    `block` first)."""
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    t, d = a_td.shape
    stack = scale_d if layer is not None else scale_d[None]
    if b_td.shape != (t, d) or stack.shape[1:] != (d,) or len({a_td.dtype, b_td.dtype,
                                                               scale_d.dtype}) != 1:
        raise ValueError(f"add_rms_norm: a {a_td.shape} {a_td.dtype}, b {b_td.shape} "
                         f"{b_td.dtype} and scale {scale_d.shape} {scale_d.dtype} must be [T, D], "
                         f"[T, D] and [D] ([L, D] with a layer) of one dtype")
    bd = block(d, interpret)
    if bd is None:
        raise ValueError(f"add_rms_norm: rows of {d} features need a power-of-two divisor of at "
                         f"least 16")
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=1)
    out = jax.ShapeDtypeStruct((t, d), a_td.dtype)
    kernel = functools.partial(_kernel, bd=bd, steps=d // bd, eps=float(eps),
                               signal=pdl.enabled(interpret), below=pdl.below())
    index = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    y, s = pl.pallas_call(kernel, out_shape=(out, out), grid=(t,), interpret=interpret,
                          compiler_params=params, name="add_rms_norm")(index, a_td, b_td, stack)
    return y, s


def _kernel(layer_ref, a_ref, b_ref, w_ref, y_ref, s_ref, *, bd, steps, eps, signal, below):
    """Program t: row t, in `steps` blocks of bd columns, the scale's row layer_ref[0]."""
    from jax.experimental import pallas as pl

    row = pl.program_id(0)
    layer = pdl.first_index(layer_ref, signal, below)
    f32 = jnp.float32
    d = bd * steps

    def cols(i):
        return pl.ds(pl.multiple_of(i * bd, bd), bd)

    def add(i):
        c = cols(i)
        return c, a_ref[row, c] + b_ref[row, c]

    def squares(i, acc):
        c, s = add(i)
        s_ref[row, c] = s
        s32 = s.astype(f32)
        return acc + jnp.sum(s32 * s32)

    inv = jax.lax.rsqrt(jax.lax.fori_loop(0, steps, squares, jnp.zeros((), f32)) / d + eps)

    def scale(i, carry):
        c, s = add(i)
        y_ref[row, c] = w_ref[layer, c] * (s.astype(f32) * inv).astype(s.dtype)
        return carry

    jax.lax.fori_loop(0, steps, scale, 0)
