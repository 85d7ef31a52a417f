"""FP8 projections (models/quant.py): close to the 16-bit model, the same tokens on every
layout, half the weight bytes, bad settings named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_logits, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from models.quant import quantize_weight

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.mark.parametrize("kind,gemv,quantization", [
    ("llama", "off", "fp8"), ("qwen2", "off", "fp8"), ("llama", "xla", "fp8"),
    ("llama", "xla", "fp8-head"), ("qwen2", "off", "fp8-head")])
def test_fp8_logits_stay_within_e4m3_rounding_of_the_full_model(hf_models, kind, gemv,
                                                                 quantization):
    """Bound: e4m3 keeps 3 mantissa bits, so a value rounds by at most 2^-4 = 6.25% of itself
    and by 2^-4/sqrt(3) = 3.6% RMS. A W8A8 projection (gemv="off": every row count) rounds both
    operands (the token's activations and the weight, each to its own scale), so its output of
    many independent terms is off by about sqrt(2) * 3.6% = 5.1% RMS. The residual stream
    carries every layer's unrounded input past its projections, which keeps the error from
    compounding layer by layer; the logits may be off by up to twice one projection's error
    (10%), and the top-1 token must hold at 85% of the positions. Weight-only (gemv="xla":
    each prompt alone is at most 64 rows) rounds the weight alone: 3.6% per projection, 7.2%
    for the logits. "fp8-head" rounds the LM head's weight as well (the tied embedding's,
    whose lookups then round the inputs too), which lands on the logits directly: one more
    projection's error, 5.1% (W8A8) or 3.6% (weight-only). Measured (2-3 layers): W8A8
    2.6-5.7% and 96-100% top-1, weight-only 2.1-5.2% and 96-100%; with the head 5.2-5.8%
    and 95-100%."""
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, (9, 4, 13, 30), seed=2)
    full = LLM.from_torch(model).logits(prompts)
    llm = LLM.from_torch(model, quantization=quantization,
                         options=CompileOptions(fp8_gemv=gemv))
    dtypes = {k[-1]: str(v.get_value().dtype) for k, v in nnx.to_flat_state(llm.state)}
    head = "embed_vd" if model.config.tie_word_embeddings else "head_dv"
    fp8 = {k for k in dtypes if k.startswith("w_")} | ({head} if quantization == "fp8-head"
                                                        else set())
    assert {dtypes[k] for k in fp8} == {"float8_e4m3fn"}
    assert {dtypes[k] for k in dtypes if k not in fp8 and not k.startswith("s_")} == {"float32"}
    assert {dtypes[f"s_{k}"] for k in fp8} == {"float32"}
    logits = [llm.logits([p])[0] for p in prompts]
    rel = [float(np.linalg.norm(a - b) / np.linalg.norm(a)) for a, b in zip(full, logits)]
    top1 = np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1)
                                   for a, b in zip(full, logits)]))
    bound = 0.10 if gemv == "off" else 0.072
    if quantization == "fp8-head":
        bound += 0.051 if gemv == "off" else 0.036
    assert 0 < max(rel) < bound, rel
    assert top1 >= 0.85, top1


@pytest.mark.parametrize("parallel", [ParallelConfig(),
                                      ParallelConfig(tp=2, sp="on", comm="ring")],
                         ids=["tp1", "tp2-sp-ring"])
def test_w8a8_in_float16_stays_within_the_w8a8_bound(hf_models, parallel):
    """A float16 model (an F16 checkpoint's dtype) runs W8A8 with every product's unscaled sum
    beyond float16's range (each operand spans +-448, one product alone 2e5 > 65504): the sums
    are written in float32 before their scales (`product_dtype`), in XLA's dot and in the ring's
    chunks alike. Bound: the W8A8 bound above (10%) against the full-precision model, float16's
    own rounding (2^-11) being far below e4m3's."""
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (9, 70), seed=3)
    full = LLM.from_torch(model).logits(prompts)
    llm = LLM.from_torch(model, dtype="float16", quantization="fp8", parallel=parallel,
                         options=CompileOptions(fp8_gemv="off"))
    for a, b in zip(full, llm.logits(prompts)):
        b = np.asarray(b, np.float32)
        assert np.isfinite(b).all()
        assert float(np.linalg.norm(a - b) / np.linalg.norm(a)) < 0.10


