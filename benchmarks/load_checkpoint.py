"""Checkpoint loading: peak host memory and time, safetensors vs Orbax, at a given tp.

Writes a random bf16 Llama checkpoint of about --gb GB as a Hugging Face folder (2 safetensors
shards + index), converts it with `jax-sp convert`, and loads each in a fresh subprocess on
--tp simulated CPU devices (or the machine's GPUs), reporting the loaded parameters' bytes, the
largest tensor, the process's peak resident memory above what it held before loading, and the
load time. JSON lines on stdout and in --out. --fp8: the same with quantization="fp8", from the
bf16 checkpoint and from the model written in FP8 (vLLM's layout: weight_scale per channel).

    python benchmarks/load_checkpoint.py --gb 1 --tp 4
    python benchmarks/load_checkpoint.py --gb 1 --tp 4 --fp8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MEASURE = r"""
import json, os, sys, time
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=%(tp)d")
import jax
from jax_sp import LLM, ParallelConfig

def status(field):  # VmHWM: this process's peak RSS (ru_maxrss would include the parent's
    for line in open("/proc/self/status"):  # RSS at fork time, carried across exec)
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
jax.devices()
before = status("VmRSS")
t0 = time.perf_counter()
llm = LLM.from_pretrained(%(path)r, parallel=ParallelConfig(tp=%(tp)d), progress=False,
                          quantization=%(quantization)r)
jax.block_until_ready(jax.tree.leaves(llm.state))
seconds = time.perf_counter() - t0
peak = status("VmHWM")
arrays = jax.tree.leaves(llm.state)
loaded = sum(s.data.nbytes for a in arrays for s in a.addressable_shards)
print(json.dumps({"before": before, "peak": peak, "loaded_bytes": loaded, "seconds": seconds,
                  "dtype": str(arrays[0].dtype),
                  "dtypes": sorted({str(a.dtype) for a in arrays})}))
"""


def write_checkpoint(folder: str, gb: float = 1.0, seed: int = 0, fp8: bool = False) -> dict:
    """A random bf16 Llama (untied head) of about `gb` GB as config.json + 2 safetensors shards
    + index (fp8: each layer projection in float8_e4m3fn beside its per-channel weight_scale,
    the layout of vLLM's FP8 checkpoints; `gb` then counts the bf16 model). Returns {"bytes":
    total, "largest": largest tensor bytes}."""
    import torch
    from safetensors.torch import save_file

    d, f, layers = 2048, 5504, max(1, round((gb * 1e9 / 2 - 2 * 32000 * 2048) / 44.3e6))
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000,
              "hidden_size": d, "intermediate_size": f, "num_hidden_layers": layers,
              "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 128,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "max_position_embeddings": 4096, "torch_dtype": "bfloat16"}
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    shapes = {"model.embed_tokens.weight": (32000, d), "model.norm.weight": (d,),
              "lm_head.weight": (32000, d)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,),
                       p + "self_attn.q_proj.weight": (16 * 128, d),
                       p + "self_attn.k_proj.weight": (4 * 128, d),
                       p + "self_attn.v_proj.weight": (4 * 128, d),
                       p + "self_attn.o_proj.weight": (d, 16 * 128),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f)})
    keys = list(shapes)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    gen = torch.Generator().manual_seed(seed)
    weight_map, total, largest = {}, 0, 0
    for n, part in enumerate(halves, 1):
        name = f"model-{n:05d}-of-00002.safetensors"
        tensors = {k: (0.02 * torch.randn(shapes[k], generator=gen)).to(torch.bfloat16)
                   for k in part}
        for k in [k for k in tensors if fp8 and k.endswith("proj.weight")]:
            w = tensors[k].float()
            scale = w.abs().amax(dim=1, keepdim=True) / 448.0
            tensors[k], tensors[k + "_scale"] = (w / scale).to(torch.float8_e4m3fn), scale
        save_file(tensors, os.path.join(folder, name))
        for k, t in tensors.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
            largest = max(largest, t.numel() * t.element_size())
        del tensors
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map},
              open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return {"bytes": total, "largest": largest}


def measure(path: str, tp: int, timeout: int = 600, quantization: str | None = None) -> dict:
    """Load `path` in a fresh process on tp devices: memory and time (see MEASURE)."""
    # a clean environment: nothing a test or shell set (XLA_FLAGS, thread pools) leaks in
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    env.update(PYTHONPATH=ROOT, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    code = MEASURE % {"path": path, "tp": tp, "quantization": quantization}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if out.returncode:
        raise RuntimeError(f"loading {path} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["above_before"] = r["peak"] - r["before"]
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--tp", type=int, default=4)
    ap.add_argument("--fp8", action="store_true",
                    help="quantization='fp8' from a bf16 checkpoint and from an FP8 one (the "
                         "same model quantized per channel, weight_scale beside each weight)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf, ox = os.path.join(tmp, "hf"), os.path.join(tmp, "orbax")
        info = write_checkpoint(hf, args.gb)
        runs = [("safetensors", hf, None)]
        if args.fp8:
            fp8 = os.path.join(tmp, "fp8")
            runs = [("safetensors", hf, "fp8"),
                    ("safetensors-fp8", fp8, "fp8", write_checkpoint(fp8, args.gb, fp8=True))]
        else:
            subprocess.run([sys.executable, "-m", "jax_sp.cli", "convert", hf, ox], check=True,
                           env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True)
            runs.append(("orbax", ox, None))
        for fmt, path, quantization, *written in runs:
            r = measure(path, args.tp, quantization=quantization)
            bound = r["loaded_bytes"] + 1.3 * info["largest"]
            row = {"bench": "load_checkpoint", "format": fmt, "tp": args.tp,
                   "quantization": quantization,
                   "checkpoint_bytes": (written[0] if written else info)["bytes"],
                   "largest_tensor_bytes": (written[0] if written else info)["largest"],
                   **r, "above_before_over_loaded": r["above_before"] / r["loaded_bytes"]}
            if not quantization:  # the bound the tests assert of a 16-bit load
                row.update(bound_bytes=bound, within_bound=r["above_before"] <= bound)
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    name = f"load_checkpoint{'_fp8' if args.fp8 else ''}_tp{args.tp}_cpu.jsonl"
    with open(os.path.join(args.out, name), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
