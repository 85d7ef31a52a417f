"""SP really changes the layout: the residual stream's sharding, the collectives XLA emits, and
per-device memory — read from the arrays and the compiled programs, not from flags."""

import dataclasses

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import random_prompts
from jax_sp import LLM, ParallelConfig
from jax_sp.inspect import inspect_modes
from jax_sp.presets import preset
from jax_sp.runtime import Runtime


@pytest.mark.parametrize("tp", [2, 4])
def test_residual_stream_is_token_sharded_with_sp_and_replicated_without(hf_models, tp):
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp))
    prompts = random_prompts(model.config.vocab_size, (37, 5))
    on, off = llm.residual_stream(prompts, sp=True), llm.residual_stream(prompts, sp=False)
    layers, rows, width = on.shape  # [L, B*T, D]
    assert on.sharding.spec in (P(None, "tp"), P(None, "tp", None))
    assert {s.data.shape for s in on.addressable_shards} == {(layers, rows // tp, width)}
    assert off.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(on), np.asarray(off), atol=1e-5)


def _layer_ops(report, cfg):
    """(kind, dims) of each collective in one layer of the scan."""
    return sorted((c.kind, c.dims) for c in report.collectives if c.scope == "layer"
                  for _ in range(c.count // cfg.num_layers))


@pytest.mark.parametrize("tp,tokens", [(2, 64), (4, 96), (8, 64)])
def test_census_sp_swaps_each_all_reduce_for_reduce_scatter_and_all_gather(tp, tokens):
    cfg = dataclasses.replace(preset("smollm2"), num_layers=3, vocab_size=1000)
    off, on = inspect_modes(cfg, tp, tokens)
    td = (tokens, cfg.hidden_size)
    assert _layer_ops(off, cfg) == [("all-reduce", td)] * 2
    assert _layer_ops(on, cfg) == [("all-gather", td)] * 2 + [("reduce-scatter", td)] * 2
    # On CPU the reduce-scatters are all-reduce + dynamic-slice, and the census says so.
    assert all(c.via == "all-reduce+dynamic-slice" for c in on.collectives
               if c.kind == "reduce-scatter")
    wire = [sum(v["wire_bytes"] for v in r.summary(cfg.num_layers)["layer"].values())
            for r in (off, on)]
    assert wire[0] == pytest.approx(wire[1])  # same bytes on the wire per layer


def test_sp_needs_less_memory_per_device_at_4096_tokens():
    cfg = dataclasses.replace(preset("smollm2"), num_layers=2)
    off, on = inspect_modes(cfg, tp=4, tokens=4096)
    assert on.memory["temp_size"] < off.memory["temp_size"]


def test_padding_plan_is_logged_and_applied(caplog):
    cfg = dataclasses.replace(preset("smollm2"), num_layers=1)
    with caplog.at_level("WARNING", logger="jax_sp"):
        rt = Runtime(cfg, ParallelConfig(tp=8))
    assert (rt.padded_cfg.num_heads, rt.padded_cfg.num_kv_heads) == (24, 8)
    assert "9->24" in caplog.text and "2.67x" in caplog.text


@pytest.mark.parametrize("heads,kv_heads,tp", [(6, 2, 4), (8, 2, 4), (9, 3, 8), (12, 4, 8),
                                               (16, 2, 8), (4, 4, 2)])
def test_fused_qkv_padding_matches_separate_head_padding(heads, kv_heads, tp):
    """The fused q/k/v weight padded by group is the per-head padding of q, k and v regrouped:
    query head j of the padded model still reads replica j // (G / r) of its KV head, zero
    groups stay zero, and unpadding gives back the original weight."""
    from bridges.hf import group_qkv
    from sharding.padding import pad_param, plan_padding, unpad_param

    plan = plan_padding(heads, kv_heads, 32, 32, tp)
    rng = np.random.default_rng(heads * tp)
    q, k, v = (rng.standard_normal((5, n, 3)) for n in (heads, kv_heads, kv_heads))
    fused = pad_param(group_qkv(q, k, v, 1), ("embed", "qkv_heads", None, "head_dim"), plan)
    kv_padded = plan.padded_kv_heads
    group = plan.padded_heads // kv_padded
    assert fused.shape == (5, kv_padded, group + 2, 3) and kv_padded % tp == 0
    want = group_qkv(pad_param(q, ("embed", "heads", "head_dim"), plan),
                     pad_param(k, ("embed", "kv_heads", "head_dim"), plan),
                     pad_param(v, ("embed", "kv_heads", "head_dim"), plan), 1)
    np.testing.assert_array_equal(fused, want)
    names = ("embed", "qkv_heads", None, "head_dim")
    np.testing.assert_array_equal(unpad_param(fused, names, plan), group_qkv(q, k, v, 1))


@pytest.mark.parametrize("tp", [2, 3, 8])
def test_one_index_map_pads_and_unpads_every_axis(tp):
    """sharding/padding.py's per-axis index maps describe the padding the streamer, pad_param
    and unpad_param all apply: padding puts x[map[i]] at i and zeros where map[i] is -1 (9 query
    heads, 3 KV heads, vocab 37, MLP 21), and unpadding gives x back."""
    from sharding.padding import index_map, pad_param, plan_padding, unpad_param

    plan = plan_padding(9, 3, 37, 21, tp)
    rng = np.random.default_rng(tp)
    for name, size in (("heads", 9), ("kv_heads", 3), ("vocab", 37), ("mlp", 21)):
        x = rng.standard_normal((2, size, 3)) + 1.0  # no zeros of its own
        names = ("layers", name, None)
        padded = pad_param(x, names, plan)
        index = index_map(name, size, plan)
        assert padded.shape == (2, len(index), 3) and len(index) % tp == 0
        np.testing.assert_array_equal(padded[:, index >= 0], x[:, index[index >= 0]])
        assert not padded[:, index < 0].any()
        np.testing.assert_array_equal(unpad_param(padded, names, plan), x)


@pytest.mark.parametrize("sp", [False, True])
def test_logits_gather_the_logits_not_the_lm_head(sp):
    """The prefill-logits program (LLM.logits, jax-sp inspect) replicates its logits; it must
    all-gather the [T, V/tp] logit shards, never the [D, V] head weight."""
    import re

    cfg = dataclasses.replace(preset("smollm2"), num_layers=1, vocab_size=4096)
    rt = Runtime(cfg, ParallelConfig(tp=4))
    text = rt.compile_prefill(sp, 1, 16, last_only=False).as_text()
    gathered = re.findall(r"= \w+\[([\d,]+)\]\S* all-gather\(", text)
    d, v = cfg.hidden_size, rt.plan.padded_vocab
    assert gathered and not any(s in (f"{d},{v}", f"{v},{d}") for s in gathered), gathered


def test_a_user_flag_wins_by_exact_name(monkeypatch):
    from sharding.xla_options import collective_matmul_options

    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm_any=true")
    assert collective_matmul_options("gpu", "xla", False)[
        "xla_gpu_enable_triton_gemm"] is False
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_enable_triton_gemm=true")
    assert "xla_gpu_enable_triton_gemm" not in collective_matmul_options(
        "gpu", "xla", False)
