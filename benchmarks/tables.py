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
  fp8_accuracy
            fp8_accuracy_*.jsonl: FP8 logits against the same model without quantization
  refactor  refactor_generation_*.jsonl: generation speed of the code before and after a
            refactor, alternating in one job
  fp8_speed generation_fp8_<gpu>_*.jsonl: jax-sp with and without quantization="fp8", decode
            and prefill, side by side in one run
  fp8_w8a8  generation_fp8_w8a8_*.jsonl: FP8 decode with the weight-only kernel against the
            kernel's FP8 operands (fp8_gemv="pallas-w8a8" / "pallas-mixed") and bf16, per batch
            (each row from one run)
  fp8_gemv  fp8_gemv_*.jsonl: decode's FP8 projections, the weight-only kernel against the
            other paths, per row count
  generation GPU MODEL
            generation_*.jsonl of that GPU and model shape: jax-sp and every peer measured, decode
            ms/token at each batch and prefill ms per case, ratio to the best peer, jax-sp's share
            of the copy bandwidth and its prefill TFLOP/s, the run's limits in the caption
  generation_summary
            generation_*.jsonl: one row per GPU and model shape, jax-sp against the best PyTorch
            peer for each decode batch and prefill case (the README's results table)
  numerics  generation_*.jsonl prefill-parity rows: last-token logits of a 1x2048 prefill, jax-sp
            and transformers-bf16 against an fp32 reference, and against each other
  attn_dp_kv, attn_dp_census, attn_dp_decode
            attn_dp_*.jsonl: attention groups against plain TP, KV-cache bytes per device,
            each layer's collectives, the decode step
  sp_vs_tp TP
            multi_gpu_tp<TP>_*.jsonl: plain TP's per-layer ms and SP's speed against it (TP / SP)
            per layer and for the whole model, per comm path and token count

A block may name arguments after the table's name (`<!-- table:generation H100 smollm2 -->`); the
closing marker is `<!-- /table:NAME -->`. Generation tables take one result file per GPU and model
shape (the latest run; older ones are retired, git history keeps them) and stop with an error
when there are several.
"""

from __future__ import annotations

import argparse
import collections
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


def _source(row: dict) -> str:
    """A table's footnote opening: its result file, machine and jax version."""
    return f"`benchmarks/results/{row['_file']}` ({row['machine']}, jax {row['jax']}): "


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


def fp8_accuracy() -> str:
    rows = [r for r in _rows("fp8_accuracy_*.jsonl") if "rel_l2_median" in r]
    if not rows:
        return "(no fp8_accuracy results)"
    out = ["| model | quantization | FP8 path | prompts (tokens) | logits rel. L2, median / max | "
           "top-1 agreement |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['model']} | {r.get('quantization', 'fp8')} | {r.get('path', 'W8A8')} | "
                   f"{r['prompts']} ({r['tokens']}) | "
                   f"{r['rel_l2_median'] * 100:.1f}% / {r['rel_l2_max'] * 100:.1f}% | "
                   f"{r['top1_agreement'] * 100:.0f}% |")
    out += ["", f"Prefill logits with `quantization=\"fp8\"` (the layers' projections) and "
            f"`\"fp8-head\"` (the LM head, or a tied embedding, too) against the same model and "
            f"weights without it ({rows[0]['dtype']}, every position of every prompt; "
            f"`benchmarks/fp8_accuracy.py`)"
            + ("; `kv_cache_dtype=fp8`: the logits of each prompt's second half read over an FP8 "
               "cache of its first half, against the same positions of the full prefill."
               if any(r.get("path") == "KV cache" for r in rows) else ".")]
    return "\n".join(out)


def _read_bytes(row) -> float:
    """The bytes a decode step of the row's model reads: its weights less the embedding table
    (one row of it is read; a tied model reads it whole as the LM head)."""
    from common import unread_embedding_bytes
    from jax_sp.presets import preset

    return row["weight_bytes"] - unread_embedding_bytes(preset(row["model"]))


def _copy_share(row, bandwidth: float) -> str:
    """A decode row's bytes read a step over its time, as a share of the copy bandwidth."""
    return f"{_read_bytes(row) / (row['ms_per_token'] / 1e3) / bandwidth * 100:.0f}%"


def fp8_speed(name: str = "generation_fp8_h200_llama3-8b", gemv: str = "pallas") -> str:
    """FP8 against 16-bit decode and prefill, one run (benchmarks/generation.py
    --quantization); gemv: what `fp8_gemv="auto"` ran as on that GPU when it ran."""
    rows = [r for r in _rows(f"{name}.jsonl") if "error" not in r]
    if not rows:
        return f"(no {name} results)"
    cell = {(r["bench"], r["impl"], r["batch"]): r for r in rows if r["bench"] in ("decode",
                                                                                  "prefill")}
    limits = next(r for r in rows if r["bench"] == "limits")
    bandwidth = limits["copy_gb_s"] * 1e9
    # the quantizations measured ("fp8"; "fp8-head": the LM head too), each with its speed-up
    quants = [q for q in ("fp8", "fp8-head") if any(r.get("impl") == f"jax-sp/{q}" for r in rows)]
    names = {"fp8": "FP8", "fp8-head": "FP8 + LM head"}
    w8a8_run = any(r.get("impl") == "jax-sp/fp8/fp8_gemv=off" for r in rows)
    decode = any(bench == "decode" for bench, _, _ in cell)  # a prefill-only run has no share
    out = ["| | 16-bit, ms | " + " | ".join(f"{names[q]}, ms (speed-up)" for q in quants)
           + (" | FP8 W8A8 at every size, ms" if w8a8_run else "")
           + (" | " + " / ".join(names[q] for q in quants)
              + ": of the copy bandwidth for the bytes a step reads" if decode else "") + " |",
           "| --- | --- | " + "--- | " * (len(quants) + w8a8_run - 1 + decode) + "--- |"]
    for (bench, impl, batch), r in sorted(cell.items()):
        qs = [cell.get((bench, f"jax-sp/{q}", batch)) for q in quants]
        if impl != "jax-sp" or not any(qs):
            continue
        w8a8 = cell.get((bench, "jax-sp/fp8/fp8_gemv=off", batch))
        key = "ms_per_token" if bench == "decode" else "median_ms"
        what = (f"decode batch {batch}, per token" if bench == "decode"
                else f"prefill {batch}×{r['tokens']}")
        share = (" / ".join(_copy_share(q, bandwidth) if q else "-" for q in qs)
                 if bench == "decode" else "")
        off = (f"{w8a8[key]:.2f}" if w8a8 else "(the same)" if bench == "prefill"
               else "not run")
        out.append(f"| {what} | {r[key]:.2f} | "
                   + " | ".join(f"{q[key]:.2f} ({r[key] / q[key]:.2f}×)" if q else "not run"
                                for q in qs)
                   + (f" | {off}" if w8a8_run else "") + (f" | {share}" if decode else "")
                   + " |")
    model = next(r["model"] for r in rows if "model" in r)
    what = (f"decode after a 128-token prompt, 256 greedy new tokens; medians, compile excluded; "
            f"copy bandwidth measured in the same run {limits['copy_gb_s'] / 1e3:.2f} TB/s. FP8 "
            f"decode runs `fp8_gemv=\"auto\"`, which was \"{gemv}\" on this GPU then; prefill "
            f"of more than 64 rows W8A8 either way." if decode else
            f"time to the first token, medians, compile excluded; the projections W8A8 (more "
            f"than 64 rows); bf16 matmul peak measured in the same run "
            f"{limits['matmul_tflops']:.0f} TFLOP/s.")
    out += ["", f"`benchmarks/results/{rows[0]['_file']}` ({limits['machine']}): {model} shape, "
            f"random weights, bfloat16 activations; {what}"]
    return "\n".join(out)


def fp8_w8a8() -> str:
    rows = [r for r in _rows("generation_fp8_w8a8_*.jsonl") if "error" not in r]
    if not rows:
        return "(no generation_fp8_w8a8 results)"
    out = ["| GPU | decode | bf16, ms | FP8 + LM head, weight-only kernel: ms (speed-up) | FP8 "
           "+ LM head, W8A8 kernel: ms (speed-up) | of the copy bandwidth: weight-only / W8A8 "
           "| run |", "| --- | --- | --- | --- | --- | --- | --- |"]
    files = sorted({r["_file"] for r in rows})
    for batch in sorted({r["batch"] for r in rows if r["bench"] == "decode"}):
        for name in files:  # each row from one run, side by side
            cell = {r["impl"]: r for r in rows if r["_file"] == name
                    and r["bench"] == "decode" and r["batch"] == batch}
            base, wo = cell.get("jax-sp"), cell.get("jax-sp/fp8-head")
            w8 = next((r for impl, r in sorted(cell.items()) if impl.startswith(
                "jax-sp/fp8-head/fp8_gemv=pallas-")), None)
            if not (base and wo and w8):
                continue
            bandwidth = next(r for r in rows if r["_file"] == name
                             and r["bench"] == "limits")["copy_gb_s"] * 1e9
            share = " / ".join(_copy_share(q, bandwidth) for q in (wo, w8))
            mode = w8["impl"].split("=")[1]
            out.append(f"| {_gpu(base['machine'])} | batch {batch} | "
                       f"{base['ms_per_token']:.2f} | "
                       + " | ".join(f"{q['ms_per_token']:.2f} "
                                    f"({base['ms_per_token'] / q['ms_per_token']:.2f}×)"
                                    for q in (wo, w8))
                       + f" | {share} | `{name}` ({mode}) |")
    machines = "; ".join(dict.fromkeys(r["machine"] for r in rows))
    out += ["", f"`benchmarks/results/` ({machines}): Llama-3-8B shape, random weights, decode "
            f"after a 128-token prompt, 256 greedy new tokens; medians, compile excluded; the "
            f"copy bandwidth measured in each run. \"pallas-mixed\" ran one row as "
            f"\"pallas\" and 2-64 rows as \"pallas-w8a8\" in these runs."]
    return "\n".join(out)


def kv_fp8_speed(model: str, kernel: str, sweep: str = "") -> str:
    """The FP8 KV cache against the 16-bit one: decode in the model (benchmarks/kv_cache_speed.py)
    and the decode-attention kernel alone (benchmarks/decode_attention_speed.py --kv-dtypes), at
    the kernel's default tiling and, from a sweep's file, at the fastest tiling for each; where
    a run also widened the FP8 cache to bfloat16 (--fp8-dots bfloat16), a column for that."""
    steps, kern = _rows(f"{model}.jsonl"), _rows(f"{kernel}.jsonl")
    if not steps or not kern:
        return f"(no {model} / {kernel} results)"
    bf = {(r["batch"], r.get("context")): r for r in steps + kern
          if r["bench"] in ("decode", "decode_attention") and r.get("dot_dtype") == "bfloat16"}
    wide = " | FP8 cache widened to bfloat16: {} / of copy" if bf else ""

    def step(r):
        return f"{r['ms_per_token']:.2f} / {r['of_copy'] * 100:.0f}%"
    # the kernel's own dots (kv_cache_speed.py --fp8-dots adds rows with others)
    own = [r for r in steps if r.get("dot_dtype", "auto") == "auto"]
    dec = {(r["batch"], r["kv_cache_dtype"]): r for r in own if r["bench"] == "decode"}
    agree = {r["batch"]: r for r in own if r["bench"] == "agreement"}
    first = steps[0]
    out = [f"| {first['model']} decode, batch | 16-bit cache: ms / of copy | FP8 cache: ms / of "
           f"copy | FP8's speed-up{wide.format('ms')} | cache bytes read a step: 16-bit / FP8 |",
           "| --- | --- | --- | ---" + " | ---" * bool(bf) + " | --- |"]
    for b in sorted(agree):
        a, f = dec[(b, "auto")], dec[(b, "fp8")]
        w = bf.get((b, None))
        out.append(f"| {b} | {step(a)} | {step(f)} | "
                   f"{a['ms_per_token'] / f['ms_per_token']:.2f}× | "
                   + (f"{step(w)} | " if w else "not run | " if bf else "")
                   + f"{a['cache_bytes'] / 1e9:.2f} / {f['cache_bytes'] / 1e9:.2f} GB |")
    out += ["", f"`benchmarks/results/{first['_file']}` ({first['machine']}): "
            f"{first['prompt']}-token prompts, {first['new_tokens']} greedy new tokens, random "
            f"weights; medians; \"of copy\": weights and cache read a step over the time, "
            f"against the copy bandwidth measured in the same run. The greedy tokens of the two "
            f"caches part after a median of "
            + " and ".join(f"{agree[b]['first_difference_median']:g}" for b in sorted(agree))
            + " tokens: random weights give near-tied logits, so this says nothing of accuracy "
            "(the table above does)."]

    def cell(r):
        return f"{r['us_per_layer']:.1f} / {r['of_copy'] * 100:.0f}%"
    att = [r for r in kern if r["bench"] == "decode_attention"]
    swept = [r for r in (_rows(f"{sweep}.jsonl") if sweep else [])
             if r["bench"] == "decode_attention" and r.get("dot_dtype", "auto") == "auto"]
    out += ["", "| kernel alone, batch × context | 16-bit: µs a layer / of copy | FP8: µs a layer "
            "/ of copy | FP8's speed-up" + wide.format("µs a layer")
            + (" | fastest tiling of the sweep: 16-bit / FP8, µs" if swept else "") + " |",
            "| --- | --- | --- | ---" + " | ---" * bool(bf) + (" | ---" if swept else "") + " |"]
    points = list(dict.fromkeys((r["batch"], r["context"]) for r in att))
    for b, c in points:
        by = {r["kv_dtype"]: r for r in att if (r["batch"], r["context"]) == (b, c)
              and r.get("dot_dtype", "auto") == "auto"}  # the kernel's own widening
        a, f = by["bfloat16"], by["float8_e4m3fn"]
        best = ""
        if swept:
            mins = [min((r for r in swept
                         if (r["batch"], r["context"], r["kv_dtype"]) == (b, c, d)),
                        key=lambda r: r["us_per_layer"], default=None)
                    for d in ("bfloat16", "float8_e4m3fn")]
            best = " | " + (" / ".join(f"{m['us_per_layer']:.1f}" for m in mins)
                            if all(mins) else "not swept")
        w = bf.get((b, c))
        out.append(f"| {b} × {c} | {cell(a)} | {cell(f)} | "
                   f"{a['us_per_layer'] / f['us_per_layer']:.2f}×"
                   + (f" | {cell(w)}" if w else " | not run" if bf else "") + f"{best} |")
    out += ["", _source(att[0]) + f"Llama-3-8B's attention (8 KV heads of 128, 4 query heads "
            f"each), {att[0]['layers']} layers a program; \"of copy\": the cache bytes read over "
            f"the time, against the copy bandwidth measured in the same run"
            + (f"; the sweep: `{sweep}.jsonl`." if swept else ".")]
    return "\n".join(out)


def fp8_modes(name: str, auto: str) -> str:
    """Decode with FP8 weights, one column per fp8_gemv mode of one run (benchmarks/generation.py
    --fp8-gemv auto,MODE...), against 16-bit; auto: what "auto" ran as then."""
    every = _rows(f"{name}.jsonl")
    rows = [r for r in every if r["bench"] == "decode" and "error" not in r]
    if not rows:
        return f"(no {name} results)"
    limits = next(r for r in every if r["bench"] == "limits")
    bandwidth = limits["copy_gb_s"] * 1e9
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "jax-sp"]

    # "MODE:unfused": CompileOptions(fp8_fused_mlp=False) in a run of the fused MLP kernel
    # (docs/fp8.md, git history), whose "auto" (the default then) fused it: auto "X+fused"
    def label(impl):
        mode = impl.split("fp8_gemv=")[1] if "fp8_gemv=" in impl else f"auto, then {auto}"
        mode, fused = (mode[:-len("+fused")], True) if mode.endswith("+fused") else (mode, None)
        mode, _, unfused = mode.partition(":")
        mlp = ", MLP as three kernels" if unfused else ", MLP as one kernel" if fused else ""
        return f"FP8 + LM head, `{mode}`{mlp}: ms (speed-up) / of copy"
    out = ["| decode | 16-bit, ms | " + " | ".join(label(i) for i in impls) + " |",
           "| --- | --- |" + " --- |" * len(impls)]
    for batch in sorted({r["batch"] for r in rows}):
        by = {r["impl"]: r for r in rows if r["batch"] == batch}
        base = by["jax-sp"]["ms_per_token"]
        out.append(f"| batch {batch} | {base:.2f} | " + " | ".join(
            f"{by[i]['ms_per_token']:.2f} ({base / by[i]['ms_per_token']:.2f}×) / "
            f"{_copy_share(by[i], bandwidth)}" for i in impls) + " |")
    out += ["", f"`benchmarks/results/{rows[0]['_file']}` ({limits['machine']}): "
            f"{rows[0]['model']} shape, random weights, decode after a 128-token prompt, 256 "
            f"greedy new tokens, per token; medians, compile excluded; \"of copy\": the bytes a "
            f"step reads over the time, against the copy bandwidth measured in the same run, "
            f"{limits['copy_gb_s'] / 1e3:.2f} TB/s."]
    return "\n".join(out)


