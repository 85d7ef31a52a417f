"""FP8 against 16/32-bit: how far the logits move when the layers' projections run in FP8, and
when the KV cache is stored in FP8.

For each model, the prefill logits of a set of prompts with quantization="fp8" (and
"fp8-head": the LM head, or a tied embedding, too) next to the same model without it, the same
weights and dtype: relative L2 error of each prompt's logits and top-1 agreement over every
position, for both FP8 paths: W8A8 (tokens and weights in FP8: `fp8_gemv="off"`, what every
forward of more than 64 rows runs) and weight-only (16-bit tokens times the widened FP8 weights:
each prompt on its own, at most 64 rows, as decode steps run). Models: the embedded
SmolLM2-135M-Instruct (real weights, chat prompts) and the tests' tiny Llama and Qwen2 (random
weights, random token ids). Runs on CPU; the numbers are XLA's FP8 arithmetic, which a GPU's FP8
GEMM computes too (up to its accumulation order). The KV cache (`kv_cache_dtype="fp8"`, 16/32-bit
weights): the logits of each prompt's second half read over a cache of its first half, against
the full prefill's.

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


def cached_logits(llm, prompt, split: int):
    """f32 logits of prompt[split:] [T - split, V] read over a KV cache that holds
    prompt[:split]: a prefill of the first `split` tokens into the cache, then one forward of the
    rest over it (as a chunked prefill's later chunks and, a token at a time, decode steps read
    the cache), with the cache in `llm`'s kv_cache_dtype. One stage (pp=1), sp off."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jax_sp.generate import Static, _forward, _logits
    from jax_sp.runtime import round_up

    rt, t = llm.runtime, len(prompt)
    st = Static.of(rt, "decode", sp=False)

    def run(state, tokens_bt):
        cache = rt.empty_cache(1, round_up(t, 16))
        head = jnp.arange(split, dtype=jnp.int32)[None]
        cache = _forward(rt, st, state, cache, head, jnp.full((1,), split, jnp.int32),
                         fresh=True, tokens_bt=tokens_bt[:, :split]).cache
        rest = jnp.arange(split, t, dtype=jnp.int32)[None]
        out = _forward(rt, st, state, cache, rest, jnp.full((1,), t, jnp.int32),
                       tokens_bt=tokens_bt[:, split:])
        return _logits(rt, out)

    return np.asarray(jax.jit(run)(llm.state, jnp.asarray([prompt], jnp.int32)))


def emit(results, name, quantization, path, prompts, full, a, b):
    """Relative L2 error of each prompt's logits b against a (`full`'s) [T_i, V], and top-1
    agreement over every position."""
    import numpy as np

    rel = [float(np.linalg.norm(x - y) / np.linalg.norm(x)) for x, y in zip(a, b)]
    same = np.concatenate([x.argmax(-1) == y.argmax(-1) for x, y in zip(a, b)])
    results.emit({"model": name, "quantization": quantization, "path": path,
                  "prompts": len(prompts), "tokens": int(sum(len(x) for x in a)),
                  "rel_l2_median": float(np.median(rel)), "rel_l2_max": max(rel),
                  "top1_agreement": float(same.mean()), "dtype": str(full.runtime.dtype.__name__)})


def compare(results, name, full, fp8, prompts, path, quantization):
    a = full.logits(prompts)
    # weight-only: one prompt at a time, so each forward has at most 64 rows
    b = fp8.logits(prompts) if path == "W8A8" else [fp8.logits([p])[0] for p in prompts]
    emit(results, name, quantization, path, prompts, full, a, b)


def compare_cache(results, name, full, kv, prompts):
    """The logits of each prompt's second half over an FP8 KV cache of its first half
    (`cached_logits`) against the same positions of the full prefill (no cache read)."""
    emit(results, name, "kv_cache_dtype=fp8", "KV cache", prompts, full,
         [full.logits([p])[0][len(p) // 2:] for p in prompts],
         [cached_logits(kv, p, len(p) // 2) for p in prompts])


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
    kv = CompileOptions(kv_cache_dtype="fp8")
    compare_cache(results, "smollm2-135m-instruct", llm,
                  LLM.from_pretrained("smollm2", progress=False, options=kv), chats)
    for kind in ("llama", "qwen2"):
        model = _build(kind)
        prompts = random_prompts(model.config.vocab_size, (9, 4, 13, 30, 61, 7, 22, 40), seed=2)
        full = LLM.from_torch(model)
        for q in QUANTIZATIONS:
            for path, gemv in paths.items():
                compare(results, f"tiny-{kind} (random)", full,
                        LLM.from_torch(model, quantization=q,
                                       options=CompileOptions(fp8_gemv=gemv)), prompts, path, q)
        compare_cache(results, f"tiny-{kind} (random)", full, LLM.from_torch(model, options=kv),
                      prompts)


if __name__ == "__main__":
    main()
