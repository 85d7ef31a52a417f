"""PyTorch peers of jax-sp's generation, for benchmarks on the same weights and prompts.

- `hf_eager`: transformers' own `generate` (dynamic cache, eager).
- `hf_static_generate`: transformers' `generate` with `cache_implementation="static"` and a
  `CompileConfig`, the documented way to compile its decode step (generate compiles the
  one-token forward itself; wrapping `model.forward` in torch.compile by hand is what fails with
  "accessing tensor output of CUDAGraphs that has been overwritten").
- `FastLlama`: a compact decode loop in the style of gpt-fast — the HF weights in a small
  Llama module with a static KV cache [B, K, S, H], prefill and a one-token step; with
  `compile=True` the step is `torch.compile(mode="reduce-overhead", fullgraph=True)` (CUDA
  graphs), the strongest single-GPU PyTorch peer.

Both are checked against each other in tests/test_peers.py (greedy tokens, CPU, compile off).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def hf_eager_generate(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """Greedy continuation by transformers' generate, no stop token: [B, max_new_tokens]."""
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0)
    return out[:, input_ids.shape[1]:]


def hf_static_generate(model, input_ids: torch.Tensor, max_new_tokens: int,
                       mode: str = "reduce-overhead") -> torch.Tensor:
    """Greedy continuation by transformers' generate with a static cache whose decode step
    generate compiles with torch.compile(mode=mode): [B, max_new_tokens]."""
    from transformers import CompileConfig

    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                             max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=0, cache_implementation="static",
                             compile_config=CompileConfig(mode=mode))
    return out[:, input_ids.shape[1]:]


def _rope_inv_freq(config) -> torch.Tensor:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = getattr(config, "rope_parameters", None) or {"rope_type": "default"}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)
    return ROPE_INIT_FUNCTIONS[kind](config, "cpu")[0]


class FastLlama(nn.Module):
    """Llama-family decoder with a static KV cache (gpt-fast's shape of code). Weights are the
    HF module's own tensors (shared, not copied)."""

    def __init__(self, hf_model, max_batch: int, max_seq: int):
        super().__init__()
        c = hf_model.config
        self.n_heads, self.n_kv = c.num_attention_heads, c.num_key_value_heads
        self.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        self.eps = c.rms_norm_eps
        self.hf = hf_model
        p = next(hf_model.parameters())
        shape = (c.num_hidden_layers, max_batch, self.n_kv, max_seq, self.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=p.dtype, device=p.device))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=p.dtype, device=p.device))
        inv = _rope_inv_freq(c).to(p.device)
        freqs = torch.outer(torch.arange(max_seq, device=p.device, dtype=torch.float), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos().to(p.dtype))
        self.register_buffer("sin", emb.sin().to(p.dtype))
        mask = torch.tril(torch.ones(max_seq, max_seq, dtype=torch.bool, device=p.device))
        self.register_buffer("causal", mask)

    def _norm(self, x, weight):
        x32 = x.float()
        return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    @staticmethod
    def _rotate(x, cos, sin):  # x [B, heads, T, H], cos/sin [T, H]
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """idx [B, T] at positions input_pos [T] (shared by the batch) -> logits [B, T, V]."""
        m = self.hf.model
        b, t = idx.shape
        x = m.embed_tokens(idx)
        cos, sin = self.cos[input_pos], self.sin[input_pos]
        mask = self.causal[input_pos][:, : self.k_cache.shape[3]]  # [T, S]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            h = self._norm(x, layer.input_layernorm.weight)
            q = a.q_proj(h).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
            k = a.k_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            v = a.v_proj(h).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = self._rotate(q, cos, sin), self._rotate(k, cos, sin)
            self.k_cache[i, :b, :, input_pos] = k
            self.v_cache[i, :b, :, input_pos] = v
            y = F.scaled_dot_product_attention(
                q, self.k_cache[i, :b], self.v_cache[i, :b], attn_mask=mask,
                enable_gqa=self.n_heads != self.n_kv, scale=1 / math.sqrt(self.head_dim))
            x = x + a.o_proj(y.transpose(1, 2).reshape(b, t, -1))
            h = self._norm(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.hf.lm_head(self._norm(x, m.norm.weight))


def fast_generate(model: FastLlama, input_ids: torch.Tensor, max_new_tokens: int,
                  compile: bool = False) -> torch.Tensor:
    """Greedy: prefill, then one-token steps (compiled with CUDA graphs when asked)."""
    b, t = input_ids.shape
    step = model.forward
    if compile:
        step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        pos = torch.arange(t, device=input_ids.device)
        token = model(input_ids, pos)[:, -1].argmax(-1, keepdim=True)
        out = [token]
        for i in range(max_new_tokens - 1):
            pos = torch.tensor([t + i], device=input_ids.device)
            token = step(token, pos)[:, -1].argmax(-1, keepdim=True).clone()
            out.append(token)
    return torch.cat(out, dim=1)
