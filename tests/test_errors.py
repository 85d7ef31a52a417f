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


@pytest.mark.parametrize("field,value", [("attention", "flash"), ("decode_unroll", 0),
                                         ("prefill_unroll", -1), ("row_multiple", 2.0),
                                         ("pad_rows_min_weight", 0), ("launch_dependents", "yes"),
                                         ("add_norm", "fused")])
def test_bad_compile_options(field, value):
    from jax_sp import CompileOptions

    with pytest.raises(ValueError, match=f"CompileOptions.{field}.*{value!r}"):
        CompileOptions(**{field: value})


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
    """Token ids as a list, a tuple, numpy integers or a numpy array of any integer type are one
    prompt (floats are refused: test_bad_input_is_named_and_the_engine_keeps_serving)."""
    llm = LLM.from_torch(hf_models("llama"))
    want = llm.logits([[1, 2, 3]])[0]
    for ids in (np.array([1, 2, 3], np.int64), np.array([[1, 2, 3]], np.uint16), (1, 2, 3),
                [np.int8(1), np.uint64(2), 3]):
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


@pytest.fixture(scope="module")
def served(hf_models):
    """One engine that every bad call below is made against: it must keep serving."""
    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=2))
    return llm, llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0].token_ids


@pytest.mark.parametrize("call,error,match", [
    (lambda llm: llm.generate([[1, 2.5]]), TypeError, r"prompt 0 has the token id 2\.5 \(float\)"),
    (lambda llm: llm.generate([[1.0, 2.0]]), TypeError, r"token id 1\.0 \(float\); token ids "
                                                         r"are integers"),
    (lambda llm: llm.generate([np.array([1.0, 2.0])]), TypeError, r"token id 1\.0"),
    (lambda llm: llm.generate([[True, 2]]), TypeError, r"token id True \(bool\)"),
    (lambda llm: llm.generate([[1, 2], None]), TypeError, r"prompt 1 is NoneType; a prompt is a "
                                                           r"string, a list of token ids or a "
                                                           r"conversation"),
    (lambda llm: llm.generate([[1, 2], {"role": "user"}]), TypeError, r"prompt 1 is dict"),
    (lambda llm: llm.generate([[{"role": "robot", "content": "hi"}]]), ValueError,
     r"prompt 0, message 0 is .*'robot'.*a message is \{'role': one of"),
    (lambda llm: llm.generate([[1, 2]], {"max_new_tokens": 3}), TypeError,
     r"sampling must be a SamplingParams, got dict; use SamplingParams\(\*\*\{'max_new_tokens'"),
    (lambda llm: llm.generate([[1, 2]], SamplingParams(stop_token_ids=[3, 101, -1])), ValueError,
     r"stop_token_ids has \[101, -1\] outside the vocabulary \[0, 101\)"),
    (lambda llm: llm.generate(prompt_embeds=[np.full((3, 45), np.nan, np.float32)]), ValueError,
     r"prompt_embeds\[0\] holds nan at \[0, 0\] \(135 values are not finite\)"),
    (lambda llm: llm.generate(prompt_embeds=[np.where(np.arange(90).reshape(2, 45) == 50, np.inf,
                                                      0.0).astype(np.float32)]), ValueError,
     r"holds inf at \[1, 5\]"),
    (lambda llm: llm.generate(["hello"]), ValueError, "text prompts need a tokenizer"),
])
def test_bad_input_is_named_and_the_engine_keeps_serving(served, call, error, match):
    llm, tokens = served
    with pytest.raises(error, match=match):
        call(llm)
    assert llm.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4))[0].token_ids == tokens


@pytest.mark.parametrize("value", [0, -5, 2.5, None])
def test_max_seq_len_must_be_positive_at_load(hf_models, value):
    with pytest.raises(ValueError, match=f"max_seq_len must be a positive integer.*{value!r}"):
        LLM.from_torch(hf_models("llama"), max_seq_len=value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(parallel=ParallelConfig(tp=16)),
     r"16 devices are needed but 8 are present.*XLA_FLAGS=--xla_force_host_platform_device_count"
     r"=16 in the environment before jax is imported"),
    (dict(max_seq_len=0), "max_seq_len must be a positive integer"),
    (dict(dtype="float64"), r"dtype must be one of"),
])
def test_load_configuration_is_checked_before_the_model_is_read(kwargs, match):
    """A path that does not exist: the configuration error comes first."""
    with pytest.raises(ValueError, match=match):
        LLM.from_pretrained("/nowhere/model.gguf", **kwargs)


def test_stage_count_is_checked_before_the_weights_are_read(hf_models, tmp_path):
    """pp against the model's layers needs its config, not its weights: a checkpoint whose weight
    file is cut short still fails on pp."""
    hf_models("llama").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"pp=4 stages cannot split 3 layers"):
        LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(pp=4))
