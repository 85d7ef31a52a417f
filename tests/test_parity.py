"""Prefill logits equal HF transformers' in fp32 on meshes that really split the model."""

import numpy as np
import pytest

from conftest import hf_logits, random_prompts
from jax_sp import LLM, ParallelConfig

LENGTHS = (1, 7, 37, 64)  # one ragged batch: padding, odd counts, a full bucket


def _max_diff(got, want):
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
@pytest.mark.parametrize("sp", ["off", "on", "auto"])
def test_logits_match_hf(hf_models, kind, tp, sp):
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=tp)
    # auto with a threshold between the two calls below: the batch runs SP, the short one TP
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp=sp, sp_min_tokens=64))
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4
    short = prompts[1:2]
    assert _max_diff(llm.logits(short), hf_logits(model, short)) <= 1e-4


@pytest.mark.parametrize("tp", [2, 4])
def test_mistral_sliding_window_matches_hf(hf_models, tp):
    model = hf_models("mistral")
    prompts = random_prompts(model.config.vocab_size, (37, 20))
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="on"))
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4


@pytest.mark.parametrize("max_window_layers,window", [(28, 0), (0, 4)])
def test_qwen2_sliding_window_follows_max_window_layers(max_window_layers, window):
    """Qwen2 slides on layers >= max_window_layers only (28 by default: none of these two)."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
        max_window_layers=max_window_layers, max_position_embeddings=256)).eval()
    prompts = random_prompts(97, (12, 9), seed=1)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2))
    assert llm.cfg.sliding_window == window
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4


def test_bfloat16_close_to_fp32(hf_models):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (37,))
    want = hf_logits(model, prompts)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, sp="on"), dtype="bfloat16")
    got = llm.logits(prompts)
    assert 0 < _max_diff(got, want) <= 0.1  # bf16 really ran (not fp32), and stayed close
    assert llm.state["embed_vd"][...].dtype.name == "bfloat16"


def test_long_prefill_runs_attention_in_query_chunks_and_matches_hf(hf_models):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (1030, 3))  # bucket 2048 > Q_CHUNK
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"))
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4


def test_rope_tables_match_hf_rotary_far_out(hf_models):
    """RoPE angles (llama3 scaling) agree with HF's float32 rotary embedding up to position
    8191, where a frequency off by one bf16 ulp would move an angle by radians."""
    import torch

    from bridges.hf import config_from_hf
    from models.llama import rope_tables

    model = hf_models("llama")
    positions = np.arange(0, 8192, 7, dtype=np.int32)[None]
    cos, sin = rope_tables(config_from_hf(model.config), positions, np.float32)
    with torch.no_grad():
        want = model.model.rotary_emb(torch.zeros(1), torch.tensor(positions, dtype=torch.long))
    np.testing.assert_allclose(cos, want[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(sin, want[1].numpy(), atol=1e-5)


def test_module_cast_to_bf16_warns_about_its_rounded_rope_buffer(hf_models, caplog):
    import copy

    import torch

    model = copy.deepcopy(hf_models("llama"))
    with caplog.at_level("WARNING", logger="bridges.hf"):
        LLM.from_torch(model)
    assert "inv_freq" not in caplog.text  # float32 buffer: nothing to say
    with caplog.at_level("WARNING", logger="bridges.hf"):
        LLM.from_torch(model.to(torch.bfloat16), dtype="bfloat16")
    assert "inv_freq buffer is torch.bfloat16" in caplog.text and "from_config" in caplog.text
