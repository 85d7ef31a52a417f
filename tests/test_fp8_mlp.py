"""The fused one-row FP8 MLP kernel (models/fp8_mlp.py), interpreted on CPU, against the
separate products it replaces; its CUDA lowering (the publication protocol between programs);
and the model running it at tp 1 and 3 against three kernels on one device."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_for_cuda, random_prompts, triton_kernels
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from models.fp8_gemv import fp8_gemv
from models.fp8_mlp import fp8_mlp, plan, workspace_size
from models.quant import quantize_weight

GREEDY = SamplingParams(max_new_tokens=6)


def stack(d, i, layers, seed):
    kg, kd = jax.random.split(jax.random.key(seed))
    gate_up = jax.vmap(lambda w: quantize_weight(w, (2,)))(
        jax.random.normal(kg, (layers, 2, i, d), jnp.float32) * 0.1)  # [L, 2, I, D], [L, 2, I]
    down = jax.vmap(lambda w: quantize_weight(w, (1,)))(
        jax.random.normal(kd, (layers, d, i), jnp.float32) * 0.1)  # [L, D, I], [L, D]
    return gate_up, down


def rounded_like_the_separate_products(x, gate_up, down, layer):
    """What the separate path computes, in float64 with its roundings to x's dtype: gate and
    up each scaled and rounded, silu(gate) * up rounded, down scaled and rounded."""
    f64 = lambda a: np.asarray(jnp.asarray(a, jnp.float32), np.float64)  # noqa: E731
    cast = lambda a: f64(jnp.asarray(a, jnp.float32).astype(x.dtype))  # noqa: E731
    xs = f64(x)[0]
    wg = f64(gate_up.q[layer]) * f64(gate_up.scale[layer])[..., None]  # [2, I, D]
    g, u = (cast(w @ xs) for w in wg)
    h = cast(g / (1 + np.exp(-g)) * u)
    return cast((f64(down.q[layer]) * f64(down.scale[layer])[:, None]) @ h)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("d,i,tiles,programs", [
    (512, 1536, dict(block_d=256, chunk=512), 1),  # 3 chunks, 64 blocks of output channels
    (512, 1536, dict(block_d=256, chunk=512), 3),
    (96, 80, dict(), 2),  # tiles shrink to 32 columns and 16 intermediate channels
    (256, 768, dict(block_i=16, block_n=4, block_d=128, chunk=256), 5)])
def test_the_fused_mlp_computes_the_separate_products(d, i, tiles, programs, dtype):
    """Every layer of a stack, read in place: gate/up, silu(gate) * up and down_proj rounded
    to x's dtype where the separate products round them, within one unit of that dtype at
    the largest output (float32 x: 16, for the float32 sums over 1536 terms in another order
    than float64's), and against the separate path itself (the kernel of models/fp8_gemv.py
    twice and XLA's SiLU) within two."""
    layers = 3
    gate_up, down = stack(d, i, layers, seed=d + i)
    x = jax.random.normal(jax.random.key(1), (1, d), jnp.float32).astype(dtype)
    ws = jnp.zeros((workspace_size(d, i, interpret=True, **tiles),), jnp.int32)
    run = jax.jit(lambda x, layer: fp8_mlp(x, gate_up.q, gate_up.scale, down.q, down.scale,
                                           layer, ws, programs=programs, **tiles))
    eps = max(float(jnp.finfo(dtype).eps), 16 * float(jnp.finfo(jnp.float32).eps))
    for layer in range(layers):
        got = np.asarray(run(x, layer).astype(jnp.float32), np.float64)[0]
        want = rounded_like_the_separate_products(x, gate_up, down, layer)
        scale = np.abs(want).max()
        assert np.abs(got - want).max() <= eps * scale, layer
        g_u = fp8_gemv(x, gate_up.q.reshape(layers, 2 * i, d), gate_up.scale.reshape(
            layers, 2 * i), layer)
        separate = fp8_gemv(jax.nn.silu(g_u[:, :i]) * g_u[:, i:], down.q, down.scale, layer)
        assert np.abs(got - np.asarray(separate.astype(jnp.float32))[0]).max() <= (
            2 * eps * scale), layer


def test_the_kernel_lowers_for_cuda_with_a_release_before_each_count():
    """Lowered for CUDA here (the GPU compiles the payload): one kernel reads the stacked FP8
    weights in place (no slice of a layer, no widened copy); in it every counter is an atomic
    add, acquire-release at GPU scope, and the two that publish stores (a chunk of
    silu(gate) * up, a block's partial sums) follow a CTA barrier; what other programs
    published is read past the L1 cache (volatile loads)."""
    spec = jax.ShapeDtypeStruct
    d, i, layers = 4096, 14336, 4
    text = lowered_for_cuda(
        lambda x, gq, gs, dq, ds, layer, ws: fp8_mlp(x, gq, gs, dq, ds, layer, ws, programs=528,
                                                     interpret=False),
        spec((1, d), jnp.bfloat16), spec((layers, 2, i, d), jnp.float8_e4m3fn),
        spec((layers, 2, i), jnp.float32), spec((layers, d, i), jnp.float8_e4m3fn),
        spec((layers, d), jnp.float32), spec((), jnp.int32),
        spec((workspace_size(d, i),), jnp.int32))
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 1 and f"tensor<{layers}x2x{i}x{d}xf8E4M3FN>" in calls[0]
    assert f"tensor<{layers}x{d}x{i}xf8E4M3FN>" in calls[0]
    assert f"tensor<2x{i}x{d}xf8E4M3FN>" not in text and f"{i}x{d}xbf16" not in text
    (kernel,) = triton_kernels(text)
    lines = [line.strip() for line in kernel.splitlines()]
    atomics = [n for n, line in enumerate(lines) if "tt.atomic_rmw" in line]
    assert atomics and all(re.search(r"tt.atomic_rmw add, acq_rel, gpu, .* -> i32$", lines[n])
                           for n in atomics)
    barriers = [n for n, line in enumerate(lines) if "gpu.barrier" in line]
    assert len(barriers) == 2
    for n in barriers:  # the next memory operation after each barrier is a count
        after = next(line for line in lines[n + 1:] if "tt.load" in line or "tt.store" in line
                     or "tt.atomic_rmw" in line)
        assert "tt.atomic_rmw add" in after, after
    assert sum("isVolatile = true" in line for line in lines if "tt.load" in line) == 2


def test_shapes_and_workspaces_the_kernel_does_not_take_are_refused():
    gate_up, down = stack(256, 512, 2, seed=0)
    x = jnp.ones((1, 256), jnp.bfloat16)
    ws = jnp.zeros((workspace_size(256, 512, interpret=True),), jnp.int32)
    args = (gate_up.q, gate_up.scale, down.q, down.scale, 0)
    with pytest.raises(ValueError, match=r"takes one row \[1, D\], not x \(2, 256\)"):
        fp8_mlp(jnp.ones((2, 256), jnp.bfloat16), *args, ws, interpret=True)
    with pytest.raises(ValueError, match=r"do not fit \(want \[1, D\], \[L, 2, I, D\]"):
        fp8_mlp(x, gate_up.q, gate_up.scale, down.q[:, :128], down.scale, 0, ws,
                interpret=True)
    with pytest.raises(ValueError, match=r"workspace must be int32 zeros of shape \(\d+,\), "
                                         r"got int32 \(3,\)"):
        fp8_mlp(x, *args, jnp.zeros((3,), jnp.int32), interpret=True)
    # SmolLM2's 576 columns: 64 is their largest power-of-two divisor, short of a GPU tile
    assert plan(576, 1536) is None and plan(576, 1536, interpret=True) is not None
    assert workspace_size(576, 1536) == 0
    with pytest.raises(ValueError, match=r"D 576 and I 1536 need power-of-two divisors"):
        fp8_mlp(jnp.ones((1, 576), jnp.bfloat16), *stack(576, 1536, 1, 0)[0][:2],
                *stack(576, 1536, 1, 0)[1][:2], 0, ws, interpret=False)


@pytest.fixture
def mlp_calls(monkeypatch):
    """The fused kernel as it runs, each call's x shape recorded."""
    import models.fp8_mlp

    kernel, calls = models.fp8_mlp.fp8_mlp, []

    def recorded(x, *args, **kwargs):
        calls.append(x.shape)
        return kernel(x, *args, **kwargs)
    monkeypatch.setattr(models.fp8_mlp, "fp8_mlp", recorded)
    return calls


def test_a_one_token_forward_runs_its_mlps_fused_as_three_kernels_run_them(hf_models,
                                                                            mlp_calls,
                                                                            monkeypatch):
    """fp8_gemv="pallas" (kernels interpreted on CPU): a one-token forward (prompts unpadded
    here: a bucket of one token) runs every layer's MLP through the fused kernel and gives the
    logits of three kernels (fp8_fused_mlp=False) up to float32 rounding; a longer forward
    keeps the three kernels."""
    import jax_sp.runner

    monkeypatch.setattr(jax_sp.runner, "MIN_BUCKET", 1)
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (1, 1, 9), seed=11)
    options = CompileOptions(fp8_gemv="pallas")
    three = LLM.from_torch(model, quantization="fp8", options=dataclasses.replace(
        options, fp8_fused_mlp=False))
    fused = LLM.from_torch(model, quantization="fp8", options=options)
    wants = [three.logits([p])[0] for p in prompts[:2]]
    assert not mlp_calls
    for p, want in zip(prompts, wants):
        np.testing.assert_allclose(fused.logits([p])[0], want, rtol=1e-5,
                                   atol=1e-5 * np.abs(want).max())
    assert set(mlp_calls) == {(1, model.config.hidden_size)}
    mlp_calls.clear()
    fused.logits([prompts[2]])  # 9 rows: three kernels
    assert not mlp_calls


