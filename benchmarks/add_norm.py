"""The residual add and RMSNorm of a decode step in one Pallas kernel (models/add_norm.py,
CompileOptions.add_norm) against XLA's two kernels, side by side: decode ms/token of a model on
random weights, each variant built in one process and timed in alternation (round after round,
each variant once a round), with the copy bandwidth measured in the same run.

Variants: 16 bits and FP8 with the LM head, each with add_norm="xla" and "pallas", and FP8 with
"pallas" and CompileOptions.launch_dependents too (models/pdl.py). "of_copy": the bytes a step
reads (the state less the embedding table) over the time, against that bandwidth; every variant
must give the tokens of its quantization's "xla" variant (`same_tokens`).
Result: benchmarks/results/add_norm_<card>_<model>[_<tag>].jsonl.

    python benchmarks/add_norm.py [--model llama3-8b] [--batches 1] [--rounds 7] [--tiny]
"""

from __future__ import annotations

import argparse
import os
import statistics

import common

VARIANTS = {"bf16": [("xla", False)],
            "fp8-head": [("xla", False), ("pallas", False), ("pallas", True)]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--quantizations", default="bf16,fp8-head")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 16 new tokens (CPU plumbing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default=None, help="suffix of the result file")
    args = ap.parse_args()

    import dataclasses

    import jax
    import numpy as np

    from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import random_params

    cfg = preset(args.model)
    if args.tiny:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.new_tokens = 16
    gpu = jax.default_backend() == "gpu"
    card = jax.devices()[0].device_kind
    tag = next((c.lower() for c in ("H200", "H100") if gpu and c in card), jax.default_backend())
    suffix = "".join(f"_{t}" for t in (args.tag, "tiny" if args.tiny else None) if t)
    out = args.out or os.path.join(common.RESULTS, f"add_norm_{tag}_{args.model}{suffix}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__, model=args.model)
    bandwidth, kinds = common.copy_bandwidth((1 << 22) if args.tiny else (1 << 30))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()}})

    params = random_params(cfg)
    table = common.unread_embedding_bytes(cfg)  # bf16 either way
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_new_tokens=args.new_tokens)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        variants = {}  # (quantization, add_norm, launch_dependents) -> (llm, tokens)
        for q in args.quantizations.split(","):
            for mode, signal in VARIANTS[q]:
                llm = LLM(cfg, params, parallel=ParallelConfig(tp=1), dtype="bfloat16",
                          max_seq_len=args.prompt + args.new_tokens + 64,
                          options=CompileOptions(add_norm=mode, launch_dependents=signal),
                          quantization=None if q == "bf16" else q)
                tokens = [c.token_ids for c in llm.generate(ids, sp)]
                variants[q, mode, signal] = (llm, tokens)
        times = common.decode_rounds({key: llm for key, (llm, _) in variants.items()}, ids, sp,
                                     args.rounds)
        medians = {key: statistics.median(t) for key, t in times.items()}
        for (q, mode, signal), (llm, tokens) in variants.items():
            per = medians[q, mode, signal]
            read = sum(x.nbytes for x in jax.tree.leaves(llm.state)) - table
            res.emit({"bench": "decode", "quantization": q, "add_norm": mode,
                      "launch_dependents": signal, "batch": batch, "prompt": args.prompt,
                      "new_tokens": args.new_tokens, "ms_per_token": per * 1e3,
                      "runs_ms": [t * 1e3 for t in times[q, mode, signal]],
                      "speedup_vs_xla": medians[q, "xla", False] / per,
                      "speedup_vs_bf16": (medians["bf16", "xla", False] / per
                                          if ("bf16", "xla", False) in medians else None),
                      "read_bytes": read, "of_copy": read / per / bandwidth,
                      "same_tokens": tokens == variants[q, "xla", False][1]})
        variants = None  # the next batch's programs in their place


if __name__ == "__main__":
    main()
