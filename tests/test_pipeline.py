"""Pipeline stages: equal to HF transformers on every split and boundary policy, with vLLM's two
PP+SP bugs replayed to show the real path matters, micro-batching without host syncs, and the
per-rank PyTorch exchange."""

import jax
import numpy as np
import pytest

from conftest import hf_greedy, hf_logits, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from jax_sp.runner import split_layers
from sharding.tokens import tp_rank_rows

GREEDY = SamplingParams(max_new_tokens=8)
LENGTHS = (13, 5, 30)  # no tp divides them all


def _max_diff(got, want):
    return max(float(np.abs(g - w).max()) for g, w in zip(got, want))


def test_vllm_layer_split():
    assert split_layers(5, 2) == [(0, 3), (3, 5)]
    assert split_layers(7, 4) == [(0, 2), (2, 4), (4, 6), (6, 7)]
    assert split_layers(8, 4) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert split_layers(7, 2, (1, 6)) == [(0, 1), (1, 7)]


# every stage split with tp (pp 2 and 4; tp 1, 2 and 4), and every SP mode x boundary policy at
# tp > 1 (SP on with 4 stages too); at tp 1 neither SP nor the policy changes anything
SPLITS = [(4, 1, "off", "gather"), (2, 2, "off", "gather"), (2, 4, "on", "gather"),
          (2, 4, "off", "scattered"), (4, 2, "on", "scattered")]


@pytest.mark.parametrize("pp,tp,sp,boundary", SPLITS)
def test_pipeline_matches_hf(hf_models, pp, tp, sp, boundary):
    model = hf_models("llama5" if pp == 2 else "llama7")  # uneven: 3+2, 2+2+2+1
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=pp * tp)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, pp=pp, sp=sp,
                                                        pp_boundary=boundary))
    assert [e - s for s, e in llm.runner.ranges] == ([3, 2] if pp == 2 else [2, 2, 2, 1])
    assert _max_diff(llm.logits(prompts), hf_logits(model, prompts)) <= 1e-4
    want = hf_greedy(model, prompts, GREEDY.max_new_tokens)
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want


def test_unrolled_decode_steps_on_uneven_stages(hf_models):
    """GPU decode programs unroll every layer (jax_sp.generate.decode_unroll gives the model's
    layer count, more than a stage holds): stages of 3 and 2 layers decode HF's tokens with no
    layer loop left in either stage's step."""
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=9)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, pp=2),
                         options=CompileOptions(decode_unroll=model.config.num_hidden_layers))
    want = hf_greedy(model, prompts, GREEDY.max_new_tokens)
    assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want
    assert [st.programs.hlo("decode_step").count(" while(") for st in llm.runner.stages] == [0, 0]


@pytest.mark.parametrize("tp", [2, 4])
def test_prompt_embeds_through_two_stages(hf_models, tp):
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, LENGTHS)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, pp=2, sp="on",
                                                        pp_boundary="gather"))
    got = llm.generate(prompt_embeds=llm.embed(prompts), sampling=GREEDY)
    assert [c.token_ids for c in got] == hf_greedy(model, prompts, GREEDY.max_new_tokens)


@pytest.mark.parametrize("tp", [2, 4])
def test_vllm_pp_sp_bugs_change_the_output(hf_models, tp):
    """The receive path must all-gather the residual and keep each rank's own rows."""
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, LENGTHS, seed=3)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, pp=2, sp="on",
                                                        pp_boundary="gather"))
    want = hf_logits(model, prompts)
    assert _max_diff(llm.logits(prompts), want) <= 1e-4
    llm.runner.receive_rows_for_rank = lambda rank, local_len: slice(0, local_len)
    assert _max_diff(llm.logits(prompts), want) > 1e-2  # rank-agnostic [0:local_len]
    llm.runner.receive_rows_for_rank = tp_rank_rows
    llm.runner.gather_residual = False
    assert _max_diff(llm.logits(prompts), want) > 1e-2  # slicing instead of gathering
    llm.runner.gather_residual = True
    assert _max_diff(llm.logits(prompts), want) <= 1e-4


