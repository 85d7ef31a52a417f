"""The residual add and RMSNorm in one Pallas kernel (models/add_norm.py): against the model's
RMSNorm on odd shapes (interpreted on CPU), its CUDA lowering, and the model's tokens with it at
tp 1/2/3, sp off/on, 16-bit and FP8 against one device without it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams

from models.add_norm import add_rms_norm, block, reference


def _rows(t, d, dtype, layers=None, seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    a = (4 * jax.random.normal(k[0], (t, d))).astype(dtype)
    b = jax.random.normal(k[1], (t, d)).astype(dtype)
    shape = (d,) if layers is None else (layers, d)
    scale = (1 + 0.3 * jax.random.normal(k[2], shape)).astype(dtype)
    return a, b, scale


@pytest.mark.parametrize("t,d", [(1, 45), (3, 64), (8, 576)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_kernel_gives_the_models_norm_of_the_sum(t, d, dtype):
    """s = a + b and y as RMSNorm gives them, in the same dtypes step by step: with XLA's excess
    precision off for both (with it, XLA, which runs the interpreted kernel on CPU, may skip a
    rounding to bfloat16 between two operations, differently in each program) the values are
    the reference's exactly in bfloat16, and float32 within a few roundings (the squares may be
    summed in another order; on GPU they are, so there y may differ from XLA's norm by a unit
    in the last place)."""
    a, b, scale = _rows(t, d, dtype)
    exact = {"xla_allow_excess_precision": False}

    def run(fn):
        return jax.jit(lambda a, b, w: fn(a, b, w, 1e-5)).lower(a, b, scale).compile(exact)(
            a, b, scale)

    (y, s), (y_ref, s_ref) = run(add_rms_norm), run(reference)
    assert y.dtype == s.dtype == dtype
    np.testing.assert_array_equal(np.asarray(s, np.float32), np.asarray(s_ref, np.float32))
    if dtype == jnp.float32:
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
    else:
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    # the norm and the scale did something: not the sum itself
    assert not np.allclose(np.asarray(y, np.float32), np.asarray(s, np.float32), atol=1e-2)


def test_a_stacked_scale_is_read_at_the_layer_given():
    """scale [L, D] with a layer index (a traced one too): the norm of that layer's row."""
    a, b, stack = _rows(3, 64, jnp.float32, layers=4)
    for layer in (0, 2, 3):
        want = reference(a, b, stack[layer], 1e-6)[0]
        np.testing.assert_allclose(add_rms_norm(a, b, stack, 1e-6, layer)[0], want,
                                   rtol=1e-5, atol=1e-6)
        traced = jax.jit(lambda i: add_rms_norm(a, b, stack, 1e-6, i)[0])(jnp.int32(layer))
        np.testing.assert_allclose(traced, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_are_refused():
    a, b, scale = _rows(2, 64, jnp.float32)
    with pytest.raises(ValueError, match=r"must be \[T, D\], \[T, D\] and \[D\]"):
        add_rms_norm(a, b[:, :32], scale, 1e-5)
    with pytest.raises(ValueError, match="one dtype"):
        add_rms_norm(a, b.astype(jnp.bfloat16), scale, 1e-5)
    # on GPU a row needs a power-of-two block of at least 16 columns
    assert block(45) is None and block(576) == 64 and block(3072) == 1024 and block(8192) == 4096
    with pytest.raises(ValueError, match="power-of-two divisor of at least 16"):
        add_rms_norm(*_rows(2, 45, jnp.float32), 1e-5, interpret=False)


@pytest.mark.parametrize("d", [4096, 3072])
def test_the_kernel_lowers_for_cuda_reading_the_stacked_scale_in_place(d):
    """Lowered for CUDA: one Triton kernel that takes every layer's scales [L, D] (no slice of
    the stack in front of it: XLA would copy one), in blocks of `block(d)` columns; with
    launch_dependents it signals once, after the layer index's load and before the rows'."""
    from conftest import lowered_for_cuda, signal_position, triton_kernels
    from models import pdl

    spec = jax.ShapeDtypeStruct
    args = (spec((8, d), jnp.bfloat16), spec((8, d), jnp.bfloat16), spec((5, d), jnp.bfloat16),
            spec((), jnp.int32))

    def lowered():
        return lowered_for_cuda(
            lambda a, b, s, i: add_rms_norm(a, b, s, 1e-5, i, interpret=False), *args)

    text = lowered()
    (call,) = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert f"tensor<5x{d}xbf16>" in call and "dynamic_slice" not in text
    (kernel,) = triton_kernels(text)
    assert f"tensor<{block(d)}x!tt.ptr<bf16>>" in kernel
    assert signal_position(kernel) == (0, None)
    with pdl.signalling(True):
        (kernel,) = triton_kernels(lowered())
    assert signal_position(kernel) == (1, 1)


@pytest.fixture(scope="module")
def one_device(hf_models):
    """Greedy tokens of one device with XLA's norms, 16-bit and FP8."""
    prompts = [[1, 5, 9, 22, 7, 60, 3], [3, 4]]
    sp = SamplingParams(max_new_tokens=6)
    return prompts, sp, {q: [c.token_ids for c in LLM.from_torch(
        hf_models("llama"), parallel=ParallelConfig(tp=1), dtype="float32", max_seq_len=64,
        quantization=q).generate(prompts, sp)] for q in (None, "fp8")}


@pytest.mark.parametrize("tp,sp,quantization", [(1, "off", "fp8"), (3, "off", None),
                                                 (2, "on", "fp8")])
def test_the_model_gives_one_devices_tokens_with_the_kernel(hf_models, one_device, tp, sp,
                                                            quantization):
    """add_norm="pallas": every norm of a decode step (and of a prompt of at most 64 rows) runs
    through the kernel, per device on its rows (tp pads the heads; sp splits the tokens), and
    the greedy tokens are one device's with XLA's norms."""
    prompts, params, want = one_device
    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=tp, sp=sp),
                         dtype="float32", max_seq_len=64, quantization=quantization,
                         options=CompileOptions(add_norm="pallas",
                                                fp8_gemv="pallas" if quantization else "auto"))
    assert [c.token_ids for c in llm.generate(prompts, params)] == want[quantization]
    assert "add_rms_norm" in llm.programs.hlo("decode")


