"""Compile-only check of the SP layer for an 8-GPU mesh on a one-GPU machine.

For Llama-3-8B and 70B layer shapes (two layers, so the scan over layers stays a loop), tp 8, SP on
(and TP for reference), bf16, compiles a prefill for a mocked 1x8x1 GPU topology with each comm
path and XLA option set of PREFILL_CASES, and records what XLA:GPU produced: success or the
error, windowed-einsum loops, the collective census per layer and, from the scheduled HLO, which
collectives run beside compute ("overlapped") and which do not ("exposed";
`sharding/schedule.py`). Every compile starts from the options jax-sp would use for that program
(`Runtime.xla_options`) and adds the case's. `--hlo-dir` also writes each case's scheduled HLO
(gzip).

Also compiles a one-token decode step (batch 8, cache 1024) at tp 8 with cuDNN attention reading
the stacked, head-sharded cache as a paged pool, its layer loop unrolled as decode programs on GPU
have it, and records whether the fused-attention calls (one per layer) and no copy of the cache
are in the program; then the same step with the fused Pallas decode kernel (attention="pallas",
the GPU default): its calls, each device's own [L, B, S, K/8, H] cache as their operand, and no
collective of a head-shaped tensor. One JSON line per case.

XLA's autotuner cannot run kernels on mocked devices and hangs there (seen with jax 0.11.2 on an
H100: no result after 100 s); every compile here passes `xla_gpu_autotune_level=0`.

    python benchmarks/mock_gpu_compile.py [--tokens 4096] [--decode-only | --prefill-only]
        [--models llama3-8b,llama3-70b] [--cases NAME,...] [--out FILE.jsonl] [--hlo-dir DIR]
        [--from-hlo]
"""

import argparse
import dataclasses
import gzip
import json
import os

import jax

jax.config.update("jax_mock_gpu_topology", "1x8x1")  # before first use
import common  # noqa: E402,F401  (the repository on the import path)

from jax_sp.config import CompileOptions, ParallelConfig  # noqa: E402
from jax_sp.generate import (  # noqa: E402
    Static, abstract_decode_step_args, decode_step_fn, decode_unroll, prefill_fn)
from jax_sp.presets import preset  # noqa: E402
from jax_sp.runtime import Runtime  # noqa: E402
from sharding.mesh import tp_mesh  # noqa: E402
from sharding.hlo import census, summarize, windowed_einsum_loops  # noqa: E402
from sharding.schedule import overlaps, summarize_overlap  # noqa: E402
from sharding.xla_options import (  # noqa: E402
    SCHEDULE_OVERLAP, WINDOWED_EINSUM, collective_matmul_options)

# (name, sp, comm, options added to jax-sp's own for the program); jax-sp's own for SP + xla on
# GPU include WINDOWED_EINSUM, "no-windowed" takes them out again
PREFILL_CASES = (
    ("tp", "off", "xla", {}),
    ("sp-xla", "on", "xla", {}),
    ("sp-xla-overlap", "on", "xla", SCHEDULE_OVERLAP),
    ("sp-xla-single-stream", "on", "xla", {"xla_gpu_multi_streamed_windowed_einsum": False}),
    ("sp-xla-no-windowed", "on", "xla", {k: None for k in WINDOWED_EINSUM}),
    ("sp-ring", "on", "ring", {}),
    ("sp-ring-overlap", "on", "ring", SCHEDULE_OVERLAP),
    ("sp-mosaic", "on", "mosaic", {}),
)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--models", default="llama3-8b,llama3-70b")
    ap.add_argument("--cases", default=",".join(c[0] for c in PREFILL_CASES))
    ap.add_argument("--out", default="")
    ap.add_argument("--hlo-dir", default="")
    ap.add_argument("--from-hlo", action="store_true",
                    help="analyse the programs saved in --hlo-dir instead of compiling (any "
                         "machine)")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--quantization", default=None, help="e.g. fp8: the layers' projections in "
                    "FP8 (models/quant.py)")
    ap.add_argument("--attn-dp", default="1", help="attention groups, e.g. 1,2,4: each case "
                    "at each (ParallelConfig.attn_dp; mosaic cases only at 1)")
    args = ap.parse_args()
    rows = []
    for model in args.models.split(","):
        cfg = dataclasses.replace(preset(model), num_layers=2)  # 2: keep the layer loop
        for attn_dp in [int(g) for g in args.attn_dp.split(",")]:
            for case in ([] if args.decode_only else PREFILL_CASES):
                if case[0] in args.cases.split(",") and (attn_dp == 1 or case[2] != "mosaic"):
                    rows.append(prefill_case(model, cfg, *case, args.tokens, args.hlo_dir,
                                             args.from_hlo, args.quantization, attn_dp))
                    print(json.dumps(rows[-1]), flush=True)
            for attention in (() if args.prefill_only else ("cudnn", "pallas")):
                rows.append(decode_case(model, cfg, attention, attn_dp=attn_dp))
                print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


