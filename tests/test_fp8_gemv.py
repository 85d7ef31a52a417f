"""The weight-only FP8 kernel (models/fp8_gemv.py), interpreted on CPU, against the product it
computes: x times the widened FP8 weight times its channel scales, in float32."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_for_cuda, signal_position, triton_kernels
from models.fp8_gemv import fp8_gemv, plan, swiglu, takes_add_norm
from models.quant import quantize_tokens, quantize_weight


def reference(x, q, scale):
    wide = np.asarray(q.astype(jnp.float32)) * np.asarray(scale)[:, None]
    return np.asarray(x, np.float32) @ wide.T


@pytest.mark.parametrize("rows,n,k,block_k,splits", [
    (1, 96, 1536, 128, 12), (5, 40, 384, 128, 3), (17, 128, 256, 512, 1), (64, 48, 80, 512, 5),
    (1, 8192, 256, 64, 1), (6, 8192, 256, 64, 2)])
def test_the_kernel_computes_the_widened_product_on_odd_shapes(rows, n, k, block_k, splits):
    """Odd row counts (one on CUDA cores, more padded to a 16-64-row tensor-core tile), odd
    channel blocks, the contracted axis split over programs (few channel blocks) or not (one
    block of it; n = 8192 on CUDA cores: 256 channel blocks)."""
    kx, kw = jax.random.split(jax.random.key(rows))
    x = jax.random.normal(kx, (rows, k), jnp.bfloat16)
    w = quantize_weight(jax.random.normal(kw, (k, n), jnp.float32), (0,))
    assert plan(rows, n, k, block_k=block_k, interpret=True)[3] == splits
    y = fp8_gemv(x, w.q, w.scale, block_k=block_k, interpret=True)
    assert y.shape == (rows, n) and y.dtype == jnp.bfloat16
    want = reference(x, w.q, w.scale)
    # bf16 output: one rounding of 2^-9 relative on top of float32 accumulation
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("rows,f,k,block_k,splits,w8a8", [
    (1, 2048, 96, 128, 1, False), (1, 48, 1536, 128, 12, False), (5, 40, 384, 128, 3, False),
    (32, 128, 256, 512, 1, False), (3, 24, 80, 512, 5, True)])
def test_glu_gives_silu_of_the_gate_times_the_up_projection(rows, f, k, block_k, splits, w8a8):
    """glu: a fused gate/up weight [2F, K] gives [M, F] = silu(gate) * up, each projection
    rounded to the output dtype as the unfused kernel writes it (so: exactly `swiglu` of the
    unfused kernel's two halves): on CUDA cores and tensor-core tiles, with the contracted
    axis split (swiglu after XLA's sum) or not (in the kernel), weight-only and W8A8."""
    kx, kw = jax.random.split(jax.random.key(rows + f))
    x = jax.random.normal(kx, (rows, k), jnp.float32)
    w = quantize_weight(jax.random.normal(kw, (k, 2 * f), jnp.float32), (0,))
    kw = {}
    if w8a8:
        x, sx = quantize_tokens(x)
        kw = {"x_scale": sx}
    else:
        x = x.astype(jnp.bfloat16)
    assert plan(rows, f, k, block_k=block_k, interpret=True)[3] == splits
    y = fp8_gemv(x, w.q, w.scale, block_k=block_k, glu=True, interpret=True, **kw)
    both = fp8_gemv(x, w.q, w.scale, block_k=block_k, splits=splits, interpret=True,
                    out_dtype=jnp.float32, **kw)
    assert y.shape == (rows, f) and y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(
        swiglu(both[:, :f], both[:, f:], jnp.bfloat16), np.float32))
    gate, up = (np.asarray(a.astype(jnp.float32)) for a in (both[:, :f], both[:, f:]))
    with np.errstate(over="ignore"):  # exp(-gate) of a large negative gate: inf, silu 0
        want = gate / (1 + np.exp(-gate)) * up
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=2e-2,
                               atol=1e-2 * np.abs(want).max())
    with pytest.raises(ValueError, match="even number of output channels"):
        fp8_gemv(x, w.q[:-1], w.scale[:-1], glu=True, interpret=True, **kw)


def _stream(k, layers, seed):
    """The residual stream's two parts [1, k] and a stack of norm scales [layers, k], bf16."""
    ks = jax.random.split(jax.random.key(seed), 3)
    a = (4 * jax.random.normal(ks[0], (1, k))).astype(jnp.bfloat16)
    b = jax.random.normal(ks[1], (1, k)).astype(jnp.bfloat16)
    return a, b, (1 + 0.3 * jax.random.normal(ks[2], (layers, k))).astype(jnp.bfloat16)


EPS = 0.5