def fp8_gemv(name: str = "fp8_gemv_h200") -> str:
    """The FP8 projections of a few rows alone, per path (benchmarks/fp8_gemv.py), one run."""
    rows = [r for r in _rows(f"{name}.jsonl") if r["bench"] == "variant" and "error" not in r]
    if not rows:
        return f"(no {name} results)"
    limits = next(r for r in _rows(rows[0]["_file"]) if r["bench"] == "limits")
    names = {"bf16": "bf16 weights, XLA's GEMM",
             "w8a8": "W8A16, models/quant.py's XLA path (run as \"w8a8\": see below)",
             "w8a8-xla": "W8A8, XLA's FP8 dot",
             "w8a16-xla": "W8A16, XLA (widens the weights in a fusion of its own)",
             "pallas": "W8A16 kernel on each layer's slice (XLA copies it)",
             "pallas-layer": "W8A16 kernel on the stack (jax-sp's)",
             "pallas-w8a8": "W8A8 kernel on the stack (FP8 operands)",
             "pallas-f16": "W8A16 kernel on the stack, rows in float16"}
    names = {k: v for k, v in names.items() if any(r["variant"] == k for r in rows)}
    counts = sorted({r["rows"] for r in rows})
    out = ["| path | " + " | ".join(f"{n} row{'s' * (n > 1)}: ms / of copy" for n in counts)
           + " |", "| --- |" + " --- |" * len(counts)]
    for variant in names:
        cells = []
        for n in counts:
            r = next((r for r in rows if (r["variant"], r["rows"]) == (variant, n)), None)
            cells.append(f"{r['ms']:.3f} / {r['of_copy'] * 100:.0f}%" if r else "")
        out.append(f"| {names[variant]} | " + " | ".join(cells) + " |")
    layers = rows[0]["layers"]
    out += ["", _source(rows[0]) + f"the four projections of {layers} Llama-3-8B layers, "
            f"stacked and "
            f"unrolled as decode runs them; \"of copy\" is the weight bytes over the time against "
            f"the copy bandwidth measured in the same run, {limits['copy_gb_s'] / 1e3:.2f} TB/s."]
    return "\n".join(out)


