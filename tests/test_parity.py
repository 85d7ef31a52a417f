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