def test_microbatches_give_the_same_tokens_and_never_wait_on_the_host(hf_models):
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, (13, 5, 30, 9, 21, 2), seed=4)
    one = LLM.from_torch(model, parallel=ParallelConfig(tp=2, pp=2, sp="on"))
    many = LLM.from_torch(model, parallel=ParallelConfig(tp=2, pp=2, sp="on", microbatches=4))
    want = [c.token_ids for c in one.generate(prompts, GREEDY)]
    assert [c.token_ids for c in many.generate(prompts, GREEDY)] == want
    # A whole prefill + decode of 4 micro-batches through both stages dispatches with no
    # device-to-host transfer at all: no stage waits on the host.
    job = many._prepare(prompts, None, GREEDY, chat=False)
    with jax.transfer_guard_device_to_host("disallow"):
        run = many.runner.prefill(job, GREEDY)
        steps = [run.tokens] + list(many.runner.steps(run, job, GREEDY))
    assert len(steps) == GREEDY.max_new_tokens and len(steps[0]) == 4
    for st in many.runner.stages:  # and no compiled stage program talks to the host
        for compiled in st.programs.compiled.values():
            hlo = compiled.as_text()
            assert not any(op in hlo for op in ("outfeed", "infeed", "host_callback",
                                                "xla_python_cpu_callback"))


def test_sampled_tokens_do_not_depend_on_the_micro_batch_split(hf_models):
    """A row's sampling key is its place in the whole batch, so a pipeline's micro-batches draw
    what one stage would (before, each micro-batch reused rows 0..B/m-1's keys)."""
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, (13, 5, 30, 9, 21, 2), seed=4)
    params = SamplingParams(max_new_tokens=8, temperature=0.9, top_k=30, seed=3)
    runs = [[c.token_ids for c in LLM.from_torch(model, parallel=p).generate(prompts, params)]
            for p in (ParallelConfig(tp=2), ParallelConfig(tp=2, pp=2, sp="on"),
                      ParallelConfig(tp=2, pp=2, sp="on", microbatches=4))]
    assert runs[0] == runs[1] == runs[2]
    assert runs[0] != [c.token_ids for c in LLM.from_torch(
        model, parallel=ParallelConfig(tp=2)).generate(prompts, GREEDY)]


def test_auto_sp_threshold_counts_the_tokens_of_one_micro_batch(hf_models):
    """sp="auto" compares sp_min_tokens with what one forward runs: with 4 micro-batches, 8 padded
    rows of 16 tokens are forwards of 2 x 16 = 32 tokens, not 128."""
    model = hf_models("llama5")
    prompts = random_prompts(model.config.vocab_size, (3, 5, 4, 2), seed=8)
    want = [c.token_ids for c in LLM.from_torch(model).generate(prompts, GREEDY)]
    for threshold, sp in ((128, False), (32, True)):
        llm = LLM.from_torch(model, parallel=ParallelConfig(
            tp=2, pp=2, microbatches=4, sp="auto", sp_min_tokens=threshold))
        assert [c.token_ids for c in llm.generate(prompts, GREEDY)] == want
        assert llm.last_stats.prefill_sp is sp


def test_bad_pipeline_configs(hf_models):
    model = hf_models("llama5")
    with pytest.raises(ValueError, match=r"tp\*pp = 4\*4 = 16 devices"):
        LLM.from_torch(model, parallel=ParallelConfig(tp=4, pp=4))
    with pytest.raises(ValueError, match=r"pp_layers=\(2, 2\) adds up to 4 layers but the "
                                         r"model has 5"):
        LLM.from_torch(model, parallel=ParallelConfig(tp=2, pp=2, pp_layers=(2, 2)))
    with pytest.raises(ValueError, match=r"pp_layers must list 2 positive layer counts"):
        ParallelConfig(pp=2, pp_layers=(5,))
    with pytest.raises(ValueError, match="pp_boundary must be one of"):
        ParallelConfig(pp=2, pp_boundary="allreduce")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=1, pp=2, pp_layers=(1, 4)))
    assert llm.runner.ranges == [(0, 1), (1, 5)]


def test_inspect_shows_stages_and_boundary_bytes(capsys):
    from jax_sp.cli import main

    assert main(["inspect", "--model", "smollm2", "--tp", "2", "--pp", "2", "--tokens", "64",
                 "--layers", "5"]) == 0
    out = capsys.readouterr().out
    assert "stages: 0: layers [0, 3), 1: layers [3, 5)" in out
    # 64 x 576 f32 = 0.141 MiB a tensor; each of 2 devices sends half of hidden and residual
    assert "sp=on   scattered send    0.141 MiB/device; receive    0.000 MiB/device (none)" in out
    assert ("sp=on   gather    send    0.141 MiB/device; receive    0.141 MiB/device "
            "(all-gather [64, 576], all-gather [64, 576])") in out
