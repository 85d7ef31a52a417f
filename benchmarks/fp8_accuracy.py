"""FP8 against 16/32-bit: how far the logits move when the layers' projections run in FP8.

For each model, the prefill logits of a set of prompts with quantization="fp8" (and
"fp8-head": the LM head, or a tied embedding, too) next to the same model without it, the same weights and dtype: relative L2 error of each prompt's logits and
top-1 agreement over every position, for both FP8 paths: W8A8 (tokens and weights in FP8:
`fp8_gemv="off"`, what every forward of more than 64 rows runs) and weight-only (16-bit tokens
times the widened FP8 weights: each prompt on its own, at most 64 rows, as decode steps run). Models: the embedded SmolLM2-135M-Instruct (real weights,
chat prompts) and the tests' tiny Llama and Qwen2 (random weights, random token ids). Runs on
CPU; the numbers are XLA's FP8 arithmetic, which a GPU's FP8 GEMM computes too (up to its
accumulation order).

    python benchmarks/fp8_accuracy.py --out benchmarks/results/fp8_accuracy_cpu.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")

from common import ROOT, Results  # noqa: E402  (and the repository on the import path)

sys.path.insert(0, os.path.join(ROOT, "tests"))

QUANTIZATIONS = ("fp8", "fp8-head")  # the layers' projections; and the LM head
CHATS = ["What is the capital of France?", "Name three primary colours.",
         "Write a haiku about the sea.", "Explain what a prime number is in one sentence.",
         "Translate 'good morning' into Spanish.", "What is 12 times 12?",
         "Give me a synonym for 'happy'.", "Who wrote Romeo and Juliet?"]


def compare(results, name, full, fp8, prompts, path, quantization):
    import numpy as np

    a = full.logits(prompts)
    # weight-only: one prompt at a time, so each forward has at most 64 rows
    b = fp8.logits(prompts) if path == "W8A8" else [fp8.logits([p])[0] for p in prompts]
    rel = [float(np.linalg.norm(x - y) / np.linalg.norm(x)) for x, y in zip(a, b)]
    same = np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b)])
    results.emit({"model": name, "quantization": quantization, "path": path,
                  "prompts": len(prompts),
                  "tokens": int(sum(len(p) for p in prompts)),
                  "rel_l2_median": float(np.median(rel)), "rel_l2_max": max(rel),
                  "top1_agreement": float(same.mean()), "dtype": str(full.runtime.dtype.__name__)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    from conftest import _build, random_prompts
    from jax_sp import LLM, CompileOptions

    results = Results(args.out or None, bench="fp8_accuracy")
    paths = {"W8A8": "off", "weight-only": "xla"}
    llm = LLM.from_pretrained("smollm2", progress=False)
    chats = [llm.encode(c) for c in CHATS]
    assert max(map(len, chats)) <= 64, "a chat prompt over 64 tokens would not run weight-only"
    for q in QUANTIZATIONS:
        for path, gemv in paths.items():
            fp8 = LLM.from_pretrained("smollm2", progress=False, quantization=q,
                                      options=CompileOptions(fp8_gemv=gemv))
            compare(results, "smollm2-135m-instruct", llm, fp8, chats, path, q)
    for kind in ("llama", "qwen2"):
        model = _build(kind)
        prompts = random_prompts(model.config.vocab_size, (9, 4, 13, 30, 61, 7, 22, 40), seed=2)
        full = LLM.from_torch(model)
        for q in QUANTIZATIONS:
            for path, gemv in paths.items():
                compare(results, f"tiny-{kind} (random)", full,
                        LLM.from_torch(model, quantization=q,
                                       options=CompileOptions(fp8_gemv=gemv)), prompts, path, q)


if __name__ == "__main__":
    main()