def test_a_stack_quantized_layer_by_layer_is_the_stack_quantized_whole(hf_models, monkeypatch):
    """A large stacked weight is quantized one layer at a time on load (its float32 copy would
    set the peak memory): the same FP8 values and scales, at tp 2 with padded heads."""
    model = hf_models("llama")
    parallel = ParallelConfig(tp=2)
    whole = LLM.from_torch(model, parallel=parallel, quantization="fp8-head")
    monkeypatch.setattr("jax_sp.runtime.QUANTIZE_BY_LAYER_BYTES", 0)
    by_layer = LLM.from_torch(model, parallel=parallel, quantization="fp8-head")
    a, b = nnx.to_flat_state(whole.state), nnx.to_flat_state(by_layer.state)
    assert [k for k, _ in a] == [k for k, _ in b]
    for (key, x), (_, y) in zip(a, b):
        x, y = x.get_value(), y.get_value()
        assert x.dtype == y.dtype and x.sharding == y.sharding, key
        np.testing.assert_array_equal(np.asarray(x.astype(np.float32)),
                                      np.asarray(y.astype(np.float32)), err_msg=str(key))


@pytest.mark.parametrize("tp,pp,sp,comm", [(2, 1, "off", "xla"), (3, 1, "on", "xla"),
                                           (2, 2, "on", "xla"), (2, 1, "on", "ring"),
                                           (4, 1, "on", "ring")])
def test_fp8_gives_the_tokens_of_fp8_on_one_device_on_every_layout(hf_models, tp, pp, sp, comm):
    """Per-token activation scales span a token's whole row, per-channel weight scales a
    channel's whole input (a row-parallel weight's across its shards): every layout quantizes
    to the same values as one device, padded heads (tp 3, 4), pipeline stages and the ring
    collective matmuls (their FP8 gather and the reduce-scatter's tp-wide token scale)
    included. The prompts run as a prefill of more than 64 rows (W8A8) and decode steps of a
    few (weight-only)."""
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (9, 40, 70), seed=1)
    want = [c.token_ids for c in LLM.from_torch(model, quantization="fp8").generate(prompts,
                                                                                   GREEDY)]
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, pp=pp, sp=sp, comm=comm),
                         quantization="fp8")
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want


def test_the_pallas_weight_only_kernel_gives_the_tokens_of_xla_on_a_split_mesh(hf_models):
    """fp8_gemv="pallas" (interpreted on CPU) per device on its weight shards, the row-parallel
    partial sums added over tp, against the XLA weight-only dot on one device."""
    model = hf_models("qwen2")
    prompts = random_prompts(model.config.vocab_size, (5, 11), seed=3)
    want = [c.token_ids for c in LLM.from_torch(model, quantization="fp8").generate(prompts,
                                                                                   GREEDY)]
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2), quantization="fp8",
                         options=CompileOptions(fp8_gemv="pallas"))
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want


