"""An FP8 KV cache (CompileOptions(kv_cache_dtype="fp8")): keys and values stored as
float8_e4m3fn and widened as attention reads them. Close to the full-precision cache, the same
tokens on every layout and through the serving engine, half the bytes, bad settings named."""

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lowered_for_cuda, random_prompts, triton_kernels
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from jax_sp.serving import Engine
from models.attention import XLA, Forward
from models.cache import KVCache, to_cache
from models.layout import DENSE
from test_decode_attention import _inputs, _llama

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fp8_accuracy import cached_logits  # noqa: E402

FP8 = CompileOptions(kv_cache_dtype="fp8")
F8 = jnp.float8_e4m3fn
GREEDY = SamplingParams(max_new_tokens=8)


def test_cache_values_saturate_and_a_nan_is_stored_as_0():
    x = jnp.asarray([1e4, -1e4, 448.0, 300.0, 0.1, -3.0], jnp.float32)
    got = np.asarray(to_cache(x, F8).astype(jnp.float32))
    assert np.isfinite(got).all()
    np.testing.assert_array_equal(got[:3], [448.0, -448.0, 448.0])
    # within e4m3's rounding (3 mantissa bits: 2^-4 of the value) elsewhere
    np.testing.assert_allclose(got[3:], [300.0, 0.1, -3.0], rtol=2 ** -4)
    assert np.isnan(np.asarray(x.astype(F8).astype(jnp.float32))[0])  # what it replaces
    for given in (jnp.float32, jnp.bfloat16, jnp.float16):  # every cache stays finite
        y = jnp.asarray([jnp.nan, jnp.inf, -jnp.inf, 2.0 ** 15, 1.5], given)
        for dtype in (F8, jnp.float16, jnp.bfloat16, jnp.float32):
            got = np.asarray(to_cache(y, dtype).astype(jnp.float32))
            top = float(jnp.finfo(dtype).max)
            np.testing.assert_array_equal(got, [0.0, top, -top, min(2.0 ** 15, top), 1.5])


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_the_kernel_on_an_fp8_cache_equals_xla_s_attention_on_it(dtype, tol):
    """The fused decode kernel (interpreted) reads the FP8 cache, widens it in registers, and
    stores the new key and value saturated; XLA's backend writes through `to_cache` and widens
    the layer it reads. 3 sequences, 2 KV heads of 3 query heads, 96 slots, blocks of 16 keys
    in 2 splits; one new value past e4m3's range. In bf16 (the tables too, as the model makes
    them) both store the same FP8 keys: rotated in float32 and rounded once."""
    import models.decode_attention as da

    qkv, cos, sin, kc, vc = _inputs(3, 2, 3, 16, 3, 96, rows=5)
    qkv, cos, sin = qkv.astype(dtype), cos.astype(dtype), sin.astype(dtype)
    qkv = qkv.at[1, 0, 4, 5].set(1e4)  # sequence 1's new value, head 0: saturates at 448
    kc, vc = to_cache(kc, F8), to_cache(vc, F8)
    positions, kv_len = jnp.asarray([0, 21, 70]), jnp.asarray([1, 22, 71])
    out, k2, v2 = jax.jit(da.decode_attention, static_argnames=("block_s", "max_splits",
                                                                "interpret"))(
        qkv, cos, sin, kc, vc, 1, positions, kv_len, block_s=16, max_splits=2, interpret=True)
    assert k2.dtype == v2.dtype == F8
    fwd = Forward(positions[:, None], kv_len, (cos[:, None], sin[:, None]), False, DENSE, XLA)
    want, cache = XLA(qkv[:3], fwd, KVCache(kc, vc), 1, 0)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want[:, 0], np.float32),
                               atol=tol, rtol=tol)
    for got, ref in ((k2, cache.k), (v2, cache.v)):
        np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                      np.asarray(ref.astype(jnp.float32)))
    assert float(v2[1, 1, 21, 0, 5].astype(jnp.float32)) == 448.0
    # the FP8 cache moved the output by about e4m3's rounding, not more: against the same
    # step on the unrounded cache (the sequences without the saturated value)
    _, _, kc0, vc0 = _inputs(3, 2, 3, 16, 3, 96, rows=5)[1:]
    exact, _ = XLA(qkv[:3], fwd, KVCache(kc0, vc0), 1, 0)
    rel = float(jnp.linalg.norm((want - exact)[::2]) / jnp.linalg.norm(exact[::2]))
    assert 0 < rel < 2 ** -4 * 2, rel


