"""Classifier-free guidance (SamplingParams(guidance_scale=s), generate(negative_prompts=...)):
the greedy tokens transformers' generate(guidance_scale=..., negative_prompt_ids=...) gives,
sampling reproducible per seed, torch inputs of any strides read without being written or
kept, and bad input refused."""

import numpy as np
import pytest
import torch

from conftest import random_prompts
from jax_sp import LLM, ParallelConfig, SamplingParams
from jax_sp.engine import _token_ids
from jax_sp.serving import Engine

EOS = 2  # the tiny Llama config's


@pytest.fixture(scope="module")
def tiny(hf_models):
    model = hf_models("llama")
    return model, LLM.from_torch(model, max_seq_len=96)


def hf_guided(model, prompt, negative, scale, n):
    """transformers' tokens for one prompt (ending at its EOS, included, as ours do)."""
    kw = {} if negative is None else {"negative_prompt_ids": torch.tensor([negative])}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             guidance_scale=scale, pad_token_id=0, eos_token_id=EOS, **kw)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("parallel,scale", [
    (ParallelConfig(tp=1), 1.5), (ParallelConfig(tp=1), 3.0), (ParallelConfig(tp=2, sp="off"), 1.5),
    (ParallelConfig(tp=2, sp="on"), 3.0), (ParallelConfig(cfg=2), 1.5),
    (ParallelConfig(tp=2, sp="off", cfg=2), 3.0), (ParallelConfig(tp=2, sp="on", cfg=2), 1.5)])
def test_greedy_tokens_are_transformers(tiny, parallel, scale):
    """Three prompts of odd lengths in one batch: two with negative prompts of their own
    lengths, one guided by its last token; both branches batched on the same devices (cfg 1)
    or each on its half of them (cfg 2)."""
    model, llm = tiny
    if parallel != ParallelConfig():
        llm = LLM.from_torch(model, parallel=parallel, max_seq_len=96)
    prompts = random_prompts(llm.cfg.vocab_size, (7, 12, 3), seed=20)
    negatives = random_prompts(llm.cfg.vocab_size, (3, 9), seed=21)
    s = SamplingParams(max_new_tokens=10, guidance_scale=scale, stop_token_ids=(EOS,))
    got = [c.token_ids for c in llm.generate(prompts, s, negative_prompts=negatives)]
    want = [hf_guided(model, p, n, scale, 10) for p, n in zip(prompts, negatives + [None])]
    assert got == want
    plain = [c.token_ids for c in llm.generate(prompts, SamplingParams(
        max_new_tokens=10, stop_token_ids=(EOS,)))]
    assert plain != got  # guidance changed something


def test_seeded_sampling_is_reproducible_its_own_and_the_same_on_both_layouts(tiny):
    model, llm = tiny
    prompts = random_prompts(llm.cfg.vocab_size, (6, 11), seed=22)
    s = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=30, seed=5, guidance_scale=2.0,
                       stop_token_ids=())
    first = [c.token_ids for c in llm.generate(prompts, s, negative_prompts=[[4, 5]])]
    assert first == [c.token_ids for c in llm.generate(prompts, s, negative_prompts=[[4, 5]])]
    split = LLM.from_torch(model, parallel=ParallelConfig(tp=2, cfg=2), max_seq_len=96)
    assert first == [c.token_ids for c in split.generate(prompts, s, negative_prompts=[[4, 5]])]
    other = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=30, seed=6,
                           guidance_scale=2.0, stop_token_ids=())
    assert first != [c.token_ids for c in llm.generate(prompts, other,
                                                       negative_prompts=[[4, 5]])]


def test_cfg_2_splits_the_batch_and_combines_with_one_collective_a_step(tiny):
    """cfg 2, tp 1: the cache's batch lies on the two halves, and the decode loop's only
    collective is the all-gather of the step's logits over the halves."""
    import re

    model, _ = tiny
    llm = LLM.from_torch(model, parallel=ParallelConfig(cfg=2), max_seq_len=96)
    s = SamplingParams(max_new_tokens=6, guidance_scale=2.5, stop_token_ids=())
    llm.generate([[3, 4, 5], [9, 8]], s, negative_prompts=[[1]])
    assert llm.runtime.cache_sharding().spec[1] == "cfg"
    hlo = llm.programs.hlo("decode")
    ops = re.findall(r"= \S+ (all-gather|all-reduce|collective-permute|all-to-all|"
                     r"reduce-scatter)(?:-start)?\(", hlo)
    assert ops == ["all-gather"], ops