@pytest.mark.parametrize("tp", [1, 2])
def test_one_row_takes_silu_of_gate_times_up_from_the_kernel(monkeypatch, tp):
    """Layout.gated with fp8_gemv="pallas" on one row (a decode step's): gate/up's kernel writes
    silu(gate) * up itself (glu, per device on its shard of F: 25 of the 50 at tp 2), equal to
    XLA's weight-only dot and jax.nn.silu(gate) * up on one device to float32's rounding (the
    same products summed in another order); 3 rows take XLA's SiLU·up after the kernel."""
    import models.fp8_gemv
    from sharding.layout import ShardedLayout
    from sharding.mesh import make_mesh

    d, f = 48, 50
    kx, kw = jax.random.split(jax.random.key(tp))
    w = quantize_weight(jax.random.normal(kw, (d, 2, f), jnp.float32), (0,))
    x = jax.random.normal(kx, (3, d), jnp.float32)
    want = ShardedLayout(make_mesh(1), sp=False, fp8_gemv="xla").gated(x, "TD,DCF->TCF", w)
    kernel, glu = models.fp8_gemv.fp8_gemv, []

    def recorded(x, wq, *args, **kwargs):
        glu.append((x.shape[0], wq.shape[-2], kwargs.get("glu", False)))
        return kernel(x, wq, *args, **kwargs)
    monkeypatch.setattr(models.fp8_gemv, "fp8_gemv", recorded)
    layout = ShardedLayout(make_mesh(tp), sp=False, fp8_gemv="pallas")
    for rows in (1, 3):
        glu.clear()
        got = layout.gated(x[:rows], "TD,DCF->TCF", w)
        assert glu == [(rows, 2 * f // tp, rows == 1)]
        np.testing.assert_allclose(np.asarray(got), np.asarray(want[:rows]), rtol=1e-5,
                                   atol=1e-5 * float(jnp.abs(want).max()))


@pytest.fixture
def kernel_calls(monkeypatch):
    """The FP8 kernel (models/fp8_gemv.py) as it runs, each call recorded as (rows, the rows'
    dtype, quantized: W8A8)."""
    import models.fp8_gemv

    kernel, calls = models.fp8_gemv.fp8_gemv, []

    def recorded(x, *args, **kwargs):
        calls.append((x.shape[0], str(x.dtype), kwargs.get("x_scale") is not None))
        return kernel(x, *args, **kwargs)
    monkeypatch.setattr(models.fp8_gemv, "fp8_gemv", recorded)
    return calls


@pytest.mark.parametrize("tp,sp,gemv", [(2, "off", "pallas-w8a8"), (3, "on", "pallas-w8a8")])
def test_the_w8a8_kernel_computes_what_w8a8_in_xla_computes_on_one_device(hf_models, tp, sp,
                                                                          gemv, kernel_calls):
    """fp8_gemv="pallas-w8a8": few rows quantized per token (each token's scale the maximum
    over every device's features, padded heads at tp 3 included) and multiplied in FP8 by the
    kernel (interpreted on CPU) per device on its weight shards, against "off" (W8A8 in XLA at
    every size) on one device: each prompt alone (at most 64 rows: the kernel's) gives the same
    logits up to float32 rounding, and decoding the same tokens."""
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 11, 30), seed=5)
    off = LLM.from_torch(model, quantization="fp8", options=CompileOptions(fp8_gemv="off"))
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp=sp), quantization="fp8",
                         options=CompileOptions(fp8_gemv=gemv))
    for p in prompts:
        want = off.logits([p])[0]
        np.testing.assert_allclose(llm.logits([p])[0], want, rtol=1e-4,
                                   atol=1e-4 * np.abs(want).max())
    assert ([c.token_ids for c in llm.generate(prompts, GREEDY)]
            == [c.token_ids for c in off.generate(prompts, GREEDY)])
    calls = kernel_calls
    assert calls and all(quantized for *_, quantized in calls)  # every few-row product went
    # through the kernel, quantized


def test_the_mixed_kernel_runs_up_to_16_rows_weight_only_and_more_w8a8(hf_models, kernel_calls):
    """fp8_gemv="pallas-mixed" (the GPU default) at tp 2 with sp, the kernel interpreted: a
    prompt of 5 or 11 tokens (16 rows after the layout's padding) runs weight-only in float16,
    within float16's rounding of the XLA weight-only dot on one device (the bound of the
    "pallas-f16" test above); one of 30 (32 rows) runs W8A8, the logits of "off" on one device
    up to float32 rounding; decoding (3 sequences, 4 rows) gives one device's tokens in the
    same mode;
    one row (a prompt alone on one device) goes in as it is, weight-only."""
    calls, model = kernel_calls, hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 11, 30), seed=7)
    options = CompileOptions(fp8_gemv="pallas-mixed")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"), quantization="fp8",
                         options=options)
    xla = LLM.from_torch(model, quantization="fp8", options=CompileOptions(fp8_gemv="xla"))
    off = LLM.from_torch(model, quantization="fp8", options=CompileOptions(fp8_gemv="off"))
    for p in prompts:
        got = llm.logits([p])[0]
        want = (xla if len(p) <= 16 else off).logits([p])[0]
        err = float(np.abs(got - want).max() / np.abs(want).max())
        assert err < (2 ** -9 if len(p) <= 16 else 1e-4), (len(p), err)
    one = LLM.from_torch(model, quantization="fp8", options=options)
    assert ([c.token_ids for c in llm.generate(prompts, GREEDY)]
            == [c.token_ids for c in one.generate(prompts, GREEDY)])
    w8a8 = {rows for rows, dtype, quantized in calls if quantized}
    assert w8a8 and min(w8a8) > 16  # the 30-token prompt's rows (padded), and only those
    assert {rows for rows, dtype, quantized in calls if dtype == "float16"} == {4, 16}
    assert all(dtype == "float16" for rows, dtype, quantized in calls if 1 < rows <= 16)
    calls.clear()  # one prompt on one device: its decode steps' rows go in as they are
    one.generate(prompts[:1], GREEDY)
    assert {(rows, dtype) for rows, dtype, quantized in calls if rows == 1} == {(1, "float32")}
    assert not any(quantized for *_, quantized in calls)