@pytest.mark.parametrize("n,k,block_k,glu", [(96, 384, 128, False), (80, 256, 64, True),
                                             (40, 45, 2048, False)])
def test_add_norm_gives_the_product_of_the_models_norm_of_the_sum(n, k, block_k, glu):
    """add_norm: one row's stream a + b (written exactly, in bf16), normalized as RMSNorm does
    with the traced layer's scale and multiplied (glu: silu(gate) * up): within the output's
    rounding of the exact product of the normalized row (the norm is folded into the product
    in float32, so it skips RMSNorm's two bf16 roundings of the row), over 3, 4 or 45
    contracted blocks (an odd row, interpreted: blocks of one column); a stack read at the
    layer given, and a single scale. eps is large enough to matter (the stream's mean square is
    about 17)."""
    a, b, scales = _stream(k, 3, n + k)
    ws = [quantize_weight(w, (0,)) for w in jax.random.normal(jax.random.key(k), (3, k, n))]
    q, wscale = jnp.stack([w.q for w in ws]), jnp.stack([w.scale for w in ws])
    run = jax.jit(lambda a, b, q, ws, g, layer: fp8_gemv(
        a, q, ws, layer, block_k=block_k, glu=glu, add_norm=(b, g, EPS), interpret=True))
    s64 = np.asarray(a, np.float64) + np.asarray(b, np.float64)
    for layer in (0, 2):
        y, s = run(a, b, q, wscale, scales, jnp.int32(layer))
        np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(a + b, np.float32))
        normed = (s64 / np.sqrt(np.mean(s64 ** 2) + EPS) * np.asarray(scales[layer], np.float64))
        exact = normed @ (np.asarray(ws[layer].q, np.float64)
                          * np.asarray(ws[layer].scale, np.float64)[:, None]).T
        if glu:
            gate, up = exact[:, :n // 2], exact[:, n // 2:]
            exact = gate / (1 + np.exp(-gate)) * up
        assert y.shape == (1, n // 2 if glu else n) and y.dtype == jnp.bfloat16
        # bf16 output: 2^-9 relative (glu: gate and up rounded first, then the product)
        np.testing.assert_allclose(np.asarray(y, np.float64), exact, rtol=2 ** -7 if glu else
                                   2 ** -8, atol=1e-4 * np.abs(exact).max())
    y1, _ = fp8_gemv(a, ws[1].q, ws[1].scale, block_k=block_k, glu=glu,
                     add_norm=(b, scales[1], EPS), interpret=True)
    np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(
        run(a, b, q, wscale, scales, jnp.int32(1))[0], np.float32))


def test_add_norm_refuses_what_it_does_not_take():
    """Several rows, a split contracted axis, rows of two shapes, FP8 rows: a ValueError that
    names what it takes; takes_add_norm says where the model may ask."""
    a, b, scales = _stream(256, 1, 0)
    w = quantize_weight(jax.random.normal(jax.random.key(1), (256, 64)), (0,))
    norm = (b, scales[0], 1e-5)
    refused = [{"x": jnp.concatenate([a, a])}, {"splits": 2},
               {"add_norm": (b[:, :128],) + norm[1:]}, {"x_scale": jnp.ones((1,), jnp.float32)}]
    for kw in refused:
        with pytest.raises(ValueError, match="add_norm takes weight-only rows"):
            fp8_gemv(kw.pop("x", a), w.q, w.scale, block_k=64, **{"add_norm": norm, **kw},
                     interpret=True)
    assert takes_add_norm(1, 6144, 4096) and takes_add_norm(1, 14336, 4096)
    assert not takes_add_norm(2, 6144, 4096)  # a tensor-core tile
    assert not takes_add_norm(1, 512, 4096)  # few channel blocks: plan splits the row


@pytest.mark.parametrize("rows,n,k,block_k,splits", [
    (1, 96, 1536, 128, 12), (1, 96, 128, 128, 1), (5, 40, 384, 128, 3), (32, 128, 256, 512, 1),
    (64, 48, 80, 512, 5)])
def test_quantized_rows_give_the_fp8_product_times_both_scales(rows, n, k, block_k, splits):
    """W8A8 (x_scale): x quantized per row, its tile multiplied in FP8 on tensor cores (one row
    widened on CUDA cores), each output scaled by its row's and its channel's scales (in the
    kernel with one split, by XLA after the splits' sum); rows of very different sizes."""
    kx, kw = jax.random.split(jax.random.key(rows + 100))
    x = jax.random.normal(kx, (rows, k), jnp.float32) * jnp.logspace(-2, 2, rows)[:, None]
    xq, sx = quantize_tokens(x)
    w = quantize_weight(jax.random.normal(kw, (k, n), jnp.float32), (0,))
    assert plan(rows, n, k, block_k=block_k, interpret=True)[3] == splits
    y = fp8_gemv(xq, w.q, w.scale, block_k=block_k, x_scale=sx, out_dtype=jnp.float32,
                 interpret=True)
    assert y.shape == (rows, n) and y.dtype == jnp.float32
    want = reference(np.asarray(xq.astype(jnp.float32)) * np.asarray(sx)[:, None], w.q,
                     w.scale)
    size = np.abs(want).max(axis=1, keepdims=True)  # each row to its own size
    np.testing.assert_allclose(np.asarray(y) / size, want / size, atol=1e-5)


@pytest.mark.parametrize("fma", ["reduce", "tile"])
def test_both_ways_of_summing_one_row_on_cuda_cores_agree(fma):
    kx, kw = jax.random.split(jax.random.key(11))
    x = jax.random.normal(kx, (1, 768), jnp.bfloat16)
    w = quantize_weight(jax.random.normal(kw, (768, 96), jnp.float32), (0,))
    y = fp8_gemv(x, w.q, w.scale, block_k=128, fma=fma, interpret=True)
    want = reference(x, w.q, w.scale)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())


