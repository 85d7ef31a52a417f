"""bridges/intermediate.py: per-rank PyTorch tensors <-> jax-sp's sharded (hidden, residual)."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from bridges.intermediate import from_torch_ranks, to_torch_ranks
from conftest import random_prompts
from jax_sp import LLM, ParallelConfig
from sharding.mesh import make_mesh

MESHES = {tp: make_mesh(tp) for tp in (1, 2, 4, 8)}


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as t, in another memory layout."""
    if how == "transposed":  # column-major storage
        return t.t().contiguous().t()
    if how == "sliced":  # a window into a larger buffer
        big = torch.zeros(t.shape[0] + 3, t.shape[1] + 5, dtype=t.dtype)
        big[2:2 + t.shape[0], 1:1 + t.shape[1]] = t
        return big[2:2 + t.shape[0], 1:1 + t.shape[1]]
    if how == "strided":  # every other row and column of a buffer
        big = torch.zeros(2 * t.shape[0], 2 * t.shape[1], dtype=t.dtype)
        big[::2, ::2] = t
        return big[::2, ::2]
    return t


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tp=st.sampled_from([1, 2, 4, 8]), local=st.integers(1, 6), width=st.integers(1, 12),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       residual=st.sampled_from(["scattered", "full"]),
       how=st.sampled_from(["contiguous", "transposed", "sliced", "strided"]), seed=st.integers(0, 9))
def test_round_trip_gives_each_rank_exactly_its_rows(tp, local, width, dtype, residual, how, seed):
    total = tp * local
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(total, width, generator=gen).to(dtype)
    res = torch.randn(total, width, generator=gen).to(dtype)
    ranks = [{"hidden_states": _layout(hidden[r * local:(r + 1) * local], how),
              "residual": _layout(res[r * local:(r + 1) * local] if residual == "scattered"
                                  else res, how)} for r in range(tp)]
    before = [{k: v.clone() for k, v in d.items()} for d in ranks]
    h, r_ = from_torch_ranks(ranks, MESHES[tp], residual)
    assert h.shape == (total, width) and h.sharding.spec[0] == "tp"
    assert {s.data.shape for s in h.addressable_shards} == {(local, width)}
    back = to_torch_ranks(h, r_, tp, residual)
    for r, (d, old) in enumerate(zip(back, before)):
        assert torch.equal(d["hidden_states"], hidden[r * local:(r + 1) * local])
        want = res[r * local:(r + 1) * local] if residual == "scattered" else res
        assert torch.equal(d["residual"], want)
        assert d["hidden_states"].dtype == dtype
        for k in ("hidden_states", "residual"):  # inputs untouched, outputs are new memory
            assert torch.equal(ranks[r][k], old[k])
            assert d[k].data_ptr() != ranks[r][k].data_ptr()


def test_first_stage_output_is_the_hf_stream_for_a_pytorch_peer(hf_models):
    """What a vLLM PP peer would receive from jax-sp's first stage, all-gathered as vLLM does,
    sums to HF's hidden state after those layers."""
    model = hf_models("llama5")
    prompt = random_prompts(model.config.vocab_size, (16,))
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, pp=2, sp="on"))
    stage = llm.runner.stages[0]
    tokens, lengths = llm._pack(prompt)
    carry = stage.runtime.logits(stage.state, tokens, lengths, sp=True)
    ranks = to_torch_ranks(*carry, tp=2, residual="scattered")
    hidden = torch.cat([d["hidden_states"] for d in ranks])  # all_gather_group receive
    residual = torch.cat([d["residual"] for d in ranks])  # sync_and_gather_intermediate_tensors
    with torch.no_grad():
        want = model(torch.tensor(prompt), output_hidden_states=True).hidden_states[3][0]
    np.testing.assert_allclose((hidden + residual)[:16].numpy(), want.numpy(), atol=1e-5)


@pytest.mark.parametrize("ranks,match", [
    ([{"hidden_states": torch.zeros(2, 4), "residual": torch.zeros(2, 4)}],
     "expected a list of 2 per-rank dicts"),
    ([{"hidden_states": torch.zeros(2, 4), "residual": torch.zeros(2, 4)},
      {"hidden_states": torch.zeros(3, 4), "residual": torch.zeros(2, 4)}],
     r"rank 1: hidden_states has shape \(3, 4\), expected \(2, 4\)"),
    ([{"hidden_states": torch.zeros(2, 4), "residual": torch.zeros(2, 4)},
      {"hidden_states": torch.zeros(2, 4)}], "rank 1: missing torch tensor 'residual'"),
])
def test_bad_rank_lists(ranks, match):
    with pytest.raises(ValueError, match=match):
        from_torch_ranks(ranks, MESHES[2])
