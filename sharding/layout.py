"""ShardedLayout: the three layout boundaries of `models.layout.Layout` on a mesh.

comm="xla": each boundary is a sharding constraint resolved by the mode's rules table; GSPMD
inserts the collectives. Per block and mode (tokens T, width D, tp devices):

  boundary          sp="off" (residual In[T, D])      sp="on" (residual In[T_tp, D])
  column(x, ...)    nothing (x is replicated)         all-gather T      -> In[T, D]
  row(spec, h, w)   all-reduce of partial sums        reduce-scatter T  -> Out[T_tp, D]
  residual(x)       replicated                        token-sharded

so an SP block runs reduce-scatter -> RMSNorm on T/tp rows -> all-gather where TP all-reduces.

comm="ring": under SP, column and row run as explicit collective matmuls
(`sharding/collective_matmul.py`: ppermute rings, the gather or scatter hidden under the
matmuls). Without SP there is nothing to gather, and rows whose count tp does not divide (the
LM head on the few sampled rows) take the XLA path. comm="mosaic": as "ring", with each column
projection that fits its tiles run by JAX's Mosaic GPU all-gather matmul (`sharding/mosaic.py`).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from models import pdl
from models.layout import swiglu_of
from models.add_norm import AddNorm
from models.fp8_gemv import FMA_ROWS, plan, takes_add_norm, tile_rows
from models.quant import (KERNEL_GEMV, WEIGHT_ONLY_ROWS, Fp8, dot, f16_rows, stored_letters,
                          w8a8_rows, weight_only, weight_only_rows)
from sharding.collective_matmul import column_feature, ring_column, ring_row
from sharding.mesh import tp_size
from sharding.mosaic import mosaic_column, projection_fits
from sharding.rules import named, rules_for, spec as partition_spec


def padded_rows(rows: int, weight_size: int, row_multiple: int, min_weight: int) -> int:
    """The rows `_einsum` runs a projection of `rows` input rows onto a weight of
    `weight_size` elements on."""
    return rows + (-rows % row_multiple if weight_size >= min_weight else 0)


def _einsum(spec, x_td, w, row_multiple, min_weight, gemv="xla"):
    """einsum(spec, x_td, w), with x's rows padded with zeros to a multiple of `row_multiple`
    (8 on GPU) when w has at least `min_weight` elements (CompileOptions.pad_rows_min_weight,
    2^20); the padding's results are dropped. XLA:GPU rewrites a vector-matrix product whose operands total under 10M elements
    into multiply + reduce fusions (no option turns that off). For Llama-3.2-1B's q, k, v and
    o_proj (1M-4M elements) at batch 1 those ran below bandwidth and o_proj materialised its
    [N, H, D] product: with 8 rows they stay cuBLAS GEMVs (2.62 -> 1.83 ms/token on an H100,
    together with the dot-merger fix in sharding/xla_options.py). SmolLM2-135M's separate
    weights (all under 1M elements, in a rolled layer loop) decoded at 1.71 ms/token with the
    reduce fusions and at 3.08 with a pad before every projection, hence the threshold. The
    barrier keeps the simplifier from slicing the padding back off through the dot.

    One-token steps carry their whole stream on `padded_rows` rows for the gate/up weight
    (models/llama.py), so their projections arrive padded and nothing is padded here; for
    SmolLM2 (fused gate/up: 1.77M elements) that runs every projection on 8 rows, 0.86 -> 0.80
    ms/token on an H100 against a pad before the large ones."""
    rows = x_td.shape[0]
    pad = padded_rows(rows, w.size, row_multiple, min_weight) - rows
    if not pad:
        return dot(spec, x_td, w, gemv)
    padded = jnp.pad(x_td, ((0, pad),) + ((0, 0),) * (x_td.ndim - 1))
    return jax.lax.optimization_barrier(dot(spec, padded, w, gemv))[:rows]


# Logical names of a column-parallel product's dimensions, by DESIGN.md letter (C: the fused
# q/k/v or gate/up parts, whole on every device).
_COLUMN_OUT = {"T": "act_gathered", "K": "qkv_heads", "N": "heads", "C": None, "H": "head_dim",
               "F": "mlp", "V": "vocab"}


# Logical names of a weight's dimensions by letter (a row-parallel N is o_proj's flattened N*H,
# F the MLP's).
_WEIGHT = {"T": None, "D": "embed", "K": "qkv_heads", "N": "heads", "C": None, "H": "head_dim",
           "F": "mlp", "V": "vocab"}


def _attention(letters: str) -> bool:
    """Whether a product's dimensions are attention's (heads): its rows are then attention's
    rows, which attention groups split by sequence (sharding/rules.py attn_dp_rules)."""
    return "K" in letters or "N" in letters


def _column_out(spec: str) -> tuple:
    """Logical names of the output of a column-parallel einsum, e.g. "TD,DCF->TCF"."""
    out = spec.split("->")[1]
    return tuple("attn_tokens" if c == "T" and _attention(out) else _COLUMN_OUT[c]
                 for c in out)


def _gated_out(spec: str) -> tuple:
    """Logical names of a gate/up product's SiLU·up ("TD,DCF->TCF" without its C)."""
    ins, out = spec.split("->")
    return _column_out(f"{ins}->{out[0]}{out[2:]}")


