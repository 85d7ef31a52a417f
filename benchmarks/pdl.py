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

    from jax_sp import CompileOptions

    cfg, res, bandwidth, params, table = common.decode_setup(args, "pdl")
    variants = {(q, signal): (q, CompileOptions(launch_dependents=signal))
                for q in args.quantizations.split(",") for signal in (False, True)}
    for batch, runs in common.decode_batches(args, cfg, params, variants):
        for (q, signal), (llm, tokens, times) in runs.items():
            off = statistics.median(runs[q, False][2])
            res.emit({**common.decode_row(args, batch, llm, times, table, bandwidth),
                      "quantization": q, "launch_dependents": signal,
                      "speedup_vs_off": off / statistics.median(times),
                      "same_tokens": tokens == runs[q, False][1]})

if __name__ == "__main__":
    main()