@pytest.mark.parametrize("tp", [1, 3])
def test_decoding_one_sequence_runs_its_mlps_fused_on_every_layout(hf_models, tp, mlp_calls):
    """Decoding one prompt (one row a step) with the fused kernel, per device on its third of
    the intermediate features at tp 3 (F 50 padded to 51, 17 a device: odd tiles), gives the
    tokens of three kernels on one device."""
    model = hf_models("llama")
    prompt = random_prompts(model.config.vocab_size, (9,), seed=12)
    three = LLM.from_torch(model, quantization="fp8", options=CompileOptions(
        fp8_gemv="pallas", fp8_fused_mlp=False))
    want = three.generate(prompt, GREEDY)[0].token_ids
    assert not mlp_calls
    fused = LLM.from_torch(model, parallel=ParallelConfig(tp=tp), quantization="fp8",
                           options=CompileOptions(fp8_gemv="pallas"))
    assert fused.generate(prompt, GREEDY)[0].token_ids == want
    assert set(mlp_calls) == {(1, model.config.hidden_size)}


def test_a_fused_mlp_setting_that_is_not_a_bool_is_named():
    with pytest.raises(ValueError, match=r"CompileOptions.fp8_fused_mlp must be True or False, "
                                         r"got 'yes'"):
        CompileOptions(fp8_fused_mlp="yes")