@pytest.mark.parametrize("batch", [1, 32])
def test_the_fused_kernel_lowers_for_cuda_and_reads_the_fp8_cache_itself(batch):
    """Lowered for CUDA here (Pallas' Triton lowering; the GPU compiles its payload): the
    kernel takes the FP8 cache as it lies, with no widened copy of it made before the call;
    inside (its Triton IR) it loads blocks of FP8 keys and values, widens them to float16 in
    registers (q is bfloat16: e4m3 widens to float16 in one instruction a pair), runs both dots
    in float16, and stores the new key and value rounded to FP8. Batch 1 splits the keys over
    programs; batch 32 (x 8 KV heads) walks whole rows."""
    import models.decode_attention as da

    spec = jax.ShapeDtypeStruct
    cache = spec((2, batch, 512, 8, 128), F8)
    text = lowered_for_cuda(
        lambda *a: da.decode_attention(*a, interpret=False),
        spec((batch, 8, 6, 128), jnp.bfloat16), spec((batch, 128), jnp.float32),
        spec((batch, 128), jnp.float32), cache, cache, spec((), jnp.int32),
        spec((batch,), jnp.int32), spec((batch,), jnp.int32))
    call = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(call) == 1
    fp8, wide = f"tensor<2x{batch}x512x8x128xf8E4M3FN>", f"tensor<2x{batch}x512x8x128xbf16>"
    assert call[0].count(fp8) >= 2 and wide not in text  # both caches in, none widened
    (kernel,) = triton_kernels(text)
    blocks = re.findall(r"(%\d+) = tt.load \S+ : tensor<64x\d+x!tt.ptr<f8E4M3FN>>", kernel)
    assert len(blocks) >= 2  # keys and values, block by block
    for block in blocks:
        assert re.search(rf"tt.fp_to_fp {block} : tensor<64x\d+xf8E4M3FN> -> "
                         rf"tensor<64x\d+xf16>", kernel)
    dots = re.findall(r"tt.dot .* : tensor<(\d+x\d+x\w+)> \* tensor<(\d+x\d+x\w+)>", kernel)
    assert len(dots) == 3 and all(a.endswith("xf16") and b.endswith("xf16") for a, b in dots)
    assert len(re.findall(r"tt.store \S+, \S+ : tensor<\d+x!tt.ptr<f8E4M3FN>>", kernel)) >= 2


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fp8_cache_logits_stay_within_e4m3_rounding(hf_models, kind):
    """The limit, an estimate rather than a bound: e4m3 rounds a value by at most 2^-4 and
    2^-4/sqrt(3) = 3.6% RMS. The cache rounds keys and values, each one operand of one of
    attention's two products: the attention output is off by about sqrt(2) * 3.6% = 5.1%, and
    the residual stream carries every layer's unrounded input past it, so on these small
    random models the logits stay within that; the top-1 token must hold at 85% of the
    positions (the FP8 weights' limit, tests/test_quant.py). Measured: 0.9-1.9% and 100%
    (docs/fp8.md's table); the embedded SmolLM2, whose keys are larger and uneven, 6.5-8.0%
    and 98%. The full-precision (float32) cache read the same way gives the full prefill's
    logits, so the difference is the FP8 cache's."""
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, (9, 13, 30, 61), seed=2)
    full, kv = LLM.from_torch(model), LLM.from_torch(model, options=FP8)
    assert kv.runtime.cache_dtype == F8 and full.runtime.cache_dtype == jnp.float32
    rel, same = [], []
    for p in prompts:
        want = full.logits([p])[0][len(p) // 2:]
        np.testing.assert_allclose(cached_logits(full, p, len(p) // 2), want, atol=1e-4,
                                   rtol=1e-4)
        got = cached_logits(kv, p, len(p) // 2)
        rel.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
        same.append(got.argmax(-1) == want.argmax(-1))
    assert 0 < max(rel) < 0.051, rel
    assert np.mean(np.concatenate(same)) >= 0.85


@pytest.mark.parametrize("parallel,options,split", [
    (ParallelConfig(tp=2, sp="on"), FP8, 0.5),
    (ParallelConfig(tp=3, sp="on"), FP8, 0.5),  # 2 KV heads padded to 3 devices
    # one token over the cache: a decode step, through the fused kernel per device
    (ParallelConfig(tp=2), CompileOptions(kv_cache_dtype="fp8", attention="pallas"), 1.0),
], ids=["tp2-sp", "tp3-sp", "tp2-pallas"])
def test_an_fp8_cache_gives_one_device_s_logits_on_every_layout(parallel, options, split):
    """Each value rounds on its own (no scale shared across devices), so a layout stores the
    values one device stores, up to a value computed in another order landing across a
    rounding boundary: its logits over the FP8 cache stay within a tenth of what the FP8 cache
    itself moves them from the float32 cache's."""
    model = _llama()
    one, full = LLM.from_torch(model, options=FP8), LLM.from_torch(model)
    llm = LLM.from_torch(model, parallel=parallel, options=options)
    assert llm.runtime.cache_dtype == F8
    for p in random_prompts(model.config.vocab_size, (17, 30), seed=2):
        at = min(len(p) - 1, int(len(p) * split))
        want, exact = cached_logits(one, p, at), cached_logits(full, p, at)
        gap = np.linalg.norm(want - exact)
        assert gap > 0
        assert np.linalg.norm(cached_logits(llm, p, at) - want) < gap / 10


def test_an_fp8_cache_gives_the_tokens_of_one_device_through_pipeline_stages():
    """tp 4 (KV heads padded to 4) in 2 stages: every stage's cache in FP8, one device's
    tokens."""
    model = _llama()
    prompts = random_prompts(model.config.vocab_size, (5, 17, 3), seed=2)
    want = [c.token_ids for c in LLM.from_torch(model, options=FP8).generate(prompts, GREEDY)]
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, pp=2), options=FP8)
    assert [st.runtime.cache_dtype for st in llm.runner.stages] == [F8, F8]
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want


def test_the_serving_engine_keeps_an_fp8_cache_and_generate_s_tokens(hf_models):
    model = hf_models("llama")
    llm = LLM.from_torch(model, options=FP8, max_seq_len=64)
    prompts = random_prompts(model.config.vocab_size, (9, 30, 4), seed=3)
    want = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    # chunks of 16: the 30-token prompt's second chunk attends over its first in the slot's
    # FP8 rows
    with Engine(llm, max_batch=2, prefill_chunk=16) as engine:
        assert {c.dtype for c in jax.tree.leaves(engine.caches)} == {jnp.dtype(F8)}
        got = [r.result() for r in [engine.submit(p, GREEDY) for p in prompts]]
    assert got == want


def test_an_fp8_cache_takes_half_a_16_bit_cache_s_bytes(hf_models):
    model = hf_models("llama")
    caches = [LLM.from_torch(model, dtype="bfloat16", options=o).runtime.abstract_cache(4, 64)
              for o in (CompileOptions(), FP8)]
    nbytes = [sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(c)) for c in caches]
    assert [c.k.dtype for c in caches] == [jnp.bfloat16, F8]
    assert nbytes[1] * 2 == nbytes[0]


