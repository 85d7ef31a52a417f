"""The residual stream after each layer of jax-sp (bf16) against transformers evaluating the same
weights in fp32, with the layer-0 error split by position quartile (JSON lines). Variants:
default, XLA attention, no Triton gemms, both; --default-only for the first.

    python benchmarks/layer_parity.py --model llama3.2-1b --tokens 2048
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama3.2-1b")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--default-only", action="store_true")
    args = ap.parse_args()

    import jax
    import numpy as np
    import torch

    from generation import hf_module
    from jax_sp import LLM, ParallelConfig
    from jax_sp.presets import preset

    cfg = preset(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chip = torch.cuda.get_device_name() if device == "cuda" else jax.devices()[0].device_kind
    machine = f"{chip} / jax {jax.__version__} / torch {torch.__version__}"
    module = hf_module(cfg, "bfloat16", device)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, args.tokens))
    with torch.no_grad():  # the same bf16 weights, evaluated in fp32
        hidden = copy.deepcopy(module).float()(torch.tensor(ids, device=device),
                                               output_hidden_states=True).hidden_states
    ref = [h[0].cpu().numpy() for h in hidden[1:-1]]  # after layers 0 .. L-2 (last is normed)
    no_triton = {"xla_gpu_enable_triton_gemm": False}
    variants = {"default": ParallelConfig(), "xla-attention": ParallelConfig(attention="xla"),
                "no-triton": ParallelConfig(xla_options=no_triton),
                "xla-attention+no-triton": ParallelConfig(attention="xla", xla_options=no_triton)}
    for name, parallel in list(variants.items())[: 1 if args.default_only else None]:
        llm = LLM.from_torch(module, parallel=parallel, dtype="bfloat16",
                             max_seq_len=args.tokens + 64)
        got = np.asarray(llm.residual_stream(ids.tolist(), sp=False)).astype(np.float32)
        rel = [float(np.linalg.norm(g - r) / np.linalg.norm(r)) for g, r in zip(got, ref)]
        by_pos = np.linalg.norm(got[0] - ref[0], axis=-1) / np.linalg.norm(ref[0], axis=-1)
        print(json.dumps({"bench": "layer-parity", "model": args.model, "tokens": args.tokens,
                          "variant": name, "rel_l2_per_layer": [round(x, 4) for x in rel],
                          "layer0_rel_by_position_quartile":
                              [round(float(q.mean()), 4) for q in np.array_split(by_pos, 4)],
                          "machine": machine}),
              flush=True)


if __name__ == "__main__":
    main()