def test_torch_prompts_of_any_strides_are_read_not_written_or_kept(tiny):
    """Prompts and negative prompts as transposed, strided and sliced tensors give what the
    same ids as lists give; the tensors are unchanged and no array the engine makes shares
    their memory."""
    _, llm = tiny
    grid = torch.arange(3, 3 + 8 * 6).reshape(8, 6) % llm.cfg.vocab_size
    prompts = grid.T  # [6, 8], transposed: rows are strided columns of grid
    wide = (torch.arange(40).reshape(2, 20) * 7 + 1) % llm.cfg.vocab_size
    negatives = [wide[0, ::3], wide[1, 2:7]]  # strided, sliced
    assert not prompts.is_contiguous() and not negatives[0].is_contiguous()
    before = [t.clone() for t in (prompts, *negatives)]
    s = SamplingParams(max_new_tokens=5, guidance_scale=1.7, stop_token_ids=())
    got = [c.token_ids for c in llm.generate(prompts, s, negative_prompts=negatives)]
    lists = [c.token_ids for c in llm.generate(prompts.tolist(), s,
                                               negative_prompts=[n.tolist() for n in negatives])]
    assert got == lists
    assert all(torch.equal(t, b) for t, b in zip((prompts, *negatives), before))
    for i, t in enumerate((prompts[1], *negatives)):
        ids = _token_ids(i, t)
        assert ids.tolist() == t.tolist() and not np.shares_memory(ids, t.numpy())
    array = np.arange(10, 20)
    assert not np.shares_memory(_token_ids(0, array), array)


def test_bad_guidance_input_is_refused(tiny, hf_models):
    model, llm = tiny
    prompts = [[1, 2, 3], [4, 5]]
    for bad in (0, -1.5, "2", True):
        with pytest.raises(ValueError, match="guidance_scale must be a number > 0"):
            SamplingParams(guidance_scale=bad)
    s = SamplingParams(max_new_tokens=3, guidance_scale=2.0)
    with pytest.raises(ValueError, match="3 negative prompts for 2 prompts"):
        llm.generate(prompts, s, negative_prompts=[[1], [2], [3]])
    with pytest.raises(ValueError, match="set SamplingParams\\(guidance_scale=s\\)"):
        llm.generate(prompts, SamplingParams(max_new_tokens=3), negative_prompts=[[1]])
    with pytest.raises(ValueError, match="negative prompt 0 has 95 tokens"):
        llm.generate(prompts, s, negative_prompts=[[1] * 95])
    with pytest.raises(ValueError, match="takes token prompts, not prompt_embeds"):
        llm.generate(prompt_embeds=[np.zeros((3, llm.cfg.hidden_size), np.float32)],
                     sampling=s)
    with pytest.raises(ValueError, match="stream does not run classifier-free guidance"):
        next(iter(llm.stream([1, 2], s)))
    with Engine(llm, max_batch=2) as engine:
        with pytest.raises(ValueError, match="does not run classifier-free guidance"):
            engine.submit([1, 2], s)
    with pytest.raises(ValueError, match="cfg must be 1 .* or 2 .*, got 3"):
        ParallelConfig(cfg=3)
    with pytest.raises(ValueError, match=r"cfg=2\) runs one pipeline stage with comm='xla'"):
        ParallelConfig(cfg=2, comm="ring", tp=2)
    with pytest.raises(ValueError, match=r"tp\*pp\*cfg = 8\*1\*2 = 16 devices"):
        LLM.from_torch(model, parallel=ParallelConfig(tp=8, cfg=2))
    with pytest.raises(ValueError, match="build the LLM with ParallelConfig\\(cfg=1\\)"):
        Engine(LLM.from_torch(model, parallel=ParallelConfig(cfg=2), max_seq_len=96))
    piped = LLM.from_torch(model, parallel=ParallelConfig(pp=2), max_seq_len=96)
    with pytest.raises(ValueError, match="one pipeline stage \\(pp=1\\), not pp=2"):
        piped.generate(prompts, s)
    # guidance_scale 1 is no guidance (transformers skips it too): the plain tokens
    one = SamplingParams(max_new_tokens=4, guidance_scale=1.0, stop_token_ids=())
    assert llm.generate(prompts, one)[0].token_ids == llm.generate(prompts, SamplingParams(
        max_new_tokens=4, stop_token_ids=()))[0].token_ids
