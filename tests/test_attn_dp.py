"""Attention in data-parallel groups (ParallelConfig(attn_dp=G)): HF's logits and greedy tokens
on meshes whose groups really split the batch and the KV heads, the KV cache stored once per
group instead of replicated, each layer's collectives over the axes the rules table gives, and
bad input refused."""

import logging

import jax
import numpy as np
import pytest

from conftest import hf_greedy, hf_logits, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from jax_sp.config import ModelConfig
from jax_sp.generate import Static, abstract_decode_step_args, decode_step_fn
from jax_sp.runtime import Runtime
from jax_sp.serving import Engine
from sharding.hlo import census

# ragged: three sequences of odd lengths (a group at attn_dp 4 gets only padding rows)
LENGTHS = (5, 13, 7)


def _max_diff(got, want):
    assert [g.shape for g in got] == [w.shape for w in want]
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


@pytest.mark.parametrize("kind,tp,attn_dp,sp,comm", [
    ("qwen2", 4, 2, "off", "xla"), ("qwen2", 4, 2, "on", "xla"), ("qwen2", 4, 2, "on", "ring"),
    ("qwen2", 8, 2, "off", "xla"), ("qwen2", 8, 2, "on", "ring"),
    ("qwen2", 8, 4, "off", "xla"), ("qwen2", 8, 4, "on", "xla"), ("qwen2", 8, 4, "on", "ring"),
    ("llama", 4, 2, "on", "xla"), ("llama", 8, 4, "off", "xla")])
def test_logits_and_greedy_tokens_match_hf(hf_models, kind, tp, attn_dp, sp, comm):
    """qwen2: 8 query / 2 KV heads, q/k/v bias, tied embeddings, V 97 and F 76 (no tp divides
    them); llama: 9 query / 3 KV heads, which a group of 2 or 4 devices pads."""
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=tp + attn_dp)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, attn_dp=attn_dp, sp=sp,
                                                        comm=comm), max_seq_len=64)
    assert dict(llm.runtime.mesh.shape) == {"pp": 1, "cfg": 1, "attn_dp": attn_dp,
                                            "attn_tp": tp // attn_dp}
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4
    got = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=8,
                                                                     stop_token_ids=()))]
    assert got == hf_greedy(model, prompts, 8)


def test_prompt_embeds_seeded_sampling_and_fp8_match_plain_tp(hf_models):
    """The tp-rank-aware placement of prompt embeddings over the two axes (SP on), seeded
    sampling, and FP8 weights: the same tokens as plain TP (tp 1 for FP8)."""
    model = hf_models("qwen2")
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=3)
    groups = LLM.from_torch(model, parallel=ParallelConfig(tp=4, attn_dp=2, sp="on"),
                            max_seq_len=64)
    plain = LLM.from_torch(model, parallel=ParallelConfig(tp=4, sp="on"), max_seq_len=64)
    greedy = SamplingParams(max_new_tokens=6, stop_token_ids=())
    from_ids = [c.token_ids for c in groups.generate(prompts, greedy)]
    embeds = groups.embed(prompts)
    assert [c.token_ids for c in groups.generate(prompt_embeds=embeds, sampling=greedy)] == from_ids
    sampled = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=11,
                             stop_token_ids=())
    assert ([c.token_ids for c in groups.generate(prompts, sampled)]
            == [c.token_ids for c in plain.generate(prompts, sampled)])
    fp8 = [c.token_ids for c in LLM.from_torch(model, quantization="fp8").generate(
        prompts, greedy)]
    # decode's FP8 projections through XLA and through the weight-only kernel (interpreted
    # here), whose row-parallel sums run over both group axes
    for gemv in ("xla", "pallas"):
        fp8_groups = LLM.from_torch(model, parallel=ParallelConfig(tp=4, attn_dp=2, sp="off"),
                                    quantization="fp8", options=CompileOptions(fp8_gemv=gemv))
        assert [c.token_ids for c in fp8_groups.generate(prompts, greedy)] == fp8, gemv


