"""o_proj's FP8 weight brought into L2 by the decode attention kernel as it runs
(CompileOptions.attention_prefetch, models/decode_attention.py `prefetch`) against the defaults,
side by side: decode ms/token of a model on random weights, each variant built in one process
and timed in alternation (round after round, each variant once a round), with the copy
bandwidth measured in the same run.

Variants: 16 bits with the defaults; FP8 with the LM head with the defaults (no prefetch) and
with each of --programs prefetching programs. "of_copy": the bytes a step reads (the state less
the embedding table) over the time, against that bandwidth; every FP8 variant must give the
tokens of the one without prefetch (`same_tokens`).
Result: benchmarks/results/attention_prefetch_<card>_<model>[_<tag>].jsonl.

    python benchmarks/attention_prefetch.py [--model llama3-8b] [--programs 64,128] [--tiny]
"""

from __future__ import annotations

import statistics

import common


def main():
    ap = common.decode_parser(__doc__.split("\n")[0])
    ap.add_argument("--programs", default="64,128",
                    help="CompileOptions.attention_prefetch values to time beside 0")
    args = ap.parse_args()

    from jax_sp import CompileOptions

    cfg, res, bandwidth, params, table = common.decode_setup(args, "attention_prefetch")
    programs = [0] + [int(p) for p in args.programs.split(",")]
    variants = {(q, p): (q, CompileOptions(attention_prefetch=p))
                for q in args.quantizations.split(",")
                for p in (programs if q != "bf16" else [0])}
    for batch, runs in common.decode_batches(args, cfg, params, variants):
        medians = {key: statistics.median(times) for key, (_, _, times) in runs.items()}
        for (q, p), (llm, tokens, times) in runs.items():
            per = medians[q, p]
            res.emit({**common.decode_row(args, batch, llm, times, table, bandwidth),
                      "quantization": q, "attention_prefetch": p,
                      "speedup_vs_base": medians[q, 0] / per,
                      "speedup_vs_bf16": (medians["bf16", 0] / per
                                          if ("bf16", 0) in medians else None),
                      "same_tokens": tokens == runs[q, 0][1]})


if __name__ == "__main__":
    main()
