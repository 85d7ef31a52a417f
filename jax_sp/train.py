"""Training on the serving layout: a jitted optax train step under tp and sp (pp=1).

The model, the rules tables and the padding plan are the serving ones, so a checkpoint is tuned
and served with the same layout. Under SP the residual stream, norms and their activations live
token-sharded through the backward pass too, which is where Megatron's SP saves activation
memory (Korthikanti et al., 2022); `remat` picks what the backward pass recomputes:

- "none": keep every activation;
- "full": keep each layer's input only, recompute the layer;
- "selective": keep the projections' matmul outputs, recompute norms, activations and attention.

Loss: next-token cross-entropy, `loss_mask[b, t]` saying whether token t is a target (so
prompts or padding can be left out). Optimizer: AdamW with linear warm-up then cosine decay and
global-norm clipping; its state is created from the parameters inside jit, so it is sharded like
them. Padded heads, vocabulary and MLP columns are zeros and get zero gradients; KV heads that
tp replicates get the sum of their replicas' gradients, so the replicas stay equal.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jax_sp.runtime import Runtime, path_str
from sharding.padding import unpad_param

REMAT = ("none", "full", "selective")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    warmup_steps: int = 10
    total_steps: int = 1000
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    remat: str = "none"

    def __post_init__(self):
        if self.remat not in REMAT:
            raise ValueError(f"TrainConfig.remat must be one of {REMAT}, got {self.remat!r}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"TrainConfig needs 0 <= warmup_steps < total_steps (the cosine decay "
                             f"takes the steps after the warm-up), got warmup_steps="
                             f"{self.warmup_steps}, total_steps={self.total_steps}")


def clip_by_global_norm(max_norm: float, weights) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with each parameter's squared gradient weighted by `weights`
    (a tree like the parameters, of arrays that broadcast against them): the norm of the model's
    own gradient, whatever copies tp padding made of it."""
    def update(updates, state, params=None):
        del params
        squares = jax.tree.map(lambda g, w: jnp.sum(w * jnp.square(g.astype(jnp.float32))),
                               updates, weights)
        norm = jnp.sqrt(sum(jax.tree.leaves(squares)))
        updates = jax.tree.map(
            lambda g: jnp.where(norm < max_norm, g, g / norm.astype(g.dtype) * max_norm), updates)
        return updates, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _kv_parts(names, shape):
    """(axis of the KV groups, bool mask of the k/v parts broadcastable to `shape`) of a fused
    q/k/v parameter, or None for any other parameter."""
    if "qkv_heads" not in names:
        return None
    axis = names.index("qkv_heads")
    parts = shape[axis + 1]  # C: query heads, then k and v
    mask = np.arange(parts) >= parts - 2
    return axis, mask.reshape((1,) * (axis + 1) + (parts,) + (1,) * (len(shape) - axis - 2))


def norm_weights(rt: Runtime):
    """Weights of each parameter's squared gradient in the clipping norm: 1, except 1/r on the
    k and v parts of the fused q/k/v weight, whose r replicas of a KV head each hold the head's
    whole gradient (tie_kv_replicas)."""
    r = rt.plan.kv_repeat

    def weight(path, var):
        kv = _kv_parts(rt.param_names[path], var.get_value().shape) if r > 1 else None
        return np.float32(1.0) if kv is None else np.where(kv[1], 1.0 / r, 1.0).astype(np.float32)

    return rt._map_state(weight)


def optimizer(tc: TrainConfig, weights=None) -> optax.GradientTransformation:
    """AdamW after global-norm clipping (weighted by `weights`, see norm_weights), linear warm-up
    then cosine decay (no warm-up: the decay starts at the peak)."""
    if tc.warmup_steps:
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, tc.learning_rate, tc.warmup_steps, tc.total_steps)
    else:
        schedule = optax.cosine_decay_schedule(tc.learning_rate, tc.total_steps)
    clip = (optax.clip_by_global_norm(tc.clip_norm) if weights is None
            else clip_by_global_norm(tc.clip_norm, weights))
    return optax.chain(clip, optax.adamw(schedule, weight_decay=tc.weight_decay))


