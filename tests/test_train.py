"""Training on the serving layout: gradients under tp/sp equal one device's, the loss falls,
remat policies change memory not results, and SP needs less activation memory than plain TP."""

import dataclasses

import jax
import numpy as np
import pytest

from bridges.hf import load_module
from conftest import _build
from jax_sp import ParallelConfig
from jax_sp.presets import preset
from jax_sp.runtime import Runtime
from jax_sp.train import TrainConfig, Trainer, unpadded_params


def batch(vocab, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (2, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    mask[1, 11:] = 0  # the second row's tail is padding
    return tokens, mask


def grads(cfg, params, tp, sp, remat="none", options=None):
    rt = Runtime(cfg, ParallelConfig(tp=tp), options=options)
    trainer = Trainer(rt, TrainConfig(remat=remat), sp)
    loss, g = trainer.grads(rt.place(params), *batch(cfg.vocab_size))
    return float(loss), unpadded_params(rt, g)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    """llama: 9 query / 3 KV heads, padded at tp 2 and 4; qwen2: 2 KV heads, replicated at
    tp 4."""
    cfg, params = load_module(_build(request.param))
    return cfg, params, grads(cfg, params, 1, False)


@pytest.mark.parametrize("tp,sp", [(2, True), (4, False), (4, True)])
def test_gradients_equal_one_device(model, tp, sp):
    cfg, params, (loss1, g1) = model
    loss, g = grads(cfg, params, tp, sp)
    assert abs(loss - loss1) <= 1e-5 * abs(loss1)
    assert g.keys() == g1.keys()
    for k in g1:
        assert g[k].shape == g1[k].shape
        err = np.linalg.norm(g[k] - g1[k]) / max(np.linalg.norm(g1[k]), 1e-12)
        assert err <= 1e-4, (k, err)


@pytest.fixture(scope="module")
def llama():
    cfg, params = load_module(_build("llama"))
    return cfg, params, grads(cfg, params, 1, False)


def test_training_with_the_add_norm_kernel_asked_for_keeps_xlas_norms(llama):
    """CompileOptions(add_norm="pallas") serves inference forwards: a training batch of 32 rows
    (at most 64) still differentiates through XLA's norms (the kernel has no gradient), so the
    gradients are the default's."""
    from jax_sp import CompileOptions

    cfg, params, (loss1, g1) = llama
    loss, g = grads(cfg, params, 1, False, options=CompileOptions(add_norm="pallas"))
    assert loss == loss1 and all(np.array_equal(g[k], g1[k]) for k in g1)


@pytest.mark.parametrize("remat", ["full", "selective"])
def test_remat_changes_nothing_but_memory(llama, remat):
    cfg, params, (loss1, g1) = llama
    loss, g = grads(cfg, params, 2, True, remat)
    assert abs(loss - loss1) <= 1e-5 * abs(loss1)
    for k in g1:
        assert np.linalg.norm(g[k] - g1[k]) <= 1e-4 * max(np.linalg.norm(g1[k]), 1e-12)


def test_ten_steps_lower_the_loss_and_optimizer_state_is_sharded_like_the_parameters():
    cfg, params = load_module(_build("qwen2"))
    rt = Runtime(cfg, ParallelConfig(tp=4))
    trainer = Trainer(rt, TrainConfig(learning_rate=3e-3, warmup_steps=2, total_steps=10,
                                      remat="selective"), sp=True)
    state = rt.place(params)
    opt_state = trainer.init(state)
    mu = opt_state[1][0].mu
    for p, m in zip(jax.tree.leaves(state), jax.tree.leaves(mu)):
        assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
    tokens, mask = batch(cfg.vocab_size, seed=1)
    losses = []
    for _ in range(10):
        state, opt_state, loss = trainer.step(state, opt_state, tokens, mask)
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses
    # KV replicas (2 KV heads at tp 4) are still equal after the updates
    # (the k and v parts of the fused weight); each replica's query heads moved on their own
    qkv = np.asarray(state["layers"]["attn"]["w_qkv_dkch"][...])  # [L, D, K'', G'' + 2, H]
    np.testing.assert_array_equal(qkv[:, :, 0::2, -2:], qkv[:, :, 1::2, -2:])
    assert not np.allclose(qkv[:, :, 0::2, :-2], qkv[:, :, 1::2, :-2])


def test_sp_needs_less_activation_memory_than_tp_at_every_remat_policy():
    cfg = dataclasses.replace(preset("llama3.2-1b"), num_layers=2, hidden_size=512,
                              intermediate_size=1536, num_heads=8, num_kv_heads=4,
                              head_dim=64, vocab_size=4096)
    for remat in ("none", "full", "selective"):
        temp = {}
        for sp in (False, True):
            rt = Runtime(cfg, ParallelConfig(tp=4))
            compiled = Trainer(rt, TrainConfig(remat=remat), sp).lower(1, 1024).compile()
            temp[sp] = compiled.memory_analysis().temp_size_in_bytes
        assert temp[True] < temp[False], (remat, temp)


def test_bad_training_configs_are_refused():
    with pytest.raises(ValueError, match="remat must be one of"):
        TrainConfig(remat="some")
    cfg, _ = load_module(_build("llama"))
    from jax_sp.runtime import Stage

    rt = Runtime(cfg, ParallelConfig(tp=1), stage=Stage(0, 2, 0, 2))
    with pytest.raises(ValueError, match="pp=1"):
        Trainer(rt, TrainConfig(), sp=False)


def test_clipping_at_tp_with_replicated_kv_heads_measures_the_model_gradient():
    """The clipping norm counts the tp replicas of a KV head (2 at tp 4) once: clipped
    gradients at tp 4 equal those on one device (an unweighted norm over the padded tree is
    larger, and scales every gradient differently)."""
    import optax

    from jax_sp.train import clip_by_global_norm, norm_weights

    cfg, params = load_module(_build("qwen2"))  # 8 query / 2 KV heads
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (2, 16)).astype(np.int32)
    mask = np.ones_like(tokens)
    clipped, plain = {}, {}
    for tp in (1, 4):
        rt = Runtime(cfg, ParallelConfig(tp=tp))
        _, g = Trainer(rt, TrainConfig(), sp=False).grads(rt.place(params), tokens, mask)
        ours, _ = clip_by_global_norm(0.1, norm_weights(rt)).update(g, optax.EmptyState())
        theirs, _ = optax.clip_by_global_norm(0.1).update(g, optax.EmptyState())
        clipped[tp], plain[tp] = unpadded_params(rt, ours), unpadded_params(rt, theirs)
    assert Runtime(cfg, ParallelConfig(tp=4)).plan.kv_repeat == 2
    for k in params:
        scale = np.abs(clipped[1][k]).max()
        np.testing.assert_allclose(clipped[4][k], clipped[1][k], atol=1e-5 * scale, err_msg=k)
    k = "layers/mlp/w_down_fd"  # no replicas in it, yet the plain norm rescales it too
    assert np.abs(plain[4][k] - plain[1][k]).max() > 0.01 * np.abs(plain[1][k]).max()


def test_warmup_must_leave_steps_for_the_decay():
    with pytest.raises(ValueError, match="0 <= warmup_steps < total_steps"):
        TrainConfig(warmup_steps=10, total_steps=10)
