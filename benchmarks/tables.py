"""Markdown tables generated from benchmarks/results, written into the docs between markers.

A table named NAME lives in a markdown file between `<!-- table:NAME -->` and
`<!-- /table:NAME -->`; `python benchmarks/tables.py` rewrites every such block in README.md and
docs/*.md from the result files, `--check` only reports (exit 1) where a block differs from what
the results give, so a number in the docs is never retyped by hand.

Tables:
  ceiling   compute_ceiling_*.jsonl (one tp-N layer's compute on one GPU) next to jax-sp TP's
            measured per-layer times (multi_gpu_*.jsonl): how much overlap can win at each size
  schedule  mock_gpu_compile_prefill_*.jsonl: per comm path, XLA's windowed-einsum loops and
            each layer's collectives overlapped by compute or exposed in the schedule
  load      load_time_*.jsonl: loading the embedded GGUF, jax-sp against transformers
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")


def _rows(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(RESULTS, pattern))):
        rows += [dict(json.loads(line), _file=os.path.basename(path))
                 for line in open(path) if line.strip()]
    return rows


def _gpu(machine: str) -> str:
    """'4x NVIDIA H200' -> 'H200'."""
    return machine.split("NVIDIA ")[-1].split(" ")[0] if "NVIDIA" in machine else machine


def ceiling() -> str:
    tp_rows = {(r["shape"], r["tp"], r["tokens"]): r for r in _rows("multi_gpu_*.jsonl")
               if r.get("side") == "jax-sp" and r.get("mode") == "tp"
               and r.get("what") == "per_layer" and not r.get("host_bound")}
    ceil = _rows("compute_ceiling_*.jsonl")
    if not ceil:
        return "(no compute_ceiling results)"
    tokens = sorted({r["tokens"] for r in ceil})
    out = ["| layer, tp | " + " | ".join(f"{t} tokens" for t in tokens) + " |",
           "| --- |" + " --- |" * len(tokens)]
    for shape, tp in sorted({(r["shape"], r["tp"]) for r in ceil}, key=lambda k: (k[0], k[1])):
        cells = []
        for t in tokens:
            c = next((r for r in ceil if (r["shape"], r["tp"], r["tokens"]) == (shape, tp, t)),
                     None)
            if c is None or c.get("host_bound"):
                cells.append("host-bound" if c else "")
                continue
            cell = f"{c['ceiling_ms']:.2f}"
            m = tp_rows.get((shape, tp, t))
            if m:
                cell += (f" / TP {m['median_ms']:.2f} ({_gpu(m.get('machine', ''))}): "
                         f"**{m['median_ms'] / c['ceiling_ms']:.2f}x**")
            cells.append(cell)
        out.append(f"| {shape}, tp {tp} | " + " | ".join(cells) + " |")
    machines = sorted({_gpu(r["machine"]) for r in ceil})
    out.append("")
    out.append(f"ms per layer: compute-only ceiling on one {', '.join(machines)} "
               f"(`compute_ceiling.py`) / jax-sp TP measured on tp GPUs (`multi_gpu.py`, GPU in "
               f"brackets): TP over the ceiling, the most any overlap can win.")
    return "\n".join(out)


def schedule() -> str:
    rows = [r for r in _rows("mock_gpu_compile_prefill_*.jsonl") if "case" in r]
    if not rows:
        return "(no mock_gpu_compile_prefill results)"
    out = ["| model, tp 8, 4096 tokens | case | windowed loops AG / RS | collectives per layer: "
           "overlapped / exposed |", "| --- | --- | --- | --- |"]
    for r in rows:
        if not r.get("compiled"):
            out.append(f"| {r['model']} | {r['case']} | did not compile: "
                       f"{r.get('error', '')[:120]} | |")
            continue
        w = r["windowed_einsum"]
        loops = (f"{w['windowed_dot_general_body_ag']} / {w['windowed_dot_general_body_rs']}"
                 if r["comm"] == "xla" else "—")
        kinds = ", ".join(f"{k} {v['overlapped']} / {v['exposed']}"
                          for k, v in sorted(r["layer_overlap"].items()))
        case = r["case"] + (f" ({r['ring_kernel']})" if "ring_kernel" in r else "")
        out.append(f"| {r['model']} | {case} | {loops} | {kinds} |")
    return "\n".join(out)


def load() -> str:
    rows = _rows("load_time_*.jsonl")
    summary = [r for r in rows if r.get("case") == "summary"]
    if not summary:
        return "(no load_time results)"
    out = ["| loading the embedded SmolLM2 GGUF (imports included) | median s | vs transformers |",
           "| --- | --- | --- |"]
    for s in summary:
        med = s["median_s"]
        for case in ("transformers", "jax-sp cold", "jax-sp cached"):
            label = {"transformers": "transformers (tokenizer + model)",
                     "jax-sp cold": "jax-sp, first load of the file",
                     "jax-sp cached": "jax-sp, every later load"}[case]
            out.append(f"| {label} | {med[case]:.1f} | {med[case] / med['transformers']:.2f}x |")
        out.append("")
        out.append(f"{s['machine']}, {s['repeats']} alternating rounds, each load a fresh "
                   f"process (`benchmarks/load_time.py`).")
    return "\n".join(out)


TABLES = {"ceiling": ceiling, "schedule": schedule, "load": load}
_BLOCK = re.compile(r"(<!-- table:(\w+) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def render(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)]() + "\n" + m.group(4), text)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true", help="report stale tables, write nothing")
    args = ap.parse_args()
    stale = []
    for path in [os.path.join(ROOT, "README.md")] + sorted(
            glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        text = open(path).read()
        new = render(text)
        if new != text:
            stale.append(os.path.relpath(path, ROOT))
            if not args.check:
                open(path, "w").write(new)
    if stale:
        print(("stale tables in: " if args.check else "rewrote: ") + ", ".join(stale))
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
