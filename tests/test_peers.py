"""The PyTorch peers used by the benchmarks compute what HF transformers computes."""

import sys
from pathlib import Path

import pytest
import torch

from conftest import hf_greedy, random_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from peers_torch import FastLlama, fast_generate  # noqa: E402


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_fast_llama_greedy_equals_hf(hf_models, kind):
    model = hf_models(kind)
    prompts = random_prompts(model.config.vocab_size, (11, 11), seed=2)  # same length: a batch
    fast = FastLlama(model, max_batch=2, max_seq=64)
    got = fast_generate(fast, torch.tensor(prompts), max_new_tokens=10).tolist()
    assert got == hf_greedy(model, prompts, 10)