def fp8_mlp(name: str) -> str:
    """One row's MLP over a stack of layers: three kernels, the fused kernel and bf16
    (benchmarks/fp8_mlp.py, in git history up to commit 0e5943d with the kernel), one run;
    with its sweep, the fused kernel's fastest settings."""
    every = _rows(f"{name}.jsonl")
    rows = {r["bench"]: r for r in every if r["bench"] in ("separate", "fused", "bf16")
            and "error" not in r}
    if "separate" not in rows:
        return f"(no {name} results)"
    limits = next(r for r in every if r["bench"] == "limits")
    sep = rows["separate"]["ms"]
    names = {"bf16": "bf16 weights, XLA's GEMVs",
             "separate": "FP8: gate/up kernel, XLA's SiLU·up, down kernel (three kernels)",
             "fused": "FP8: the fused kernel (one)"}
    out = ["| path | µs a layer | of copy | vs three kernels | error vs three kernels |",
           "| --- | --- | --- | --- | --- |"]
    for bench in ("bf16", "separate", "fused"):
        if bench in rows:
            r = rows[bench]
            err = r["rel_err_vs_separate"]
            out.append(f"| {names[bench]} | {r['us_per_layer']:.1f} | {r['of_copy']:.0%} | "
                       f"{sep / r['ms']:.2f}× | {'' if err is None else f'{err:.1e}'} |")
    sweep = sorted((r for r in every if r["bench"] == "fused-sweep" and "error" not in r),
                   key=lambda r: r["ms"])
    settings = ("programs", "block_i", "block_d", "block_n", "chunk", "num_warps", "num_stages")
    if sweep:
        out += ["", "| " + " | ".join(settings) + " | µs a layer | of copy |",
                "|" + " --- |" * (len(settings) + 2)]
        for r in sweep[:6]:
            out.append("| " + " | ".join(str(r.get(k, "default")) for k in settings)
                       + f" | {r['us_per_layer']:.1f} | {r['of_copy']:.0%} |")
    first = rows["separate"]
    out += ["", f"`benchmarks/results/{first['_file']}` ({limits['machine']}, jax "
            f"{first['jax']}): {first['layers']} Llama-3-8B layers' MLPs (gate/up 2×14336×4096, "
            f"down 4096×14336), one row, layers unrolled; medians; \"of copy\": FP8 weight "
            f"bytes (bf16's for bf16) over the time against the copy bandwidth measured in the "
            f"same run, {limits['copy_gb_s'] / 1e3:.2f} TB/s"
            + (f"; {len(sweep)} settings swept." if sweep else ".")]
    return "\n".join(out)


