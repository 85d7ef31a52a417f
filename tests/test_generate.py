"""Generation equals HF transformers token for token; SP gating, prompt embeds, sampling,
batching and bad input, all on meshes that really split the model."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import hf_greedy, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from sharding.hlo import census

GREEDY = SamplingParams(max_new_tokens=12)


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("sp", ["off", "on", "auto"])
def test_greedy_matches_hf_on_tiny_model(hf_models, tp, sp):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 17, 3, 30), seed=tp)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp=sp, sp_min_tokens=64))
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(model, prompts, GREEDY.max_new_tokens)
    assert all(c is None for c in (o.text for o in llm.generate(prompts[:1], GREEDY)))


@pytest.mark.parametrize("kind,tp", [("llama", 2), ("qwen2", 2), ("mistral", 1)])
def test_gpu_row_padding_changes_nothing(hf_models, kind, tp):
    """GPU runs projections of large weights on a multiple of 8 rows (sharding/layout.py
    `_einsum`), and one-token steps carry their whole residual stream on those rows
    (models/llama.py); here the same padding runs on CPU for every weight: one-row decode steps,
    3-row batches and the LM head's sampled rows give HF's tokens and the unpadded logits, with
    q/k/v biases (qwen2: the padding rows' q/k/v are the bias, never attended) and a sliding
    window (mistral)."""
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, (5, 17, 3), seed=11)
    plain = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="off"))
    padded = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="off"),
                            options=CompileOptions(row_multiple=8, pad_rows_min_weight=1))
    for batch in (prompts[:1], prompts):
        got = [c.token_ids for c in padded.generate(batch, GREEDY)]
        assert got == hf_greedy(model, batch, GREEDY.max_new_tokens)
    np.testing.assert_allclose(padded.logits(prompts[1:2])[0], plain.logits(prompts[1:2])[0],
                               atol=1e-5)
    plain.generate(prompts[:1], GREEDY)  # one-row decode: padded to 8 rows only in `padded`
    rows = [len(re.findall(r"\[8,\d+\]", llm.programs.hlo("decode"))) for llm in (plain, padded)]
    assert rows[0] == 0 < rows[1]


@pytest.mark.parametrize("fresh,attention", [(False, "xla"), (False, "pallas"), (True, "xla")],
                         ids=["decode-xla", "decode-pallas", "one-token-prefill"])
def test_one_token_forward_on_padded_rows_equals_the_plain_one(fresh, attention):
    """The model alone, one token for each of 3 sequences: with every projection on 8 rows the
    stream is carried padded through the layers, and the logits, the cache, the per-layer
    residual stream and a pipeline stage's carry equal the unpadded forward's."""
    from flax import nnx

    from models.cache import KVCache
    from models.config import ModelConfig
    from models.llama import Llama
    from sharding.layout import ShardedLayout
    from sharding.mesh import make_mesh, stage_mesh

    from jax_sp.attention import PallasDecode
    from models.attention import XLA

    cfg = ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=40, num_layers=3,
                      num_heads=4, num_kv_heads=2, head_dim=16)
    rng = np.random.default_rng(7)
    cache = KVCache(*(jnp.asarray(rng.normal(size=(3, 3, 32, 2, 16)), jnp.float32)
                      for _ in range(2)))
    positions = jnp.zeros((3, 1), jnp.int32) if fresh else jnp.asarray([[4], [0], [9]])
    tokens = jnp.asarray([[5], [17], [60]])
    mesh = stage_mesh(make_mesh(1), 0)
    outs = []
    for row_multiple in (1, 8):
        layout = ShardedLayout(mesh, sp=False, row_multiple=row_multiple, pad_rows_min_weight=1)
        full = Llama(cfg, rngs=nnx.Rngs(0))
        stage = Llama(cfg, rngs=nnx.Rngs(0), last=False)
        args = dict(tokens_bt=tokens, cache=cache, layout=layout, fresh=fresh,
                    attention=PallasDecode() if attention == "pallas" else XLA)
        outs.append((full(positions, positions[:, 0] + 1, collect_residuals=True, **args),
                     stage(positions, positions[:, 0] + 1, **args).carry))
    for plain, padded in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1])):
        assert plain.shape == padded.shape
        np.testing.assert_allclose(padded, plain, rtol=2e-5, atol=2e-5)
    # the padded stream is what the layer loop carries (not only the projections' rows)
    jaxpr = jax.make_jaxpr(lambda: full(positions, positions[:, 0] + 1, **args))()
    scans = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    carried = {v.aval.shape for e in scans
               for v in e.invars[e.params["num_consts"]:][:e.params["num_carry"]]}
    assert (8, cfg.hidden_size) in carried and (3, cfg.hidden_size) not in carried


def test_decode_is_one_call_and_new_lengths_reuse_the_bucket(hf_models):
    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=2))
    llm.generate([[1, 2, 3, 4, 5]], GREEDY)
    assert dict(llm.programs.calls) == {"prefill": 1, "decode": 1}  # 12 tokens, 2 calls
    compiled = len(llm.programs.compiled)
    llm.generate([[7] * 9], GREEDY)  # another length in the same bucket: no new program
    assert len(llm.programs.compiled) == compiled
    assert llm.last_stats.compile_s == 0 and llm.last_stats.new_tokens == 12


def test_unrolled_decode_equals_the_layer_loop(hf_models):
    """GPU decode programs unroll the layer loop (jax_sp/generate.py `decode_unroll`); unrolled
    on a split mesh, decode gives HF's tokens with no layer loop left in the program."""
    import jax_sp.generate as gen

    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 17, 3), seed=4)
    assert gen.decode_unroll(LLM.from_torch(model).runtime) == 1  # CPU: the rolled loop
    loops = {}
    for unroll in (1, model.config.num_hidden_layers):
        llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2),
                             options=CompileOptions(decode_unroll=unroll))
        assert gen.decode_unroll(llm.runtime) == unroll
        got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
        assert got == hf_greedy(model, prompts, GREEDY.max_new_tokens)
        loops[unroll] = llm.programs.hlo("decode").count(" while(")
    assert loops == {1: 2, llm.runtime.cfg.num_layers: 1}  # decode loop (+ layer loop)