def test_a_stacked_weight_is_read_at_the_layer_given():
    kx, kw = jax.random.split(jax.random.key(7))
    x = jax.random.normal(kx, (3, 256), jnp.float16)
    ws = [quantize_weight(w, (0,)) for w in jax.random.normal(kw, (4, 256, 64), jnp.float32)]
    stack, scales = jnp.stack([w.q for w in ws]), jnp.stack([w.scale for w in ws])
    for layer in (0, 3):
        y = jax.jit(lambda x, q, s, layer: fp8_gemv(x, q, s, layer, interpret=True))(
            x, stack, scales, jnp.int32(layer))
        want = reference(x, ws[layer].q, ws[layer].scale)
        np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2,
                                   atol=1e-2 * np.abs(want).max())


@pytest.mark.parametrize("rows,w8a8,splits", [(1, False, None), (32, False, None),
                                             (40, False, None), (32, True, None), (40, True, 1),
                                             (1, True, None), (1, True, 1)])
def test_the_kernel_lowers_for_cuda_on_a_stack_it_reads_in_place(rows, w8a8, splits):
    """Lowered for CUDA here (Pallas' Triton lowering; the GPU compiles its payload), on CUDA
    cores (1 row) and tensor cores (32 rows, and 40 in a tile of 64: Triton's blocks are powers
    of two; W8A8: their FP8 values, one row's too, and with one split the rows' scales applied
    in the kernel):
    the stacked FP8 weights go into the kernel as they lie, with no slice or widened copy of
    them before it, and W8A8's rows in FP8. Inside (its Triton IR) the tensor-core dot takes
    FP8 operands in W8A8 and the weight widened to bf16 in W8A16."""
    spec = jax.ShapeDtypeStruct
    x = spec((rows, 4096), jnp.float8_e4m3fn if w8a8 else jnp.bfloat16)
    text = lowered_for_cuda(
        lambda x, q, s, layer, sx: fp8_gemv(x, q, s, layer, x_scale=sx if w8a8 else None,
                                            splits=splits, interpret=False),
        x, spec((4, 1024, 4096), jnp.float8_e4m3fn), spec((4, 1024), jnp.float32),
        spec((), jnp.int32), spec((rows,), jnp.float32))
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 1 and "tensor<4x1024x4096xf8E4M3FN>" in calls[0]
    tile = plan(rows, 1024, 4096, splits=splits)[0]  # rows padded to a tile
    assert f"tensor<{tile}x4096x{'f8E4M3FN' if w8a8 else 'bf16'}>" in calls[0]
    # no layer sliced out of the stack, no weight widened to 16 bits
    assert "tensor<1024x4096xf8E4M3FN>" not in text and "1024x4096xbf16" not in text
    (kernel,) = triton_kernels(text)
    dots = [line for line in kernel.splitlines() if "tt.dot" in line]
    if rows == 1:  # CUDA cores: multiply-adds, no dot
        assert not dots
    else:
        kind = "f8E4M3FN" if w8a8 else "bf16"
        assert dots and all(re.search(rf": tensor<{tile}x\d+x{kind}> \* tensor<\d+x\d+x{kind}>",
                                      line) for line in dots), dots


