"""The fused decode kernel (models/decode_attention.py, Pallas, interpreted on CPU): against the
model's XLA path (RoPE, cache write, attention), and through the engine against HF on split
meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.experimental import pallas as pl

import models.decode_attention as da
from conftest import hf_greedy, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from jax_sp.attention import PallasDecode
from models.attention import XLA, Forward
from models.cache import KVCache
from models.layout import DENSE
from sharding.hlo import census

PALLAS = CompileOptions(attention="pallas")


def _xla_step(qkv, cos, sin, k_cache, v_cache, layer, positions, kv_len):
    """The same step through the XLA backend (models/attention.py), in fp32: rotate, write,
    attend."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    fwd = Forward(positions[:, None], kv_len, (f32(cos)[:, None], f32(sin)[:, None]), False,
                  DENSE, XLA)  # T = 1
    out, cache = XLA(f32(qkv), fwd, KVCache(f32(k_cache), f32(v_cache)), layer, 0)
    return out[:, 0], cache.k, cache.v


def _inputs(b, k, g, h, layers, s, rows=None, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    qkv = jnp.asarray(rng.normal(size=(rows or b, k, g + 2, h)), dtype)
    k_cache, v_cache = (jnp.asarray(rng.normal(size=(layers, b, s, k, h)), dtype)
                        for _ in range(2))
    angle = rng.normal(size=(b, h // 2)) * 3
    angle = np.concatenate([angle, angle], -1)  # rotate-half tables: both halves alike
    return qkv, jnp.asarray(np.cos(angle)), jnp.asarray(np.sin(angle)), k_cache, v_cache


@pytest.mark.parametrize("block_s,max_splits,splits",
                         [(8, 16, 12), (8, 1, 1), (16, 2, 2), (32, 2, 2)])
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 3e-2)])
def test_kernel_equals_rope_write_and_attention_in_plain_jax(block_s, max_splits, splits, dtype,
                                                             tol):
    """3 sequences, 2 KV heads of 3 query heads, 96 slots (not a power of two): blocks of 8 keys,
    one per program (12 splits); one program per sequence and head walking all 12 blocks; 2 splits
    of 3 blocks of 16, where two sequences see no key of the second; 2 splits of 3 blocks of 32
    (two blocks, then one). New keys at the first slot, inside a block and in the second half; 5
    rows of q/k/v of which the last two are a projection's padding."""
    qkv, cos, sin, kc, vc = _inputs(3, 2, 3, 16, 3, 96, rows=5, dtype=dtype)
    positions, kv_len = jnp.asarray([0, 21, 70]), jnp.asarray([1, 22, 71])
    grids, pallas_call = [], pl.pallas_call

    def spy(*args, grid, **kwargs):  # the programs the kernel runs: (B, K, splits)
        grids.append(grid)
        return pallas_call(*args, grid=grid, **kwargs)

    run = jax.jit(da.decode_attention, static_argnames=("block_s", "max_splits", "interpret"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pl, "pallas_call", spy)
        out, k2, v2 = run(qkv, cos, sin, kc, vc, 1, positions, kv_len, block_s=block_s,
                          max_splits=max_splits, interpret=True)
    assert grids == [(3, 2, splits)]
    want = _xla_step(qkv[:3], cos, sin, kc, vc, 1, positions, kv_len)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want[0], np.float32),
                               atol=tol, rtol=tol)
    for got, ref, old in ((k2, want[1], kc), (v2, want[2], vc)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32),
                                   atol=tol, rtol=tol)
        changed = np.argwhere(np.any(np.asarray(got != old), axis=(3, 4)))
        assert changed.tolist() == [[1, 0, 0], [1, 1, 21], [1, 2, 70]]  # one slot per sequence