def pdl(*names: str) -> str:
    """Decode with jax-sp's Pallas kernels signalling launch_dependents and without, per result
    file of benchmarks/pdl.py (one batch size each, both variants in one process)."""
    out = ["| batch | weights | without: ms (runs) / of copy | with: ms (runs) / of copy | "
           "speed-up | same tokens |", "| --- | --- | --- | --- | --- | --- |"]
    notes, rounds = [], set()
    for name in names:
        every = _rows(f"{name}.jsonl")
        cells = {(r["quantization"], r["launch_dependents"]): r for r in every
                 if r["bench"] == "decode"}
        limits = next(r for r in every if r["bench"] == "limits")
        labels = {"bf16": "bf16", "fp8-head": "FP8 + LM head"}
        for q in [q for q in labels if (q, False) in cells]:
            off, on = cells[q, False], cells[q, True]
            rounds |= {len(off["runs_ms"]), len(on["runs_ms"])}
            cell = [f"{r['ms_per_token']:.3f} ({min(r['runs_ms']):.3f}-{max(r['runs_ms']):.3f})"
                    f" / {r['of_copy']:.0%}" for r in (off, on)]
            out.append(f"| {off['batch']} | {labels[q]} | {cell[0]} | {cell[1]} | "
                       f"{off['ms_per_token'] / on['ms_per_token']:.3f}× | "
                       f"{'yes' if on['same_tokens'] else 'no'} |")
        notes.append(f"`benchmarks/results/{name}.jsonl` (copy bandwidth "
                     f"{limits['copy_gb_s'] / 1e3:.2f} TB/s)")
    first = _rows(f"{names[0]}.jsonl")[0]
    out += ["", f"{'; '.join(notes)}: {first['machine']}, jax {first['jax']}; {first['model']} "
            f"shape, random weights, decode after a 128-token prompt, 256 greedy new tokens, per "
            f"token; each variant timed {'-'.join(str(n) for n in sorted(rounds))} times in "
            f"alternation with the other in one process, "
            f"medians; \"of copy\": the bytes a step reads (the state less the embedding table) "
            f"over the time against the copy bandwidth measured in the same run."]
    return "\n".join(out)


