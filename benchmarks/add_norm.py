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

import statistics

import common

VARIANTS = {"bf16": [("xla", False)],
            "fp8-head": [("xla", False), ("pallas", False), ("pallas", True)]}


def main():
    args = common.decode_parser(__doc__.split("\n")[0]).parse_args()

    import jax
    import numpy as np

    from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams

    cfg, res, bandwidth, params, table = common.decode_setup(args, "add_norm")
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
