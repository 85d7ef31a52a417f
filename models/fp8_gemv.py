"""Weight-only FP8 matmul for few rows (decode): y = x @ (wq * scale)^T with x in 16 bits and
wq in float8_e4m3fn, as one Pallas (Triton) kernel that reads each FP8 weight once and widens it
in registers.

Why: a decode step is a matrix-vector product per projection, bound by the bytes of the weights.
With cuBLASLt's FP8 GEMMs (what XLA emits for an FP8 dot) at every size, FP8 decode of the
Llama-3-8B shape ran at 0.62-0.68x bf16's speed on an H200 (docs/fp8.md), although it reads
half the bytes. Here program (n, p) owns BLOCK_N output channels and split p of the contracted
axis: it walks its split in blocks of BLOCK_K, widens the weight block to the activations' dtype
and accumulates x_block @ w_block^T in float32 on tensor cores (x padded to 16, 32 or 64
rows: Triton's blocks are powers of two, 16 the smallest). The splits' partial sums are added
and scaled per output channel in XLA (one small fusion). Splitting the contracted axis keeps
every multiprocessor busy when a projection has few output blocks (a tp shard of o_proj or
down_proj).

The activations stay in 16 bits (W8A16), so this is more accurate than the W8A8 path it serves
beside (models/quant.py `dot` picks it for few rows). With `x_scale` the rows come quantized
(FP8 values, one scale per row: W8A8, CompileOptions(fp8_gemv="pallas-w8a8")) and the tile's
dot takes both operands in FP8 as they lie; one row still runs on CUDA cores. On Hopper Triton
does not run that dot on FP8 tensor cores: below wgmma's 64 rows, and with no
`max_num_imprecise_acc` from Pallas, its `mma.sync` path widens both operands to float16 (native
FP8 `mma.sync` is sm_89's and sm_120's). What W8A8 saves there is the widening: e4m3 to float16
is one instruction a pair of values, to bfloat16 three. Rows in float16 (fp8_gemv="pallas-f16")
get the same widening of the weight without quantizing the rows. With `glu` a program reads a
fused gate/up weight's gate rows and the matching up rows and writes silu(gate) * up, so a
batch-1 decode step's MLP runs as two kernels (`swiglu`; sharding/layout.py `gated`).
With `add_norm` the kernel also runs the residual add and the RMSNorm before the projection
(one row, one split): each program adds the stream's two parts block by block as it walks the
contracted axis (program 0 writes the sum, the new stream), accumulates their squares beside
the products of the weight with the sum times the norm's scale, and multiplies its outputs by
the inverse RMS at the end. Every program reads the whole row anyway, so this costs no pass
of its own; normalizing the row first and then multiplying (exactly RMSNorm's roundings) made
a decode step 9% slower than the separate add-and-norm kernel on an H100, because each program
then waited for the sum of squares before its first weight load (docs/fp8.md). A decode step
then runs no kernel between a layer's projections but attention (models/llama.py `Block`).
`interpret=True` runs the same kernel through Pallas' interpreter (the tests use it on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from models import pdl

MAX_ROWS = 64  # the kernel serves at most this many rows
FMA_ROWS = 1  # up to this many rows: CUDA-core multiply-adds; more: tensor cores (16-64-row tiles)
TARGET_PROGRAMS = 264  # split the contracted axis while there are fewer programs (2 per SM)
# tiles (channels, contracted) and pipeline stages, by the sweeps of benchmarks/fp8_gemv.py on
# an H200: tensor cores benchmarks/results/fp8_gemv_h200.jsonl, one row (CUDA cores) per
# projection fp8_gemv_h200_shape.jsonl (8 x 2048 gave 85 us a layer against 97.5 for 16 x 1024)
BLOCK_N, BLOCK_K, STAGES = 64, 128, 4
FMA_BLOCK_N, FMA_BLOCK_K, FMA_STAGES = 8, 2048, 3
NUM_WARPS = 4


def plan(rows: int, n: int, k: int, block_n: int | None = None, block_k: int | None = None,
         interpret: bool = False, splits: int | None = None):
    """(tile rows, block_n, block_k, splits) for an [rows, k] x [n, k] product, or None when the
    kernel does not take it: more than MAX_ROWS rows, n or k without a power-of-two divisor of 16 on
    GPU (of min(16, block_n) for n on CUDA cores), or `splits` not dividing the contracted blocks.
    Tile rows: `rows` itself up to FMA_ROWS (CUDA cores, one row at a time), else rows rounded up to
    a power of two of at least 16 (tensor cores: Pallas' Triton lowering takes power-of-two blocks
    only, so 48 rows would not lower). Unless `splits` is given, the contracted axis is split over
    programs until there are about TARGET_PROGRAMS."""
    for name, value in (("block_n", block_n), ("block_k", block_k), ("splits", splits)):
        if value is not None and (value < 1 or (name != "splits" and value & (value - 1))):
            raise ValueError(f"fp8_gemv: {name} must be "
                             f"{'at least 1' if name == 'splits' else 'a power of two'}, got "
                             f"{value}")
    if rows > MAX_ROWS:
        return None
    fma = rows <= FMA_ROWS
    block_n = block_n or (FMA_BLOCK_N if fma else BLOCK_N)
    block_k = block_k or (FMA_BLOCK_K if fma else BLOCK_K)
    bn, bk = min(n & -n, block_n), min(k & -k, block_k)
    if not interpret and (bn < (min(16, block_n) if fma else 16) or bk < 16):
        return None
    tile = tile_rows(rows)
    blocks_n, blocks_k = n // bn, k // bk
    if splits is not None:
        return (tile, bn, bk, splits) if blocks_k % splits == 0 else None
    want = max(1, TARGET_PROGRAMS // blocks_n)
    splits = next(s for s in range(min(want, blocks_k), 0, -1) if blocks_k % s == 0)
    return tile, bn, bk, splits


def takes_add_norm(rows: int, n: int, k: int, interpret: bool = False) -> bool:
    """Whether `fp8_gemv(..., add_norm=...)` takes an [rows, k] x [n, k] product (n: the
    output channels, halved with glu): rows on CUDA cores (the fold is written for them), and a
    contracted axis that the kernel would not split anyway (every program normalizes the whole
    row: forcing one split would shrink the grid, which is not what was measured)."""
    shape = plan(rows, n, k, interpret=interpret) if rows <= FMA_ROWS else None
    return shape is not None and shape[3] == 1


def tile_rows(rows: int) -> int:
    """The rows the kernel runs `rows` rows on: themselves up to FMA_ROWS (CUDA cores), else a
    power-of-two tensor-core tile of at least 16 (the rows padded to it)."""
    return rows if rows <= FMA_ROWS else max(16, 1 << (rows - 1).bit_length())


def fp8_gemv(x, wq, scale, layer=None, *, block_n: int | None = None,
             block_k: int | None = None, num_warps: int = NUM_WARPS,
             num_stages: int | None = None, fma: str = "reduce",
             splits: int | None = None, x_scale=None, out_dtype=None, glu: bool = False,
             add_norm=None, interpret: bool | None = None):
    """x [M, K] (16-bit), wq [N, K] float8_e4m3fn, scale [N] float32 -> [M, N] in x's dtype: sum_k
    x[m, k] * wq[n, k] * scale[n], accumulated in float32. x_scale [M] float32: x is FP8 (W8A8) and
    row m is also scaled by x_scale[m]; the result is in out_dtype (default x's dtype; bf16 with
    x_scale). With `layer` (an int or an int32 scalar array), wq [L, N, K] and scale [L, N] are a
    stack of layers' weights and the kernel reads layer `layer` where it lies: XLA copies a slice of
    a stack that it passes to a kernel, so a decode step's layers share the stacked weights this way
    (as models/decode_attention.py shares the stacked KV cache). Raises ValueError when `plan`
    refuses the shapes (callers check `plan` first). fma: how a CUDA-core row sums its products,
    "reduce" (each block's across its columns) or "tile" (per column over the whole loop, summed
    once at the end). splits: how many programs share the contracted axis (by default `plan`'s
    choice). glu: the weight's N rows are a gate's then an up projection's (vLLM's fused
    gate_up_proj), and the result is [M, N / 2], silu(gate) * up (`swiglu`): in the kernel, so
    the product's two halves are never written, where the contracted axis is not split; after
    the split sums (in XLA) where it is. add_norm (b [M, K], norm_scale [K] ([L, K] with
    `layer`: that layer's row is read), eps): x and b are the two parts of the residual
    stream, the product is taken of norm_scale * RMSNorm(x + b), and the result is
    (y, x + b) (x + b in x's dtype, as the model adds). The norm is folded into the product:
    sum_k w[n, k] * scale[k] * s[k], times rsqrt(mean(s^2) + eps), all in float32, so the two
    roundings of models/add_norm.py `reference` to x's dtype (of the normalized row, and of it
    times the scale) are skipped: more precise, and within those roundings of the product of
    `reference`'s row. One row, one split of K, weight-only (`takes_add_norm`; else a
    ValueError)."""
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    m, k = x.shape
    if layer is None:
        wq, scale = wq[None], scale[None]
    n, kw = wq.shape[1:]
    if kw != k or scale.shape != wq.shape[:2]:
        raise ValueError(f"fp8_gemv: x {x.shape}, weight {wq.shape} and scale {scale.shape} "
                         f"do not fit (want [M, K], [(L,) N, K], [(L,) N])")
    if glu and n % 2:
        raise ValueError(f"fp8_gemv: glu needs an even number of output channels (gate, then "
                         f"up), not {n}")
    if add_norm is not None and splits is None:  # every program normalizes the whole row
        splits = 1
    shape = plan(m, n // 2 if glu else n, k, block_n, block_k, interpret, splits)
    if shape is None:
        raise ValueError(f"fp8_gemv: takes at most {MAX_ROWS} rows, N and K with a "
                         f"power-of-two divisor >= 16 and splits dividing K's blocks, not "
                         f"x {x.shape}, weight {wq.shape}, splits {splits}")
    rows, bn, bk, splits = shape
    extra, eps = (), None
    if add_norm is not None:
        b, norm_scale, eps = add_norm
        norm_stack = norm_scale if layer is not None else norm_scale[None]
        if (x_scale is not None or b.shape != x.shape or b.dtype != x.dtype
                or norm_stack.shape != (wq.shape[0], k) or m > FMA_ROWS or splits != 1):
            raise ValueError(
                f"fp8_gemv: add_norm takes weight-only rows x and b of one shape and dtype "
                f"(have {x.shape} {x.dtype}, {b.shape} {b.dtype}; at most {FMA_ROWS}), a norm "
                f"scale [K] ([L, K] with a layer; have {norm_scale.shape}) and one split of K "
                f"(have {splits}): see takes_add_norm")
        extra, eps = (b, norm_stack.astype(x.dtype)), float(eps)
    if x_scale is not None and x_scale.shape != (m,):
        raise ValueError(f"fp8_gemv: x_scale {x_scale.shape} must hold one scale per row of "
                         f"x {x.shape}")
    dtype = out_dtype or (x.dtype if x_scale is None else jnp.bfloat16)
    # W8A8 rows go in as FP8 on either path (CUDA cores widen them in registers): widened and
    # scaled by XLA beforehand, the FP8 round trip was simplified away on GPU (one row then
    # had the weight-only path's error to every digit)
    xp = x if rows == m else jnp.pad(x, ((0, rows - m), (0, 0)))
    # W8A8 on tensor cores: the rows' scales (padding rows: 1) go in after the weights' scales
    xs = () if x_scale is None else (
        jnp.pad(x_scale.astype(jnp.float32), (0, rows - m), constant_values=1.0),)
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(
            num_warps=num_warps,
            num_stages=num_stages or (FMA_STAGES if m <= FMA_ROWS else STAGES))
    # one split: scaled and written in x's dtype by the kernel; several: float32 partial sums,
    # added and scaled by XLA
    out = (jax.ShapeDtypeStruct((rows, n // 2 if glu else n), dtype) if splits == 1
           else jax.ShapeDtypeStruct((splits, rows, n), jnp.float32))
    if eps is not None:  # and the new stream
        out = (out, jax.ShapeDtypeStruct((m, k), x.dtype))
    # signalled where the next kernel reads the output as written (one split, no row padding)
    kernel = functools.partial(_kernel, bn=bn, bk=bk, per_split=k // bk // splits,
                               splits=splits, fma=fma if m <= FMA_ROWS else False,
                               half=n // 2 if glu else 0, eps=eps,
                               signal=pdl.enabled(interpret, splits == 1 and rows == m),
                               below=pdl.below())
    index = jnp.reshape(jnp.asarray(0 if layer is None else layer, jnp.int32), (1,))
    grid = ((n // 2 if glu else n) // bn, splits)
    y = pl.pallas_call(kernel, out_shape=out, grid=grid, interpret=interpret,
                       compiler_params=params, name="fp8_gemv")(index, xp, wq, scale, *xs,
                                                                *extra)
    if eps is not None:
        return y
    if splits > 1:
        y = jnp.sum(y, axis=0) * jax.lax.dynamic_index_in_dim(scale, index[0], 0, False)
        y = y if x_scale is None else y * xs[0][:, None]
        y = swiglu(y[:, :n // 2], y[:, n // 2:], dtype) if glu else y.astype(dtype)
    return y if rows == m else y[:m]


def swiglu(gate, up, dtype):
    """silu(gate) * up in `dtype` from float32 products: each rounded to `dtype` first, as the
    unfused projection writes them, then the activation and the product in float32 and one
    rounding, as XLA fuses `jax.nn.silu(gate) * up`."""
    g, u = (a.astype(dtype).astype(jnp.float32) for a in (gate, up))
    return (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)


def _groups(ni, bn: int, half: int):
    """Program ni's output channels, and with glu (`half`) the up projection's `half` further
    on."""
    from jax.experimental import pallas as pl

    return [pl.ds(pl.multiple_of(ni * bn + g * half, bn), bn) for g in range(1 + bool(half))]


def _kernel(layer_ref, x_ref, w_ref, s_ref, *refs, bn, bk, per_split, splits, fma, half,
            eps, signal, below):
    """Program (n, p): output channels [n * bn, (n + 1) * bn), contracted blocks
    [p * per_split, (p + 1) * per_split) of bk each. fma ("reduce" or "tile"): each row's
    products summed on CUDA cores (a few rows: a tensor-core tile would be mostly padding);
    False: one tensor-core dot of the row tile, in FP8 when x is (W8A8: refs then begin with
    the rows' scales, xs_ref). half (glu): also the channels `half` further on (the up
    projection's), and the output is `swiglu` of the two (one split) or both, side by side as
    the weight holds them (several). eps (add_norm): x is one part of the stream and refs begin
    with the other and the norm's scales, and end with the new stream's output (`_normed`).
    refs: ([xs_ref,] out_ref) or (b_ref, g_ref, out_ref, stream_ref)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if eps is not None:
        return _normed(layer_ref, x_ref, w_ref, s_ref, *refs, bn=bn, bk=bk, blocks=per_split,
                       half=half, eps=eps, signal=signal, below=below)
    *xs_ref, out_ref = refs
    ni, pi = pl.program_id(0), pl.program_id(1)
    layer = pdl.first_index(layer_ref, signal, below)
    rows = x_ref.shape[0]
    groups = _groups(ni, bn, half)
    f32 = jnp.float32
    dtype = out_ref.dtype

    def cols(i):
        return pl.ds(pl.multiple_of((pi * per_split + i) * bk, bk), bk)

    def finish(vals, scale_rows):
        """The group's float32 sums [.., bn] scaled and written: swiglu'd with glu."""
        vals = [scale_rows(v * s_ref[layer, ch]) for v, ch in zip(vals, groups)]
        return swiglu(*vals, dtype) if half else vals[0].astype(dtype)

    if fma:  # acc: per group, per row
        def step(i, acc):
            c = cols(i)
            out = []
            for g, ch in enumerate(groups):
                wb = w_ref[layer, ch, c].astype(f32)  # [bn, bk]
                for r in range(rows):
                    p = wb * x_ref[r, c].astype(f32)[None, :]
                    # "tile": products kept per (channel, column) over the loop, summed once
                    out.append(acc[g * rows + r] + (p if fma == "tile" else jnp.sum(p, axis=1)))
            return tuple(out)

        shape = (bn, bk) if fma == "tile" else (bn,)
        acc = jax.lax.fori_loop(0, per_split, step, tuple(
            jnp.zeros(shape, f32) for _ in range(len(groups) * rows)))
        if fma == "tile":
            acc = tuple(jnp.sum(a, axis=1) for a in acc)
        for r in range(rows):
            vals = [acc[g * rows + r] for g in range(len(groups))]
            if splits == 1:  # W8A8: the row's own scale too
                out_ref[r, groups[0]] = finish(
                    vals, lambda v, r=r: v * xs_ref[0][r] if xs_ref else v)
            else:
                for v, ch in zip(vals, groups):
                    out_ref[pi, r, ch] = v
        return

    every = pl.ds(0, rows)

    def step(i, acc):
        c = cols(i)
        xb = x_ref[every, c]
        # exact: e4m3 fits in 16 bits
        return tuple(a + plgpu.dot(xb, w_ref[layer, ch, c].astype(xb.dtype), trans_b=True)
                     for a, ch in zip(acc, groups))

    acc = jax.lax.fori_loop(0, per_split, step, tuple(jnp.zeros((rows, bn), f32)
                                                      for _ in groups))
    if splits == 1:  # W8A8: each row's own scale too
        out_ref[every, groups[0]] = finish(
            list(acc), lambda v: v * xs_ref[0][every][:, None] if xs_ref else v)
    else:
        for a, ch in zip(acc, groups):
            out_ref[pi, every, ch] = a


def _normed(layer_ref, x_ref, w_ref, s_ref, b_ref, g_ref, out_ref, stream_ref, *, bn, bk, blocks,
            half, eps, signal, below):
    """Program n of `fp8_gemv(..., add_norm=...)` on CUDA cores: one loop over the contracted
    blocks that adds the stream's two parts (program 0 writes the sum), sums their squares and
    multiplies the weight block by the sum times the norm's scale; the inverse RMS scales the
    products at the end (see `fp8_gemv` on the roundings this skips)."""
    from jax.experimental import pallas as pl

    ni = pl.program_id(0)
    layer = pdl.first_index(layer_ref, signal, below)
    f32 = jnp.float32
    groups = _groups(ni, bn, half)
    for r in range(x_ref.shape[0]):
        def step(i, carry, r=r):
            c = pl.ds(pl.multiple_of(i * bk, bk), bk)
            s = x_ref[r, c] + b_ref[r, c]  # in the stream's dtype, as the model adds

            @pl.when(ni == 0)
            def _():
                stream_ref[r, c] = s

            s = s.astype(f32)
            x = g_ref[layer, c].astype(f32) * s
            return (carry[0] + jnp.sum(s * s),) + tuple(
                a + jnp.sum(w_ref[layer, ch, c].astype(f32) * x[None, :], axis=1)
                for a, ch in zip(carry[1:], groups))

        squares, *acc = jax.lax.fori_loop(0, blocks, step, (jnp.zeros((), f32),) + tuple(
            jnp.zeros((bn,), f32) for _ in groups))
        inv = jax.lax.rsqrt(squares / (bk * blocks) + eps)
        vals = [s_ref[layer, ch] * (a * inv) for a, ch in zip(acc, groups)]
        out_ref[r, groups[0]] = (swiglu(*vals, out_ref.dtype) if half
                                 else vals[0].astype(out_ref.dtype))
