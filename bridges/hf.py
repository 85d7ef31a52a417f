"""Hugging Face Llama-family weights -> jax-sp parameters, as data: a key table plus transposes.

Supported: LlamaForCausalLM (Llama 2/3, SmolLM), MistralForCausalLM, Qwen2ForCausalLM. The
result is the *unpadded* parameter set keyed by jax-sp parameter path ("layers/attn/w_qkv_dkch");
per-layer tensors are stacked on a leading L axis. Head/vocab padding for tp is applied later,
by logical axis name, so every weight source shares it (see sharding/padding.py).

HF Linear weights are [out, in]; jax-sp stores [in, out] with heads split out, and projections
that share an input fused on a C axis (vLLM's QKVParallelLinear and gate_up_proj):
  q_proj [N*H, D], k_proj, v_proj [K*H, D] -> w_qkv_dkch [D, K, G + 2, H]
      (by KV group: C 0..G-1 = the group's query heads k*G + c, G = its k, G + 1 = its v)
  gate_proj, up_proj [F, D] -> w_gate_up_dcf [D, 2, F]   (C: 0 = gate, 1 = up)
  o_proj [D, N*H] -> w_o_nhd [N, H, D]    lm_head [V, D] -> head_dv [D, V]
  down_proj [D, F] -> [F, D]
One matmul then reads each fused weight: at batch 1 a GEMV of three times the bytes costs about
what one of the parts alone did, and a layer launches three kernels fewer.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from models.config import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"}

# (HF key with {i} for the layer, jax-sp path, transpose, target dims, part): the key's tensor
# fills the target dims without "C"; a fused target takes it at index `part` of its C axis.
# The q/k/v parts ("q", "k", "v") are placed by KV group instead (GROUPED, `group_qkv`).
KEY_TABLE = [
    ("model.embed_tokens.weight", "embed_vd", False, "VD", None),
    ("model.norm.weight", "final_norm/scale", False, "D", None),
    ("lm_head.weight", "head_dv", True, "DV", None),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm/scale", False, "D", None),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm/scale", False, "D",
     None),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/attn/w_qkv_dkch", True, "DNH", "q"),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/attn/w_qkv_dkch", True, "DKH", "k"),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/attn/w_qkv_dkch", True, "DKH", "v"),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/attn/w_o_nhd", True, "NHD", None),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/attn/b_qkv_kch", False, "NH", "q"),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/attn/b_qkv_kch", False, "KH", "k"),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/attn/b_qkv_kch", False, "KH", "v"),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/mlp/w_gate_up_dcf", True, "DCF", 0),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/mlp/w_gate_up_dcf", True, "DCF", 1),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/mlp/w_down_fd", True, "FD", None),
]
PARTS = 2  # the size of the C axis of gate/up
GROUPED = {"layers/attn/w_qkv_dkch": "DKCH", "layers/attn/b_qkv_kch": "KCH"}  # q/k/v by group


def group_qkv(q, k, v, axis: int):
    """q [..., N, ...], k and v [..., K, ...] (heads at `axis`) -> [..., K, N/K + 2, ...]: each
    KV group's query heads, then its k, then its v (the layout of w_qkv_dkch)."""
    kv_heads = k.shape[axis]
    q = q.reshape(*q.shape[:axis], kv_heads, q.shape[axis] // kv_heads, *q.shape[axis + 1:])
    return np.concatenate([q, np.expand_dims(k, axis + 1), np.expand_dims(v, axis + 1)],
                          axis=axis + 1)

_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
log = logging.getLogger(__name__)


def config_from_hf(hf_config) -> ModelConfig:
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r} "
            f"({getattr(hf_config, 'architectures', None)}); supported: "
            f"{', '.join(ARCHITECTURES.values())}")
    rope = dict(getattr(hf_config, "rope_parameters", None) or {})
    rope_theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    legacy = getattr(hf_config, "rope_scaling", None) or {}
    rope = {**legacy, **rope}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rope_type == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]),
                              int(rope["original_max_position_embeddings"]))
    elif rope_type != "default":
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: 'default', 'llama3'")
    act = getattr(hf_config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"unsupported hidden_act {act!r}; the MLP is SwiGLU (silu)")
    window = getattr(hf_config, "sliding_window", None) or 0
    kinds = getattr(hf_config, "layer_types", None)
    if kinds is None and model_type == "qwen2":  # older configs: sliding from max_window_layers
        slide = getattr(hf_config, "use_sliding_window", False)
        first = getattr(hf_config, "max_window_layers", hf_config.num_hidden_layers)
        kinds = ["sliding_attention" if slide and i >= first else "full_attention"
                 for i in range(hf_config.num_hidden_layers)]
    if kinds is not None and window:
        sliding = [i for i, kind in enumerate(kinds) if kind == "sliding_attention"]
        if not sliding:
            window = 0
        elif len(sliding) < len(kinds):
            raise ValueError(
                f"sliding-window attention on layers {sliding[0]}..{sliding[-1]} only "
                f"({len(sliding)} of {len(kinds)}; Qwen2's max_window_layers): jax-sp applies "
                f"one window to every layer; use a config whose layers all slide or none do")
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None)
        or hf_config.num_attention_heads,
        head_dim=getattr(hf_config, "head_dim", None) or 0,
        rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(rope_theta),
        rope_scaling=scaling,
        qkv_bias=model_type == "qwen2" or bool(getattr(hf_config, "attention_bias", False)),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        max_position_embeddings=getattr(hf_config, "max_position_embeddings", 4096),
        sliding_window=window,
    )


