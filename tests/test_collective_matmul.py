"""Ring collective matmuls: each kernel against its plain-jit twin, then end to end."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from conftest import hf_greedy, hf_logits, random_prompts
from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
from jax_sp.inspect import inspect_modes
from jax_sp.presets import preset
from sharding.collective_matmul import all_gather_matmul, matmul_reduce_scatter
from sharding.mesh import make_mesh

MESHES = {tp: make_mesh(tp) for tp in (2, 4, 8)}
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}  # relative to the output's scale


def _ag_matmul(mesh, bidirectional):
    """shard_map'd kernel: x In[T_tp, D], (w1, w2) In[D, F_tp] -> Out[T, F_tp] each."""
    return jax.jit(jax.shard_map(
        lambda x, w1, w2: tuple(all_gather_matmul(x, [w1, w2], bidirectional=bidirectional)),
        mesh=mesh, in_specs=(P("tp", None), P(None, "tp"), P(None, "tp")),
        out_specs=(P(None, "tp"), P(None, "tp")), check_vma=False))


def _matmul_rs(mesh, bidirectional):
    """shard_map'd kernel: x In[T, F_tp], w In[F_tp, D] -> Out[T_tp, D]."""
    return jax.jit(jax.shard_map(
        lambda x, w: matmul_reduce_scatter(x, w, bidirectional=bidirectional), mesh=mesh,
        in_specs=(P(None, "tp"), P("tp", None)), out_specs=P("tp", None), check_vma=False))


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.abs(got - want).max() <= TOL[dtype] * max(1.0, np.abs(want).max())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tp=st.sampled_from([2, 4, 8]), rows=st.integers(1, 5), d=st.integers(1, 24),
       f=st.integers(1, 5), dtype=st.sampled_from([jnp.float32, jnp.bfloat16]),
       bidirectional=st.booleans(), seed=st.integers(0, 99))
def test_kernels_match_their_plain_jit_twins(tp, rows, d, f, dtype, bidirectional, seed):
    rng = np.random.default_rng(seed)
    t, feat = tp * rows, tp * f  # T and F multiples of tp; D anything
    x = jnp.asarray(rng.standard_normal((t, d)), dtype)
    w1 = jnp.asarray(rng.standard_normal((d, feat)), dtype)
    w2 = jnp.asarray(rng.standard_normal((d, 2 * feat)), dtype)
    y1, y2 = _ag_matmul(MESHES[tp], bidirectional)(x, w1, w2)
    twin = jax.jit(lambda x, w1, w2: (x @ w1, x @ w2))
    for got, want in zip((y1, y2), twin(x, w1, w2)):
        assert got.dtype == dtype and got.shape == want.shape
        _close(got, want, dtype)
    h = jnp.asarray(rng.standard_normal((t, feat)), dtype)
    wd = jnp.asarray(rng.standard_normal((feat, d)), dtype)
    out = _matmul_rs(MESHES[tp], bidirectional)(h, wd)
    assert out.sharding.spec[0] == "tp" and out.dtype == dtype
    _close(out, jax.jit(lambda h, w: h @ w)(h, wd), dtype)


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_ring_matches_xla_and_hf(hf_models, tp):
    model = hf_models("qwen2" if tp == 4 else "llama")
    prompts = random_prompts(model.config.vocab_size, (5, 17, 30), seed=tp)
    ring = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="on", comm="ring"))
    xla = LLM.from_torch(model, parallel=ParallelConfig(tp=tp, sp="on", comm="xla"))
    want = hf_logits(model, prompts)
    for got in (ring.logits(prompts), xla.logits(prompts)):
        assert max(float(np.abs(g - w).max()) for g, w in zip(got, want)) <= 1e-4
    greedy = SamplingParams(max_new_tokens=8)
    tokens = [c.token_ids for c in ring.generate(prompts, greedy)]
    assert tokens == [c.token_ids for c in xla.generate(prompts, greedy)]
    assert tokens == hf_greedy(model, prompts, greedy.max_new_tokens)


def _per_layer(report, layers):
    return [c for c in report.collectives if c.scope == "layer" for _ in range(c.count // layers)]


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_ring_census_has_only_permutes_and_moves_the_xla_bytes(tp):
    cfg = dataclasses.replace(preset("smollm2"), num_layers=2, vocab_size=1024)
    tokens = 64
    (xla,) = inspect_modes(cfg, tp, tokens, modes=("on",))
    (ring,) = inspect_modes(cfg, tp, tokens, comm="ring", modes=("on",))
    ops = _per_layer(ring, cfg.num_layers)
    # bidirectional rings: tp - 1 hops per kernel (tp // 2 forward, the rest backward), 4 kernels
    assert [c.kind for c in ops] == ["collective-permute"] * 4 * (tp - 1)
    assert {c.dims for c in ops} == {(tokens // tp, cfg.hidden_size)}
    wire = [sum(c.wire_bytes for c in _per_layer(r, cfg.num_layers)) for r in (xla, ring)]
    assert wire[0] == pytest.approx(wire[1])


@pytest.mark.parametrize("comm", ["xla", "ring"])
def test_bf16_activations_are_gathered_as_bf16(comm):
    """The gathers move the compute dtype. (XLA once moved the cast below the gather and sent
    f32.) XLA:CPU widens every 16-bit collective to f32 itself; the census sees through that."""
    from jax_sp.runtime import Runtime
    from sharding.hlo import census

    cfg = dataclasses.replace(preset("smollm2"), num_layers=2, vocab_size=1024)
    tp, tokens = 4, 64
    rt = Runtime(cfg, ParallelConfig(tp=tp, sp="on", comm=comm), dtype="bfloat16")
    layer = [c for c in census(rt.compile_prefill(True, 1, tokens).as_text(), cfg.num_layers)
             if c.scope == "layer"]
    kind = "all-gather" if comm == "xla" else "collective-permute"
    moved = [c for c in layer if c.kind == kind]
    assert moved and {c.dtype for c in moved} == {"bf16"}
    per_gather = tokens * cfg.hidden_size * 2  # one [T, D] bf16 activation
    # xla: 2 all-gathers a layer; ring: 2 gathers + 2 scatters, each (tp-1)/tp of [T, D]
    want = 2 * per_gather if comm == "xla" else 4 * per_gather * (tp - 1) / tp
    assert sum(c.tensor_bytes * c.count for c in moved) / cfg.num_layers == pytest.approx(want)


def test_xla_options_that_fail_to_compile_fall_back_with_a_warning(hf_models, caplog):
    model = hf_models("llama")
    prompts = random_prompts(model.config.vocab_size, (7, 20))
    bad = CompileOptions(xla_options={"xla_no_such_option_for_jax_sp": 1})
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on"), options=bad)
    with caplog.at_level("WARNING", logger="jax_sp"):
        got = llm.logits(prompts)
    assert "could not compile this program" in caplog.text
    assert max(float(np.abs(g - w).max()) for g, w in zip(got, hf_logits(model, prompts))) <= 1e-4
