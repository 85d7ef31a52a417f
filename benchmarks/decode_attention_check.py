"""GPU check: one-token decode steps with cuDNN attention, and with the fused Pallas decode kernel
(models/decode_attention.py), against XLA attention on the same cache.

A random Llama-3.2-1B-shaped model cut to 4 layers, bf16; 3 sequences of different lengths are
prefilled once, then each implementation runs 6 decode steps from that cache. Prints the
relative L2 distance of the logits and the fraction of equal argmaxes (one JSON line). On a CPU
only the Pallas kernel (interpreted) is compared.

    python benchmarks/decode_attention_check.py
"""

from __future__ import annotations

import dataclasses
import json

import common  # noqa: E402,F401  (the repository on the import path)


def main():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jax_sp.presets import preset
    from jax_sp.attention import Cudnn, PallasDecode
    from models.attention import XLA
    from models.cache import KVCache
    from models.llama import Llama

    cfg = dataclasses.replace(preset("llama3.2-1b"), num_layers=4)
    graphdef, state = nnx.split(Llama(cfg, jnp.bfloat16, rngs=nnx.Rngs(0)))
    batch, prompt, slots = 3, 37, 128
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, prompt)),
                      jnp.int32)
    kv_len = jnp.asarray([37, 20, 29], jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(prompt, dtype=jnp.int32), (batch, prompt))

    @jax.jit
    def prefill(state, cache):
        return nnx.merge(graphdef, state)(positions, kv_len, tokens_bt=ids, cache=cache,
                                          fresh=True).cache

    backends = {"xla": XLA, "cudnn": Cudnn(), "pallas": PallasDecode()}

    def step(impl):
        @jax.jit
        def run(state, cache, token_b, pos_b):
            out = nnx.merge(graphdef, state)(pos_b[:, None], pos_b + 1,
                                             tokens_bt=token_b[:, None], cache=cache,
                                             attention=backends[impl])
            return out.logits.astype(jnp.float32), out.cache
        return run

    cache0 = prefill(state, KVCache.zeros(cfg.num_layers, batch, slots, cfg.num_kv_heads,
                                          cfg.head_dim, jnp.bfloat16))
    logits = {}
    impls = ("xla", "cudnn", "pallas") if jax.default_backend() == "gpu" else ("xla", "pallas")
    for impl in impls:
        run, cache, pos, rows = step(impl), cache0, kv_len, []
        for i in range(6):
            out, cache = run(state, cache, jnp.asarray([5 + i, 7, 11], jnp.int32), pos)
            rows.append(np.asarray(out))
            pos = pos + 1
        logits[impl] = np.stack(rows)
    row = {"bench": "decode-attention-check", "device": jax.devices()[0].device_kind}
    for impl in impls[1:]:
        diff = np.linalg.norm(logits[impl] - logits["xla"]) / np.linalg.norm(logits["xla"])
        row[f"rel_l2_{impl}_vs_xla"] = float(diff)
        row[f"argmax_equal_{impl}"] = float(np.mean(logits[impl].argmax(-1) ==
                                                    logits["xla"].argmax(-1)))
    print(json.dumps(row))


if __name__ == "__main__":
    main()
