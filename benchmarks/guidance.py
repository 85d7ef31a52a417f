"""Classifier-free guidance's decode step: both branches batched on the same devices (cfg 1)
against each branch on its half of the devices (cfg 2), at the same tp, with the unguided step
of the same prompts as the reference (what guidance costs). Random weights of a preset shape,
greedy, medians over repeats, compile excluded. Result: benchmarks/results/guidance_<machine>.jsonl.

    python benchmarks/guidance.py [--model smollm2] [--batch 8] [--tp 1,2]

On CPU the devices are simulated (XLA_FLAGS=--xla_force_host_platform_device_count=8, set here
before jax is imported) and share the machine's cores: cfg 2 cannot be faster there, and the
result shows the cost of the layout, not a speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import common  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=8, help="prompts (each with its twin)")
    ap.add_argument("--tp", default="1,2")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 else")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import jax
    import numpy as np

    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import random_params

    gpu = jax.default_backend() == "gpu"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")
    tag = common.machine().split(" ", 1)[1].split()[-1].lower() if gpu else "cpu"
    out = args.out or os.path.join(common.RESULTS, f"guidance_{tag}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__, model=args.model,
                         dtype=dtype, batch=args.batch, prompt=args.prompt,
                         new_tokens=args.new_tokens)
    cfg = preset(args.model)
    params = random_params(cfg)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist() for _ in range(args.batch)]
    negatives = [rng.integers(0, cfg.vocab_size, args.prompt // 4).tolist()
                 for _ in range(args.batch)]
    n = args.new_tokens
    for tp in [int(t) for t in args.tp.split(",")]:
        for cfg_groups in (1, 2):
            if tp * cfg_groups > jax.device_count():
                continue
            llm = LLM(cfg, params, parallel=ParallelConfig(tp=tp, cfg=cfg_groups), dtype=dtype,
                      max_seq_len=args.prompt + n + 16)
            cases = {"guided": (SamplingParams(max_new_tokens=n, guidance_scale=1.5,
                                               stop_token_ids=()), negatives)}
            if cfg_groups == 1:
                cases["unguided"] = (SamplingParams(max_new_tokens=n, stop_token_ids=()), None)
            for case, (sampling, negs) in cases.items():
                llm.generate(prompts, sampling, negative_prompts=negs)  # compiled, warm
                steps = []
                for _ in range(args.repeats):
                    llm.generate(prompts, sampling, negative_prompts=negs)
                    steps.append(llm.last_stats.decode_s / (n - 1) * 1e3)
                res.emit({"bench": "step", "tp": tp, "cfg": cfg_groups, "case": case,
                          "devices": tp * cfg_groups, "ms_per_step": statistics.median(steps),
                          "spread_ms": [min(steps), max(steps)]})
            del llm


if __name__ == "__main__":
    main()
