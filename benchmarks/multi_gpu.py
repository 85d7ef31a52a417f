"""Prefill throughput across N devices: plain TP, SP + XLA collectives, SP + ring collective
matmul (jax-sp), and the PyTorch tensor-parallel peers at the same tp. Llama-3-8B / 70B layer
shapes, T from 256 to 16384 tokens. One JSON line per result.

jax-sp side (this process, all local devices):
  per_layer  — one decoder layer: first pipeline stages (embedding + layers, no LM head) of
               `--layers` and of half as many layers are timed, and the difference over the
               difference of layers is a layer's time without the embedding or per-call costs;
  end_to_end — a whole `--layers`-layer model's prefill with last-token logits.
Each time is the median over `--repeats` rounds of `--burst` calls launched back to back.
PyTorch side (`--torch`, one process per device, torch.distributed): DTensor tensor parallel
(`parallelize_module` with Colwise/Rowwise plans), the same with `SequenceParallel` norms, and
async TP (`torch._inductor.config._micro_pipeline_tp`, fused all-gather-matmul /
matmul-reduce-scatter; CUDA only) on one decoder layer, timed the same way (rounds of calls
launched back to back), after checking its output against the same layer on one device.

    python benchmarks/multi_gpu.py --tp 8 --torch                 # on an 8-GPU host
    python benchmarks/multi_gpu.py --cpu-devices 8 --tiny         # plumbing on CPU
Keep NVLink multicast off on shared machines: NCCL_NVLS_ENABLE=0
TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 (set here for the child processes).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import statistics
import time

from common import machine, pyplot, timed_bursts  # noqa: E402  (and the repository on the path)
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

MODES = {"tp": ("off", "xla"), "sp-xla": ("on", "xla"), "sp-ring": ("on", "ring")}


def jax_rows(args):
    """per_layer: a first pipeline stage (embedding + layers, no LM head) compiled with
    `--layers` and with half as many; the difference of the two times over the difference of
    layers is one layer's time, free of the embedding and the call's fixed costs.
    end_to_end: a whole `--layers`-layer model's prefill with last-token logits."""
    import numpy as np

    from jax_sp.config import ParallelConfig
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime, Stage, random_params

    machine_name = machine()
    hi = args.layers
    lo = hi // 2
    if lo < 1:
        raise SystemExit("--layers must be at least 2 (one layer's time is a difference)")
    for shape in args.shapes.split(","):
        cfg = dataclasses.replace(preset(shape), num_layers=hi)
        if args.tiny:
            cfg = dataclasses.replace(cfg, hidden_size=256, intermediate_size=512, num_heads=8,
                                      num_kv_heads=8, head_dim=32, vocab_size=1024)
        host = random_params(cfg)
        for mode, (sp, comm) in MODES.items():
            parallel = ParallelConfig(tp=args.tp, sp=sp, comm=comm)
            whole = Runtime(cfg, parallel, args.dtype)
            stages, states = {}, {}
            for n in (lo, hi):  # first stages of n layers: no LM head
                stages[n] = Runtime(dataclasses.replace(cfg, num_layers=n), parallel, args.dtype,
                                    mesh=whole.mesh, stage=Stage(0, 2, 0, n))
                states[n] = stages[n].place({k: v[:n] if k.startswith("layers/") else v
                                             for k, v in host.items()
                                             if k in stages[n].param_names})
            states["end_to_end"] = whole.place(host)
            for t in (int(x) for x in args.tokens.split(",")):
                t = -(-t // args.tp) * args.tp
                ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, t)).astype("int32")
                lengths = np.array([t], "int32")
                got = {}
                for key, rt in ((lo, stages[lo]), (hi, stages[hi]), ("end_to_end", whole)):
                    got[key] = timed_bursts(lambda: rt.logits(states[key], ids, lengths,  # noqa: B023
                                                       sp == "on", out="last"),
                                     args.repeats, args.burst)
                per_layer = (got[hi][1] - got[lo][1]) / (hi - lo)
                # twice the layers not even 25% slower: the call's fixed (host) cost dominates
                # and the difference is noise
                host_bound = got[hi][1] < 1.25 * got[lo][1]
                common = {"bench": "multi_gpu", "side": "jax-sp", "mode": mode, "shape": shape,
                          "tp": args.tp, "tokens": t, "machine": machine_name}
                yield {**common, "what": "per_layer", "layers": [lo, hi],
                       "median_ms": per_layer * 1e3, "tokens_per_s": t / per_layer,
                       "stage_ms": [got[lo][1] * 1e3, got[hi][1] * 1e3],
                       "host_bound": host_bound,
                       "first_call_s": got[hi][0]}
                yield {**common, "what": "end_to_end", "layers": hi,
                       "median_ms": got["end_to_end"][1] * 1e3,
                       "tokens_per_s": t / got["end_to_end"][1],
                       "first_call_s": got["end_to_end"][0]}


