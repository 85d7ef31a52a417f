"""Fingerprints of every program the engine compiles, for checking that a refactor left the
compiled programs (and so their speed) as they were.

Runs a fixed set of generations (greedy, seeded sampling, from prompt embeddings) and logits on
simulated CPU devices through the public API (tiny Llama/Qwen2 models, tp 1/2/4, sp off/on/auto,
xla/ring, pp 1/2 with micro-batches, the Pallas decode kernel interpreted) and hashes the
optimized HLO of every program compiled meanwhile (caught at jax.stages.Lowered.compile, so
whatever the engine's structure), with its metadata (source lines, op names) removed. Two
runs of the same code give the same fingerprints; `--compare FILE` lists what differs.

    python benchmarks/program_fingerprint.py --out before.json
    python benchmarks/program_fingerprint.py --compare before.json
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import common  # noqa: E402,F401  (the repository on the import path)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

_HEADER = re.compile(r"^(HloModule |FileNames|FunctionNames|FileLocations|StackFrames|\d+ )")


def canonical(text: str) -> str:
    """Optimized HLO without what names the source: metadata and the source-location tables."""
    text = re.sub(r", metadata=\{[^}]*\}", "", text)
    return "\n".join(line for line in text.splitlines() if not _HEADER.match(line))


def fingerprint(text: str) -> str:
    return hashlib.sha256(canonical(text).encode()).hexdigest()[:16]


def cases():
    """(name, build LLM, exercise it) for every configuration fingerprinted."""
    from conftest import SAMPLED, _build, random_prompts
    from jax_sp import CompileOptions, ParallelConfig, SamplingParams

    greedy = SamplingParams(max_new_tokens=5)

    def run(llm, vocab):
        prompts = random_prompts(vocab, (5, 17, 3), seed=1)
        llm.generate(prompts, greedy)
        llm.generate(prompts[:1], SAMPLED)
        llm.logits(prompts[:2])
        if llm.parallel.pp == 1 and llm.tokenizer is None:
            llm.generate(prompt_embeds=llm.embed(prompts[:1]), sampling=greedy)

    out = [("llama16-tp2-pallas", "llama16", dict(options=CompileOptions(attention="pallas"))),
           # what GPU programs do, on CPU: projections on 8 rows, decode with every layer unrolled
           ("llama-tp2-gpu-like", "llama", dict(options=CompileOptions(
               row_multiple=8, pad_rows_min_weight=1, decode_unroll=3)))]
    for kind in ("llama", "qwen2"):
        for tp, pp, sp, comm in ((1, 1, "off", "xla"), (2, 1, "on", "xla"), (4, 1, "on", "ring"),
                                 (2, 1, "auto", "xla"), (2, 2, "on", "xla"), (1, 2, "off", "xla")):
            out.append((f"{kind}-tp{tp}-pp{pp}-{sp}-{comm}", kind,
                        dict(parallel=ParallelConfig(tp=tp, pp=pp, sp=sp, comm=comm,
                                                     microbatches=2 if pp > 1 else 1))))
    return out, run, _build


COMPILED: list[str] = []  # optimized HLO of every program compiled since the last clear()


def _record_compiles():
    """Every program the engine compiles passes through jax.stages.Lowered.compile, whatever the
    engine's own structure: record them there."""
    import jax

    compile_ = jax.stages.Lowered.compile

    def compile_and_record(self, *args, **kwargs):
        out = compile_(self, *args, **kwargs)
        COMPILED.append(out.as_text())
        if os.environ.get("FINGERPRINT_DUMP"):  # each program's text, by its place in the run
            import traceback

            caller = [f.name for f in traceback.extract_stack() if "jax_sp" in f.filename]
            path = os.path.join(os.environ["FINGERPRINT_DUMP"], f"{len(COMPILED):02d}-"
                                f"{'-'.join(caller[-2:])}.txt")
            with open(path, "w") as f:
                f.write(canonical(COMPILED[-1]))
        return out

    jax.stages.Lowered.compile = compile_and_record


def collect() -> dict:
    from jax_sp import LLM, ParallelConfig

    _record_compiles()
    specs, run, build = cases()
    prints = {}
    only = os.environ.get("FINGERPRINT_ONLY")
    for name, kind, kwargs in specs:
        if only and name != only:
            continue
        if kind == "llama16":  # head_dim 16: a size the Pallas kernel takes
            import transformers

            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
                vocab_size=101, hidden_size=64, intermediate_size=50, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16)).eval()
        else:
            model = build(kind)
        if "parallel" not in kwargs:
            kwargs = dict(kwargs, parallel=ParallelConfig(tp=2))
        COMPILED.clear()
        llm = LLM.from_torch(model, **kwargs)
        run(llm, model.config.vocab_size)
        prints[name] = hashes = sorted(fingerprint(text) for text in COMPILED)
        print(name, len(hashes), flush=True)
    return prints


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    ap.add_argument("--compare", default="")
    args = ap.parse_args()
    prints = collect()
    if args.out:
        json.dump(prints, open(args.out, "w"), indent=1)
    if args.compare:
        old = json.load(open(args.compare))
        bad = {k: (collections.Counter(old.get(k, [])) - collections.Counter(v),
                   collections.Counter(v) - collections.Counter(old.get(k, [])))
               for k, v in prints.items() if sorted(old.get(k, [])) != v}
        for k, (gone, new) in bad.items():
            print(f"{k}: {sum(gone.values())} program(s) changed or gone, {sum(new.values())} new")
        print("identical" if not bad else f"{len(bad)} configuration(s) differ")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