@pytest.mark.parametrize("sp,embeds", [("off", False), ("on", True)])
def test_prefill_makes_a_cache_sharded_over_kv_heads_and_the_rows_keys(hf_models, sp, embeds):
    """The prefill program makes the KV cache (laid out as Runtime.cache_sharding, split over KV
    heads), writes only the prompts' block of it, and makes row b's key fold_in(PRNGKey(seed),
    b) — from token ids, and from prompt embeddings placed as SP token shards."""
    import jax

    llm = LLM.from_torch(hf_models("llama"), parallel=ParallelConfig(tp=4, sp=sp))
    want = llm.runtime.cache_sharding()
    assert want.spec == P(None, None, None, "tp", None)  # [L, B, S, K, H]
    heads = llm.runtime.padded_cfg.num_kv_heads // 4
    sampling = SamplingParams(max_new_tokens=20, seed=-1)
    prompts = [[1, 2, 3], [4]]
    job = llm._prepare(None if embeds else prompts, llm.embed(prompts) if embeds else None,
                       sampling, chat=False)
    assert job.prefill_sp == (sp == "on")
    run = llm.runner.prefill(job, sampling)
    cache, keys = run.caches[0][0], run.keys[0][0]
    t = job.inputs.shape[1]
    assert job.cache_len > t
    for kv in (cache.k, cache.v):
        assert kv.sharding.is_equivalent_to(want, kv.ndim)
        assert kv.addressable_shards[0].data.shape[2:4] == (job.cache_len, heads)
        written = np.asarray(kv).any(axis=(0, 3, 4))  # [B, S]
        assert all(written[b, :n].all() for b, n in enumerate(job.lengths))
        assert not written[:, t:].any()  # nothing beyond the prompts' padded block
    base = jax.random.PRNGKey(-1)
    assert np.array_equal(keys, [jax.random.fold_in(base, b) for b in range(job.batch)])


def test_unrolled_prefill_equals_the_layer_loop(hf_models):
    """CompileOptions.prefill_unroll unrolls the generation prefill's layer loop: the same
    tokens as HF, with the layer loop gone from the prefill program."""
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (5, 17, 3), seed=6)
    assert LLM.from_torch(model).runtime.options.prefill_unroll == 1
    want = hf_greedy(model, prompts, 4)
    loops = {}
    for unroll in (1, model.config.num_hidden_layers):
        llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"),
                             options=CompileOptions(prefill_unroll=unroll))
        got = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=4))]
        assert got == want
        loops[unroll] = llm.programs.hlo("prefill").count(" while(")
    assert loops[1] == loops[llm.runtime.cfg.num_layers] + 1  # the layer loop