@pytest.mark.parametrize("boundary", ["scattered", "gather"])
def test_pipeline_stages_of_attention_groups_match_hf(hf_models, boundary):
    """pp 2 x tp 4 x attn_dp 2 (all eight devices), SP on: each stage's mesh keeps the groups,
    the carry crosses token-sharded over both axes."""
    model = hf_models("llama4")
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=8)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, pp=2, attn_dp=2, sp="on",
                                                        pp_boundary=boundary), max_seq_len=64)
    got = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=6,
                                                                     stop_token_ids=()))]
    assert got == hf_greedy(model, prompts, 6)


def test_serving_engine_slots_split_over_groups(hf_models):
    """The continuous-batching engine on tp 4 x attn_dp 2: its slots (a multiple of the
    groups) and their cache split over the groups; each request gets HF's tokens."""
    model = hf_models("qwen2")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, attn_dp=2, sp="off"),
                         max_seq_len=64)
    prompts = random_prompts(model.config.vocab_size, (6, 11, 3), seed=12)
    with Engine(llm, max_batch=3, steps_per_launch=2) as engine:
        assert engine.slots == 4
        assert engine.caches[0].k.sharding.shard_shape(engine.caches[0].k.shape)[1] == 2
        requests = [engine.submit(p, SamplingParams(max_new_tokens=n, stop_token_ids=()))
                    for p, n in zip(prompts, (5, 7, 4))]
        got = [r.result(timeout=120) for r in requests]
    assert got == [hf_greedy(model, [p], n)[0] for p, n in zip(prompts, (5, 7, 4))]


def test_a_batch_smaller_than_the_groups_runs_and_says_so(hf_models, caplog):
    model = hf_models("qwen2")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=8, attn_dp=4, sp="off"),
                         max_seq_len=64)
    prompt = random_prompts(model.config.vocab_size, (9,), seed=13)
    with caplog.at_level(logging.INFO, logger="jax_sp"):
        got = llm.generate(prompt, SamplingParams(max_new_tokens=5, stop_token_ids=()))
    assert [got[0].token_ids] == hf_greedy(model, prompt, 5)
    assert "1 sequence(s) for 4 attention groups" in caplog.text


# Llama-3-70B's attention shape, cut down: 8 query / 2 KV heads, so tp 8 replicates each KV head
# four times; D 256 and F 512 so that the program compiles in seconds
CFG = ModelConfig(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=2,
                  head_dim=32, intermediate_size=512)


