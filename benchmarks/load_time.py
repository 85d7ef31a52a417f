"""Load time of the embedded GGUF model, jax-sp against transformers, side by side in one run.

Each load runs in a fresh Python process and is timed from the process's first line (imports
included) until the model and tokenizer are ready:
  transformers   AutoTokenizer + AutoModelForCausalLM.from_pretrained(gguf_file=...) (float32)
  jax-sp cold    LLM.from_pretrained("smollm2") with an empty cache: the GGUF metadata is parsed
                 and the tokenizer converted, both then stored (bridges/cache.py)
  jax-sp cached  the same with the cache the cold load left: every later load
The three alternate for `--repeats` rounds; medians and ratios to transformers are printed as
JSON lines (one per load and one summary).

    python benchmarks/load_time.py [--repeats 3] [--out benchmarks/results/load_time_cpu.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = {
    "transformers": """
import time; t0 = time.perf_counter()
import os, torch, transformers
from bridges.pretrained import embedded_gguf
folder, name = os.path.split(embedded_gguf("smollm2"))
tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
t1 = time.perf_counter()
model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                          dtype=torch.float32)
t2 = time.perf_counter()
print({"total_s": t2 - t0, "tokenizer_s": t1 - t0, "model_s": t2 - t1})
""",
    "jax-sp": """
import time; t0 = time.perf_counter()
from jax_sp import LLM
t1 = time.perf_counter()
llm = LLM.from_pretrained("smollm2", progress=False)
t2 = time.perf_counter()
assert llm.tokenizer is not None
print({"total_s": t2 - t0, "import_s": t1 - t0, "load_s": t2 - t1})
""",
}


def run(kind: str, cache: str) -> dict:
    env = {**os.environ, "JAX_SP_CACHE": cache, "JAX_PLATFORMS": "cpu",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", CHILD[kind]], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=600)
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return eval(out.stdout.strip().splitlines()[-1])  # noqa: S307 - our own child's dict


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    machine = f"{os.cpu_count()}-core CPU"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run("jax-sp", os.path.join(tmp, "warm"))  # fills the cache the cached loads read
        for r in range(args.repeats):
            for case in ("transformers", "jax-sp cold", "jax-sp cached"):
                cache = os.path.join(tmp, f"cold{r}" if case == "jax-sp cold" else "warm")
                got = run(case.split()[0], cache)
                rows.append({"bench": "load_time", "case": case, "round": r, **got,
                             "machine": machine})
                print(json.dumps(rows[-1]), flush=True)
    med = {c: statistics.median(r["total_s"] for r in rows if r["case"] == c)
           for c in ("transformers", "jax-sp cold", "jax-sp cached")}
    summary = {"bench": "load_time", "case": "summary", "median_s": med,
               "cold_vs_transformers": med["jax-sp cold"] / med["transformers"],
               "cached_vs_transformers": med["jax-sp cached"] / med["transformers"],
               "repeats": args.repeats, "machine": machine}
    rows.append(summary)
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


if __name__ == "__main__":
    main()