@dataclasses.dataclass(frozen=True, eq=False)
class ShardedLayout:
    mesh: Mesh
    sp: bool
    comm: str = "xla"
    row_multiple: int = 1  # projections run on a multiple of this many rows (8 on GPU: _einsum)
    pad_rows_min_weight: int = 1 << 20  # ... onto weights of at least this many elements
    fp8_gemv: str = "xla"  # FP8 projections of few rows: models/quant.py FP8_GEMV_MODES, resolved
    # residual adds and norms in one kernel (models/add_norm.py): "pallas" in forwards of at most
    # 64 rows, "direct" in those whose rows the FP8 GEMV kernel then takes as they are, "gemv"
    # as direct but inside that GEMV kernel where it takes them (`norm_in_kernel`), "off"
    add_norm: str = "off"

    @property
    def rules(self):
        return rules_for(self.sp, self.mesh)

    def _constrain(self, x, names):
        return jax.lax.with_sharding_constraint(x, named(self.mesh, names, self.rules))

    def residual(self, x_td):
        return self._constrain(x_td, ("act_tokens", "act_embed"))

    def _ring(self, rows: int, *weights) -> bool:
        # a few rows of an FP8 weight run weight-only, not through the ring (whose FP8 products
        # are W8A8): every layout then computes what one device does
        return (self.comm in ("ring", "mosaic") and self.sp and rows % tp_size(self.mesh) == 0
                and not any(weight_only_rows(w, rows, self.fp8_gemv) for w in weights))

    def _ring_axes(self, letters: str, feature: str) -> dict:
        """The mesh axes of a ring over a product with these dimension letters whose features
        are `feature`: the ring runs along the features' axes, the residual's tokens come in
        or leave split as `act_tokens`, and attention's rows stay split as `attn_tokens`."""
        rules = self.rules
        rows = rules["attn_tokens" if _attention(letters) else "act_gathered"]
        return {"axis": rules[_WEIGHT[feature]], "tokens": rules["act_tokens"], "rows": rows}

    def _mosaic(self, projections) -> bool:
        tp = tp_size(self.mesh)
        return self.comm == "mosaic" and all(projection_fits(spec, w.shape, tp)
                                             for spec, w in projections)

    def _rows(self) -> int:
        # SP forwards are long (and token-sharded): nothing to pad there; the FP8 kernel takes
        # any row count (one row runs on CUDA cores: models/fp8_gemv.py)
        return 1 if self.sp or self.fp8_gemv in KERNEL_GEMV else self.row_multiple

    def column(self, x_td, *projections):
        if self._ring(x_td.shape[0], *(w for _, w in projections)):
            if self._mosaic(projections):
                return [mosaic_column(self.mesh, spec, self.residual(x_td), w)
                        for spec, w in projections]
            (spec, w), *more = [(s, w.unstacked() if isinstance(w, Fp8) else w)
                                for s, w in projections]
            ins, out = spec.split("->")
            return ring_column(self.mesh, spec, self.residual(x_td), w, *more,
                               **self._ring_axes(out, column_feature(ins.split(",")[1])))
        if self.sp:
            # Gather exactly what the caller computed: without the barrier XLA:CPU moved the
            # gather above the norm's scale-and-cast, redoing that work on all T rows.
            x_td = jax.lax.optimization_barrier(x_td)
        # Only the product is constrained (all tokens, features split): under SP the dot itself
        # sees token-sharded x, so XLA:GPU can decompose gather + dot into a windowed einsum.
        # Pinning x gathered before the dot left the partitioner nothing to window (a plain
        # all-gather, then the dot).
        return [self._constrain(self._einsum(spec, x_td, w), _column_out(spec))
                for spec, w in projections]

    def stacked_fp8(self, rows: int) -> bool:
        """Whether a forward of `rows` rows keeps its FP8 weights stacked for the kernel."""
        return self.fp8_gemv in KERNEL_GEMV and rows <= WEIGHT_ONLY_ROWS

    def fused_norm(self, rows: int) -> bool:
        """Whether a forward of `rows` rows adds and normalizes through models/add_norm.py's
        kernel, or ("gemv") in the FP8 kernel after it where `norm_in_kernel`."""
        gemv = self.fp8_gemv
        if self.add_norm in ("direct", "gemv"):  # rows the GEMV kernel takes as they are
            return (gemv in KERNEL_GEMV and rows <= WEIGHT_ONLY_ROWS and tile_rows(rows) == rows
                    and not (w8a8_rows(gemv, rows) or f16_rows(gemv, rows)))
        return self.add_norm == "pallas" and rows <= WEIGHT_ONLY_ROWS

    def gated(self, x_td, spec, w):
        rows = x_td.shape[0]
        lhs = spec.split("->")[0].split(",")[0]
        # one row (CUDA cores), where the epilogue was measured; a tensor-core tile's grid
        # would halve with it, not yet timed: those keep XLA's SiLU·up
        if not (self.fp8_gemv in KERNEL_GEMV and weight_only_rows(w, rows, self.fp8_gemv)
                and rows <= FMA_ROWS and not self._summed(lhs)):
            return swiglu_of(self.column(x_td, (spec, w))[0])
        if self.sp:  # as `column`: gather exactly what the caller computed
            x_td = jax.lax.optimization_barrier(x_td)
        return self._constrain(self._weight_only_kernel(spec, x_td, w, glu=True),
                               _gated_out(spec))

    def direct_kernel(self, spec: str, rows: int, w) -> bool:
        """Whether a projection (spec onto w) of `rows` rows runs as models/fp8_gemv.py's kernel
        reading the rows as they are: weight-only in their own dtype, not padded to a tile."""
        gemv = self.fp8_gemv
        if (gemv not in KERNEL_GEMV or not weight_only_rows(w, rows, gemv) or self.sp
                or w8a8_rows(gemv, rows) or f16_rows(gemv, rows)):
            return False
        shape = plan(rows, *self._shard_nk(spec, w), interpret=jax.default_backend() != "gpu")
        return shape is not None and shape[0] == rows

    def norm_in_kernel(self, spec: str, rows: int, w, glu: bool = False) -> bool:
        """Whether a column-parallel projection (spec onto w; glu: gate/up's SiLU·up too) of
        `rows` rows takes the residual add and the norm before it into its FP8 kernel
        (add_norm="gemv": `add_norm_column`): it reads the rows as they are (`direct_kernel`),
        each device holds whole rows, and models/fp8_gemv.py `takes_add_norm` the shard."""
        if self.add_norm != "gemv" or not self.direct_kernel(spec, rows, w):
            return False
        n, k = self._shard_nk(spec, w)
        lhs = spec.split("->")[0].split(",")[0]
        return not self._summed(lhs) and takes_add_norm(
            rows, n // (2 if glu else 1), k, jax.default_backend() != "gpu")

    def add_norm_column(self, a_td, spec: str, w, add_norm: AddNorm, glu: bool = False):
        """(the projection of add_norm's scale * RMSNorm(a + b) onto w, a + b) in one FP8
        kernel per device, where `norm_in_kernel` says so (the caller asks it first)."""
        y, stream = self._weight_only_kernel(spec, a_td, w, glu=glu, add_norm=add_norm)
        return (self._constrain(y, _gated_out(spec) if glu else _column_out(spec)),
                self.residual(stream))

    def _shard_nk(self, spec: str, w) -> tuple[int, int]:
        """(output channels, contracted size) of each device's shard of FP8 weight w."""
        lhs, rhs = spec.split("->")[0].split(",")
        stored = stored_letters(lhs, rhs)
        lead = (None,) if w.layer is not None else ()
        shard = jax.sharding.NamedSharding(self.mesh, partition_spec(
            lead + tuple(_WEIGHT[c] for c in stored), self.rules)).shard_shape(w.q.shape)
        contracted = len(lhs) - 1
        return (math.prod(shard[len(lead):len(shard) - contracted]),
                math.prod(shard[len(shard) - contracted:]))

    def _summed(self, lhs: str) -> tuple:
        """The mesh axes (of more than one device) that split the contracted letters of x, `lhs`
        (an entry of a partition spec may name several): a product's partial sums are added
        over them."""
        names = partition_spec(tuple(_WEIGHT[c] for c in lhs[1:]), self.rules)
        return tuple(sorted({name for a in names if a is not None
                             for name in ((a,) if isinstance(a, str) else a)
                             if self.mesh.shape[name] > 1}))

    def _einsum(self, spec, x_td, w):
        if self.fp8_gemv in KERNEL_GEMV and weight_only_rows(w, x_td.shape[0], self.fp8_gemv):
            return self._weight_only_kernel(spec, x_td, w)
        if isinstance(w, Fp8):
            w = w.unstacked()
        return _einsum(spec, x_td, w, self._rows(), self.pad_rows_min_weight, self.fp8_gemv)

    def _weight_only_kernel(self, spec, x_td, w: Fp8, glu: bool = False, add_norm=None):
        """The Pallas weight-only FP8 product per device on its weight shard (GSPMD cannot
        partition a kernel): x whole on every device; a row-parallel product's partial sums
        are added over tp, in x's dtype as the XLA path adds them. glu: silu(gate) * up of a
        gate/up product (`weight_only`), whose output letters then drop the (gate, up) one.
        add_norm: x and add_norm.b_td are the stream's parts, normalized in the kernel
        (`add_norm_column`), and the stream comes out too, as x's shards."""
        ins, out = spec.split("->")
        lhs, rhs = ins.split(",")
        stored = stored_letters(lhs, rhs)
        outputs = stored[:len(stored) - len(lhs) + 1]
        lead = (None,) if w.layer is not None else ()  # a stack's layer axis
        pspec = lambda letters, lead=(): partition_spec(  # noqa: E731
            lead + tuple(_WEIGHT[c] for c in letters), self.rules)
        summed = self._summed(lhs)

        w_spec = Fp8(pspec(stored, lead), pspec(outputs, lead),
                     None if w.layer is None else P())
        if add_norm is not None:  # no partial sums: each device holds whole rows
            def normed(x, w, b, scale, *layer):
                return weight_only(spec, x, w, self.fp8_gemv, glu=glu,
                                   add_norm=add_norm._replace(b_td=b, scale=scale,
                                                              layer=layer[0] if layer else None))

            layer = () if add_norm.layer is None else (jnp.asarray(add_norm.layer, jnp.int32),)
            scale_spec = pspec(lhs[1:], (None,) * (add_norm.scale.ndim - 1))
            return jax.shard_map(
                normed, mesh=self.mesh,
                in_specs=(pspec(lhs), w_spec, pspec(lhs), scale_spec) + (P(),) * len(layer),
                out_specs=(pspec(out[0] + out[1 + glu:]), pspec(lhs)), check_vma=False)(
                    x_td, w, add_norm.b_td, add_norm.scale, *layer)

        def body(x, w):  # W8A8: each token's scale the maximum over every device's features
            pmax = (lambda a: jax.lax.pmax(a, summed)) if summed else None
            if not summed:
                return weight_only(spec, x, w, self.fp8_gemv, glu=glu)
            with pdl.followed_by_kernel(False):  # an all-reduce comes next
                return jax.lax.psum(weight_only(spec, x, w, self.fp8_gemv, reduce=pmax), summed)

        return jax.shard_map(body, mesh=self.mesh, in_specs=(pspec(lhs), w_spec),
                             out_specs=pspec(out[0] + out[1 + glu:]), check_vma=False)(x_td, w)

    def row(self, spec, h, w):
        if self._ring(h.shape[0], w):
            lhs = spec.split(",")[0]
            return ring_row(self.mesh, spec, h, w.unstacked() if isinstance(w, Fp8) else w,
                            **self._ring_axes(lhs, lhs[1]))
        out = self._einsum(spec, h, w)
        if not self.sp and _attention(spec.split(",")[0]) and self.rules["attn_tokens"]:
            # attention groups without SP: sum o_proj's partial products on the group's own
            # rows (an all-reduce over "attn_tp"), then gather the groups' rows; left to
            # itself GSPMD gathered the heads' rows first and all-reduced every row
            out = self._constrain(out, ("attn_tokens", "act_embed"))
        return self.residual(out)

    def rows(self, rows, weight_size):
        return padded_rows(rows, weight_size, self._rows(), self.pad_rows_min_weight)

    def local(self, fn, in_names, out_names, *args):
        """fn per device on the shards the logical names give (a kernel that XLA cannot
        partition: left to GSPMD, its operands would be gathered whole)."""
        specs = lambda names: tuple(partition_spec(n, self.rules) for n in names)  # noqa: E731
        return jax.shard_map(fn, mesh=self.mesh, in_specs=specs(in_names),
                             out_specs=specs(out_names), check_vma=False)(*args)