def test_the_float16_rows_kernel_computes_weight_only_on_a_split_mesh(hf_models, kernel_calls):
    """fp8_gemv="pallas-f16": few-row products weight-only through the kernel (interpreted on
    CPU) per device at tp 2 with sp, 2-64 rows rounded to float16 and one row as it is (float32
    here), against the XLA weight-only dot on one device. Rounding an activation to float16
    moves it by at most 2^-11 of itself, about 2^-12 RMS, so a projection moves by about that
    and the logits (every layer's projections, the residual stream carrying their unrounded
    inputs) by a few times it: within 2^-9 of their largest value, against e4m3's 2^-4 that
    W8A8's rounding of the same rows allows; and the same tokens."""
    calls, model = kernel_calls, hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 11, 30), seed=6)
    xla = LLM.from_torch(model, quantization="fp8", options=CompileOptions(fp8_gemv="xla"))
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"), quantization="fp8",
                         options=CompileOptions(fp8_gemv="pallas-f16"))
    errs = []
    for p in prompts:
        want, got = xla.logits([p])[0], llm.logits([p])[0]
        errs.append(float(np.abs(got - want).max() / np.abs(want).max()))
    assert 0 < max(errs) < 2 ** -9, errs  # rounded, and by float16's rounding only
    assert ([c.token_ids for c in llm.generate(prompts, GREEDY)]
            == [c.token_ids for c in xla.generate(prompts, GREEDY)])
    assert {dtype for rows, dtype, _ in calls if rows > 1} == {"float16"}
    assert not any(quantized for *_, quantized in calls)
    calls.clear()  # one prompt on one device: its decode steps' rows go in as they are
    LLM.from_torch(model, quantization="fp8", options=CompileOptions(
        fp8_gemv="pallas-f16")).generate(prompts[:1], GREEDY)
    assert {dtype for rows, dtype, _ in calls if rows == 1} == {"float32"}


@pytest.mark.parametrize("kind,tp,sp,comm,gemv", [("llama", 3, "on", "ring", "xla"),
                                                  ("qwen2", 2, "off", "xla", "pallas")])
def test_an_fp8_head_gives_the_tokens_of_one_device_on_a_split_mesh(hf_models, kind, tp, sp,
                                                                    comm, gemv):
    """The LM head in FP8 split over the vocabulary (101 -> 102 at tp 3: a zero row of scale
    1; a tied embedding looked up in FP8 over its vocabulary shards), the tokens and the
    input embeddings of one device."""
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, (9, 40, 70), seed=4)
    one = LLM.from_torch(model, quantization="fp8-head")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp=sp, comm=comm),
                         quantization="fp8-head", options=CompileOptions(fp8_gemv=gemv))
    assert ([c.token_ids for c in llm.generate(prompts, GREEDY)]
            == [c.token_ids for c in one.generate(prompts, GREEDY)])
    np.testing.assert_array_equal(llm.embed(prompts[:1])[0], one.embed(prompts[:1])[0])
    # every position's logits: 70 rows run the head W8A8 (through the ring with comm="ring")
    for got, want in zip(llm.logits(prompts), one.logits(prompts)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    if model.config.tie_word_embeddings:  # the FP8 rows widened, not the 16-bit table
        assert not np.array_equal(one.embed(prompts[:1])[0],
                                  LLM.from_torch(model).embed(prompts[:1])[0])


def test_fp8_weights_take_at_most_0_6_of_the_bf16_bytes_for_llama3_8b():
    """The projections in one byte per value plus a float32 per output channel; the embedding
    and LM head stay in bfloat16. Abstract parameters: nothing is allocated."""
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime

    cfg = preset("llama3-8b")

    def weight_bytes(quantization):
        rt = Runtime(cfg, ParallelConfig(tp=1), "bfloat16", quantization=quantization)
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(rt.abstract_state()))

    bf16 = weight_bytes(None)
    ratio = weight_bytes("fp8") / bf16
    assert 0.5 < ratio <= 0.6, ratio
    # the LM head (1.05 GB in bf16) in FP8 too: only the embedding stays 16-bit
    assert 0.5 < weight_bytes("fp8-head") / bf16 <= 0.54