def test_pallas_backend_equals_the_xla_backend_on_its_own():
    """The backend object (jax_sp/attention.py) against XLA's, on one layer's step of 3
    sequences (a dense layout): the same output and cache; a prefill (fresh) and a sliding-window
    layer fall back to XLA's."""
    qkv, cos, sin, kc, vc = _inputs(3, 2, 3, 16, 2, 64, rows=8)
    cache = KVCache(kc, vc)
    positions = jnp.asarray([[5], [0], [40]])
    fwd = Forward(positions, positions[:, 0] + 1, (cos[:, None], sin[:, None]), False, DENSE,
                  None)
    pallas = PallasDecode()
    out, got = jax.jit(lambda c: pallas(qkv, fwd, c, 1, 0))(cache)
    want_out, want = XLA(qkv, fwd, cache, 1, 0)
    np.testing.assert_allclose(out, want_out[:, 0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got.k, want.k, atol=1e-6)
    np.testing.assert_allclose(got.v, want.v, atol=1e-6)
    for fallback in (fwd._replace(fresh=True), fwd):
        window = 0 if fallback.fresh else 4
        same = [pallas(qkv, fallback, cache, 1, window), XLA(qkv, fallback, cache, 1, window)]
        for a, b in zip(jax.tree.leaves(same[0]), jax.tree.leaves(same[1])):
            np.testing.assert_array_equal(a, b)


def test_no_visible_key_gives_zeros_with_or_without_splits():
    qkv, cos, sin, kc, vc = _inputs(1, 1, 2, 16, 1, 32)
    for max_splits in (1, 4):
        out, _, _ = da.decode_attention(qkv, cos, sin, kc, vc, 0, jnp.asarray([3]),
                                        jnp.asarray([0]), block_s=8, max_splits=max_splits,
                                        interpret=True)
        assert np.all(np.asarray(out) == 0)


def test_kernel_rejects_shapes_it_cannot_take():
    qkv, cos, sin, kc, vc = _inputs(2, 2, 3, 16, 2, 32)
    with pytest.raises(ValueError, match=r"does not fit the cache"):
        da.decode_attention(qkv[:, :1], cos, sin, kc, vc, 0, jnp.zeros(2, int), jnp.ones(2, int),
                            interpret=True)
    assert da.supported(64) and da.supported(16, interpret=True)
    assert not da.supported(16) and not da.supported(48) and not da.supported(6, interpret=True)


def _llama(heads=8, kv_heads=2, layers=2, seed=0):
    """A tiny Llama whose head size (16) the kernel takes; 4 query heads per KV head."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=103, hidden_size=48, intermediate_size=40, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return model.eval().float()


@pytest.fixture(scope="module")
def llama16():
    return _llama()


GREEDY = SamplingParams(max_new_tokens=10)


@pytest.mark.parametrize("parallel", [ParallelConfig(tp=1), ParallelConfig(tp=2, sp="on"),
                                      ParallelConfig(tp=2, pp=2)], ids=["tp1", "tp2-sp", "tp2pp2"])
def test_pallas_decode_gives_hf_tokens(llama16, parallel):
    """Decode steps through the kernel: each reads the keys earlier steps wrote, at tp 2 per
    device on its own KV head, and no collective gathers the cache."""
    prompts = random_prompts(llama16.config.vocab_size, (5, 17, 3), seed=2)
    llm = LLM.from_torch(llama16, parallel=parallel, options=PALLAS)
    assert (llm.runtime.attention.name, llm.runtime.decode_attention.name) == ("xla", "pallas")
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(llama16, prompts, GREEDY.max_new_tokens)
    if parallel.pp == 1:
        assert "decode_attention" in llm.programs.hlo("decode")
        # nothing shaped like heads (last dimension the head size, 16) crosses devices
        assert [c for c in census(llm.programs.hlo("decode")) if c.dims[-1:] == (16,)] == []


def test_token_by_token_pallas_decode_samples_what_the_decode_loop_samples(llama16):
    """stream's path (one compiled step per token) through the kernel, sampled with a seed."""
    llm = LLM.from_torch(llama16, parallel=ParallelConfig(tp=2), options=PALLAS)
    prompt = random_prompts(llama16.config.vocab_size, (11,), seed=3)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=30, seed=5,
                            stop_token_ids=())
    want = llm.generate(prompt, params)[0].token_ids
    job = llm._prepare(prompt, None, params, chat=False)
    assert list(llm._token_stream(job, params)) == want


def test_pallas_decode_at_tp3_with_a_cache_of_no_power_of_two(llama16):
    """tp 3 pads the KV groups and rounds a 17-token prompt's bucket to 33 tokens; the cache is
    then 48 slots (a multiple of 16, three blocks of keys) and decode still gives HF's tokens."""
    prompts = random_prompts(llama16.config.vocab_size, (17, 6), seed=8)
    llm = LLM.from_torch(llama16, parallel=ParallelConfig(tp=3, sp="off"), options=PALLAS)
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(llama16, prompts, GREEDY.max_new_tokens)
    assert ",48," in llm.programs.hlo("decode")  # [L, B, 48, K, H]