def _to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:  # numpy has no bf16: widen losslessly
        t = t.float()
    return t.contiguous().numpy()


def _groups(shape, target) -> bool:
    """Whether each dim of `shape` is the product of consecutive dims of `target`
    (so a reshape only splits dims, e.g. [D, N*H] -> [D, N, H])."""
    dims = list(target)
    for size in shape:
        prod = 1
        while dims and prod < size:
            prod *= dims.pop(0)
        if prod != size:
            return False
    return not dims


def sizes_of(cfg: ModelConfig) -> dict[str, int]:
    """The size of each dimension letter of KEY_TABLE."""
    return {"V": cfg.vocab_size, "D": cfg.hidden_size, "F": cfg.intermediate_size,
            "N": cfg.num_heads, "K": cfg.num_kv_heads, "H": cfg.head_dim, "C": PARTS}


def _expected_keys(cfg: ModelConfig):
    """Yield (hf_key, path, layer or None, transpose, dims, part) for every tensor cfg needs."""
    for hf_key, path, transpose, dims, part in KEY_TABLE:
        if "bias" in hf_key and not cfg.qkv_bias:
            continue
        if hf_key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if "{i}" in hf_key:
            for i in range(cfg.num_layers):
                yield hf_key.format(i=i), path, i, transpose, dims, part
        else:
            yield hf_key, path, None, transpose, dims, part


def check_names(cfg: ModelConfig, present, where: str = "", error=ValueError) -> list:
    """The (hf_key, path, layer, transpose, dims, part) entries cfg needs; raises `error` naming the
    checkpoint keys (and the parameters they are for) that are missing or unexpected."""
    expected = list(_expected_keys(cfg))
    present = set(present)
    where = f"{where}: " if where else ""
    missing = [(k, p) for k, p, *_ in expected if k not in present]
    if missing:
        shown = ", ".join(f"{k} (for {p})" for k, p in missing[:5])
        raise error(f"{where}{len(missing)} checkpoint tensor(s) missing: {shown}"
                    + (" ..." if len(missing) > 5 else ""))
    known = {k for k, *_ in expected}
    if cfg.tie_word_embeddings:
        known.add("lm_head.weight")  # some tied checkpoints still store the alias
    unexpected = sorted(k for k in present - known if not _IGNORED.match(k))
    if unexpected:
        raise error(f"{where}{len(unexpected)} unexpected checkpoint tensor(s), not in the key "
                    f"table: {', '.join(unexpected[:5])}")
    return expected


def params_from_state_dict(state_dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Map an HF state dict (name -> tensor or array) to stacked jax-sp parameters."""
    sizes = sizes_of(cfg)
    expected = check_names(cfg, state_dict)

    blocks: dict[str, dict] = {}  # path -> {(layer, part): array}
    for hf_key, path, layer, transpose, dims, part in expected:
        value = state_dict[hf_key]
        x = _to_numpy(value) if type(value).__module__.startswith("torch") else np.asarray(value)
        if transpose:
            x = x.T
        target = tuple(sizes[d] for d in dims.replace("C", ""))
        if not _groups(x.shape, target):
            raise ValueError(f"checkpoint tensor {hf_key} has shape {tuple(value.shape)}, which "
                             f"does not fit {path} [{dims}] = {target}"
                             + ("" if part is None else f" (part {part})"))
        blocks.setdefault(path, {})[layer, part] = (x.reshape(target), dims)
    params: dict[str, np.ndarray] = {}
    for path, got in blocks.items():
        layers = sorted({layer for layer, _ in got})
        per_layer = []
        for layer in layers:
            if path in GROUPED:
                (q, dims), (k, _), (v, _) = (got[layer, p] for p in "qkv")
                per_layer.append(group_qkv(q, k, v, dims.index("N")))
                continue
            parts = sorted((p for lay, p in got if lay == layer), key=lambda p: p or 0)
            arrays = [got[layer, p][0] for p in parts]
            dims = got[layer, parts[0]][1]
            per_layer.append(np.stack(arrays, dims.index("C")) if "C" in dims else arrays[0])
        params[path] = per_layer[0] if layers == [None] else np.stack(per_layer)
    return params


def load_module(module) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """An HF causal-LM module -> (ModelConfig, unpadded parameters)."""
    name = type(module).__name__
    if name not in ARCHITECTURES.values():
        raise ValueError(f"unsupported module {name}; supported: "
                         f"{', '.join(ARCHITECTURES.values())}")
    cfg = config_from_hf(module.config)
    _check_rope_buffer(module, name)
    return cfg, params_from_state_dict(module.state_dict(), cfg)


def _check_rope_buffer(module, name):
    """jax-sp computes RoPE frequencies in float32 from the config, as vLLM and an HF model made
    by from_pretrained/from_config(dtype=...) do. `module.to(torch.bfloat16)` also rounds the
    rotary inv_freq buffer to bf16, which moves the module's angles by up to 0.4% of the
    position: its outputs then drift from jax-sp's (and the checkpoint's) with position."""
    import torch

    rounded = sorted({str(v.dtype) for k, v in module.named_buffers()
                      if _IGNORED.match(k) and v.dtype != torch.float32})
    if rounded:
        log.warning("%s's rotary inv_freq buffer is %s (module.to(dtype) casts it): jax-sp "
                    "uses float32 RoPE frequencies from the config, so the two differ at long "
                    "positions. Build the module with from_pretrained(..., dtype=...) or "
                    "from_config(config, dtype=...) to keep the buffer in float32.",
                    name, "/".join(rounded))
