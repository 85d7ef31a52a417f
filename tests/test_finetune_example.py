"""examples/finetune_smollm2.py: tunes the embedded model and saves a loadable checkpoint."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import finetune_smollm2  # noqa: E402

from jax_sp import LLM, ParallelConfig  # noqa: E402

pytestmark = pytest.mark.slow  # runs the example script end to end


def test_finetune_lowers_the_loss_and_saves_a_loadable_checkpoint(tmp_path, smollm2):
    text = tmp_path / "one_chunk.txt"
    text.write_text("Sequence parallelism splits the residual stream over devices. " * 12)
    out = tmp_path / "tuned"
    losses, cfg, params = finetune_smollm2.main(
        ["--text", str(text), "--out", str(out), "--steps", "4", "--tp", "2", "--seq-len", "32",
         "--batch", "1", "--lr", "1e-3"])
    assert losses[-1] < losses[0], losses
    loaded = LLM.from_pretrained(str(out), parallel=ParallelConfig(tp=2))
    assert loaded.tokenizer is not None
    prompts = [[1, 504, 3458, 282, 4649]]
    want = LLM(cfg, params).logits(prompts)[0]
    np.testing.assert_allclose(loaded.logits(prompts)[0], want, atol=1e-4, rtol=1e-4)
    original = LLM(*smollm2[:2]).logits(prompts)[0]
    assert np.abs(want - original).max() > 1e-3  # the weights did change
