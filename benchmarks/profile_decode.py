"""Where a decode step's time goes: a jax.profiler trace of greedy generation, summed by kernel.

Runs `LLM.generate` on random weights (no PyTorch), traces one warm call per case, and reads the
trace with `jax.profiler.ProfileData`: device busy time per new token next to wall time per
token (busy << wall: launch- or host-bound; busy ~ wall: kernel-bound) and the kernels that
take the time. JSON lines on stdout and in --out.

    python benchmarks/profile_decode.py --model llama3.2-1b --batches 1,32 --unroll 1
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import tempfile
import time

import common  # noqa: E402  (and the repository on the import path)


def kernel_times(trace_dir: str):
    """{kernel name: (total ns, count)} over the device planes of the trace in trace_dir."""
    from jax.profiler import ProfileData

    path = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)[0]
    data = ProfileData.from_file(path)
    totals = collections.defaultdict(lambda: [0, 0])
    kernel_times.events = []  # (start ns, name, duration ns), for the step sequence
    kernel_times.layout = [(p.name, [ln.name for ln in p.lines][:8]) for p in data.planes]
    for plane in data.planes:
        if not plane.name.startswith("/device:"):
            continue
        for line in plane.lines:
            if "stream" not in line.name.lower():  # kernels and copies sit on stream lines
                continue
            for ev in line.events:
                totals[ev.name][0] += ev.duration_ns
                totals[ev.name][1] += 1
                kernel_times.events.append((ev.start_ns, ev.name, ev.duration_ns))
    return totals


def step_sequence(events, per_step: int):
    """The kernels of about two decode steps in launch order, from the middle of the trace:
    [(name, µs, gap before it in µs)]."""
    events = sorted(events)
    mid = len(events) // 2
    window = events[mid: mid + 2 * per_step]
    return [(n, d / 1e3, (s - (p[0] + p[2])) / 1e3 if p else 0.0)
            for p, (s, n, d) in zip([None] + window[:-1], window)]


def parse_options(pairs) -> dict:
    """KEY=VALUE strings -> compiler options (true/false and integers converted)."""
    options = {}
    for kv in pairs:
        k, v = kv.split("=", 1)
        options[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)
    return options


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--unroll", type=int, default=None,
                    help="decode layer-loop unroll factor (default: the library's, "
                         "jax_sp.generate.decode_unroll: every layer on GPU)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (CPU plumbing)")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--attention", default="auto", help="CompileOptions.attention")
    ap.add_argument("--out", default=None)
    ap.add_argument("--sliced-cache", action="store_true",
                    help="cuDNN decode reads a copy of each layer's cache slice (the old path)")
    ap.add_argument("--from-torch", action="store_true",
                    help="load the weights from a transformers model as benchmarks/generation.py "
                         "does (default: jax-sp's random_params)")
    ap.add_argument("--torch-first", action="store_true",
                    help="let PyTorch create the CUDA context before XLA does, as "
                         "benchmarks/generation.py does")
    ap.add_argument("--pad-rows-min-weight", type=int, default=1 << 20,
                    help="CompileOptions.pad_rows_min_weight: projections of weights from this "
                         "many elements up run on a multiple of 8 rows on GPU")
    ap.add_argument("--hlo", action="store_true",
                    help="also write the decode program's optimized HLO and every kernel to --out")
    ap.add_argument("--quantization", default=None, help="e.g. fp8 (LLM(quantization=...))")
    ap.add_argument("--launch-dependents", default="auto", choices=("auto", "true", "false"),
                    help="CompileOptions.launch_dependents: which of jax-sp's Pallas kernels let "
                         "the next kernel launch as they start (models/pdl.py)")
    ap.add_argument("--add-norm", default="auto",
                    help="CompileOptions.add_norm: a decode step's residual adds and norms in the "
                         "FP8 GEMV after each (gemv), in one Pallas kernel (pallas), as XLA fuses "
                         "them (xla) or by default (auto)")
    ap.add_argument("--attention-max-splits", type=int, default=None,
                    help="at most this many programs per sequence and KV head in the decode "
                         "attention kernel (models/decode_attention.py MAX_SPLITS; one: no "
                         "split of the keys, no combine after the kernel)")
    ap.add_argument("--xla-option", action="append", default=[],
                    help="KEY=VALUE compiler option for every program (repeatable)")
    args = ap.parse_args()
    args.launch_dependents = {"true": True, "false": False}.get(args.launch_dependents, "auto")
    if args.torch_first:
        import torch

        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")

    import dataclasses

    import jax
    import numpy as np

    import jax_sp.generate as gen
    from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import random_params

    if args.attention_max_splits:
        import models.decode_attention

        models.decode_attention.MAX_SPLITS = args.attention_max_splits
    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    options = parse_options(args.xla_option)
    parallel = ParallelConfig(tp=1)
    compile_options = CompileOptions(
        attention=args.attention, decode_unroll=args.unroll, xla_options=options or None,
        pad_rows_min_weight=args.pad_rows_min_weight, paged_decode=not args.sliced_cache,
        launch_dependents=args.launch_dependents, add_norm=args.add_norm)
    max_len = args.prompt + args.new_tokens + 64
    if args.from_torch:
        from generation import hf_module

        device = "cuda" if jax.default_backend() == "gpu" else "cpu"
        llm = LLM.from_torch(hf_module(cfg, args.dtype, device), parallel=parallel,
                             dtype=args.dtype, max_seq_len=max_len, options=compile_options)
    else:
        llm = LLM(cfg, random_params(cfg), parallel=parallel, dtype=args.dtype,
                  max_seq_len=max_len, options=compile_options, quantization=args.quantization)
    args.unroll = gen.decode_unroll(llm.runtime)  # recorded as resolved
    # prefill-decode
    attention = f"{llm.runtime.attention.name}-{llm.runtime.decode_attention.name}"
    # what sets this run apart, in every file name it writes
    variant = "".join(tag for on, tag in ((args.sliced_cache, "_sliced"),
                                           (args.from_torch, "_from_torch"),
                                           (args.torch_first, "_torch_first"),
                                           (args.launch_dependents is True,
                                            "_launch_dependents"),
                                           (args.launch_dependents is False, "_no_signal"),
                                           (args.add_norm != "auto", f"_add_norm_{args.add_norm}"),
                                           (args.attention_max_splits,
                                            f"_attention_splits{args.attention_max_splits}"),
                                           (args.quantization, f"_{args.quantization}")) if on)
    rng = np.random.default_rng(0)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        sp = SamplingParams(max_new_tokens=args.new_tokens)
        llm.generate(ids, sp)
        untraced = []
        for _ in range(3):
            llm.generate(ids, sp)
            untraced.append(llm.last_stats.decode_s / (args.new_tokens - 1) * 1e3)
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                t0 = time.perf_counter()
                llm.generate(ids, sp)
                wall = time.perf_counter() - t0
            stats = llm.last_stats
            totals = kernel_times(d)
        steps = args.new_tokens - 1
        busy = sum(t for t, _ in totals.values())
        top = sorted(totals.items(), key=lambda kv: -kv[1][0])[: args.top]
        row = {"bench": "profile-decode", "model": args.model, "batch": batch,
               "layers": cfg.num_layers, "quantization": args.quantization,
               "unroll": args.unroll, "attention": llm.runtime.attention.name,
               "wall_ms": wall * 1e3, "decode_attention": llm.runtime.decode_attention.name,
               "paged_cache": not args.sliced_cache,
               "launch_dependents": args.launch_dependents, "add_norm": args.add_norm,
               "attention_max_splits": args.attention_max_splits,
               "pad_rows_min_weight": args.pad_rows_min_weight,
               "weights": "from_torch" if args.from_torch else "random_params",
               "context_created_by": "torch" if args.torch_first else "xla",
               "decode_ms_per_token": stats.decode_s / steps * 1e3,
               "untraced_decode_ms_per_token": sorted(untraced)[1],
               "device_busy_ms_per_token_incl_prefill": busy / 1e6 / steps,
               "kernels_per_token": sum(c for _, c in totals.values()) / steps,
               "top": [{"name": n[:90], "us_per_token": t / 1e3 / steps, "calls_per_token":
                        c / steps} for n, (t, c) in top],
               "device": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""),
               "xla_options": options}
        if not totals:  # say what the trace held instead
            row["trace_planes"] = kernel_times.layout
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.hlo and args.out:
            os.makedirs(args.out, exist_ok=True)
            stem = os.path.join(args.out, f"decode_{args.model}_b{batch}_u{args.unroll}"
                                           f"_{attention}{variant}")
            with open(stem + ".hlo.txt", "w") as f:
                f.write(llm.programs.hlo("decode"))
            with open(stem + ".kernels.tsv", "w") as f:
                for n, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0]):
                    f.write(f"{t / 1e3 / steps:.2f}\t{c / steps:.2f}\t{n}\n")
            with open(stem + ".sequence.tsv", "w") as f:  # µs, gap before it (µs), kernel
                for n, d, gap in step_sequence(kernel_times.events,
                                               round(row["kernels_per_token"])):
                    f.write(f"{d:.2f}\t{gap:.2f}\t{n[:120]}\n")
    if args.out:
        tag = "".join(f"_{k.removeprefix('xla_gpu_')}-{v}" for k, v in options.items())
        if args.pad_rows_min_weight is not None:
            tag += f"_pad_rows_min_weight-{args.pad_rows_min_weight}"
        name = f"profile_decode_{args.model}_u{args.unroll}_{attention}{variant}{tag}.jsonl"
        name = name.replace(".jsonl", f"_l{cfg.num_layers}.jsonl") if args.layers else name
        common.write_jsonl(os.path.join(args.out, name), rows)


if __name__ == "__main__":
    main()
