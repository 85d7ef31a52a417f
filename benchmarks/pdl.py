"""Programmatic dependent launch from jax-sp's Pallas kernels (models/pdl.py), on and off, side
by side: decode ms/token of a model on random weights, in 16 bits and in FP8 with the LM head,
built with CompileOptions(launch_dependents=False) and (=True) in one process and timed in
alternation (round after round, each variant once a round), with the copy bandwidth measured in
the same run. "of_copy": the bytes a step reads (the state less the embedding table) over the
time, against that bandwidth. Both variants must give the same tokens (`same_tokens`).
Result: benchmarks/results/pdl_<card>_<model>[_<tag>].jsonl.

    python benchmarks/pdl.py [--model llama3-8b] [--batches 1] [--rounds 7] [--tiny]
"""

from __future__ import annotations

import statistics

import common


def main():
    args = common.decode_parser(__doc__.split("\n")[0]).parse_args()

    import jax
    import numpy as np

    from jax_sp import CompileOptions, SamplingParams

    cfg, res, bandwidth, params, table = common.decode_setup(args, "pdl")
    rng = np.random.default_rng(0)
    sp = SamplingParams(max_new_tokens=args.new_tokens)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        runs = common.decode_variants(args, cfg, params, ids, sp, {
            (q, signal): (q, CompileOptions(launch_dependents=signal))
            for q in args.quantizations.split(",") for signal in (False, True)})
        for (q, signal), (llm, tokens, times) in runs.items():
            per = statistics.median(times)
            read = sum(x.nbytes for x in jax.tree.leaves(llm.state)) - table
            off = statistics.median(runs[q, False][2])
            res.emit({"bench": "decode", "quantization": q, "launch_dependents": signal,
                      "batch": batch, "prompt": args.prompt, "new_tokens": args.new_tokens,
                      "ms_per_token": per * 1e3, "runs_ms": [t * 1e3 for t in times],
                      "speedup_vs_off": off / per, "read_bytes": read,
                      "of_copy": read / per / bandwidth,
                      "same_tokens": tokens == runs[q, False][1]})
        runs = None  # the next batch's programs in their place


if __name__ == "__main__":
    main()
