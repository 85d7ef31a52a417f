"""The residual add and RMSNorm of a decode step in one Pallas kernel (models/add_norm.py,
CompileOptions.add_norm) against XLA's two kernels, side by side: decode ms/token of a model on
random weights, each variant built in one process and timed in alternation (round after round,
each variant once a round), with the copy bandwidth measured in the same run.

Variants (add_norm, CompileOptions.launch_dependents: models/pdl.py): 16 bits with the
defaults; FP8 with the LM head with XLA's norms and no signal, with the add-and-norm kernel
("pallas", "auto": signalling where jax-sp's own kernel comes next; at one row the defaults
before "gemv") and with the defaults ("auto", "auto": each add and norm inside the FP8 GEMV
kernel after it, models/fp8_gemv.py `add_norm`). "of_copy": the bytes a step reads (the state
less the embedding table) over the time, against that bandwidth; every variant must give the
tokens of its quantization's first variant (`same_tokens`).
Result: benchmarks/results/add_norm_<card>_<model>[_<tag>].jsonl.

    python benchmarks/add_norm.py [--model llama3-8b] [--batches 1] [--rounds 7] [--tiny]
"""

from __future__ import annotations

import statistics

import common

# (add_norm, launch_dependents): the defaults ("auto", "auto"), and for FP8 XLA's norms with no
# signal and the add-and-norm kernel before each FP8 GEMV ("pallas": at one row what "auto"
# gave before "gemv")
VARIANTS = {"bf16": [("auto", "auto")],
            "fp8-head": [("xla", False), ("pallas", "auto"), ("auto", "auto")]}
BASE = {"bf16": ("auto", "auto"), "fp8-head": ("xla", False)}


def main():
    args = common.decode_parser(__doc__.split("\n")[0]).parse_args()

    from jax_sp import CompileOptions

    cfg, res, bandwidth, params, table = common.decode_setup(args, "add_norm")
    variants = {(q, mode, signal): (q, CompileOptions(add_norm=mode, launch_dependents=signal))
                for q in args.quantizations.split(",") for mode, signal in VARIANTS[q]}
    bf16 = ("bf16", *BASE["bf16"])
    for batch, runs in common.decode_batches(args, cfg, params, variants):
        medians = {key: statistics.median(times) for key, (_, _, times) in runs.items()}
        for (q, mode, signal), (llm, tokens, times) in runs.items():
            per, base = medians[q, mode, signal], (q, *BASE[q])
            res.emit({**common.decode_row(args, batch, llm, times, table, bandwidth),
                      "quantization": q, "add_norm": mode, "launch_dependents": signal,
                      "speedup_vs_base": medians[base] / per, "base": list(BASE[q]),
                      "speedup_vs_bf16": medians[bf16] / per if bf16 in medians else None,
                      "same_tokens": tokens == runs[base][1]})

if __name__ == "__main__":
    main()