def torch_worker(rank, world, args, queue):
    """One rank of the PyTorch peers: a single decoder layer under each TP plan."""
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import (ColwiseParallel, RowwiseParallel,
                                                   SequenceParallel, parallelize_module)

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            init_method=f"tcp://127.0.0.1:{args.port}")
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world,))
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = getattr(torch, args.dtype) if cuda else torch.float32
    from jax_sp.presets import preset

    for shape in args.shapes.split(","):
        cfg = preset(shape)
        d, f, n, k, h = (256, 512, 8, 8, 32) if args.tiny else (
            cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
        hc = transformers.LlamaConfig(hidden_size=d, intermediate_size=f, num_attention_heads=n,
                                      num_key_value_heads=k, head_dim=h, num_hidden_layers=1,
                                      vocab_size=1024, attn_implementation="sdpa")
        plans = ["dtensor-tp", "dtensor-tp-sp"] + (["async-tp"] if cuda else [])
        for plan in plans:
            torch.manual_seed(0)
            layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer(hc, 0)
            layer = layer.to(device=device, dtype=dtype)
            reference = copy.deepcopy(layer)  # the same weights on one device
            rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(hc).to(device)
            tp_plan = {"self_attn.q_proj": ColwiseParallel(), "self_attn.k_proj": ColwiseParallel(),
                       "self_attn.v_proj": ColwiseParallel(),
                       "mlp.gate_proj": ColwiseParallel(), "mlp.up_proj": ColwiseParallel()}
            if plan == "dtensor-tp":
                tp_plan.update({"self_attn.o_proj": RowwiseParallel(),
                                "mlp.down_proj": RowwiseParallel()})
            else:  # SP: norms on token shards, all-gather before and reduce-scatter after
                tp_plan.update({
                    "input_layernorm": SequenceParallel(),
                    "post_attention_layernorm": SequenceParallel(),
                    "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1)),
                    "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
                    "self_attn.q_proj": ColwiseParallel(input_layouts=Shard(1)),
                    "self_attn.k_proj": ColwiseParallel(input_layouts=Shard(1)),
                    "self_attn.v_proj": ColwiseParallel(input_layouts=Shard(1)),
                    "mlp.gate_proj": ColwiseParallel(input_layouts=Shard(1)),
                    "mlp.up_proj": ColwiseParallel(input_layouts=Shard(1))})
            parallelize_module(layer, mesh, tp_plan)
            run = layer
            if plan == "async-tp":
                import torch._inductor.config as inductor

                inductor._micro_pipeline_tp = True
                from torch.distributed._symmetric_memory import enable_symm_mem_for_group

                enable_symm_mem_for_group(dist.group.WORLD.group_name)
                run = torch.compile(layer)
            for t in (int(x) for x in args.tokens.split(",")):
                t = -(-t // world) * world
                rows = t // world if plan != "dtensor-tp" else t
                torch.manual_seed(1)  # every rank draws the same full input
                x_full = torch.randn(1, t, d, device=device, dtype=dtype)
                x = x_full[:, rank * rows:(rank + 1) * rows] if rows < t else x_full
                cos, sin = rotary(x_full, torch.arange(t, device=device)[None])
                try:
                    with torch.no_grad():
                        out = run(x, position_embeddings=(cos, sin), attention_mask=None)
                        out = out[0] if isinstance(out, tuple) else out
                        out = out.full_tensor() if hasattr(out, "full_tensor") else out
                        want = reference(x_full, position_embeddings=(cos, sin),
                                         attention_mask=None)
                        want = (want[0] if isinstance(want, tuple) else want)
                        want = want[:, rank * rows:(rank + 1) * rows] if rows < t else want
                        rel = float((out.float() - want.float()).norm() / want.float().norm())
                        if cuda:
                            torch.cuda.synchronize()
                        times = []
                        for _ in range(args.repeats):
                            dist.barrier()
                            t0 = time.perf_counter()
                            for _ in range(args.burst):
                                run(x, position_embeddings=(cos, sin), attention_mask=None)
                            if cuda:
                                torch.cuda.synchronize()
                            times.append((time.perf_counter() - t0) / args.burst)
                    med = statistics.median(times)
                    row = {"median_ms": med * 1e3, "tokens_per_s": t / med,
                           "rel_err_vs_one_device": rel}
                except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                    row = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                if rank == 0:
                    queue.put({"bench": "multi_gpu", "side": "torch", "what": "per_layer",
                               "mode": plan, "shape": shape, "tp": world, "tokens": t,
                               "torch": torch.__version__, **row})
    dist.destroy_process_group()


def torch_rows(args):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=torch_worker, args=(r, args.tp, args, queue))
             for r in range(args.tp)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=args.timeout)
    while not queue.empty():
        yield queue.get()
    for p in procs:
        if p.is_alive():
            p.kill()
            yield {"bench": "multi_gpu", "side": "torch", "error": "timed out"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=8)
    ap.add_argument("--shapes", default="llama3-8b,llama3-70b")
    ap.add_argument("--tokens", default="256,1024,4096,16384")
    ap.add_argument("--layers", type=int, default=4,
                    help="layers of the bigger stage; per-layer time = (t(L) - t(L/2)) / (L - L/2)")
    ap.add_argument("--repeats", type=int, default=7, help="timed rounds (median)")
    ap.add_argument("--burst", type=int, default=4, help="calls per round, waited for once")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--cpu-devices", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="small widths, for CPU plumbing")
    ap.add_argument("--torch", action="store_true", help="also run the PyTorch peers")
    ap.add_argument("--no-jax", action="store_true",
                    help="skip the jax-sp rows (with --torch: the PyTorch peers alone)")
    ap.add_argument("--port", type=int, default=29533)
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--replot", nargs="+", metavar="JSONL",
                    help="only redraw the plot from these result files (written next to the first)")
    args = ap.parse_args()
    if args.replot:
        rows = [json.loads(line) for p in args.replot for line in open(p) if line.strip()]
        plot(rows, os.path.splitext(args.replot[0])[0] + ".png")
        return
    if args.cpu_devices:
        from jax_sp.cli import ensure_devices  # before the backend starts

        ensure_devices(args.cpu_devices)
        os.environ["JAX_PLATFORMS"] = "cpu"
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"multi_gpu_tp{args.tp}" + ("_tiny" if args.tiny else "")
                        + ("_torch" if args.no_jax else ""))
    rows = []
    sides = ([] if args.no_jax else [jax_rows]) + ([torch_rows] if args.torch else [])
    with open(stem + ".jsonl", "w") as fh:  # written as it goes: a cut-off run keeps its rows
        for side in sides:
            for row in side(args):
                rows.append(row)
                print(json.dumps(row), flush=True)
                fh.write(json.dumps(row) + "\n")
                fh.flush()
    plot(rows, stem + ".png")


