"""Generation speed: jax-sp next to its PyTorch peers on the same weights, shapes and prompts.

Models: random weights in the shape of Llama-3.2-1B and of SmolLM2-135M (the embedded model's
shape; its GGUF file is too large to carry to every machine), built once as an HF module and
handed to every implementation. Cases: prefill of 1x2048 and 8x2048 tokens (time to the first
token: logits of each sequence's last token only, for every implementation); greedy decode at
batch 1, 8, 32 after a 128-token prompt, 256 new tokens. Limits measured in the same run:
device-to-device copy bandwidth and an 8192^3 matmul.

Each result: median and spread over repeats, compile (first-call) time apart, tokens/s,
ms/token, prefill TFLOP/s (2 * params * tokens) and the ratios to the limits. Decode ms/token is
(time of the whole generation - time of its prefill) / (new tokens - 1) for every
implementation; tokens_per_s_e2e is batch * new tokens / whole time.

    python benchmarks/generation.py [--models llama3.2-1b,smollm2] [--dtype bfloat16]
    python benchmarks/generation.py --tiny      # CPU plumbing: a 2-layer model, short runs
    python benchmarks/generation.py --plot benchmarks/results/generation_h200_llama3.2-1b.jsonl
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import os
import statistics
import time
import traceback

from common import copy_bandwidth, pyplot, timed  # noqa: E402  (and the repository on the import path)

PEERS = ("hf-eager", "hf-static-compiled", "gpt-fast-eager", "gpt-fast-compiled")


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
    with torch.device(device):  # from_config(dtype=) keeps the rotary inv_freq in float32, as
        # from_pretrained does; model.to(bfloat16) would round it (and every angle) to bf16
        model = transformers.AutoModelForCausalLM.from_config(hc, dtype=getattr(torch, dtype))
    model.config.eos_token_id = model.generation_config.eos_token_id = None
    return model.eval()


def first_call(fn, sync):
    t0 = time.perf_counter()
    out = fn()
    sync(out)
    return time.perf_counter() - t0, out


class Bench:
    def __init__(self, args):
        import jax
        import torch

        self.args = args
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.sync_t = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        name = (torch.cuda.get_device_name() if self.device == "cuda"
                else jax.devices()[0].device_kind)
        self.machine = (f"{name} / jax {jax.__version__} ({jax.devices()[0].platform}) / torch "
                        f"{torch.__version__}")
        os.makedirs(args.out, exist_ok=True)
        tag = args.tag or jax.devices()[0].platform + ("_tiny" if args.tiny else "")
        self.path = os.path.join(args.out, f"generation_{tag}.jsonl")
        self.rows = []
        open(self.path, "w").close()

    def emit(self, row):
        row["machine"] = self.machine
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def limits(self):
        import jax
        import jax.numpy as jnp

        n = 8192 if not self.args.tiny else 512
        a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
        mm = jax.jit(lambda x: x @ x)
        mm(a).block_until_ready()
        med, _, _ = timed(lambda: mm(a), 10, lambda y: y.block_until_ready())
        self.peak_tflops = 2 * n ** 3 / med / 1e12
        size = 1 << 30 if not self.args.tiny else 1 << 22  # bytes; well past any cache
        # the faster of XLA's elementwise copy and the copy engine's (common.copy_bandwidth)
        self.bandwidth, kinds = copy_bandwidth(size)
        xla_copy, torch_copy = kinds["xla_kernel"], kinds.get("cuda_copy", 0.0)
        self.emit({"bench": "limits", "matmul_tflops": self.peak_tflops,
                   "copy_gb_s": self.bandwidth / 1e9, "copy_gb_s_xla_kernel": xla_copy / 1e9,
                   "copy_gb_s_cuda_copy": torch_copy / 1e9, "matmul_n": n,
                   "copy_bytes": size})


def run_model(b: Bench, name: str):
    import dataclasses

    import numpy as np
    import torch

    import jax_sp.generate as gen
    from jax_sp import LLM, CompileOptions, ParallelConfig, SamplingParams
    from jax_sp.presets import preset
    from peers_torch import FastLlama, fast_generate, hf_eager_generate, hf_static_generate

    args = b.args
    cfg = preset(name)
    if args.tiny:
        cfg = dataclasses.replace(cfg, num_layers=2, vocab_size=1024)
    prefill_cases = [tuple(int(v) for v in c.split("x")) for c in args.prefill.split(",") if c]
    if args.tiny:
        prefill_cases = [(1, 64), (2, 64)]
    decode_batches = [int(x) for x in args.decode_batches.split(",") if x] if not args.tiny else [1, 2]
    prompt_len, new_tokens = (128, 256) if not args.tiny else (16, 8)
    peers = [p for p in args.peers.split(",") if p]
    if b.device != "cuda":
        peers = [p for p in peers if "compiled" not in p]  # CUDA graphs: GPU only

    module = hf_module(cfg, args.dtype, b.device)
    params = cfg.num_params()
    weight_bytes = params * torch.finfo(getattr(torch, args.dtype)).bits // 8
    max_len = max(2048, prompt_len + new_tokens) + 64
    llms = {"jax-sp": LLM.from_torch(module, parallel=ParallelConfig(tp=1), dtype=args.dtype,
                                     max_seq_len=max_len)}
    if llms["jax-sp"].runtime.attention.name != "xla" and args.compare_attention:
        llms["jax-sp/xla-attention"] = LLM.from_torch(  # the same model with XLA's attention
            module, parallel=ParallelConfig(tp=1), dtype=args.dtype, max_seq_len=max_len,
            options=CompileOptions(attention="xla"))
    quantizations = [q for q in args.quantization.split(",") if q]
    for q in quantizations:  # the same model with its projections quantized
        llms[f"jax-sp/{q}"] = LLM.from_torch(module, parallel=ParallelConfig(tp=1),
                                             dtype=args.dtype, max_seq_len=max_len,
                                             quantization=q)
    rng = np.random.default_rng(0)
    common = {"model": name, "dtype": args.dtype, "params": params}

    # -- prefill: time to the first token ------------------------------------------------------
    for batch, t in prefill_cases:
        ids = rng.integers(0, cfg.vocab_size, (batch, t))
        flops = 2 * params * batch * t
        one = SamplingParams(max_new_tokens=1)

        def report(impl, med, lo, hi, first_s, **extra):
            tflops = flops / med / 1e12
            b.emit({"bench": "prefill", **common, "impl": impl, "batch": batch, "tokens": t,
                    "median_ms": med * 1e3, "min_ms": lo * 1e3, "max_ms": hi * 1e3,
                    "first_call_s": first_s, "tflops": tflops,
                    "of_matmul_peak": tflops / b.peak_tflops, **extra})

        firsts = {}
        for impl, llm in llms.items():
            try:
                first_s, out = first_call(lambda: llm.generate(ids.tolist(), one),
                                          lambda _: None)
            except Exception as e:  # noqa: BLE001 - recorded, and the other rows still run
                b.emit({"bench": "prefill", **common, "impl": impl, "batch": batch,
                        "tokens": t, "error": f"{type(e).__name__}: {str(e)[:400]}"})
                traceback.print_exc()
                continue
            firsts[impl] = [c.token_ids[0] for c in out]
            report(impl, *timed(lambda: llm.generate(ids.tolist(), one), args.repeats,
                                lambda _: None), first_s, attention=llm.runtime.attention.name)
        x = torch.tensor(ids, device=b.device)
        with torch.no_grad():
            forward = lambda: module(x, logits_to_keep=1).logits  # noqa: E731
            first_s, logits = first_call(forward, lambda _: b.sync_t())
            ref = logits[:, -1].argmax(-1).tolist()
            report("hf-eager", *timed(forward, args.repeats, lambda _: b.sync_t()), first_s)
            if b.device == "cuda" and "hf-static-compiled" in peers:
                compiled = torch.compile(module)
                forward = lambda: compiled(x, logits_to_keep=1).logits  # noqa: E731
                first_s, _ = first_call(forward, lambda _: b.sync_t())
                report("hf-compiled", *timed(forward, args.repeats, lambda _: b.sync_t()),
                       first_s, mode="default")
        if batch == 1:  # last-token logits next to transformers' and to an fp32 reference
            # (the same weights evaluated in fp32): at 2048 tokens transformers' own bf16
            # forward is the farther of the two from it, so both distances are reported
            want = logits[0, -1].float().cpu().numpy()
            with torch.no_grad():
                exact = copy.deepcopy(module).float()(x[:1], logits_to_keep=1).logits[0, -1]
            exact = exact.cpu().numpy()
            got = {impl: llm.logits(ids[:1].tolist())[0][-1] for impl, llm in llms.items()}
            rel = lambda a, b_: float(np.linalg.norm(a - b_) / np.linalg.norm(b_))  # noqa: E731
            b.emit({"bench": "prefill-parity", **common, "tokens": t,
                    "last_logits_rel_l2_vs_hf": {k: rel(v, want) for k, v in got.items()},
                    "last_logits_rel_l2_vs_fp32": {**{k: rel(v, exact) for k, v in got.items()},
                                                   "hf-eager": rel(want, exact)},
                    "first_token_equal_to_hf": {k: v == ref for k, v in firsts.items()}})

    # -- decode ----------------------------------------------------------------------------------
    unrolls = [int(u) for u in args.unroll.split(",")] if args.unroll else [None]
    # side by side: other attention modes' decode, other unroll factors (None: the default's)
    decoders = {"jax-sp": ("auto", None, "auto")}
    decoders.update({f"jax-sp/attention={m}": (m, None, "auto")
                     for m in args.decode_attention.split(",") if m and m != "auto"})
    decoders.update({f"jax-sp/{q}": ("auto", q, "auto") for q in quantizations})
    decoders.update({f"jax-sp/{q}/fp8_gemv={g}": ("auto", q, g) for q in quantizations
                     for g in args.fp8_gemv.split(",") if g and g != "auto"})
    engines = {("auto", None, q, "auto"): llms[f"jax-sp/{q}"] for q in quantizations}
    engines["auto", None, None, "auto"] = llms["jax-sp"]

    def engine(mode, unroll, quantization, gemv):
        key = (mode, unroll, quantization, gemv)
        if key not in engines:
            engines[key] = LLM.from_torch(
                module, parallel=ParallelConfig(tp=1), dtype=args.dtype, max_seq_len=max_len,
                options=CompileOptions(attention=mode, decode_unroll=unroll, fp8_gemv=gemv),
                quantization=quantization)
        return engines[key]

    def state_bytes(llm):  # what a decode step reads: every parameter once
        import jax

        return sum(x.nbytes for x in jax.tree.leaves(llm.state))

    for batch in decode_batches:
        ids = rng.integers(0, cfg.vocab_size, (batch, prompt_len))
        sp = SamplingParams(max_new_tokens=new_tokens)
        tokens = {}

        def report(impl, total, prefill, spread, first_s, wbytes=weight_bytes, **extra):
            per = (total - prefill) / (new_tokens - 1)
            b.emit({"bench": "decode", **common, "impl": impl, "batch": batch,
                    "prompt": prompt_len, "new_tokens": new_tokens, "ms_per_token": per * 1e3,
                    "tokens_per_s": batch / per, "tokens_per_s_e2e": batch * new_tokens / total,
                    "total_ms": total * 1e3, "prefill_ms": prefill * 1e3,
                    "spread_ms_per_token": [s * 1e3 for s in spread],
                    "of_bandwidth_limit": (1 / per) / (b.bandwidth / wbytes),
                    "weight_bytes": wbytes, "first_call_s": first_s, **extra})

        for (impl, (mode, quant, gemv)), setting in itertools.product(decoders.items(),
                                                                      unrolls):
            try:
                llm = engine(mode, setting, quant, gemv)
                unroll = gen.decode_unroll(llm.runtime)  # what the library's default resolves to
                first_s, out = first_call(lambda: llm.generate(ids.tolist(), sp), lambda _: None)
            except Exception as e:  # noqa: BLE001 - recorded, and the other rows still run
                b.emit({"bench": "decode", **common, "impl": impl, "batch": batch,
                        "error": f"{type(e).__name__}: {str(e)[:400]}"})
                traceback.print_exc()
                continue
            tokens[f"{impl}/unroll={unroll}"] = [c.token_ids for c in out]
            totals, prefills, decodes = [], [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                llm.generate(ids.tolist(), sp)
                totals.append(time.perf_counter() - t0)
                prefills.append(llm.last_stats.prefill_s)
                decodes.append(llm.last_stats.decode_s / (new_tokens - 1))
            prefill = statistics.median(prefills)  # spread on the same footing as the peers'
            spread = tuple((t - prefill) / (new_tokens - 1) for t in (min(totals), max(totals)))
            report(impl, statistics.median(totals), prefill, spread, first_s,
                   wbytes=state_bytes(llm), unroll=unroll,
                   decode_attention=llm.runtime.decode_attention.name,
                   xla_options=llm.runtime.xla_options(False),
                   decode_loop_ms_per_token=statistics.median(decodes) * 1e3)
            if args.dump_hlo and batch in (decode_batches[0], decode_batches[-1]):
                tag = impl.replace("/", "_")
                with open(os.path.join(args.dump_hlo, f"decode_{tag}_{name}_b{batch}_u{unroll}"
                                                      ".hlo"), "w") as f:
                    f.write(llm.programs.hlo("decode"))

        x = torch.tensor(ids, device=b.device)
        fast = None
        runs = {
            "hf-eager": lambda n: hf_eager_generate(module, x, n),
            "hf-static-compiled": lambda n: hf_static_generate(module, x, n),
            "gpt-fast-eager": lambda n: fast_generate(fast, x, n),
            "gpt-fast-compiled": lambda n: fast_generate(fast, x, n, compile=True),
        }
        for impl in peers:
            if impl.startswith("gpt-fast") and fast is None:
                fast = FastLlama(module, batch, prompt_len + new_tokens + 8)
            try:
                first_s, out = first_call(lambda: runs[impl](new_tokens), lambda _: b.sync_t())
                tokens[impl] = out.tolist()
                reps = max(2, args.repeats // 2)
                runs[impl](1)  # warm the prefill-only path (transformers' compile skips it)
                prefill, _, _ = timed(lambda: runs[impl](1), reps, lambda _: b.sync_t())
                total, lo, hi = timed(lambda: runs[impl](new_tokens), reps, lambda _: b.sync_t())
                spread = ((lo - prefill) / (new_tokens - 1), (hi - prefill) / (new_tokens - 1))
                report(impl, total, prefill, spread, first_s)
            except Exception as e:  # noqa: BLE001 - a peer that fails is a result too
                b.emit({"bench": "decode", **common, "impl": impl, "batch": batch,
                        "error": f"{type(e).__name__}: {str(e)[:400]}"})
                traceback.print_exc()
        if "hf-eager" in tokens:
            ref = tokens["hf-eager"]
            agree = {}
            for impl, got in tokens.items():
                # greedy on random weights meets near-ties: count the shared prefix per row
                shared = [next((i for i, (p, q) in enumerate(zip(g, r)) if p != q), len(r))
                          for g, r in zip(got, ref)]
                agree[impl] = statistics.median(shared)
            b.emit({"bench": "decode-agreement", **common, "batch": batch,
                    "median_prefix_equal_to_hf_eager": agree})


def plot(path):
    plt = pyplot()
    if plt is None:
        return

    rows = [json.loads(line) for line in open(path)]
    limits = next(r for r in rows if r["bench"] == "limits")
    models = sorted({r["model"] for r in rows if "model" in r})
    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.2 * len(models)), squeeze=False)
    for m, ax in zip(models, axes):
        dec = [r for r in rows if r["bench"] == "decode" and r.get("model") == m
               and "error" not in r]
        best = {}
        unrolls = {r.get("unroll", 1) for r in dec if r["impl"] == "jax-sp"}
        for r in dec:  # one bar per implementation (and per unroll factor when several ran)
            impl = r["impl"]
            if impl == "jax-sp" and len(unrolls) > 1:
                impl = f"jax-sp (unroll={r.get('unroll', 1)})"
            best[(impl, r["batch"])] = r["tokens_per_s"]
        impls = sorted({i for i, _ in best}, key=lambda i: (not i.startswith("jax"), i))
        batches = sorted({bb for _, bb in best})
        width = 0.8 / max(len(impls), 1)
        for k, impl in enumerate(impls):
            xs = [i + k * width for i in range(len(batches))]
            ax[0].bar(xs, [best.get((impl, bb), 0) for bb in batches], width, label=impl)
        if best:
            ax[0].set_xticks([i + 0.4 - width / 2 for i in range(len(batches))],
                             [f"batch {bb}" for bb in batches])
            ax[0].set_yscale("log")
            ax[0].set_ylabel("decode tokens/s (log)")
            ax[0].set_title(f"{m}: greedy decode, prompt 128, 256 new")
            ax[0].legend(fontsize=7)
        else:  # a prefill-only run (--decode-batches "")
            ax[0].set_visible(False)
        pre = [r for r in rows if r["bench"] == "prefill" and r.get("model") == m]
        pre = [r for r in pre if "error" not in r]
        impls = sorted({r["impl"] for r in pre}, key=lambda i: (not i.startswith("jax"), i))
        cases = sorted({(r["batch"], r["tokens"]) for r in pre})
        if not pre:
            ax[1].set_visible(False)
            continue
        width = 0.8 / len(impls)
        for k, impl in enumerate(impls):
            vals = {(r["batch"], r["tokens"]): r["tflops"] for r in pre if r["impl"] == impl}
            ax[1].bar([i + k * width for i in range(len(cases))],
                      [vals.get(c, 0) for c in cases], width, label=impl)
        ax[1].axhline(limits["matmul_tflops"], color="k", ls="--", lw=1,
                      label=f"8192³ matmul {limits['matmul_tflops']:.0f} TFLOP/s")
        ax[1].set_xticks([i + 0.4 - width / 2 for i in range(len(cases))],
                         [f"{bb}x{t}" for bb, t in cases])
        ax[1].set_ylabel("prefill TFLOP/s (2·params·tokens)")
        ax[1].set_title(f"{m}: prefill, time to first token")
        ax[1].legend(fontsize=7)
    fig.suptitle(limits["machine"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path.replace(".jsonl", ".png"), dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="llama3.2-1b,smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode-batches", default="1,8,32")
    ap.add_argument("--peers", default=",".join(PEERS))
    ap.add_argument("--unroll", default="",
                    help="decode layer-loop unroll factors to compare (default: the library's, "
                         "jax_sp.generate.decode_unroll: every layer on GPU)")
    ap.add_argument("--prefill", default="1x2048,8x2048", help="BxT cases; empty: none")
    ap.add_argument("--compare-attention", type=int, default=1,
                    help="also run prefill with XLA attention where cuDNN's is the default")
    ap.add_argument("--decode-attention", default="auto",
                    help="CompileOptions.attention values whose decode jax-sp runs side by side "
                         "(auto: the default's, impl 'jax-sp'; others 'jax-sp/attention=MODE')")
    ap.add_argument("--quantization", default="",
                    help="also run jax-sp with these quantizations side by side (e.g. fp8)")
    ap.add_argument("--fp8-gemv", default="auto",
                    help="CompileOptions.fp8_gemv values whose FP8 decode runs side by side "
                         "(auto: impl 'jax-sp/fp8'; others 'jax-sp/fp8/fp8_gemv=MODE')")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--tag", default=None, help="file name: generation_<tag>.jsonl")
    ap.add_argument("--dump-hlo", default=None, help="folder for the decode programs' HLO")
    ap.add_argument("--plot", default=None, help="only plot this jsonl file")
    args = ap.parse_args()
    if args.plot:
        return plot(args.plot)
    b = Bench(args)
    b.limits()
    for name in args.models.split(","):
        run_model(b, name)
    plot(b.path)


if __name__ == "__main__":
    main()
