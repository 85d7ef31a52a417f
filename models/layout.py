"""The places where a parallel layout may change what the model math does.

Megatron's TP/SP has exactly three layout boundaries in a decoder, and the model names them here
instead of inserting collectives itself:

- `residual(x_td)`: the residual stream (embedding output, each block's output, the final norm's
  input). Replicated under plain TP; token-sharded under SP.
- `column(x_td, *projections)`: entry to a column-parallel group (q/k/v, gate/up, LM head). The
  input arrives in residual layout; under SP it must be all-gathered over tokens first. Several
  projections of one input share that gather.
- `row(spec, h, w)`: exit of a row-parallel projection (o_proj, down_proj). Its partial sums are
  all-reduced under TP, reduce-scattered over tokens under SP.

`stacked_fp8(rows)` says whether a forward of that many rows keeps its FP8 weights stacked over
the layers for a kernel that reads each layer's in place (models/fp8_gemv.py).

`fused_norm(rows)` says whether a forward of that many rows adds each sublayer's output to the
residual stream and normalizes the sum in one kernel (models/add_norm.py).

`gated(x_td, spec, w)` is a column-parallel gate/up projection ("TD,DCF->TCF") followed by
silu(gate) * up, [T, F]: where the FP8 kernel runs it, in the kernel's epilogue.

`direct_kernel(spec, rows, w)` says whether a projection of that many rows runs as the FP8
kernel reading the rows exactly as the layout holds them (no padding, rounding or quantizing
before it): the kernel that wrote them may then signal it early (models/pdl.py).

`add_norm_column(a_td, spec, w, add_norm, glu)` is the residual add and the RMSNorm
(`models.add_norm.AddNorm`) followed by a column-parallel projection (with glu: `gated`'s):
(the projection, a + b), in one FP8 kernel where `norm_in_kernel(spec, rows, w, glu)` says so.

`rows(rows, weight_size)` says how many rows a projection of `rows` rows onto a weight of that
many elements runs on (more than `rows` where a layout pads them), so that a one-token step can
carry its activations on those rows instead of padding before each projection.

A kernel that works on each device's own heads (the fused decode attention) runs through
`local(fn, in_names, out_names, *args)`: the arguments' logical axis names say how they are
split; a sharded layout runs fn per device on its shards, `Dense` runs it once.

`Dense` is the single-device meaning of the three. `sharding.layout.ShardedLayout` implements the
same methods with sharding constraints (comm="xla") or explicit collective-matmul kernels
(comm="ring"); the model code is the same either way.
"""

from __future__ import annotations

from typing import Protocol

import jax

from models.quant import dot


class Layout(Protocol):
    def residual(self, x_td: jax.Array) -> jax.Array: ...

    def column(self, x_td: jax.Array, *projections: tuple[str, jax.Array]) -> list[jax.Array]: ...

    def row(self, spec: str, h: jax.Array, w: jax.Array) -> jax.Array: ...

    def rows(self, rows: int, weight_size: int) -> int: ...

    def local(self, fn, in_names: tuple, out_names: tuple, *args): ...

    def stacked_fp8(self, rows: int) -> bool: ...

    def fused_norm(self, rows: int) -> bool: ...

    def gated(self, x_td: jax.Array, spec: str, w: jax.Array) -> jax.Array: ...

    def direct_kernel(self, spec: str, rows: int, w) -> bool: ...

    def norm_in_kernel(self, spec: str, rows: int, w, glu: bool = False) -> bool: ...

    def add_norm_column(self, a_td: jax.Array, spec: str, w, add_norm,
                        glu: bool = False) -> tuple[jax.Array, jax.Array]: ...


class Dense:
    """No parallelism: plain einsums, no constraints."""

    def residual(self, x_td):
        return x_td

    def column(self, x_td, *projections):
        return [dot(spec, x_td, w) for spec, w in projections]

    def row(self, spec, h, w):
        return dot(spec, h, w)

    def rows(self, rows, weight_size):
        return rows

    def local(self, fn, in_names, out_names, *args):
        return fn(*args)

    def stacked_fp8(self, rows):
        return False

    def fused_norm(self, rows):
        return False

    def gated(self, x_td, spec, w):
        return swiglu_of(self.column(x_td, (spec, w))[0])

    def direct_kernel(self, spec, rows, w):
        return False

    def norm_in_kernel(self, spec, rows, w, glu=False):
        return False

    def add_norm_column(self, a_td, spec, w, add_norm, glu=False):
        raise ValueError("Dense takes no norm into a projection's kernel (norm_in_kernel is "
                         "False): normalize first, then `column` or `gated`")


def swiglu_of(gate_up_tcf):
    """silu(gate) * up of a gate/up product [T, 2, F], as XLA fuses it."""
    return jax.nn.silu(gate_up_tcf[:, 0]) * gate_up_tcf[:, 1]


DENSE = Dense()
