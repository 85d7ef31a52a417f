"""The kernel after each signalling jax-sp kernel, in XLA's schedule: evidence for
CompileOptions(launch_dependents="auto") (models/pdl.py).

"auto" lets a kernel signal `griddepcontrol.launch_dependents` only where the model knows that
the next kernel is one of jax-sp's own (whose loads are Triton's, `ld.global` with no `.nc`),
never before one of XLA's fusions, which read the output of a kernel that does not signal with
non-coherent loads. A 2-layer model of the preset in FP8 with the LM head and the defaults
decodes a few tokens; in the optimized HLO of its decode program (XLA's schedule: instructions
in launch order) every Triton call that signals is listed with the next instruction that
launches work. `predicated`: the kernel signals only below the last layer (models/pdl.py
`followed_by_kernel(below=...)`), so the last layer's, followed by XLA's final norm, does not.
Result: benchmarks/results/pdl_schedule_<card>_<model>.jsonl.

    python benchmarks/pdl_schedule.py [--model llama3-8b]
"""

from __future__ import annotations

import argparse
import os
import re

import common

SKIP = ("parameter", "get-tuple-element", "bitcast", "tuple", "constant")


def schedule(hlo: str):
    """(name, kernel, signals, predicated, next op, next kernel) for each Triton call that
    signals, in the computation of the optimized HLO with the most Triton calls."""
    body = max(re.split(r"\n(?=\S)", hlo), key=lambda c: c.count("xla.gpu.triton"))
    ops = []
    for line in body.splitlines()[1:]:
        m = re.match(r"\s*(?:ROOT )?(%[\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(", line)
        if not m or m.group(2) in SKIP:
            continue
        config = line[line.find("backend_config"):]
        kernel = re.search(r"name\W+(\w+)", config).group(1) if "xla.gpu.triton" in line else None
        ops.append((m.group(1), m.group(2), kernel, "launch_dependents" in config,
                    "setp.lt" in config))
    for (name, _, kernel, signals, pred), after in zip(ops, ops[1:] + [(None,) * 5]):
        if signals:
            yield {"op": name, "kernel": kernel, "predicated": pred, "next_op": after[0],
                   "next_kind": after[1], "next_kernel": after[2]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import dataclasses

    import jax

    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import random_params

    device = jax.devices()[0]
    card = next((c.lower() for c in ("H200", "H100") if c in device.device_kind),
                jax.default_backend())
    res = common.Results(args.out or os.path.join(
        common.RESULTS, f"pdl_schedule_{card}_{args.model}.jsonl"),
        machine=common.machine(), jax=jax.__version__, model=args.model)
    cfg = dataclasses.replace(preset(args.model), num_layers=2, vocab_size=4096)
    llm = LLM(cfg, random_params(cfg), parallel=ParallelConfig(tp=1), dtype="bfloat16",
              max_seq_len=256, quantization="fp8-head")
    llm.generate([[1, 2, 3, 4]], SamplingParams(max_new_tokens=4))
    for row in schedule(llm.programs.hlo("decode")):
        res.emit({"bench": "schedule", "layers": cfg.num_layers, **row})

if __name__ == "__main__":
    main()
