"""Model shapes by name, for `jax-sp inspect` and benchmarks (shapes only, no weights)."""

from __future__ import annotations

from models.config import ModelConfig, RopeScaling

_LLAMA3_ROPE = dict(rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=131072)

PRESETS: dict[str, ModelConfig] = {
    "smollm2": ModelConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                           num_layers=30, num_heads=9, num_kv_heads=3, rope_theta=100000.0,
                           tie_word_embeddings=True, max_position_embeddings=8192),
    "llama3.2-1b": ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                               num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
                               tie_word_embeddings=True,
                               rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192), **_LLAMA3_ROPE),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                             num_layers=32, num_heads=32, num_kv_heads=8,
                             rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **_LLAMA3_ROPE),
    "llama3-70b": ModelConfig(vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                              num_layers=80, num_heads=64, num_kv_heads=8,
                              rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192), **_LLAMA3_ROPE),
    # fewer KV heads than a tp-8 node has devices (attention groups: docs/attn_dp.md)
    "qwen2.5-7b": ModelConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                              num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128,
                              qkv_bias=True, rope_theta=1000000.0, rms_norm_eps=1e-6,
                              max_position_embeddings=32768),
    "qwen2.5-1.5b": ModelConfig(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                                num_layers=28, num_heads=12, num_kv_heads=2, head_dim=128,
                                qkv_bias=True, tie_word_embeddings=True, rope_theta=1000000.0,
                                rms_norm_eps=1e-6, max_position_embeddings=32768),
}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model shape {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]
