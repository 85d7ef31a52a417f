"""LLM: the public engine. Loads weights onto a mesh and runs forwards and generation.

The engine knows token ids, batches and padding; tokenization is the tokenizer's business and the
parallel layout is the rules table's. A forward's tokens are padded per sequence up to a compile
bucket that is a multiple of tp (so SP can split B*T rows evenly); pad tokens sit after the real
ones, are masked as keys, and their outputs are dropped.
"""

from __future__ import annotations

import numpy as np

from jax_sp.config import ModelConfig, ParallelConfig
from jax_sp.runtime import Runtime, round_up

MIN_BUCKET = 16


def bucket(num_tokens: int, tp: int) -> int:
    """Compile bucket for a per-sequence length: the next power of two (>= MIN_BUCKET), rounded up
    to a multiple of tp, so nearby lengths share one compiled function."""
    size = MIN_BUCKET
    while size < num_tokens:
        size *= 2
    return round_up(size, tp)


class LLM:
    def __init__(self, cfg: ModelConfig, host_params, *, parallel: ParallelConfig | None = None,
                 dtype="float32", max_seq_len: int = 2048, tokenizer=None):
        self.cfg = cfg
        self.parallel = parallel or ParallelConfig()
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.runtime = Runtime(cfg, self.parallel, dtype)
        self.state = self.runtime.place(host_params)

    @classmethod
    def from_torch(cls, module, tokenizer=None, *, parallel: ParallelConfig | None = None,
                   dtype="float32", max_seq_len: int = 2048):
        """From an HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM module."""
        from bridges.hf import load_module  # torch is imported only on this path

        cfg, params = load_module(module)
        return cls(cfg, params, parallel=parallel, dtype=dtype, max_seq_len=max_seq_len,
                   tokenizer=tokenizer)

    # -- input checks --------------------------------------------------------------------------

    def _check_ids(self, prompts) -> list[list[int]]:
        if isinstance(prompts, (str, bytes)) or not len(prompts):
            raise ValueError("expected a non-empty list of token-id lists, e.g. [[1, 2, 3]]")
        out = []
        for i, ids in enumerate(prompts):
            ids = [int(t) for t in np.asarray(ids).reshape(-1)]
            if not ids:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside "
                                 f"[0, {self.cfg.vocab_size})")
            if len(ids) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than max_seq_len="
                                 f"{self.max_seq_len}")
            out.append(ids)
        return out

    def _pack(self, prompts: list[list[int]]):
        """Right-pad to a shared bucket: tokens [B, T], positions [B, T], lengths [B]."""
        t = bucket(max(len(p) for p in prompts), self.parallel.tp)
        tokens = np.zeros((len(prompts), t), np.int32)
        for b, ids in enumerate(prompts):
            tokens[b, : len(ids)] = ids
        positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape).copy()
        lengths = np.array([len(p) for p in prompts], np.int32)
        return tokens, positions, lengths

    # -- forwards ------------------------------------------------------------------------------

    def logits(self, prompts) -> list[np.ndarray]:
        """Full prefill logits of each prompt: a list of float32 arrays [T_i, V]."""
        prompts = self._check_ids(prompts)
        tokens, positions, lengths = self._pack(prompts)
        sp = self.parallel.use_sp(tokens.size)
        logits, _ = self.runtime.prefill_logits(sp)(self.state, tokens, positions, lengths)
        logits = np.asarray(logits).reshape(*tokens.shape, -1)
        return [logits[b, :n] for b, n in enumerate(lengths)]

    def residual_stream(self, prompts, sp: bool):
        """The residual stream after each layer, [L, B*T, D], as sharded device arrays (for
        inspecting layouts)."""
        tokens, positions, lengths = self._pack(self._check_ids(prompts))
        return self.runtime.prefill_logits(sp, True)(self.state, tokens, positions, lengths)[1]
