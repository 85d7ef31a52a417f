"""Generation speed: jax-sp next to its PyTorch peers on the same weights, shapes and prompts.

Models: random weights in the shape of Llama-3.2-1B and of SmolLM2-135M (the embedded model's
shape; its GGUF file is too large to carry to every machine), built once as an HF module and
handed to both sides. Cases: prefill of 1x2048 and 8x2048 tokens; greedy decode at batch 1, 8,
32 after a 128-token prompt, 256 new tokens. Limits measured in the same run: device-to-device
copy bandwidth and an 8192^3 matmul. Each result: median and spread over repeats, compile time
apart, tokens/s, ms/token, prefill TFLOP/s (2 * params * tokens), and the ratio to the limits.

    python benchmarks/generation.py [--models llama3.2-1b,smollm2] [--dtype bfloat16]
    python benchmarks/generation.py --tiny      # CPU plumbing: a 2-layer model, short runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def hf_module(cfg, dtype, device):
    import torch
    import transformers

    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hc)
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return model.to(getattr(torch, dtype)).eval()


def timed(fn, repeats, sync):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama3.2-1b,smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--skip-compiled-peer", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args()

    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from peers_torch import FastLlama, fast_generate, hf_eager_generate

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync_t = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    machine = f"{jax.devices()[0].device_kind} / torch {torch.__version__} on {device}"
    prefill_cases = [(1, 2048), (8, 2048)] if not args.tiny else [(1, 64), (2, 64)]
    decode_cases = [1, 8, 32] if not args.tiny else [1, 2]
    prompt_len, new_tokens = (128, 256) if not args.tiny else (16, 8)
    rows = []

    def emit(row):
        row["machine"] = machine
        rows.append(row)
        print(json.dumps(row), flush=True)

    # limits measured in this run
    n = 8192 if not args.tiny else 512
    a = jnp.ones((n, n), jnp.bfloat16)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    med, _, _ = timed(lambda: mm(a), args.repeats, lambda y: y.block_until_ready())
    peak_tflops = 2 * n ** 3 / med / 1e12
    buf = jnp.ones((256 * 2 ** 20 // 2 if not args.tiny else 2 ** 20,), jnp.bfloat16)
    copy = jax.jit(lambda x: x + 1)
    copy(buf).block_until_ready()
    med, _, _ = timed(lambda: copy(buf), args.repeats, lambda y: y.block_until_ready())
    bandwidth = 2 * buf.nbytes / med  # read + write
    emit({"bench": "limits", "matmul_tflops": peak_tflops, "copy_gb_s": bandwidth / 1e9})

    for name in args.models.split(","):
        cfg = preset(name)
        if args.tiny:
            cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=1024)
        module = hf_module(cfg, args.dtype, device)
        params = cfg.num_params()
        weight_bytes = params * torch.finfo(getattr(torch, args.dtype)).bits // 8
        llm = LLM.from_torch(module, parallel=ParallelConfig(tp=1), dtype=args.dtype,
                             max_seq_len=max(2048, prompt_len + new_tokens) + 64)
        rng = np.random.default_rng(0)

        for batch, t in prefill_cases:
            ids = rng.integers(0, cfg.vocab_size, (batch, t))
            flops = 2 * params * batch * t
            sp = SamplingParams(max_new_tokens=1)
            t0 = time.perf_counter()
            llm.generate(ids.tolist(), sp)
            compile_s = time.perf_counter() - t0
            med, lo, hi = timed(lambda: llm.generate(ids.tolist(), sp), args.repeats, lambda _: None)
            emit({"bench": "prefill", "model": name, "impl": "jax-sp", "batch": batch,
                  "tokens": t, "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                  "first_call_s": compile_s, "tflops": flops / med / 1e12,
                  "of_matmul_peak": flops / med / 1e12 / peak_tflops})
            x = torch.tensor(ids, device=device)
            with torch.no_grad():
                module(x)
                sync_t()
                med, lo, hi = timed(lambda: module(x), args.repeats, lambda _: sync_t())
            emit({"bench": "prefill", "model": name, "impl": "hf-eager", "batch": batch,
                  "tokens": t, "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                  "tflops": flops / med / 1e12, "of_matmul_peak": flops / med / 1e12 / peak_tflops})

        for batch in decode_cases:
            ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
            sp = SamplingParams(max_new_tokens=new_tokens)
            llm.generate(ids.tolist(), sp)  # compile
            decode = []
            for _ in range(args.repeats):
                llm.generate(ids.tolist(), sp)
                decode.append(llm.last_stats.decode_s)
            per_token = statistics.median(decode) / (new_tokens - 1)
            limit = bandwidth / weight_bytes  # tokens/s if each step reads the weights once
            emit({"bench": "decode", "model": name, "impl": "jax-sp", "batch": batch,
                  "ms_per_token": per_token * 1e3, "tokens_per_s": batch / per_token,
                  "spread_ms": [1e3 * min(decode) / (new_tokens - 1),
                                1e3 * max(decode) / (new_tokens - 1)],
                  "of_bandwidth_limit": (1 / per_token) / limit})
            x = torch.tensor(ids, device=device)
            peers = [("hf-eager", lambda: hf_eager_generate(module, x, new_tokens))]
            fast = FastLlama(module, batch, prompt_len + new_tokens + 8)
            peers.append(("gpt-fast-eager", lambda: fast_generate(fast, x, new_tokens)))
            if device == "cuda" and not args.skip_compiled_peer:
                peers.append(("gpt-fast-compiled",
                              lambda: fast_generate(fast, x, new_tokens, compile=True)))
            for impl, run in peers:
                run()
                sync_t()
                med, lo, hi = timed(run, max(2, args.repeats // 2), lambda _: sync_t())
                per = med / new_tokens  # prefill included: an upper bound on ms/token
                emit({"bench": "decode", "model": name, "impl": impl, "batch": batch,
                      "ms_per_token": per * 1e3, "tokens_per_s": batch / per,
                      "of_bandwidth_limit": (1 / per) / limit, "includes_prefill": True})

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"generation_{jax.devices()[0].platform}"
                        + ("_tiny" if args.tiny else ""))
    with open(stem + ".jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