def fp8_warm(*names: str) -> str:
    """The FP8 GEMV chain with the next weight warmed into L2 and without (benchmarks/fp8_warm.py,
    last in commit 0e898dc), one table per result file."""
    tables = []
    for name in names:
        every = _rows(f"{name}.jsonl")
        limits = next(r for r in every if r["bench"] == "limits")
        rows = sorted((r for r in every if r["bench"] == "warm"),
                      key=lambda r: (r["launch_dependents"], r["warm_mb"], r["evict_first"],
                                     r.get("control", False)))
        out = ["| launch_dependents | MB warmed a kernel | own loads evict_first | warmed | "
               "µs a layer (rounds) | of copy | vs none warmed | same output |",
               "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            runs = [t * 1e3 / r["layers"] for t in r["rounds_ms"]]
            what = ("—" if not r["warm_mb"] else "a layer read later (control)"
                    if r.get("control") else "the next projection's")
            out.append(f"| {'on' if r['launch_dependents'] else 'off'} | {r['warm_mb']} | "
                       f"{'yes' if r['evict_first'] else 'no'} | {what} | "
                       f"{r['us_per_layer']:.1f} ({min(runs):.1f}-{max(runs):.1f}) | "
                       f"{r['of_copy']:.0%} | {r['speedup_vs_unwarmed']:.3f}× | "
                       f"{'yes' if r['same_output'] else 'no'} |")
        out += ["", _source(rows[0]) + f"{rows[0]['layers']} Llama-3-8B layers as decode runs "
                f"them, one row (q/k/v, o_proj, gate/up, down_proj through the FP8 kernel, "
                f"XLA's norms, SiLU·up and residual adds between); each setting timed "
                f"{len(rows[0]['rounds_ms'])} times in alternation in one process, medians; "
                f"\"of copy\": FP8 weight bytes over the time against the copy bandwidth "
                f"measured in the same run, {limits['copy_gb_s'] / 1e3:.2f} TB/s."]
        tables.append("\n".join(out))
    return "\n\n".join(tables)


def add_norm(name: str) -> str:
    """Decode with the residual adds and norms in jax-sp's kernel and in XLA's, one run of
    benchmarks/add_norm.py (every variant in one process, in alternation), against its
    quantization's first variant (XLA's norms, no signal; earlier runs: add_norm="xla")."""
    every = _rows(f"{name}.jsonl")
    limits = next(r for r in every if r["bench"] == "limits")
    rows = [r for r in every if r["bench"] == "decode"]
    labels = {"bf16": "bf16", "fp8-head": "FP8 + LM head"}
    signals = {True: "all", False: "off", "auto": "`auto`"}
    out = ["| batch | weights | add_norm | launch_dependents | ms (runs) / of copy | "
           "vs the first | vs bf16 | same tokens |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        out.append(f"| {r['batch']} | {labels[r['quantization']]} | `{r['add_norm']}` | "
                   f"{signals[r['launch_dependents']]} | {r['ms_per_token']:.3f} "
                   f"({min(r['runs_ms']):.3f}-{max(r['runs_ms']):.3f}) / {r['of_copy']:.0%} | "
                   f"{r.get('speedup_vs_base', r.get('speedup_vs_xla')):.3f}× | "
                   f"{r['speedup_vs_bf16']:.2f}× | {'yes' if r['same_tokens'] else 'no'} |")
    out += ["", _source(rows[0]) + f"{rows[0]['model']} shape, random weights, decode after "
            f"a {rows[0]['prompt']}-token prompt, {rows[0]['new_tokens']} greedy new tokens, "
            f"per token; each variant timed {len(rows[0]['runs_ms'])} times in alternation with "
            f"the others in one process, medians; \"of copy\": the bytes a step reads (the state "
            f"less the embedding table) over the time against the copy bandwidth measured in the "
            f"same run, {limits['copy_gb_s'] / 1e3:.2f} TB/s."]
    return "\n".join(out)


def refactor() -> str:
    rows = [r for r in _rows("refactor_generation_*.jsonl") if r.get("impl") == "jax-sp"
            and r["bench"] in ("decode", "prefill") and "error" not in r]
    if not rows:
        return "(no refactor_generation results)"
    cols = sorted({(r["bench"], r["batch"]) for r in rows}, key=lambda c: (c[0] != "decode", c))
    head = [f"decode batch {b}, ms/token" if k == "decode" else f"prefill {b}×2048, ms"
            for k, b in cols]
    out = ["| code, round | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(cols)]
    for version, rnd in sorted({(r["version"], r["round"]) for r in rows},
                               key=lambda v: (v[1], v[0] == "after")):
        cells = []
        for k, b in cols:
            r = next(r for r in rows if (r["version"], r["round"], r["bench"], r["batch"]) ==
                     (version, rnd, k, b))
            cells.append(f"{r['ms_per_token' if k == 'decode' else 'median_ms']:.3f}")
        out.append(f"| {version}, {rnd} | " + " | ".join(cells) + " |")
    machine = rows[0]["machine"]
    out += ["", f"`benchmarks/generation.py --models llama3.2-1b --peers ''` on one machine "
            f"({machine}), the code before and after alternating twice in one job "
            f"(`benchmarks/results/{rows[0]['_file']}`); medians of 5, compile excluded."]
    return "\n".join(out)


# -- generation.py: jax-sp against its PyTorch peers -------------------------------------------

IMPL_LABELS = {
    "jax-sp": "**jax-sp** (defaults)",
    "jax-sp/attention=cudnn": 'jax-sp, `attention="cudnn"`',
    "jax-sp/xla-attention": 'jax-sp, `attention="xla"`',
    "gpt-fast-compiled": "gpt-fast-style, compiled",
    "gpt-fast-eager": "gpt-fast-style, eager",
    "hf-static-compiled": "transformers static cache + compile",
    "hf-compiled": "`torch.compile(model)`",
    "hf-eager": "transformers eager",
}
MODEL_LABELS = {"llama3.2-1b": "Llama-3.2-1B", "smollm2": "SmolLM2-135M"}
DECODE_BATCHES = (1, 8, 32)
PREFILL_CASES = ((1, 2048), (8, 2048))


def _is_peer(impl: str) -> bool:
    return not impl.startswith("jax-sp")


def _generation_runs() -> dict[tuple[str, str], list[dict]]:
    """(GPU, model) -> the rows of its one generation file."""
    runs: dict[tuple[str, str], list[dict]] = {}
    files: dict[tuple[str, str], set[str]] = {}
    for r in _rows("generation_*.jsonl"):
        if "model" in r and not r["_file"].startswith("generation_fp8_"):  # fp8: its own table
            key = (_gpu(r.get("machine", "")), r["model"])
            files.setdefault(key, set()).add(r["_file"])
    for key, names in files.items():
        if len(names) > 1:
            raise SystemExit(f"several generation results for {key[0]} {key[1]}: "
                             f"{', '.join(sorted(names))}; keep the latest only")
        runs[key] = _rows(next(iter(names)))
    return runs


def _run_cells(rows: list[dict]):
    """decode[(impl, batch)] -> row, prefill[(impl, batch, tokens)] -> row, limits row."""
    decode = {(r["impl"], r["batch"]): r for r in rows if r.get("bench") == "decode"}
    prefill = {(r["impl"], r["batch"], r["tokens"]): r for r in rows
               if r.get("bench") == "prefill"}
    limits = next((r for r in rows if r.get("bench") == "limits"), {})
    return decode, prefill, limits


def _best_peer(cells: dict, key_rest: tuple, value: str):
    peers = [(r[value], impl) for (impl, *rest), r in cells.items()
             if _is_peer(impl) and tuple(rest) == key_rest]
    return min(peers) if peers else None


def _order(impls) -> list[str]:
    known = list(IMPL_LABELS)
    return sorted(impls, key=lambda i: (known.index(i) if i in known else len(known), i))


def generation(gpu: str, model: str) -> str:
    runs = _generation_runs()
    rows = runs.get((gpu, model))
    if rows is None:
        return f"(no generation results for {gpu} {model})"
    decode, prefill, limits = _run_cells(rows)
    head = ([f"decode batch {b}, ms/token" if i == 0 else f"batch {b}"
             for i, b in enumerate(DECODE_BATCHES)]
            + [f"prefill {b}×{t}, ms" if i == 0 else f"{b}×{t}"
               for i, (b, t) in enumerate(PREFILL_CASES)])
    out = [f"| {gpu}, {MODEL_LABELS.get(model, model)} shape | " + " | ".join(head) + " |",
           "| --- |" + " --- |" * len(head)]
    impls = _order({i for i, _ in decode} | {i for i, _, _ in prefill})
    for impl in impls:
        cells = [f"{decode[impl, b]['ms_per_token']:.2f}" if (impl, b) in decode else ""
                 for b in DECODE_BATCHES]
        cells += [f"{prefill[impl, b, t]['median_ms']:.1f}" if (impl, b, t) in prefill else ""
                  for b, t in PREFILL_CASES]
        if impl == "jax-sp":
            cells = [f"**{c}**" if c else c for c in cells]
        out.append(f"| {IMPL_LABELS.get(impl, impl)} | " + " | ".join(cells) + " |")
    ratio, share = [], []
    for b in DECODE_BATCHES:
        best, own = _best_peer(decode, (b,), "ms_per_token"), decode.get(("jax-sp", b))
        ratio.append(f"{best[0] / own['ms_per_token']:.2f}×" if best and own else "")
        share.append(f"{own['of_bandwidth_limit']:.0%}"
                     if own and "of_bandwidth_limit" in own else "")
    for b, t in PREFILL_CASES:
        best, own = _best_peer(prefill, (b, t), "median_ms"), prefill.get(("jax-sp", b, t))
        ratio.append(f"{best[0] / own['median_ms']:.2f}×" if best and own else "")
        share.append(f"{own['tflops']:.0f}" if own and "tflops" in own else "")
    out.append("| jax-sp vs best peer (peer time / jax-sp time) | " + " | ".join(ratio) + " |")
    out.append("| jax-sp: decode, of the copy bandwidth; prefill, TFLOP/s | " + " | ".join(share)
               + " |")
    d = next(iter(decode.values()), {})
    machine = limits.get("machine", rows[0].get("machine", ""))
    out.append("")
    out.append(f"`benchmarks/results/{rows[0]['_file']}` ({machine}): random weights in the "
               f"model's shape, {d.get('dtype', 'bfloat16')}, one GPU; decode after a "
               f"{d.get('prompt', '?')}-token prompt, {d.get('new_tokens', '?')} greedy new "
               f"tokens, ms/token = (generation − its prefill) / {d.get('new_tokens', 1) - 1}; "
               f"prefill to the first token; medians, compile excluded. Limits measured in the "
               f"same run: copy {limits.get('copy_gb_s', float('nan')) / 1000:.2f} TB/s, "
               f"8192³ bf16 matmul {limits.get('matmul_tflops', float('nan')):.0f} TFLOP/s.")
    return "\n".join(out)


def generation_summary() -> str:
    runs = _generation_runs()
    if not runs:
        return "(no generation results)"
    head = ([f"decode batch {b}" for b in DECODE_BATCHES]
            + [f"prefill {b}×{t}" for b, t in PREFILL_CASES])
    out = ["| GPU, model shape | " + " | ".join(head) + " |", "| --- |" + " --- |" * len(head)]
    for gpu, model in sorted(runs, key=lambda k: (k[0], k[1])):
        decode, prefill, _ = _run_cells(runs[gpu, model])
        cells = []
        for b in DECODE_BATCHES:
            best, own = _best_peer(decode, (b,), "ms_per_token"), decode.get(("jax-sp", b))
            cells.append(f"{own['ms_per_token']:.2f} / {best[0]:.2f}: "
                         f"**{best[0] / own['ms_per_token']:.2f}×**" if best and own else "")
        for b, t in PREFILL_CASES:
            best, own = _best_peer(prefill, (b, t), "median_ms"), prefill.get(("jax-sp", b, t))
            cells.append(f"{own['median_ms']:.1f} / {best[0]:.1f}: "
                         f"**{best[0] / own['median_ms']:.2f}×**" if best and own else "")
        out.append(f"| {gpu}, {MODEL_LABELS.get(model, model)} | " + " | ".join(cells) + " |")
    out.append("")
    out.append("jax-sp / the best PyTorch peer measured in the same run (decode: ms per token; "
               "prefill: ms to the first token) and how many times faster jax-sp is; one GPU, "
               "bf16, random weights in the model's shape (`benchmarks/generation.py`).")
    return "\n".join(out)


def numerics() -> str:
    runs = _generation_runs()
    out = ["| GPU, model shape | jax-sp vs fp32 | transformers-bf16 vs fp32 | jax-sp vs "
           "transformers-bf16 | first token equal |", "| --- | --- | --- | --- | --- |"]
    for gpu, model in sorted(runs, key=lambda k: (k[0], k[1])):
        p = next((r for r in runs[gpu, model] if r.get("bench") == "prefill-parity"), None)
        if p is None:
            continue
        fp32, hf = p["last_logits_rel_l2_vs_fp32"], p["last_logits_rel_l2_vs_hf"]
        same = p.get("first_token_equal_to_hf", {}).get("jax-sp")
        out.append(f"| {gpu}, {MODEL_LABELS.get(model, model)} | {fp32['jax-sp']:.1%} | "
                   f"{fp32['hf-eager']:.1%} | {hf['jax-sp']:.1%} | "
                   f"{'yes' if same else 'no' if same is not None else ''} |")
    out.append("")
    out.append("Relative L2 distance of the last-token logits of a 1×2048 prefill, bf16; the "
               "fp32 reference evaluates the same bf16 weights in fp32 (`benchmarks/"
               "generation.py`, prefill-parity rows).")
    return "\n".join(out)


# -- multi_gpu.py: SP against plain TP ---------------------------------------------------------

def sp_vs_tp(tp: str) -> str:
    rows = [r for r in _rows(f"multi_gpu_tp{tp}_*.jsonl")
            if r.get("side") == "jax-sp" and not r["_file"].endswith("_cpu.jsonl")]
    if not rows:
        return f"(no multi_gpu results at tp {tp})"
    cell = {(r["shape"], r["mode"], r["what"], r["tokens"]): r for r in rows}  # last row wins
    tokens = sorted({r["tokens"] for r in rows})
    out = ["| padded tokens | " + " | ".join(str(t) for t in tokens) + " |",
           "| --- |" + " --- |" * len(tokens)]

    def ms(shape, mode, what, t):
        r = cell.get((shape, mode, what, t))
        return None if r is None or r.get("host_bound") else r["median_ms"]

    def speed(shape, mode, what, t):
        base, other = ms(shape, "tp", what, t), ms(shape, mode, what, t)
        return f"{base / other:.2f}" if base and other else "—"

    for shape in sorted({r["shape"] for r in rows}, reverse=True):
        label = {"llama3-70b": "Llama-3-70B", "llama3-8b": "Llama-3-8B"}.get(shape, shape)
        tp_ms = [ms(shape, "tp", "per_layer", t) for t in tokens]
        out.append(f"| {label} layer, TP ms | "
                   + " | ".join(f"{v:.2f}" if v else "—" for v in tp_ms) + " |")
        for mode, name in (("sp-xla", "SP + xla"), ("sp-ring", "SP + ring")):
            out.append(f"| per layer, {name} | "
                       + " | ".join(speed(shape, mode, "per_layer", t) for t in tokens) + " |")
        layers = next((r["layers"] for r in rows if r["what"] == "end_to_end"), "?")
        whole = [f"{speed(shape, 'sp-xla', 'end_to_end', t)} / "
                 f"{speed(shape, 'sp-ring', 'end_to_end', t)}" for t in tokens]
        out.append(f"| {layers}-layer model, SP + xla / ring | " + " | ".join(whole) + " |")
    files = sorted({r["_file"] for r in rows})
    machines = sorted({r.get("machine", "") for r in rows})
    out.append("")
    cited = ", ".join(f"`benchmarks/results/{f}`" for f in files)
    out.append(f"SP's speed against plain TP (TP time / SP time; below 1: SP slower), bf16, "
               f"{', '.join(machines)} ({cited}); —: not timed, or too short to time per layer "
               f"(`host_bound`).")
    return "\n".join(out)


def fp8_fma() -> str:
    """The one-row kernel per projection and its tile sweep (fp8_gemv.py --fma-sweep)."""
    rows = _rows("fp8_gemv_*_sweep_fma.jsonl")
    if not rows:
        return "(no fp8_gemv --fma-sweep results)"
    out = ["| projection [N, K] | ms for 8 layers | of copy |", "| --- | --- | --- |"]
    out += [f"| {r['projection']} {r['shape_nk']} | {r['ms']:.3f} | {r['of_copy'] * 100:.0f}% |"
            for r in rows if r["bench"] == "projection"]
    out += ["", "| summation | tile (channels x contracted), stages | ms, all four | of copy |",
            "| --- | --- | --- | --- |"]
    sweep = sorted((r for r in rows if r["bench"] == "fma-sweep" and "ms" in r),
                   key=lambda r: r["ms"])
    out += [f"| {r['fma']} | {r['block_n']}x{r['block_k']}, {r['num_stages']} | {r['ms']:.3f} | "
            f"{r['of_copy'] * 100:.0f}% |" for r in sweep]
    limits = next(r for r in rows if r["bench"] == "limits")
    out += ["", _source(rows[0]) + "one row, 8 Llama-3-8B layers; copy bandwidth "
            f"{limits['copy_gb_s'] / 1e3:.2f} TB/s (XLA's own copy kernel: "
            f"{limits['copy_gb_s_xla_kernel'] / 1e3:.2f} TB/s) in the same run."]
    return "\n".join(out)


def fp8_shape() -> str:
    """One row, each projection over tiles and splits (fp8_gemv.py --shape-sweep)."""
    rows = _rows("fp8_gemv_*_shape.jsonl")
    if not rows:
        return "(no fp8_gemv --shape-sweep results)"
    from models.fp8_gemv import FMA_BLOCK_K, FMA_BLOCK_N, FMA_STAGES, NUM_WARPS

    sweep = [r for r in rows if r["bench"] == "shape-sweep" and "ms" in r]
    layers = next(r["layers"] for r in rows if r["bench"] == "variant")

    def cell(r):
        return (f"{r['ms'] / layers * 1e3:.1f} µs, {r['of_copy'] * 100:.0f}%" if r else "—")

    def at(name, tile):
        return next((r for r in sweep if r["projection"] == name and
                     (r["block_n"], r["block_k"], r["splits"], r["num_stages"],
                      r["num_warps"]) == tile), None)

    default = (FMA_BLOCK_N, FMA_BLOCK_K, 1, FMA_STAGES, NUM_WARPS)
    out = ["| projection [N, K] | 16x1024, 3 stages (before) | "
           f"{FMA_BLOCK_N}x{FMA_BLOCK_K}, {FMA_STAGES} stages (default) | best: tile, splits, "
           "stages, warps | best |", "| --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r["projection"] for r in sweep):
        best = min((r for r in sweep if r["projection"] == name), key=lambda r: r["ms"])
        out.append(f"| {name} {best['shape_nk']} | {cell(at(name, (16, 1024, 1, 3, 4)))} | "
                   f"{cell(at(name, default))} | {best['block_n']}x{best['block_k']}, "
                   f"{best['splits']}, {best['num_stages']}, {best['num_warps']} | "
                   f"{cell(best)} |")
    limits = next(r for r in rows if r["bench"] == "limits")
    out += ["", _source(rows[0]) + f"one row, each projection alone over {layers} Llama-3-8B "
            f"layers, time a layer and share of the copy bandwidth "
            f"({limits['copy_gb_s'] / 1e3:.2f} TB/s in the same run); {len(sweep)} settings "
            "timed."]
    return "\n".join(out)


def serving(name: str = "serving_h200_llama3-8b") -> str:
    """Continuous batching against static batches (benchmarks/serving.py), one result file."""
    rows = _rows(f"{name}.jsonl")
    if not rows:
        return f"(no {name} results)"
    out = ["| steps a launch | engine step, ms | its program alone, ms | `generate`'s step, ms "
           "| all slots, tokens/s |", "| --- | --- | --- | --- | --- |"]
    out += [f"| {r['steps_per_launch']} | {r['engine_step_ms']:.2f} | "
            f"{r['engine_step_device_ms']:.2f} | {r['generate_step_ms']:.2f} | "
            f"{r['all_slots_tokens_per_s']:.0f} |" for r in rows if r["bench"] == "limits"]
    latency = any("latency_p99_s" in r for r in rows)  # reported since the rate sweeps
    out += ["", "| rate, req/s | mode | tokens/s | TTFT p50 / p99, s | TPOT p50 / p99, ms "
            + "| latency p50 / p99, s " * latency + "| compile inside, s |",
            "| --- " * (6 + latency) + "|"]
    for r in sorted((r for r in rows if r["bench"] == "serving"),
                    key=lambda r: (r["rate"], r["mode"], r["steps_per_launch"] or 0,
                                   r.get("max_prefill_tokens") or 0)):
        mode = (f"continuous, {r['steps_per_launch']} step{'s' * (r['steps_per_launch'] > 1)}"
                if r["mode"] == "continuous" else "static `generate` batches")
        budget = r.get("max_prefill_tokens")
        if r["mode"] == "continuous" and budget is not None:
            mode += (", each prefill alone" if budget == 1 else
                     f", prefills together up to {budget} tokens")
        if r["mode"] == "continuous" and "prefill_chunk" in r:
            chunk = r["prefill_chunk"]
            mode += f", chunks of {chunk}" if chunk else ", prompts whole"
        out.append(f"| {r['rate']:g} | {mode} | {r['tokens_per_s']:.0f} | "
                   f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} | "
                   f"{r['tpot_p50_s'] * 1e3:.1f} / {r['tpot_p99_s'] * 1e3:.1f} | "
                   + (f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | " if latency
                      else "")
                   + f"{r['compile_s_inside']:.1f} |")
    equal = [r for r in rows if r["bench"] == "at_equal_latency"]
    def setting(r):
        return r["steps_per_launch"], r["max_prefill_tokens"], r["prefill_chunk"]

    settings = list(dict.fromkeys(map(setting, equal)))
    for key in settings:
        label = (f" (the engine at {key[0]} steps a launch, prefills together up to {key[1]} "
                 f"tokens, chunks of {key[2]})" if len(settings) > 1 else "")
        out += ["", f"| static batches at, req/s | their tokens/s | their p99 TTFT, s | the "
                f"engine's tokens/s at that p99 TTFT{label} | ratio | their p99 latency, s | the "
                f"engine's tokens/s at that p99 latency | ratio |", "| --- " * 8 + "|"]
        mine = [r for r in equal if setting(r) == key]
        for rate in sorted({r["rate"] for r in mine}):
            at = {r["metric"]: r for r in mine if r["rate"] == rate}
            ttft, lat = at["ttft_p99_s"], at["latency_p99_s"]

            def cells(r):
                if r["continuous_tokens_per_s"] is None:
                    return "(the engine's lowest rate is past it) | |"
                more = "≥ " if r["at_least"] else ""
                return (f"{more}{r['continuous_tokens_per_s']:.0f} | "
                        f"**{more}{r['ratio']:.2f}×** |")
            out.append(f"| {rate:g} | {ttft['static_tokens_per_s']:.0f} | "
                       f"{ttft['latency_s']:.2f} | {cells(ttft)} {lat['latency_s']:.2f} | "
                       f"{cells(lat)}")
    first = rows[0]
    (p0, p1), (o0, o1) = first.get("prompt_lens", (16, 1024)), first.get("output_lens", (16, 256))
    quant = f", `quantization=\"{first['quantization']}\"`" if first.get("quantization") else ""
    out += ["", f"`benchmarks/results/{first['_file']}` ({first['machine']}, "
            f"{first['model']} shape{quant}, random weights, {first['max_batch']} slots): "
            f"{next(r['requests'] for r in rows if r['bench'] == 'serving')} requests, prompts "
            f"{p0}-{p1} and outputs {o0}-{o1} tokens, Poisson arrivals."]
    return "\n".join(out)


def serving_trace(*names: str) -> str:
    """Where a served workload's device time goes (benchmarks/serving.py --trace-workload), one
    row per result file."""
    out = ["| run | tokens/s | wall, s | device busy / idle, s | decode steps: s, count, ms a step "
           "| admissions, s | idle gaps over 50 us, s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    first = None
    for name in names:
        for r in _rows(f"{name}.jsonl"):
            if r["bench"] != "workload_trace":
                continue
            first = first or r
            # steps: reported since the trace gained them, else from occupancy's definition
            steps = r.get("steps") or round((r["tokens"] - r["requests"])
                                            / (r["occupancy"] * r["max_batch"]))
            decode = r["program_kernel_s"].get("jit_slots_step", 0)
            gaps = sum(g["s"] for g in r["idle_gaps_over_50us"].values())
            out.append(f"| `{r['_file']}` | {r['tokens_per_s']:.0f} | {r['wall_s']:.2f} | "
                       f"{r['device_busy_s']:.2f} / {r['device_idle_s']:.2f} | {decode:.2f}, "
                       f"{steps}, {decode / steps * 1e3:.2f} | "
                       f"{r['program_kernel_s'].get('jit_admit', 0):.2f} | {gaps:.3f} |")
    if first is None:
        return "(no serving trace results)"
    (p0, p1), (o0, o1) = first["prompt_lens"], first["output_lens"]
    return "\n".join(out + ["", f"{first['machine']}, {first['model']} shape, random weights, "
                            f"{first['max_batch']} slots, {first['steps_per_launch']} steps a "
                            f"launch: {first['requests']} requests at {first['rate']:g} a "
                            f"second, prompts {p0}-{p1} and outputs {o0}-{o1} tokens; the "
                            f"measured run traced with the Python tracer off, kernels per "
                            f"program summed from the GPU's stream lines."])


def guidance() -> str:
    """Guidance's decode step, cfg 1 against cfg 2 (benchmarks/guidance.py), per result file."""
    out = []
    for path in sorted(glob.glob(os.path.join(RESULTS, "guidance_*.jsonl"))):
        rows = _rows(os.path.basename(path))
        if not rows:
            continue
        first = rows[0]
        cell = {(r["tp"], r["cfg"], r["case"]): r["ms_per_step"] for r in rows}
        out += ["| tp | unguided, ms a step | guided, cfg 1 (tp devices) | "
                "guided, cfg 2 (2·tp devices) | cfg 2 / cfg 1 |", "| --- | --- | --- | --- | --- |"]
        for tp in sorted({r["tp"] for r in rows}):
            plain, one, two = (cell.get((tp, c, k)) for c, k in
                               ((1, "unguided"), (1, "guided"), (2, "guided")))
            fmt = lambda v: "—" if v is None else f"{v:.2f}"  # noqa: E731
            ratio = "—" if None in (one, two) else f"{two / one:.2f}×"
            out.append(f"| {tp} | {fmt(plain)} | {fmt(one)} | {fmt(two)} | {ratio} |")
        out += ["", _source(first) + f"{first['model']} shape, random weights, "
                f"{first['dtype']}, {first['batch']} prompts of {first['prompt']} tokens and "
                f"their negative prompts, {first['new_tokens']} greedy new tokens; medians."
                + (" Simulated CPU devices share two cores: cfg 2 shows the layout's cost, "
                   "not a speed-up." if "cpu" in first["machine"].lower() else ""), ""]
    return "\n".join(out).rstrip() if out else "(no guidance results)"


def _attn_dp_rows(bench: str) -> list[dict]:
    return [r for r in _rows("attn_dp_*.jsonl") if r.get("bench") == bench]


def attn_dp_kv() -> str:
    """KV-cache GiB per device by model shape, tp and attn_dp (benchmarks/attn_dp.py)."""
    rows = _attn_dp_rows("kv")
    if not rows:
        return "(no attn_dp kv results)"
    first = rows[0]
    groups = sorted({r["attn_dp"] for r in rows})
    out = ["| model (KV heads), tp | " + " | ".join(f"attn_dp {g}" for g in groups) + " |",
           "| --- |" + " --- |" * len(groups)]
    for model in dict.fromkeys(r["model"] for r in rows):
        for tp in sorted({r["tp"] for r in rows if r["model"] == model}):
            cell = {r["attn_dp"]: r for r in rows if (r["model"], r["tp"]) == (model, tp)}
            kv = cell[1]["kv_heads"]
            out.append(f"| {model} ({kv}), tp {tp} | " + " | ".join(
                f"{cell[g]['gib_per_device']:.3g} GiB ({cell[g]['copies']:g}×)" if g in cell
                else "—" for g in groups) + " |")
    return "\n".join(out + ["", _source(first) + f"K and V of {first['batch']} sequences of "
                            f"{first['positions']} positions in bfloat16, per device, read from "
                            f"the cache's sharding on the mesh; in brackets how many copies of "
                            f"each KV head all devices hold together (replicas and zero heads "
                            f"padded in)."])


def attn_dp_census() -> str:
    """Each layer's collectives by attn_dp and sp mode (benchmarks/attn_dp.py)."""
    rows = _attn_dp_rows("census")
    if not rows:
        return "(no attn_dp census results)"
    first = rows[0]
    out = ["| attn_dp | sp | a layer's collectives (group size, tensor rows) | wire MiB/device |",
           "| --- | --- | --- | --- |"]
    for r in rows:
        ops = ", ".join(f"{kind} ({group}, {dims[0]})" for kind, group, dims in
                        sorted(r["collectives"], key=lambda c: (-c[1], c[0])))
        out.append(f"| {r['attn_dp']} | {r['sp']} | {ops} | {r['wire_mib_per_layer']:.1f} |")
    return "\n".join(out + ["", _source(first) + f"compiled prefill of {first['batch']} × "
                            f"{first['tokens']} tokens, {first['model']} "
                            f"shape with {first['layers']} layers, tp {first['tp']}, float32 "
                            f"(wire bytes of a ring implementation)."])


def attn_dp_decode() -> str:
    """The decode step by attn_dp (benchmarks/attn_dp.py), per machine."""
    rows = _attn_dp_rows("decode")
    if not rows:
        return "(no attn_dp decode results)"
    out = []
    for machine in dict.fromkeys(r["machine"] for r in rows):
        mine = [r for r in rows if r["machine"] == machine]
        base = next(r for r in mine if r["attn_dp"] == 1)
        out += ["| attn_dp | KV heads stored | ms a step | tokens/s | against attn_dp 1 |",
                "| --- | --- | --- | --- | --- |"]
        for r in mine:
            out.append(f"| {r['attn_dp']} | {r['kv_heads_stored']} | {r['ms_per_step']:.1f} | "
                       f"{r['tokens_per_s']:.0f} | {base['ms_per_step'] / r['ms_per_step']:.2f}× |")
        out += ["", _source(base) + f"tp {base['tp']}, {base['batch']} sequences of "
                f"{base['prompt']}-token prompts, {base['new_tokens']} greedy tokens, "
                f"{base['dtype']}, 2 KV heads, medians."
                + (" Simulated CPU devices share the machine's cores: the step follows the "
                   "total work and bytes, not a multi-device speed-up." if "cpu" in machine
                   else ""), ""]
    return "\n".join(out).rstrip()


def attn_dp_gpu() -> str:
    """The mocked 8-GPU compile of attention groups (benchmarks/mock_gpu_compile.py --attn-dp)."""
    rows = _rows("mock_gpu_compile_attn_dp_*.jsonl")
    if not rows:
        return "(no mock_gpu_compile_attn_dp results)"
    out = ["| attn_dp | case | compiled | windowed-einsum loops (ag, rs) | a layer's collectives "
           "exposed in the schedule |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["case"] == "decode":
            what = (f"{r['pallas_calls']} fused Pallas calls on each device's own cache"
                    if r["attention"] == "pallas" else
                    f"{r['cudnn_fmha_calls']} cuDNN calls, {r['layer_slice_copies']} layer-slice "
                    f"copies")
            out.append(f"| {r['attn_dp']} | decode step, {r['attention']} | {r['compiled']} | — "
                       f"| {what} |")
            continue
        loops = r["windowed_einsum"]
        exposed = collections.Counter(e.rsplit(" x", 1)[0] for e in r["exposed_in_layer"])
        text = ", ".join(f"{n}× {e}" for e, n in sorted(exposed.items())) or "none"
        out.append(f"| {r['attn_dp']} | {r['case']} | {r['compiled']} | "
                   f"{loops['windowed_dot_general_body_ag']}, "
                   f"{loops['windowed_dot_general_body_rs']} | {text} |")
    first = next(r for r in rows if "devices" in r)
    return "\n".join(out + ["", f"`benchmarks/results/{first['_file']}` (jax {first['jax']}, "
                            f"one H200 compiling for a mocked 1x8x1 topology, "
                            f"{first['devices']}): {first['model']} shape, {first['layers']} "
                            f"layers, tp {first['tp']}, bfloat16, prefill of {first['tokens']} "
                            f"tokens (one sequence per group); decode: batch 8, cache 1024."])

# the kernel design each run of benchmarks/add_norm.py timed as add_norm="gemv" (models/fp8_gemv.py
# `add_norm`), by result file
_NORM_IN_GEMV = {
    "add_norm_norm_in_registers_h100_llama3-8b": "every weight block loaded into registers "
    "first, the row normalized, then the products",
    "add_norm_norm_first_h100_llama3-8b": "a pass over the row for its sum of squares, then "
    "the pipelined loop on the normalized row (RMSNorm's roundings)",
    "add_norm_norm_folded_h100_llama3-8b": "one pipelined loop, the norm folded into the "
    "product (kept)"}


def add_norm_in_gemv(*names: str) -> str:
    """The add and the norm inside the FP8 GEMV kernel ("gemv"), one design per run of
    benchmarks/add_norm.py, against the add-and-norm kernel before the GEMV ("auto" then) and
    XLA's norms with no signal in the same run."""
    out = ["| the norm in the GEMV kernel | XLA's norms, no signal, ms | add-and-norm kernel, ms "
           "| in the GEMV, ms | vs the add-and-norm kernel | same tokens |",
           "| --- | --- | --- | --- | --- | --- |"]
    first = None
    for name in names:
        rows = {r["add_norm"]: r for r in _rows(f"{name}.jsonl")
                if r["bench"] == "decode" and r["quantization"] == "fp8-head"}
        first = first or rows["gemv"]
        out.append(f"| {_NORM_IN_GEMV[name]} | {rows['xla']['ms_per_token']:.3f} | "
                   f"{rows['auto']['ms_per_token']:.3f} | {rows['gemv']['ms_per_token']:.3f} | "
                   f"{rows['auto']['ms_per_token'] / rows['gemv']['ms_per_token']:.3f}× | "
                   f"{'yes' if rows['gemv']['same_tokens'] else 'no'} |")
    out += ["", f"`benchmarks/results/`: {', '.join(f'`{n}.jsonl`' for n in names)} "
            f"({first['machine']}, jax {first['jax']}): {first['model']} shape with the LM head "
            f"in FP8, random weights, batch 1, decode after a {first['prompt']}-token prompt, "
            f"{first['new_tokens']} greedy new tokens, per token; one process a row, each "
            f"variant timed {len(first['runs_ms'])} times in alternation with the others, "
            f"medians; \"same tokens\": as with XLA's norms."]
    return "\n".join(out)


TABLES = {"ceiling": ceiling, "attn_dp_gpu": attn_dp_gpu, "guidance": guidance, "fp8_fma": fp8_fma, "fp8_shape": fp8_shape,
          "serving": serving, "serving_trace": serving_trace, "schedule": schedule,
          "load": load, "fp8_accuracy": fp8_accuracy,
          "attn_dp_kv": attn_dp_kv, "attn_dp_census": attn_dp_census,
          "attn_dp_decode": attn_dp_decode,
          "fp8_speed": fp8_speed, "fp8_modes": fp8_modes, "kv_fp8_speed": kv_fp8_speed,
          "fp8_w8a8": fp8_w8a8, "fp8_gemv": fp8_gemv, "fp8_mlp": fp8_mlp, "pdl": pdl,
          "fp8_warm": fp8_warm, "add_norm": add_norm, "add_norm_in_gemv": add_norm_in_gemv,
          "refactor": refactor,
          "generation": generation,
          "generation_summary": generation_summary, "numerics": numerics, "sp_vs_tp": sp_vs_tp}
_BLOCK = re.compile(r"(<!-- table:(\w+)((?: [\w.+\-]+)*) -->\n)(.*?)(<!-- /table:\2 -->)", re.S)


def render(text: str) -> str:
    return _BLOCK.sub(lambda m: m.group(1) + TABLES[m.group(2)](*m.group(3).split()) + "\n"
                      + m.group(5), text)


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