def test_pallas_decode_reads_padded_projection_rows(llama16):
    """On GPU the q/k/v projection runs on 8 rows and the kernel reads the first B in place;
    the same padding here, for every weight, gives HF's tokens."""
    prompts = random_prompts(llama16.config.vocab_size, (9, 4, 12), seed=5)
    options = CompileOptions(attention="pallas", row_multiple=8, pad_rows_min_weight=1)
    llm = LLM.from_torch(llama16, parallel=ParallelConfig(tp=2), options=options)
    got = [c.token_ids for c in llm.generate(prompts, GREEDY)]
    assert got == hf_greedy(llama16, prompts, GREEDY.max_new_tokens)


def test_pallas_needs_a_head_size_it_takes(hf_models):
    with pytest.raises(ValueError, match=r"attention='pallas' needs head_dim a power of two"):
        LLM.from_torch(hf_models("llama"), options=PALLAS)
    llm = LLM.from_torch(hf_models("llama"))  # auto on CPU: XLA everywhere
    assert (llm.runtime.attention.name, llm.runtime.decode_attention.name) == ("xla", "xla")


@pytest.mark.parametrize("max_seq_len", [96, 784, 4368])
def test_the_serving_engine_s_rows_are_whole_blocks_of_the_kernel_s_keys(llama16, max_seq_len):
    """The kernel walks a cache in blocks of the largest power of two up to BLOCK_S that divides
    its length: with it the serving engine's rows hold whole BLOCK_S blocks (784, a multiple of
    16 only, made it walk 16 keys a block), no more than one block past max_seq_len; with XLA's
    attention (which reads the whole row) a multiple of 16."""
    from jax_sp.serving import Engine

    for options, multiple in ((PALLAS, da.BLOCK_S), (CompileOptions(attention="xla"), 16)):
        llm = LLM.from_torch(llama16, max_seq_len=max_seq_len, options=options)
        with Engine(llm, max_batch=2) as engine:
            s = engine.cache_len
            assert engine.caches[0].k.shape[2] == s
        assert max_seq_len <= s < max_seq_len + multiple and s % multiple == 0


def test_with_launch_dependents_the_kernel_signals_before_its_cache_loads():
    """CompileOptions(launch_dependents=True) (models/pdl.py), lowered for CUDA: each block
    executes griddepcontrol.launch_dependents once, after loading the layer index and before
    any load of q, the RoPE tables or the cache; without the option there is none."""
    from conftest import lowered_for_cuda, signal_position, triton_kernels
    from models import pdl

    spec = jax.ShapeDtypeStruct
    b, k, g, h, layers, s = 2, 8, 4, 128, 3, 512
    args = (spec((b, k, g + 2, h), jnp.bfloat16), spec((b, h), jnp.float32),
            spec((b, h), jnp.float32), spec((layers, b, s, k, h), jnp.bfloat16),
            spec((layers, b, s, k, h), jnp.bfloat16), spec((), jnp.int32),
            spec((b,), jnp.int32), spec((b,), jnp.int32))

    def kernel_ir():
        text = lowered_for_cuda(lambda *a: da.decode_attention(*a, interpret=False), *args)
        (kernel,) = triton_kernels(text)
        return kernel

    with pdl.signalling(True):
        assert signal_position(kernel_ir()) == (1, 1)
    assert signal_position(kernel_ir()) == (0, None)


def test_programs_are_traced_with_the_launch_dependents_option_given():
    """Runtime.compile traces every program inside models/pdl.py's `signalling` with
    CompileOptions.launch_dependents, so the kernels of that program (and only of it) see it."""
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime
    from models import pdl

    seen = []
    for on in (True, False):
        def program(x):  # a function of its own each time, as each runtime's programs are
            seen.append(pdl.enabled(interpret=False))
            return x + 1

        rt = Runtime(preset("smollm2"), ParallelConfig(tp=1),
                     options=CompileOptions(launch_dependents=on))
        rt.compile(program, (jnp.zeros(3),), sp=False)
    assert seen == [True, False] and not pdl.enabled(interpret=False)