def test_the_embedded_model_still_answers_with_an_fp8_cache(smollm2):
    cfg, params, tokenizer, _ = smollm2
    llm = LLM(cfg, params, parallel=ParallelConfig(tp=2, sp="on"), tokenizer=tokenizer,
              options=FP8)
    (out,) = llm.generate(["What is the capital of France?"], SamplingParams(max_new_tokens=12))
    assert "Paris" in out.text, out.text


def test_an_unknown_kv_cache_dtype_is_named():
    with pytest.raises(ValueError, match=r"CompileOptions.kv_cache_dtype must be one of "
                                         r"\('auto', 'fp8'\), got 'int8'"):
        CompileOptions(kv_cache_dtype="int8")


def test_the_cli_passes_the_kv_cache_dtype(monkeypatch):
    from jax_sp import cli

    seen = {}
    monkeypatch.setattr(LLM, "from_pretrained", classmethod(
        lambda cls, name, **kw: seen.update(kw)))
    cli._load(cli.build_parser().parse_args(["generate", "--kv-cache-dtype", "fp8", "hi"]))
    assert seen["options"].kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "--kv-cache-dtype", "int8", "hi"])


@pytest.mark.parametrize("options,quantization,why", [
    (CompileOptions(), "fp8", r"quantization='fp8' needs FP8 matmuls: NVIDIA A100 \(compute "
                              r"capability 8.0\) has none; use an H100/H200 or newer, or "
                              r"quantization=None"),
    (FP8, None, r"kv_cache_dtype='fp8' needs FP8 conversions: NVIDIA A100 \(compute capability "
                r"8.0\) has none; use an H100/H200 or newer, or kv_cache_dtype='auto'"),
])
def test_fp8_on_a_gpu_before_hopper_is_named(options, quantization, why):
    """The check the runtime makes of its mesh's devices (described here: this machine has no
    GPU); an H200 and CPU devices pass, and nothing FP8 checks nothing."""
    from types import SimpleNamespace

    from jax_sp.config import check_devices_for

    def device(cc, kind):
        return SimpleNamespace(platform="gpu", compute_capability=cc, device_kind=kind)

    a100 = device("8.0", "NVIDIA A100")
    with pytest.raises(ValueError, match=why):
        check_devices_for(options, quantization, [device("9.0", "NVIDIA H200"), a100])
    check_devices_for(options, quantization, [device("9.0", "NVIDIA H200"), *jax.devices()])
    check_devices_for(CompileOptions(), None, [a100])
