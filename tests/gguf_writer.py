"""Write a Hugging Face Llama module as a GGUF file the way llama.cpp's converter does (tensor
names, metadata, q/k rows permuted for its RoPE), with the `gguf` package. For tests."""

from __future__ import annotations

import gguf
import numpy as np

NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight", "self_attn.q_proj.weight":
    "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight":
    "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight":
    "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight":
    "ffn_down.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias", "self_attn.v_proj.bias": "attn_v.bias",
}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def gguf_name(key: str) -> str:
    if key.startswith("model.layers."):
        _, _, i, rest = key.split(".", 3)
        return f"blk.{i}.{NAMES[rest]}"
    return NAMES[key]


def quantize_like_gguf(w: np.ndarray, qtype) -> np.ndarray:
    """What a GGUF reader gets back for w stored as qtype (2-D weights; 1-D stay F32)."""
    if w.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
        return w
    return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)


def write_gguf(model, path: str, qtype=gguf.GGMLQuantizationType.F32,
               rope_scaling: tuple[str, float] | None = None) -> None:
    c = model.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_rope_dimension_count(c.head_dim)
    if rope_scaling is not None:  # (type, factor), as llama.cpp writes linear/yarn scaling
        w.add_rope_scaling_type(gguf.RopeScalingType(rope_scaling[0]))
        w.add_rope_scaling_factor(rope_scaling[1])
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and c.tie_word_embeddings:
            continue
        x = t.detach().float().numpy()
        if key.endswith("o_proj.bias"):  # jax-sp has no o_proj bias: only zeros may be dropped
            assert not x.any(), key
            continue
        if key.endswith(("q_proj.weight", "q_proj.bias")):  # llama.cpp permutes both
            x = permute(x, c.num_attention_heads)
        elif key.endswith(("k_proj.weight", "k_proj.bias")):
            x = permute(x, c.num_key_value_heads)
        if x.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(key), gguf.quants.quantize(x, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gguf_name(key), np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