def test_gemv_normalizes_in_each_devices_fp8_kernel_under_tp(monkeypatch):
    """add_norm="gemv" at tp 2 (plain TP: every device holds whole rows): q/k/v and gate/up
    normalize in their FP8 kernels on each device's weight shard, so a decode step runs no
    add-and-norm kernel (the prompt, 16 rows, still does: the GEMV kernel takes that tile as
    it is, but folds the norm into one row only), and the tokens are one device's with XLA's
    norms."""
    import models.llama
    from models import fp8_gemv
    from jax_sp import ModelConfig
    from jax_sp.runtime import random_params

    cfg = ModelConfig(vocab_size=101, hidden_size=2048, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    params, prompts = random_params(cfg), [[3, 1, 4, 1, 5]]

    def tokens(tp, mode):
        llm = LLM(cfg, params, parallel=ParallelConfig(tp=tp), dtype="float32", max_seq_len=32,
                  quantization="fp8", options=CompileOptions(fp8_gemv="pallas", add_norm=mode))
        return [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=4))]

    want = tokens(1, "xla")
    rows = []

    def counted(a, *args, **kwargs):
        rows.append(a.shape[0])
        return add_rms_norm(a, *args, **kwargs)

    normed, original = [], fp8_gemv._normed

    def kernel(*args, **kwargs):  # what the FP8 kernel runs with add_norm
        normed.append(kwargs["half"])
        return original(*args, **kwargs)

    monkeypatch.setattr(models.llama, "add_rms_norm", counted)
    monkeypatch.setattr(fp8_gemv, "_normed", kernel)
    assert tokens(2, "gemv") == want
    assert rows == [16, 16]  # the prefill's two norms, traced once
    assert normed == [0, 24]  # the decode step's q/k/v, then gate/up (glu: F / tp channels)


@pytest.mark.parametrize("gemv,rows", [
    ("pallas-mixed", [1]), ("pallas", [1, 16, 32, 64]), ("pallas-f16", [1]),
    ("pallas-w8a8", []), ("xla", [])])
def test_auto_uses_the_kernel_where_an_fp8_gemv_kernel_takes_its_rows_as_they_are(gemv, rows):
    """add_norm="auto" on GPU (the layout's "direct"): the kernel for the forwards whose rows the
    FP8 GEMV kernel then takes as they are, in their own dtype and unpadded: one row on CUDA
    cores, a whole 16/32/64-row tile with fp8_gemv="pallas"; not where the rows are padded to a
    tile, rounded to float16 or quantized first (pallas-w8a8 at any row count, pallas-f16 and
    pallas-mixed from 2), nor without the kernel. "pallas": every forward of at most 64 rows."""
    from sharding.layout import ShardedLayout
    from sharding.mesh import make_mesh

    mesh = make_mesh(1)
    direct = ShardedLayout(mesh, sp=False, fp8_gemv=gemv, add_norm="direct")
    every = ShardedLayout(mesh, sp=False, fp8_gemv=gemv, add_norm="pallas")
    assert [r for r in range(1, 80) if direct.fused_norm(r)] == rows
    assert [r for r in range(1, 80) if every.fused_norm(r)] == list(range(1, 65))
