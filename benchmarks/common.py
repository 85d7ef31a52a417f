"""What the benchmark scripts share: the repository on the import path, the machine's name, results
as JSON lines, timing and plots.

A script in benchmarks/ starts with `import common` (Python puts the script's own folder on the
path, so it is found from any working directory). Importing it puts the repository root on the
path and imports nothing heavy, so a script can still set XLA_FLAGS or jax's configuration
before jax is first imported.

Results: one JSON object per line, printed as each result comes and written to
benchmarks/results/<script>_<machine>[_<variant>].jsonl (`Results`), so a run cut off by a time
limit keeps what it measured; a PNG beside it where a curve says more than a table (`pyplot`).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def machine() -> str:
    """'4x NVIDIA H200': the devices jax sees, counted, and their kind."""
    import jax

    devices = jax.devices()
    return f"{len(devices)}x {devices[0].device_kind}"


class Results:
    """Rows printed as JSON lines as they come and written to `path` at once (None: printed
    only); `rows` keeps them for a plot or a summary."""

    def __init__(self, path: str | None = None, **common):
        self.path, self.common, self.rows = path, common, []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            open(path, "w").close()

    def emit(self, row: dict) -> dict:
        row = {**self.common, **row}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        return row


def write_jsonl(path: str, rows) -> None:
    """rows, one JSON object per line, in path (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def timed(fn, repeats: int, sync) -> tuple[float, float, float]:
    """(median, min, max) seconds of fn() over repeats, each synchronised by sync(result)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times), max(times)


def timed_bursts(call, repeats: int, burst: int) -> tuple[float, float]:
    """(first call's seconds, median seconds per call) of a jax call: `repeats` rounds of
    `burst` calls launched back to back and waited for once, so the host's dispatch overlaps
    device work."""
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - t0
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        outs = [call() for _ in range(burst)]
        jax.block_until_ready(outs)
        rounds.append((time.perf_counter() - t0) / burst)
    return first, statistics.median(rounds)


def decode_parser(description: str):
    """The arguments of a benchmark that times decode variants of one model side by side
    (pdl.py, add_norm.py): model, batches, rounds, prompt and new tokens, quantizations,
    --tiny, --out and --tag."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--quantizations", default="bf16,fp8-head")
    ap.add_argument("--tiny", action="store_true", help="2 layers, 16 new tokens (CPU plumbing)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--tag", default=None, help="suffix of the result file")
    return ap


def decode_setup(args, stem: str):
    """(model config, Results, copy bandwidth, random host parameters, the bytes a step does not
    read) for `decode_parser`'s arguments: the preset (2 layers and 16 new tokens with --tiny),
    results in benchmarks/results/<stem>_<card>_<model>[_<tag>].jsonl (or --out), and the copy
    bandwidth measured and emitted first."""
    import dataclasses

    import jax

    from jax_sp.presets import preset
    from jax_sp.runtime import random_params

    cfg = preset(args.model)
    if args.tiny:
        cfg = dataclasses.replace(cfg, num_layers=2)
        args.new_tokens = 16
    gpu = jax.default_backend() == "gpu"
    card = jax.devices()[0].device_kind
    tag = next((c.lower() for c in ("H200", "H100") if gpu and c in card), jax.default_backend())
    suffix = "".join(f"_{t}" for t in (args.tag, "tiny" if args.tiny else None) if t)
    out = args.out or os.path.join(RESULTS, f"{stem}_{tag}_{args.model}{suffix}.jsonl")
    res = Results(out, machine=machine(), jax=jax.__version__, model=args.model)
    bandwidth, kinds = copy_bandwidth((1 << 22) if args.tiny else (1 << 30))
    res.emit({"bench": "limits", "copy_gb_s": bandwidth / 1e9,
              **{f"copy_gb_s_{k}": v / 1e9 for k, v in kinds.items()}})
    return cfg, res, bandwidth, random_params(cfg), unread_embedding_bytes(cfg)


def decode_variants(args, cfg, params, ids, sp, variants: dict) -> dict:
    """{key: (llm, greedy tokens, decode seconds per token of each round)} for `variants`
    {key: (quantization or "bf16", CompileOptions)}: each built on one device from the same
    host parameters and generating once, then all timed in alternation, `args.rounds` rounds of
    each once a round (greedy, `sp`), so that drift in the machine's speed falls on every
    variant alike."""
    from jax_sp import LLM, ParallelConfig

    built = {}
    for key, (q, options) in variants.items():
        llm = LLM(cfg, params, parallel=ParallelConfig(tp=1), dtype="bfloat16",
                  max_seq_len=args.prompt + args.new_tokens + 64, options=options,
                  quantization=None if q == "bf16" else q)
        built[key] = (llm, [c.token_ids for c in llm.generate(ids, sp)])
    times = {key: [] for key in built}
    for _ in range(args.rounds):
        for key, (llm, _) in built.items():
            llm.generate(ids, sp)
            times[key].append(llm.last_stats.decode_s / (sp.max_new_tokens - 1))
    return {key: (llm, tokens, times[key]) for key, (llm, tokens) in built.items()}


def decode_batches(args, cfg, params, variants: dict):
    """(batch, `decode_variants` of `variants`) for each batch size of args.batches, on random
    prompts of args.prompt tokens (one seed for the whole run); the runs of one batch are
    dropped before the next is built, so that only one batch's programs are held at a time."""
    import numpy as np

    from jax_sp import SamplingParams

    rng = np.random.default_rng(0)
    sp = SamplingParams(max_new_tokens=args.new_tokens)
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = rng.integers(0, cfg.vocab_size, (batch, args.prompt)).tolist()
        yield batch, decode_variants(args, cfg, params, ids, sp, variants)


def decode_row(args, batch: int, llm, times, table: int, bandwidth: float) -> dict:
    """A decode variant's record fields: its median ms a token and every round's, and the bytes a
    step reads (the state less `table`, the unread embedding) against the copy `bandwidth`."""
    import jax

    per = statistics.median(times)
    read = sum(x.nbytes for x in jax.tree.leaves(llm.state)) - table
    return {"bench": "decode", "batch": batch, "prompt": args.prompt,
            "new_tokens": args.new_tokens, "ms_per_token": per * 1e3,
            "runs_ms": [t * 1e3 for t in times], "read_bytes": read,
            "of_copy": read / per / bandwidth}


def unread_embedding_bytes(cfg, itemsize: int = 2) -> int:
    """The bytes of a model's state that a decode step does not read: its embedding table (a
    step reads one row of it), or none when the table is tied to the LM head (read whole)."""
    return 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * itemsize


def copy_bandwidth(size: int = 1 << 30) -> tuple[float, dict]:
    """(bytes read + written per second, by kind) of copying `size` bytes on the default
    device: XLA's elementwise kernel and, on a GPU with torch, the copy engine's device-to-device
    copy. The limit is the faster: on an H200 the XLA kernel reached 2.2 TB/s and the copy 4.1,
    and a ratio against the slower would flatter every "of the limit"."""
    import jax
    import jax.numpy as jnp

    buf = jax.random.normal(jax.random.key(1), (size // 2,), jnp.bfloat16)
    copy = jax.jit(lambda x: x * 2)
    jax.block_until_ready(copy(buf))
    med, _, _ = timed(lambda: copy(buf), 10, jax.block_until_ready)
    kinds = {"xla_kernel": 2 * size / med}
    buf = None  # freed before torch's buffers
    if jax.default_backend() == "gpu":
        try:
            import torch
        except ImportError:
            torch = None
        if torch is not None and torch.cuda.is_available():
            src = torch.empty(size // 2, dtype=torch.bfloat16, device="cuda").normal_()
            dst = torch.empty_like(src)
            start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            times = []
            for _ in range(11):
                start.record()
                dst.copy_(src)
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            kinds["cuda_copy"] = 2 * size / statistics.median(times[1:])
            del src, dst
            torch.cuda.empty_cache()
    return max(kinds.values()), kinds


def pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed (the
    `bench` extra): the JSON lines are the result, the plot is a view of them."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')",
              file=sys.stderr)
        return None
    return plt