def test_paged_view_of_the_cache_gives_each_layer_its_own_pages():
    """cuDNN decode steps read the cache through `KVCache.paged` (GPU only); the page table must
    pick layer l's rows of every sequence, for a traced layer index too."""
    import jax

    from models.cache import KVCache

    n_layers, b, s, k, h = 3, 5, 7, 2, 4
    rng = np.random.default_rng(0)
    cache = KVCache(*(jax.numpy.asarray(rng.normal(size=(n_layers, b, s, k, h)), "float32")
                      for _ in range(2)))
    for layer in range(n_layers):
        k_pool, v_pool, table = jax.jit(cache.paged)(layer)
        assert k_pool.shape == (n_layers * b, s, k, h) and table.shape == (b, 1, n_layers, 1)
        assert (np.asarray(table) == np.asarray(table)[:, :, :1]).all()
        want_k, want_v = cache.layer(layer)
        np.testing.assert_array_equal(k_pool[table[:, 0, 0, 0]], want_k)
        np.testing.assert_array_equal(v_pool[table[:, 0, 0, 0]], want_v)


@pytest.mark.parametrize("start", [0, 3])
def test_aligned_cache_write_equals_the_per_row_write(start):
    """A prefill writes every sequence's block at the same position with one
    dynamic_update_slice (`aligned`); it must store exactly what the per-row scatter stores,
    at a traced layer index, leaving the other layers and positions alone."""
    import jax

    from models.cache import KVCache

    n_layers, b, s, t, k, h = 3, 5, 9, 4, 2, 4
    rng = np.random.default_rng(1)
    cache = KVCache(*(jax.numpy.asarray(rng.normal(size=(n_layers, b, s, k, h)), "float32")
                      for _ in range(2)))
    new_k, new_v = (jax.numpy.asarray(rng.normal(size=(b, t, k, h)), "float32") for _ in range(2))
    starts = jax.numpy.full((b,), start, "int32")
    for layer in range(n_layers):
        got = jax.jit(lambda i: cache.write(i, new_k, new_v, starts, aligned=True))(layer)
        want = jax.jit(lambda i: cache.write(i, new_k, new_v, starts))(layer)
        np.testing.assert_array_equal(got.k, want.k)
        np.testing.assert_array_equal(got.v, want.v)
        np.testing.assert_array_equal(got.k[layer, :, start:start + t], new_k)
        np.testing.assert_array_equal(np.delete(np.asarray(got.v), layer, 0),
                                      np.delete(np.asarray(cache.v), layer, 0))


def _layer_kinds(hlo):
    return {c.kind for c in census(hlo, layers=3) if c.scope == "layer"}


def test_sp_min_tokens_defaults_to_the_measured_threshold_of_its_tp():
    """tp 2 and 4 take what was measured on 2 and 4 GPUs (SP slower at every size: auto never
    uses it); other tp the CPU-derived 256 until GPU timings exist; a given value always wins,
    and a bad one is still refused."""
    assert ParallelConfig(tp=2).sp_threshold is None is ParallelConfig(tp=4).sp_threshold
    assert not ParallelConfig(tp=2, sp="auto").use_sp(1 << 20)
    assert not ParallelConfig(tp=4, sp="auto").use_sp(1 << 20)
    assert ParallelConfig(tp=2, sp="on").use_sp(16)
    assert ParallelConfig(tp=3).sp_threshold == ParallelConfig(tp=8).sp_threshold == 256
    assert dataclasses.replace(ParallelConfig(tp=2), tp=8).use_sp(256)  # its own tp's default
    assert ParallelConfig(tp=2, sp_min_tokens=64).sp_threshold == 64
    with pytest.raises(ValueError, match="sp_min_tokens must be a positive integer"):
        ParallelConfig(tp=2, sp_min_tokens=0)


def test_auto_uses_sp_for_long_prefill_and_tp_for_decode_and_short_prefill(hf_models):
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, sp="auto", sp_min_tokens=128))
    long_prompt = random_prompts(model.config.vocab_size, (150,))
    llm.generate(long_prompt, GREEDY)
    assert _layer_kinds(llm.programs.hlo("prefill")) == {"reduce-scatter", "all-gather"}
    assert _layer_kinds(llm.programs.hlo("decode")) == {"all-reduce"}
    llm.generate([[3, 4, 5]], GREEDY)
    assert _layer_kinds(llm.programs.hlo("prefill")) == {"all-reduce"}
    forced = LLM.from_torch(model, parallel=ParallelConfig(tp=4, sp="on"))
    forced.generate([[3, 4, 5]], GREEDY)
    assert _layer_kinds(forced.programs.hlo("decode")) == {"reduce-scatter", "all-gather"}