def prefill_case(model, cfg, name, sp, comm, extra, tokens, hlo_dir, from_hlo=False,
                 quantization=None, attn_dp=1):
    # The mocked topology is eight processes of one GPU each, which comm="mosaic" refuses
    # (sharding.mosaic.check_mesh: one process must own every GPU); the runtime is built as
    # "ring" and switched, and the kernel compiles its multi-process variant here.
    rt = Runtime(cfg, ParallelConfig(tp=8, sp=sp, comm="ring" if comm == "mosaic" else comm,
                                     attn_dp=attn_dp),
                 dtype="bfloat16", quantization=quantization)
    if comm == "mosaic":
        rt.parallel = dataclasses.replace(rt.parallel, comm=comm)
        rt.mesh = tp_mesh(rt.mesh)  # what the runtime does after check_mesh
    options = {k: v for k, v in {**collective_matmul_options("gpu", comm, sp == "on"),
                                 **extra}.items() if v is not None}
    row = {"model": model, "layers": cfg.num_layers, "tp": 8, "tokens": tokens, "case": name,
           "quantization": quantization, "attn_dp": attn_dp,
           "sp": sp, "comm": comm, "options": options, "devices": f"{len(jax.devices())}x "
           f"{jax.devices()[0].device_kind}", "jax": jax.__version__}
    tag = (f"{name}_{quantization}" if quantization else name) + (
        f"_attn_dp{attn_dp}" if attn_dp > 1 else "")
    saved = os.path.join(hlo_dir, f"{model}_{tag}.hlo.txt.gz") if hlo_dir else ""
    if from_hlo:  # analyse the program an earlier run compiled and saved
        with open(saved.replace(".hlo.txt.gz", ".json")) as f:
            row.update(json.load(f))  # where it was compiled: devices, jax
        with gzip.open(saved, "rt") as f:
            return analyse(row, f.read(), cfg.num_layers)
    static = Static.of(rt, "prefill", sp == "on")
    # one sequence per attention group (a group owns whole sequences)
    ids = jax.ShapeDtypeStruct((attn_dp, tokens // attn_dp), "int32")
    lengths = jax.ShapeDtypeStruct((attn_dp,), "int32")
    try:
        lowered = jax.jit(prefill_fn(rt, static, "tokens", "last")).lower(
            rt.abstract_state(), ids, lengths)
        hlo = lowered.compile({**options, "xla_gpu_autotune_level": 0}).as_text()
    except Exception as e:  # noqa: BLE001
        return {**row, "compiled": False, "error": str(e).splitlines()[0][:1000]}
    if saved:
        os.makedirs(hlo_dir, exist_ok=True)
        with gzip.open(saved, "wt") as f:
            f.write(hlo)
        with open(saved.replace(".hlo.txt.gz", ".json"), "w") as f:
            json.dump({k: row[k] for k in ("devices", "jax")}, f)
    return analyse(row, hlo, cfg.num_layers)


def analyse(row, hlo, layers):
    """The row of a compiled prefill: windowed-einsum loops, per-layer census and schedule."""
    found = overlaps(hlo, layers)
    per_layer = [o for o in found if o.collective.scope == "layer"]
    return {**row, "compiled": True, "windowed_einsum": windowed_einsum_loops(hlo),
            "layer_collectives": {k: v["count"] for k, v in
                                  summarize(census(hlo, layers), layers).get("layer", {}).items()},
            # what each layer's collectives carry: "kind dtype[dims] x count", and the bytes
            "layer_census": sorted(f"{c.kind} {c.dtype}{list(c.dims)} x{c.count // layers}"
                                   for c in census(hlo, layers) if c.scope == "layer"),
            "layer_bytes": {k: v["tensor_bytes"] for k, v in
                            summarize(census(hlo, layers), layers).get("layer", {}).items()},
            "layer_overlap": summarize_overlap(found, layers).get("layer", {}),
            "exposed_in_layer": [f"{o.collective.kind} {o.collective.dtype}"
                                 f"{list(o.collective.dims)} x{o.collective.count // layers}"
                                 for o in per_layer if not o.overlapped],
            "outside_overlap": summarize_overlap(found, layers).get("outside", {}),
            "mosaic_kernels": hlo.count("mosaic_gpu")}


def decode_case(model, cfg, attention, batch=8, max_len=1024, attn_dp=1):
    rt = Runtime(cfg, ParallelConfig(tp=8, sp="off", attn_dp=attn_dp), dtype="bfloat16",
                 options=CompileOptions(attention=attention))
    c = rt.padded_cfg
    args = abstract_decode_step_args(rt, batch, max_len)
    heads, rows = c.num_kv_heads // (8 // attn_dp), batch // attn_dp  # a device's
    row = {"model": model, "layers": cfg.num_layers, "tp": 8, "attn_dp": attn_dp,
           "case": "decode", "batch": batch,
           "cache": max_len, "attention": rt.decode_attention.name, "unroll": decode_unroll(rt),
           "jax": jax.__version__}
    try:
        fn = decode_step_fn(rt, Static(sp=False, greedy=True, top_k=0, unroll=row["unroll"]))
        lowered = jax.jit(fn, donate_argnums=(1,)).lower(*args)
        hlo = lowered.compile({**rt.xla_options(False),
                               "xla_gpu_autotune_level": 0}).as_text()
        local = f"{cfg.num_layers * rows},{max_len},{heads},{c.head_dim}"
        stacked = f"bf16[{cfg.num_layers},{rows},{max_len},{heads},{c.head_dim}]"
        head_shaped = [x for x in census(hlo) if x.dims[-1:] == (c.head_dim,)]
        row.update(compiled=True, cudnn_fmha_calls=hlo.count("__cudnn$fmha"),
                   cudnn_mentions=hlo.count("cudnn"), while_loops=hlo.count(" while("),
                   paged_pool_operand=f"bf16[{local}]" in hlo,
                   pallas_calls=len([ln for ln in hlo.splitlines() if "__gpu$xla.gpu.triton" in ln
                                     and "decode_attention" in ln]),
                   local_stacked_cache_operand=stacked in hlo,
                   head_shaped_collectives=len(head_shaped),
                   layer_slice_copies=hlo.count(f"bf16[{rows},{max_len},"),
                   layer_collectives=sorted(f"{x.kind} {x.dtype}{list(x.dims)} n{x.group}"
                                            for x in census(hlo) if x.scope != "outside"))
    except Exception as e:  # noqa: BLE001
        row.update(compiled=False, error=str(e).splitlines()[0][:1000])
    return row


if __name__ == "__main__":
    main()