def plot(rows, path):
    """Per-layer time relative to plain TP (jax-sp's "tp" row of the same shape and T), one
    panel per shape; lines for every other jax-sp mode and PyTorch plan. Host-bound jax-sp rows
    (whose per-layer time is noise) are left out."""
    plt = pyplot()
    if plt is None:
        return
    layer = [r for r in rows if r.get("what") == "per_layer" and "median_ms" in r
             and not r.get("host_bound")]
    base = {(r["shape"], r["tokens"]): r["median_ms"] for r in layer
            if r["side"] == "jax-sp" and r["mode"] == "tp"}
    shapes = sorted({r["shape"] for r in layer})
    if not base or not shapes:
        return
    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for side, mode in sorted({(r["side"], r["mode"]) for r in layer}):
            pts = sorted((r["tokens"], base[shape, r["tokens"]] / r["median_ms"]) for r in layer
                         if (r["side"], r["mode"], r["shape"]) == (side, mode, shape)
                         and (shape, r["tokens"]) in base)
            if pts:
                ax.plot(*zip(*pts), "o-" if side == "jax-sp" else "s--", label=f"{side} {mode}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens")
        ax.set_ylabel("speed vs jax-sp plain TP (per layer)")
        ax.set_title(f"{shape}, tp {layer[0]['tp']}")
        ax.legend(fontsize=7)
    fig.suptitle(layer[0].get("machine", ""))
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