@pytest.mark.parametrize("attn_dp,kv_per_device,replication", [(1, 1, 4), (2, 1, 2), (4, 1, 1)])
def test_kv_cache_is_stored_once_per_group(attn_dp, kv_per_device, replication):
    """KV cache bytes per device at tp 8: plain TP stores each of the 2 KV heads on 4 devices
    and every sequence everywhere; G groups hold B / G sequences each, the heads replicated
    8 / G / 2 times less often (attn_dp 4: each once per group)."""
    rt = Runtime(CFG, ParallelConfig(tp=8, attn_dp=attn_dp))
    cache = jax.jit(lambda: rt.empty_cache(8, 32))()
    shard = cache.k.addressable_shards[0].data.shape
    assert shard == (2, 8 // attn_dp, 32, kv_per_device, 32)
    assert rt.padded_cfg.num_kv_heads == 2 * replication
    per_device = 2 * cache.k.addressable_shards[0].data.nbytes
    whole = 2 * 2 * 8 * 32 * 2 * 32 * 4  # K and V of every sequence and head once, f32
    assert per_device * 8 == whole * replication  # 8 devices hold `replication` copies


def _layer_collectives(text):
    return sorted((c.kind, c.group, c.dims) for c in census(text, CFG.num_layers)
                  if c.scope == "layer")


@pytest.mark.parametrize("attn_dp", [2, 4])
def test_each_layer_moves_tokens_over_the_group_axes(attn_dp):
    """Prefill of 8 x 64 tokens and a decode step of 8 at tp 8 (T rows: 512 and 8). sp off:
    o_proj's partial sums all-reduced over a group's devices on its own rows, the rows
    all-gathered over the groups, down_proj all-reduced over all 8. sp on: attention's
    gather and scatter over a group's devices on its rows, the MLP's over all 8. (XLA:CPU
    writes a reduce-scatter as all-reduce + dynamic-slice; the census names it
    reduce-scatter.)"""
    a = 8 // attn_dp
    for sp in (False, True):
        rt = Runtime(CFG, ParallelConfig(tp=8, attn_dp=attn_dp, sp="on" if sp else "off"))
        prefill = rt.compile_prefill(sp, 8, 64).as_text()
        st = Static.of(rt, "decode", sp)
        step = rt.programs.compile("decode_step", lambda: decode_step_fn(rt, st), st,
                                   abstract_decode_step_args(rt, 8, 128)).as_text()
        for text, t in ((prefill, 512), (step, 8)):
            if sp:
                want = [("all-gather", 8, (t, 256)), ("all-gather", a, (t // attn_dp, 256)),
                        ("reduce-scatter", 8, (t, 256)),
                        ("reduce-scatter", a, (t // attn_dp, 256))]
            else:
                want = [("all-gather", attn_dp, (t, 256)), ("all-reduce", 8, (t, 256)),
                        ("all-reduce", a, (t // attn_dp, 256))]
            assert _layer_collectives(text) == sorted(want), (sp, t)


@pytest.mark.parametrize("kwargs,needle", [
    ({"tp": 4, "attn_dp": 3}, "attn_dp=3 must divide tp=4 (attention runs in attn_dp groups of "
                              "tp / attn_dp devices); use one of [1, 2, 4]"),
    ({"tp": 4, "attn_dp": 0}, "ParallelConfig.attn_dp must be a positive integer, got 0"),
    ({"tp": 2, "attn_dp": True}, "ParallelConfig.attn_dp must be a positive integer, got True"),
    ({"tp": 2, "attn_dp": 2, "comm": "mosaic"}, "not comm='mosaic', cfg=1"),
    ({"tp": 2, "attn_dp": 2, "cfg": 2}, "not comm='xla', cfg=2")])
def test_bad_attn_dp_is_refused_with_what_would_work(kwargs, needle):
    with pytest.raises(ValueError) as e:
        ParallelConfig(**kwargs)
    assert needle in str(e.value)


def test_cli_inspect_prints_the_group_collectives_and_refuses_a_bad_attn_dp(capsys):
    from jax_sp.cli import main as cli

    assert cli(["inspect", "--model", "smollm2", "--layers", "2", "--tp", "4", "--attn-dp", "2",
                "--tokens", "64", "--batch", "2"]) == 0
    out = capsys.readouterr().out
    assert "tp=4 in 2 attention groups" in out
    # sp=off: o_proj's all-reduce over a group's 2 devices on its sequence's 64 rows
    layer = [line.split() for line in out.splitlines() if line.startswith("  layer ")]
    assert ["layer", "all-reduce", "2", "1", "f32[64,576]"] == layer[0][:5]
    assert cli(["inspect", "--tp", "4", "--attn-dp", "3"]) == 2  # a usage error
    assert "attn_dp=3 must divide tp=4" in capsys.readouterr().err


def test_guidance_on_attention_groups_gives_the_tokens_of_one_device(hf_models):
    """Classifier-free guidance (both branches batched) on tp 4 x attn_dp 4: one prompt and
    its unconditional twin fill two rows, padded to four so that each group owns one."""
    model = hf_models("qwen2")
    prompt = random_prompts(model.config.vocab_size, (7,), seed=14)
    s = SamplingParams(max_new_tokens=6, guidance_scale=2.0, stop_token_ids=())
    want = LLM.from_torch(model, max_seq_len=64).generate(prompt, s, negative_prompts=[[5, 6]])
    groups = LLM.from_torch(model, parallel=ParallelConfig(tp=4, attn_dp=4, sp="off"),
                            max_seq_len=64)
    job = groups.runner.guided_batch([np.array(prompt[0], np.int32)], [np.array([5, 6])], 6)
    assert job.batch == 4
    got = groups.generate(prompt, s, negative_prompts=[[5, 6]])
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