@pytest.mark.parametrize("tp", [2, 4])
def test_prompt_embeds_equal_token_ids_under_sp(hf_models, tp):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (13, 29, 6), seed=1)  # T % tp != 0
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="on"))
    want = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    embeds = llm.embed(prompts)
    assert [e.shape for e in embeds] == [(len(p), model.config.hidden_size) for p in prompts]
    assert [c.token_ids for c in llm.generate(prompt_embeds=embeds, sampling=GREEDY)] == want
    # vLLM's original bug: every rank keeps rows [0, T/tp). It must change the output.
    buggy = llm.generate(prompt_embeds=embeds, sampling=GREEDY,
                         _rows_for_rank=lambda rank, local_len: slice(0, local_len))
    assert [c.token_ids for c in buggy] != want


def test_seeded_sampling_is_the_same_on_every_mesh_and_differs_across_seeds(hf_models):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (9, 4))
    params = SamplingParams(max_new_tokens=16, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    runs = {}
    for tp, sp in [(1, "off"), (2, "off"), (4, "off"), (4, "on")]:
        llm = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp=sp))
        runs[tp, sp] = [c.token_ids for c in llm.generate(prompts, params)]
    assert len({str(r) for r in runs.values()}) == 1
    other = llm.generate(prompts, dataclasses.replace(params, seed=8))
    assert [c.token_ids for c in other] != runs[4, "on"]
    assert runs[1, "off"] != [c.token_ids for c in llm.generate(prompts, GREEDY)][:2]


@pytest.mark.parametrize("seed", [0, 7, -1, 2**31, 2**32 + 7, 2**40, np.int64(-(2**40) - 3)])
def test_row_keys_made_in_a_program_are_prngkey_of_the_seed_folded_with_the_row(seed):
    """The prefill makes each row's key inside the program from SamplingParams.key_seed; row b
    (of the whole batch, at any micro-batch offset) gets fold_in(PRNGKey(seed), b), as jax
    makes it from the Python int eagerly, with 64-bit types off and on."""
    import jax

    from jax_sp.sampling import row_keys

    base = jax.random.PRNGKey(int(seed))
    want = np.stack([np.asarray(jax.random.fold_in(base, b)) for b in range(7)])
    key_seed = SamplingParams(seed=seed).key_seed()
    assert np.array_equal(jax.jit(row_keys, static_argnums=1)(key_seed, 7), want)
    assert np.array_equal(jax.jit(row_keys, static_argnums=1)(key_seed, 4, np.int32(3)), want[3:])
    with jax.enable_x64(True):  # PRNGKey keeps all 64 bits of the seed then
        base = jax.random.PRNGKey(int(seed))
        want = np.stack([np.asarray(jax.random.fold_in(base, b)) for b in range(4)])
        key_seed = SamplingParams(seed=seed).key_seed()
        assert np.array_equal(jax.jit(row_keys, static_argnums=1)(key_seed, 4), want)


def test_repeated_sampling_values_are_copied_to_the_devices_once(hf_models):
    """The seed, sampling scalars and stop ids go to the devices once per distinct value
    (Runner.constants); the cache of them stays bounded and hands back the right values."""
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2))
    prompts = random_prompts(model.config.vocab_size, (9, 4), seed=1)
    params = SamplingParams(max_new_tokens=6, temperature=0.7, seed=3)
    first = [c.token_ids for c in llm.generate(prompts, params)]
    cache = llm.runner.stages[0].constants
    held = dict(cache)
    assert [c.token_ids for c in llm.generate(prompts, params)] == first
    assert cache.keys() == held.keys()
    assert all(cache[k] is v for k, v in held.items())  # the same device arrays
    for i in range(300):
        (got,) = llm.runner.constants(0, np.uint32(i))
        assert int(got) == i and got.sharding.is_fully_replicated
        assert len(cache) <= 256


@pytest.mark.parametrize("parallel", [ParallelConfig(tp=2), ParallelConfig(tp=2, pp=2)])
def test_token_by_token_decode_samples_what_the_decode_loop_samples(hf_models, parallel):
    """stream's one-call-per-token decode (its step number and positions carried on device from
    call to call) draws the same sampled tokens as generate's on-device loop."""
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=parallel)
    prompt = random_prompts(model.config.vocab_size, (10,), seed=9)
    params = SamplingParams(max_new_tokens=12, temperature=0.9, top_k=20, seed=11,
                            stop_token_ids=())
    want = llm.generate(prompt, params)[0].token_ids
    assert want != llm.generate(prompt, dataclasses.replace(params, temperature=0))[0].token_ids
    job = llm._prepare(prompt, None, params, chat=False)
    assert list(llm._token_stream(job, params)) == want