def loss_fn(rt: Runtime, sp: bool, remat: str, state, tokens_bt, loss_mask_bt):
    """Mean next-token cross-entropy over the masked targets."""
    model = nnx.merge(rt.graphdef, state)
    b, t = tokens_bt.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    out = model(positions, jnp.full((b,), t, jnp.int32), tokens_bt=tokens_bt,
                layout=rt.layout(sp), fresh=True, remat=remat)
    logits = out.logits[:, : rt.cfg.vocab_size].astype(jnp.float32).reshape(b, t, -1)
    targets = tokens_bt[:, 1:]
    mask = loss_mask_bt[:, 1:].astype(jnp.float32)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], targets)
    return jnp.sum(nll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def tie_kv_replicas(rt: Runtime, grads):
    """Give every replica of a tp-replicated KV head the sum of the replicas' gradients (the k
    and v parts of the fused q/k/v weight; each replica's query heads are its own)."""
    r = rt.plan.kv_repeat
    if r == 1:
        return grads

    def tie(path, g):
        kv = _kv_parts(rt.param_names[path_str(path)], g.shape)
        if kv is None:
            return g
        (axis, is_kv), shape = kv, g.shape
        grouped = g.reshape(*shape[:axis], shape[axis] // r, r, *shape[axis + 1:])
        summed = jnp.sum(grouped, axis=axis + 1, keepdims=True)
        return jnp.where(is_kv, jnp.broadcast_to(summed, grouped.shape).reshape(shape), g)

    flat = [(p, v.replace(tie(p, v.get_value()))) for p, v in nnx.to_flat_state(grads)]
    return nnx.from_flat_state(flat)


class Trainer:
    """train_step(state, opt_state, tokens [B, T], loss_mask [B, T]) -> (state, opt_state,
    loss), compiled once per batch shape; `grads` gives the (tied) gradients alone."""

    def __init__(self, rt: Runtime, tc: TrainConfig, sp: bool):
        if rt.stage.count > 1:
            raise ValueError("training runs with pp=1; use tp and sp")
        if rt.quantization:
            raise ValueError(f"training updates 16/32-bit weights; load the model without "
                             f"quantization={rt.quantization!r}")
        self.rt, self.tc, self.sp = rt, tc, sp
        self.opt = optimizer(tc, norm_weights(rt))
        # optimizer moments sharded like their parameters, step counts replicated
        abstract = rt.abstract_state()
        param_shardings = jax.tree.map(lambda a: a.sharding, abstract)
        replicated = rt.sharding_of(())
        shardings = optax.tree_map_params(
            self.opt, lambda _, s: s, jax.eval_shape(self.opt.init, abstract), param_shardings,
            transform_non_params=lambda _: replicated)
        self.init = jax.jit(self.opt.init, out_shardings=shardings)

        def grads(state, tokens, mask):
            loss, g = jax.value_and_grad(
                lambda s: loss_fn(rt, sp, tc.remat, s, tokens, mask))(state)
            return loss, tie_kv_replicas(rt, g)

        def step(state, opt_state, tokens, mask):
            loss, g = grads(state, tokens, mask)
            updates, opt_state = self.opt.update(g, opt_state, state)
            return optax.apply_updates(state, updates), opt_state, loss

        self.grads = jax.jit(grads)
        self.step = jax.jit(step, donate_argnums=(0, 1))

    def lower(self, batch: int, tokens: int):
        """The train step lowered for abstract parameters (memory analysis without weights)."""
        state = self.rt.abstract_state()
        opt_state = jax.eval_shape(self.opt.init, state)
        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
        return self.step.lower(state, opt_state, ids, ids)


def unpadded_params(rt: Runtime, state) -> dict[str, np.ndarray]:
    """The model's parameters without tp padding (first replica of each KV head), as host
    arrays keyed by path: what `LLM(cfg, params)` and `bridges.orbax_source.save` take. An FP8
    state gives its FP8 values as stored (contracted axes last) and their `s_*` scales, which
    neither takes (they load 16-bit weights)."""
    return {path_str(p): unpad_param(np.asarray(jax.device_get(v.get_value())),
                                     rt.param_names[path_str(p)], rt.plan)
            for p, v in nnx.to_flat_state(state)}
