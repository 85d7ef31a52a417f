"""The host's share of a call: what a prefill pays before and after its kernels on this machine.

Times, untraced (median of --repeats, microseconds), each piece of host work a
`LLM.generate(max_new_tokens=1)` call does around its prefill program:

- `put_*`: one batched `jax.device_put` of the prefill's host arrays (ids [B, T], lengths [B],
  seed, first row, temperature, top_p: 6 arrays), of the same values packed into 3 arrays
  (ids, one int32 vector, one float32 vector) and of the ids alone, each waited for;
- `launch_roundtrip`: a compiled one-op program on a device scalar, launched and waited for;
- `to_host`: a fresh device scalar to numpy;
- `generate_floor`: the whole `generate(max_new_tokens=1)` at a short prompt of the given model,
  where the kernels are a small part, next to the same program's device busy time;
- `stream_step`: ms per token of the one-call-per-token decode that `LLM.stream` runs (row 0's
  tokens, each brought to the host), --stream-tokens of them after a short prompt.

    python benchmarks/host_overhead.py --model smollm2 --out DIR
    python benchmarks/host_overhead.py --model smollm2 --layers 2 --vocab 512 --dtype float32 \
        --only stream   # any machine: the host's share of a streamed token
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from common import Results, write_jsonl  # noqa: E402  (and the repository on the path)


def median_us(fn, repeats: int) -> dict:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_us": statistics.median(times) * 1e6, "min_us": min(times) * 1e6}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", default="2048", help="prompt lengths for the put rows")
    ap.add_argument("--floor-tokens", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="fewer layers (CPU plumbing)")
    ap.add_argument("--vocab", type=int, default=None, help="a smaller vocabulary (CPU plumbing)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--stream-tokens", type=int, default=128)
    ap.add_argument("--only", default=None, help="one group: put, launch, floor or stream")
    ap.add_argument("--tag", default=None, help="file name: host_overhead_<tag>.jsonl")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import dataclasses

    import jax
    import numpy as np

    from jax_sp import LLM, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from jax_sp.runtime import random_params
    from profile_decode import kernel_times

    device = jax.devices()[0]
    where = jax.sharding.SingleDeviceSharding(device)
    results = Results(None, bench="host-overhead", device=device.device_kind,
                      jax=jax.__version__)
    emit, rows = results.emit, results.rows

    want = lambda group: args.only in (None, group)  # noqa: E731
    b = args.batch
    for t in (int(x) for x in args.tokens.split(",") if want("put")):
        ids = np.zeros((b, t), np.int32)
        six = (ids, np.full((b,), t, np.int32), np.uint32(0), np.int32(0), np.float32(1e-6),
               np.float32(1.0))
        three = (ids, np.array([t] * b + [0, 0], np.int32), np.array([1e-6, 1.0], np.float32))
        for name, host in (("put_6_arrays", six), ("put_3_arrays", three), ("put_ids", (ids,))):
            emit({"what": name, "batch": b, "tokens": t,
                  **median_us(lambda h=host: jax.block_until_ready(jax.device_put(h, where)),
                              args.repeats)})

    if want("launch"):
        one = jax.device_put(np.float32(1), where)
        add = jax.jit(lambda x: x + 1).lower(one).compile()
        emit({"what": "launch_roundtrip", **median_us(lambda: add(one).block_until_ready(),
                                                       args.repeats)})
        emit({"what": "to_host", **median_us(lambda: np.asarray(add(one)), args.repeats)})

    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    if args.vocab:
        cfg = dataclasses.replace(cfg, vocab_size=args.vocab)
    t = args.floor_tokens
    llm = LLM(cfg, random_params(cfg), parallel=ParallelConfig(tp=1), dtype=args.dtype,
              max_seq_len=max(64, 2 * t, t + args.stream_tokens))
    prompts, one_token = np.zeros((b, t), np.int32).tolist(), SamplingParams(max_new_tokens=1)
    if want("floor"):
        call = lambda: llm.generate(prompts, one_token)  # noqa: E731
        timing = median_us(call, max(20, args.repeats // 10))
        with tempfile.TemporaryDirectory() as d:
            with jax.profiler.trace(d):
                call()
            busy = sum(ns for ns, _ in kernel_times(d).values()) / 1e3
        emit({"what": "generate_floor", "model": args.model, "batch": b, "tokens": t, **timing,
              "device_busy_us": busy})
    if want("stream"):
        n = args.stream_tokens
        sampling = SamplingParams(max_new_tokens=n, stop_token_ids=())
        job = llm._prepare(prompts[:1], None, sampling, chat=False)
        timing = median_us(lambda: list(llm._token_stream(job, sampling)), 7)
        emit({"what": "stream_step", "model": args.model, "layers": cfg.num_layers,
              "tokens": n, "ms_per_token": timing["median_us"] / n / 1e3,
              "min_ms_per_token": timing["min_us"] / n / 1e3})
    if args.out:
        name = f"host_overhead_{args.tag or args.model}.jsonl"
        write_jsonl(os.path.join(args.out, name), rows)


if __name__ == "__main__":
    main()
