"""Bad input gets a ValueError that names the value and says what would work."""

import numpy as np
import pytest
import torch
import transformers

from bridges.hf import params_from_state_dict, config_from_hf
from jax_sp import LLM, ParallelConfig, SamplingParams


def test_too_many_devices(hf_models):
    with pytest.raises(ValueError, match=r"tp\*pp = 16\*1 = 16 devices.*8 are present"):
        LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=16))


def test_pp_greater_than_layers(hf_models):
    with pytest.raises(ValueError, match=r"pp=4 stages cannot split 3 layers"):
        LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=1, pp=4))


@pytest.mark.parametrize("field,value", [("sp", "sometimes"), ("comm", "nccl"), ("tp", 0),
                                         ("pp", -1), ("tp", 2.0)])
def test_bad_parallel_values(field, value):
    with pytest.raises(ValueError, match=f"ParallelConfig.{field}.*{value!r}"):
        ParallelConfig(**{field: value})


@pytest.mark.parametrize("field,value", [("max_new_tokens", 0), ("temperature", -0.5),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1),
                                         ("seed", 1.5), ("seed", "7"), ("seed", True)])
def test_bad_sampling_values(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_unsupported_hf_configs_are_refused():
    from bridges.hf import config_from_hf

    base = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="unsupported hidden_act 'gelu'"):
        config_from_hf(transformers.LlamaConfig(**base, hidden_act="gelu"))
    with pytest.raises(ValueError, match=r"sliding-window attention on layers 1\.\.2 only"):
        config_from_hf(transformers.Qwen2Config(**base, use_sliding_window=True,
                                                sliding_window=4, max_window_layers=1))


def test_unsupported_architecture():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="unsupported module GPT2LMHeadModel.*LlamaForCausalLM"):
        LLM.from_torch(gpt2)


def test_missing_and_misshaped_tensors_name_both_sides(hf_models):
    model = hf_models("llama")
    cfg = config_from_hf(model.config)
    sd = dict(model.state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"model.layers.1.mlp.up_proj.weight \(for layers/mlp/w_gate_up_dcf\)"):
        params_from_state_dict(sd, cfg)
    sd = dict(model.state_dict())
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(7, 45)
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(7, 45\).*layers/attn/w_qkv_dkch"):
        params_from_state_dict(sd, cfg)
    sd = dict(model.state_dict())
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match="unexpected.*self_attn.extra.weight"):
        params_from_state_dict(sd, cfg)


@pytest.mark.parametrize("prompts,match", [
    ([[]], "prompt 0 is empty"),
    ([[1, 2], [5, 101]], r"prompt 1 has token id\(s\) \[101\] outside \[0, 101\)"),
    ([[-1]], r"outside \[0, 101\)"),
    ("hello", "non-empty list of prompts"),
])
def test_bad_prompts_and_engine_keeps_serving(hf_models, prompts, match):
    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=2))
    with pytest.raises(ValueError, match=match):
        llm.logits(prompts)
    assert np.isfinite(llm.logits([[1, 2, 3]])[0]).all()


def test_prompt_ids_of_any_integer_form_give_the_same_logits(hf_models):
    """Token ids as a list, a numpy array of any integer type, or integral floats (int() of
    each, as before the check was vectorised) are one prompt."""
    llm = LLM.from_torch(hf_models("llama"))
    want = llm.logits([[1, 2, 3]])[0]
    for ids in (np.array([1, 2, 3], np.int64), np.array([[1, 2, 3]], np.uint16), [1.0, 2.0, 3.0]):
        np.testing.assert_array_equal(llm.logits([ids])[0], want)
    with pytest.raises(ValueError, match=r"token id\(s\) \[4294967295\] outside"):
        llm.logits([np.array([1, 2**32 - 1], np.uint32)])  # not wrapped to -1 by the cast
    with pytest.raises(ValueError, match=r"token id\(s\) \[1180591620717411303424\] outside"):
        llm.logits([[1, 2**70]])  # beyond int64: still the range error


@pytest.mark.parametrize("argv", [["inspect", "--tokens", "0"], ["inspect", "--batch", "0"],
                                  ["inspect", "--pp", "0"], ["generate", "hi", "--tp", "-2"]])
def test_cli_counts_must_be_positive(argv, capsys):
    from jax_sp.cli import main as cli

    with pytest.raises(SystemExit) as exit_:
        cli(argv)
    assert exit_.value.code == 2
    assert f"argument {argv[-2]}: must be a positive integer, got {argv[-1]}" in (
        capsys.readouterr().err)