QUESTION = "What is the capital of France?"
CLEAR = QUESTION + " Reply with the name of the city only."


@pytest.mark.parametrize("quantization", ["fp8", "fp8-head"])
def test_the_embedded_model_still_answers_in_fp8(smollm2, quantization):
    """FP8 answers with Paris where the unquantized model's answer does not hang on a
    near-tie: asking for the city's name only, the HF model's (float32) every token up to
    "Paris" leads the next by at least 1 logit, five times what FP8 moved the bare question's
    two leading first tokens apart (0.21 with FP8 weights, 0.16 with the FP8 head too). The bare
    question itself is answered with FP8 weights; with the FP8 head too its first token is a
    tie (the unquantized model leads "The" over "L" by 0.08) that the rounding flips, to
    "L'Étoile..." (docs/fp8.md)."""
    cfg, params, tokenizer, module = smollm2
    llm = LLM(cfg, params, parallel=ParallelConfig(tp=2, sp="on"), tokenizer=tokenizer,
              quantization=quantization)
    questions = [CLEAR] + ([QUESTION] if quantization == "fp8" else [])
    outs = llm.generate(questions, SamplingParams(max_new_tokens=12))
    for question, out in zip(questions, outs):
        assert "Paris" in out.text, (question, out.text)
    prompt, answer = llm.encode(CLEAR, chat=True), list(outs[0].token_ids)
    upto = next(i for i in range(1, len(answer) + 1)
                if "Paris" in tokenizer.decode(answer[:i]))
    (logits,) = hf_logits(module, [prompt + answer[:upto]])
    logits = logits[len(prompt) - 1:-1]  # [upto, V]: those that chose each answer token
    assert logits.argmax(-1).tolist() == answer[:upto]  # the unquantized model's answer
    top2 = np.sort(logits, axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() >= 1.0


@pytest.mark.parametrize("kwargs,match", [
    ({"quantization": "int4"}, r"quantization must be one of \(None, 'fp8', 'fp8-head'\), got 'int4'"),
    ({"quantization": "fp8", "parallel": ParallelConfig(tp=2, sp="on", comm="mosaic")},
     r"runs with comm='xla' or 'ring'.*comm='mosaic' has no FP8 kernel"),
])
def test_bad_quantization_settings_are_named(hf_models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM.from_torch(hf_models("llama"), **kwargs)


def test_an_unknown_fp8_gemv_is_named():
    with pytest.raises(ValueError, match=r"CompileOptions.fp8_gemv must be one of "
                                         r"\('auto', 'pallas', 'xla', 'off', 'pallas-w8a8', "
                                         r"'pallas-mixed', 'pallas-f16'\), "
                                         r"got 'cublas'"):
        CompileOptions(fp8_gemv="cublas")


def test_from_pretrained_checks_quantization_before_reading_anything(tmp_path):
    with pytest.raises(ValueError, match="quantization must be one of"):
        LLM.from_pretrained(str(tmp_path / "nothing here"), quantization="fp4")


def test_training_refuses_an_fp8_model(hf_models):
    from jax_sp.train import TrainConfig, Trainer

    llm = LLM.from_torch(hf_models("llama"), quantization="fp8")
    with pytest.raises(ValueError, match="training updates 16/32-bit weights"):
        Trainer(llm.runtime, TrainConfig(), sp=False)
