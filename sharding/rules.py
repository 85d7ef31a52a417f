"""Logical axis name -> mesh axis: one table per SP mode. The only place a layout is chosen.

Logical names used by `models/`:
  parameters   layers, vocab, embed, heads (o_proj's query heads), qkv_heads (the KV groups of
               the fused q/k/v weight), head_dim, mlp, norm
  activations  act_tokens (residual-stream rows), act_gathered (input rows of a column-parallel
               matmul), attn_tokens (the rows attention works on: q/k/v's output, attention's
               output, o_proj's input), act_embed (the D of activations)
  KV cache     cache_batch, cache_seq (and kv_heads, head_dim)

Under plain TP (Megatron) q/k/v and gate/up are column-parallel (KV groups, mlp split),
o_proj and down_proj row-parallel, embedding and LM head vocab-parallel, the residual replicated.
SP differs in one entry: the residual stream's tokens are split over "tp". A "cfg" mesh axis
of 2 splits the batch over it, and attention data-parallel groups are a two-axis view of tp
(`rules_for`).
"""

from __future__ import annotations

from jax.sharding import NamedSharding, PartitionSpec as P

TP_RULES: dict[str, str | None] = {
    "layers": None,
    "vocab": "tp",
    "embed": None,
    "heads": "tp",
    "kv_heads": "tp",
    "qkv_heads": "tp",
    "head_dim": None,
    "mlp": "tp",
    "norm": None,
    "act_tokens": None,
    "act_gathered": None,
    "attn_tokens": None,
    "act_embed": None,
    "cache_batch": None,
    "cache_seq": None,
}

SP_RULES: dict[str, str | None] = {**TP_RULES, "act_tokens": "tp"}

RULES = {"off": TP_RULES, "on": SP_RULES}


def attn_dp_rules(sp: bool) -> dict[str, str | tuple[str, ...] | None]:
    """The table on a mesh whose tp devices form attention data-parallel groups
    (ParallelConfig(attn_dp=G): axes "attn_dp" of G and "attn_tp" of tp/G, SGLang's DP
    attention). Whatever splits over tp splits over both axes (embedding, MLP and LM head
    over all tp devices; SP's token shards); attention's heads (q/k/v, o_proj, the KV cache's
    heads) split over "attn_tp" only, and its rows and the cache's sequences over "attn_dp": a
    group owns B/G whole sequences (the flattened rows of a batch that G divides), its KV heads
    split over its tp/G devices.

    Between them GSPMD moves the tokens with the collectives SP already has, over one axis
    each. sp="off": before attention nothing (each group reads its rows of the replicated
    stream), after o_proj an all-reduce over "attn_tp" and an all-gather over "attn_dp".
    sp="on": before q/k/v an all-gather over "attn_tp" (the group's tokens), after o_proj a
    reduce-scatter over "attn_tp"; the MLP's gather and scatter span both axes."""
    tp = ("attn_dp", "attn_tp")
    return {**TP_RULES, "vocab": tp, "mlp": tp, "heads": "attn_tp", "kv_heads": "attn_tp",
            "qkv_heads": "attn_tp", "act_tokens": tp if sp else None, "attn_tokens": "attn_dp",
            "cache_batch": "attn_dp"}


def rules_for(sp: bool, mesh) -> dict[str, str | tuple[str, ...] | None]:
    """The table for a mode on a mesh. With a "cfg" axis of 2 (classifier-free guidance's
    branches on two halves of the devices, ParallelConfig(cfg=2)) the batch is split over it:
    the activations' rows (tokens of both branches, first half conditional) over "cfg" (and
    "tp" within it under SP), and the KV cache's batch. A mesh with an "attn_dp" axis takes
    `attn_dp_rules`."""
    if "attn_dp" in mesh.axis_names:
        return attn_dp_rules(sp)
    rules = RULES["on" if sp else "off"]
    if dict(mesh.shape).get("cfg", 1) == 1:
        return rules
    return {**rules, "act_tokens": ("cfg", "tp") if sp else "cfg", "act_gathered": "cfg",
            "attn_tokens": "cfg", "cache_batch": "cfg"}


def spec(names, rules: dict[str, str | None]) -> P:
    """PartitionSpec of mesh axes for a tuple of logical names (None stays None)."""
    unknown = [n for n in names if n is not None and n not in rules]
    if unknown:
        raise KeyError(f"logical axis names {unknown} have no rule; known: {sorted(rules)}")
    return P(*(None if n is None else rules[n] for n in names))


def named(mesh, names, rules) -> NamedSharding:
    return NamedSharding(mesh, spec(names, rules))
