"""Attention data-parallel groups (ParallelConfig(attn_dp=G)) against plain TP: what each device
stores of the KV cache, what each layer communicates, and the decode step's time at a large
batch. Result: benchmarks/results/attn_dp_<machine>.jsonl.

    python benchmarks/attn_dp.py [--part kv,census,decode]

- kv: KV-cache bytes per device for 64 sequences of 4096 positions in bfloat16, model shapes
  whose KV heads are fewer than tp (Llama-3 8B/70B: 8; Qwen2.5-7B: 4; Qwen2.5-1.5B: 2) at tp 8
  and 16, every attn_dp dividing tp. Read from the cache sharding jax-sp builds (a shard's
  shape on the mesh), not computed beside it; 16 devices are simulated on CPU.
- census: each layer's collectives (count, group, wire bytes per device) in the compiled
  prefill (8 x 512 tokens) of a two-layer Qwen2.5-7B shape at tp 8, sp off and on.
- decode: the decode step's median time (greedy, random weights, compile excluded) at tp 8 on
  the devices present, for a cut-down model with 2 KV heads (so plain TP replicates each 4
  times), 64 sequences of 448-token prompts. On CPU the 8 devices are simulated and share the
  machine's cores: the time follows the total work and bytes, which is what groups change
  (each KV head read once per group instead of by 4 devices), not a multi-device speed-up.
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=16")

import common  # noqa: E402

KV_MODELS = ("llama3-70b", "llama3-8b", "qwen2.5-7b", "qwen2.5-1.5b")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--part", default="kv,census,decode")
    ap.add_argument("--batch", type=int, default=64, help="decode: sequences")
    ap.add_argument("--prompt", type=int, default=448, help="decode: prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    parts = args.part.split(",")

    import jax
    import numpy as np

    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.config import ModelConfig
    from jax_sp.inspect import inspect_modes
    from jax_sp.presets import preset
    from jax_sp.runtime import Runtime, random_params
    from sharding.mesh import make_mesh

    gpu = jax.default_backend() == "gpu"
    tag = common.machine().split(" ", 1)[1].split()[-1].lower() if gpu else "cpu"
    out = args.out or os.path.join(common.RESULTS, f"attn_dp_{tag}.jsonl")
    res = common.Results(out, machine=common.machine(), jax=jax.__version__)

    if "kv" in parts:
        batch, positions = 64, 4096
        for name in KV_MODELS:
            cfg = preset(name)
            for tp in (8, 16):
                if tp > jax.device_count():
                    continue
                for g in divisors(tp):
                    rt = Runtime(cfg, ParallelConfig(tp=tp, attn_dp=g), "bfloat16",
                                 mesh=make_mesh(tp, attn_dp=g))
                    k = rt.abstract_cache(batch, positions).k
                    shard = k.sharding.shard_shape(k.shape)
                    per_device = 2 * int(np.prod(shard)) * 2  # K and V, 2 bytes
                    once = 2 * cfg.num_layers * batch * positions * cfg.num_kv_heads \
                        * cfg.head_dim * 2  # every sequence and KV head stored once
                    res.emit({"bench": "kv", "model": name, "tp": tp, "attn_dp": g,
                              "kv_heads": cfg.num_kv_heads,
                              "kv_heads_stored": rt.padded_cfg.num_kv_heads,
                              "shard": list(shard), "batch": batch, "positions": positions,
                              "gib_per_device": per_device / 2**30,
                              "copies": per_device * tp / once})

    if "census" in parts:
        cfg = ModelConfig(**{**preset("qwen2.5-7b").__dict__, "num_layers": 2})
        for g in divisors(8):
            for report in inspect_modes(cfg, 8, 512, 8, attn_dp=g):
                layer = [c for c in report.collectives if c.scope == "layer"]
                res.emit({"bench": "census", "model": "qwen2.5-7b", "layers": 2, "tp": 8,
                          "attn_dp": g, "sp": report.mode, "batch": 8, "tokens": 512,
                          "collectives": [[c.kind, c.group, list(c.dims)] for c in layer],
                          "wire_mib_per_layer": sum(c.wire_bytes * c.count for c in layer)
                          / cfg.num_layers / 2**20})

    if "decode" in parts and jax.device_count() >= 8:
        dtype = "bfloat16" if gpu else "float32"
        cfg = ModelConfig(vocab_size=8192, hidden_size=512, intermediate_size=1536,
                          num_layers=4, num_heads=8, num_kv_heads=2, head_dim=64)
        params = random_params(cfg)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, cfg.vocab_size, args.prompt).tolist()
                   for _ in range(args.batch)]
        n = args.new_tokens
        sampling = SamplingParams(max_new_tokens=n, stop_token_ids=())
        for g in (1, 2, 4, 8):
            llm = LLM(cfg, params, parallel=ParallelConfig(tp=8, attn_dp=g, sp="off"),
                      dtype=dtype, max_seq_len=args.prompt + n + 16)
            first = llm.generate(prompts, sampling)  # compiled, warm
            steps = []
            for _ in range(args.repeats):
                again = llm.generate(prompts, sampling)
                steps.append(llm.last_stats.decode_s / (n - 1) * 1e3)
            assert [c.token_ids for c in again] == [c.token_ids for c in first]
            res.emit({"bench": "decode", "tp": 8, "attn_dp": g, "dtype": dtype,
                      "batch": args.batch, "prompt": args.prompt, "new_tokens": n,
                      "kv_heads_stored": llm.runtime.padded_cfg.num_kv_heads,
                      "ms_per_step": statistics.median(steps),
                      "spread_ms": [min(steps), max(steps)],
                      "tokens_per_s": args.batch / statistics.median(steps) * 1e3})
            del llm


if __name__ == "__main__":
    main()