def test_top_k_of_the_vocabulary_or_more_keeps_every_token(hf_models):
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2))
    prompts = random_prompts(model.config.vocab_size, (9, 4), seed=2)
    draw = lambda k: [c.token_ids for c in llm.generate(  # noqa: E731
        prompts, SamplingParams(max_new_tokens=12, temperature=1.0, top_k=k, seed=5))]
    off = draw(0)
    assert draw(model.config.vocab_size) == off and draw(10 * model.config.vocab_size) == off
    assert draw(2) != off


def test_ragged_batch_equals_one_by_one(hf_models):
    model = hf_models("qwen2")
    prompts = random_prompts(model.config.vocab_size, (3, 21, 8, 40), seed=5)
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=4, sp="on"))
    batched = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert batched == [llm.generate([p], GREEDY)[0].token_ids for p in prompts]


def test_stop_tokens_end_a_row_and_are_kept(hf_models):
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2))
    prompt = random_prompts(model.config.vocab_size, (11,))
    free = llm.generate(prompt, GREEDY)[0].token_ids
    stop = free[4]
    first = free.index(stop)
    out = llm.generate(prompt, dataclasses.replace(GREEDY, stop_token_ids=(stop,)))[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"


def test_a_first_token_that_is_a_stop_id_ends_the_row_before_decode(hf_models):
    """The decode loop starts with every row done whose prefill token is a stop id (and the
    padding rows): such a row gets no decoded tokens, the others decode as without it."""
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2))
    prompts = random_prompts(model.config.vocab_size, (11, 6), seed=3)
    free = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    stop = free[0][0]
    assert stop not in free[1]  # what the test needs of its prompts
    job = llm._prepare(prompts, None, GREEDY, chat=False)
    out = llm.runner.decode(llm.runner.prefill(job, GREEDY), job, GREEDY, (stop,))
    assert (out[0] == -1).all() and (out[2:] == -1).all()  # row 0 and the padding rows
    assert out[1, : GREEDY.max_new_tokens - 1].tolist() == free[1][1:]
    done = llm.generate(prompts, dataclasses.replace(GREEDY, stop_token_ids=(stop,)))
    assert done[0].token_ids == [stop] and done[0].finish_reason == "stop"
    assert done[1].token_ids == free[1]


@pytest.mark.parametrize("call,match", [
    (lambda llm: llm.generate([[]], GREEDY), "prompt 0 is empty"),
    (lambda llm: llm.generate([[1, 500]], GREEDY), r"token id\(s\) \[500\] outside \[0, 101\)"),
    (lambda llm: llm.generate([[1] * 60], SamplingParams(max_new_tokens=10)),
     r"60 tokens; with max_new_tokens=10 that exceeds max_seq_len=64.*to 4"),
    (lambda llm: llm.generate([[1] * 64], SamplingParams(max_new_tokens=1)),
     r"64 tokens.*shorten the prompt or raise max_seq_len"),
    (lambda llm: llm.generate([[1]], SamplingParams(max_new_tokens=0)), "max_new_tokens"),
    (lambda llm: llm.generate([[1]], SamplingParams(temperature=-1.0)), "temperature"),
    (lambda llm: llm.generate([[1]], SamplingParams(top_p=1.2)), r"top_p must be in \(0, 1\]"),
    (lambda llm: llm.generate(prompt_embeds=[np.zeros((3, 7), np.float32)], sampling=GREEDY),
     r"shape \(3, 7\); expected \[T, 45\]"),
    (lambda llm: llm.generate(prompt_embeds=[np.zeros((3, 45), np.int64)], sampling=GREEDY),
     "dtype int64"),
    (lambda llm: llm.generate([[1]], GREEDY, prompt_embeds=[np.zeros((1, 45), np.float32)]),
     "exactly one of prompts and prompt_embeds, not both"),
    (lambda llm: llm.generate(["hello"], GREEDY), "text prompts need a tokenizer"),
])
def test_bad_input_is_rejected_and_the_engine_keeps_serving(hf_models, call, match):
    model = hf_models("llama")
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"), max_seq_len=64)
    with pytest.raises(ValueError, match=match):
        call(llm)
    assert llm.generate([[1, 2, 3]], GREEDY)[0].token_ids == hf_greedy(model, [[1, 2, 3]], 12)[0]