def test_bfloat16_rows_past_float16_s_range_are_clipped_not_made_infinite():
    """fp8_gemv="pallas-f16" rounds 2-64 bfloat16 rows to float16 before the kernel: values
    past float16's 65504 are clipped to it (in float32: bfloat16 rounds 65504 itself up to
    65536, which float16 makes an inf), so the product is the weight-only product of the
    clipped rows, finite; one row goes in as it is."""
    from models.quant import dot

    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (4, 64), jnp.float32).at[0, 3].set(7e4).at[1, 5].set(-1e6)
    w = quantize_weight(jax.random.normal(kw, (64, 48), jnp.float32), (0,))
    xb = x.astype(jnp.bfloat16)
    y = dot("TK,KN->TN", xb, w, gemv="pallas-f16")
    assert y.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))
    clipped = jnp.clip(xb.astype(jnp.float32), -65504.0, 65504.0)
    want = reference(clipped, w.q, w.scale)
    np.testing.assert_allclose(np.asarray(y, np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())
    one = dot("TK,KN->TN", xb[:1], w, gemv="pallas-f16")  # one row: unclipped, as "pallas"
    np.testing.assert_allclose(np.asarray(one, np.float32), reference(xb[:1], w.q, w.scale),
                               rtol=1e-2, atol=1e-2 * float(np.abs(reference(
                                   xb[:1], w.q, w.scale)).max()))


def test_float16_rows_widen_the_weight_to_float16_in_the_tile():
    """fp8_gemv="pallas-f16"'s rows, lowered for CUDA: 32 rows in float16 go in as they are,
    and the tile's dot takes them and the weight block widened from e4m3 to float16 (one
    conversion a pair of values on Hopper, where bfloat16 takes three), accumulating in float32;
    the result comes out in the dtype asked for."""
    spec = jax.ShapeDtypeStruct
    text = lowered_for_cuda(
        lambda x, q, s, layer: fp8_gemv(x, q, s, layer, out_dtype=jnp.bfloat16, interpret=False),
        spec((32, 4096), jnp.float16), spec((4, 1024, 4096), jnp.float8_e4m3fn),
        spec((4, 1024), jnp.float32), spec((), jnp.int32))
    (call,) = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert "tensor<32x4096xf16>" in call and "1024x4096xf16" not in text
    (kernel,) = triton_kernels(text)
    dots = [line for line in kernel.splitlines() if "tt.dot" in line]
    assert dots and all(re.search(r": tensor<32x\d+xf16> \* tensor<\d+x\d+xf16> -> "
                                  r"tensor<32x\d+xf32>", line) for line in dots), dots
    assert re.search(r"tt.fp_to_fp \S+ : tensor<\d+x\d+xf8E4M3FN> -> tensor<\d+x\d+xf16>",
                     kernel)


def test_shapes_the_kernel_does_not_take_are_refused():
    x = jnp.zeros((65, 64), jnp.bfloat16)
    w = quantize_weight(jnp.ones((64, 32)), (0,))
    assert plan(65, 32, 64) is None  # > 64 rows
    assert plan(2, 24, 64) is None and plan(1, 20, 64) is None  # N % 16 (8 for one row) != 0
    assert plan(1, 32, 64 * 3, block_k=64, splits=2) is None  # 2 does not divide 3 blocks
    with pytest.raises(ValueError, match="at most 64 rows"):
        fp8_gemv(x, w.q, w.scale, interpret=True)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_gemv(x[:, :32], w.q, w.scale, interpret=True)
    # a block that is no power of two would leave columns or channels out
    for kw, match in [({"block_k": 48}, "block_k must be a power of two, got 48"),
                      ({"block_n": 12}, "block_n must be a power of two, got 12"),
                      ({"splits": 0}, "splits must be at least 1, got 0")]:
        with pytest.raises(ValueError, match=match):
            fp8_gemv(x[:2], w.q, w.scale, interpret=True, **kw)


@pytest.mark.parametrize("rows", [1, 32])
def test_with_launch_dependents_the_kernel_signals_before_its_weight_loads(rows):
    """CompileOptions(launch_dependents=True) (models/pdl.py), lowered for CUDA: each block
    executes griddepcontrol.launch_dependents once, after loading the layer index (whose value
    passes through the instruction) and before any load of the row or the weight; without the
    option the kernel has no such instruction."""
    from models import pdl

    spec = jax.ShapeDtypeStruct
    args = (spec((rows, 4096), jnp.bfloat16), spec((4, 1024, 4096), jnp.float8_e4m3fn),
            spec((4, 1024), jnp.float32), spec((), jnp.int32))

    def kernel_ir():
        text = lowered_for_cuda(lambda x, q, s, l: fp8_gemv(x, q, s, l, interpret=False), *args)
        (kernel,) = triton_kernels(text)
        return kernel

    with pdl.signalling(True):
        assert signal_position(kernel_ir()) == (1, 1)
    assert signal_position(kernel_ir()) == (0, None)
