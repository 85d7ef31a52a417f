"""The `jax-sp` command line: generate, serve, inspect, convert, launch-local.

On a CPU-only machine, simulated devices must be requested before jax is imported, so this
module parses arguments first and imports jax (through jax_sp) only afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


COMM_CHOICES = ("xla", "ring", "mosaic")  # jax_sp.config.COMM_MODES (importing it imports jax)


def ensure_devices(count: int) -> None:
    """Ask XLA for `count` simulated host devices unless the user already chose a number.
    Only affects the CPU platform; on a GPU machine the GPUs are still what jax uses."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _chunk(text: str) -> int:
    """argparse type: 0 (no chunked prefill) or at least the smallest compile bucket."""
    from jax_sp.runner import MIN_BUCKET

    value = int(text)
    if value != 0 and value < MIN_BUCKET:
        raise argparse.ArgumentTypeError(f"must be 0 (prompts prefilled whole) or at least "
                                         f"{MIN_BUCKET} tokens, got {text}")
    return value


def _inspect(args) -> int:
    ensure_devices(args.tp * args.pp)
    if args.tokens % args.tp:  # as the engine buckets a forward
        args.tokens += args.tp - args.tokens % args.tp
        print(f"tokens rounded up to {args.tokens}, a multiple of tp={args.tp}")
    if args.batch % args.attn_dp:  # as the engine pads a batch: each group owns sequences
        args.batch += args.attn_dp - args.batch % args.attn_dp
        print(f"batch rounded up to {args.batch}, a multiple of attn_dp={args.attn_dp}")
    from jax_sp.inspect import format_reports, inspect_modes
    from jax_sp.presets import preset

    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    reports = inspect_modes(cfg, args.tp, args.tokens, args.batch, args.comm,
                            attn_dp=args.attn_dp)
    print(f"model {args.model}: " + format_reports(cfg, args.tp, args.tokens, args.batch,
                                                   reports, args.attn_dp))
    if args.pp > 1:
        from jax_sp.inspect import boundary_report, format_boundary_report

        print(f"\npipeline, pp={args.pp}:")
        print(format_boundary_report(boundary_report(cfg, args.tp, args.pp, args.tokens,
                                                     args.batch)))
    return 0


def _generate(args) -> int:
    from jax_sp.distributed import initialize

    multi = initialize(args.coordinator, args.num_processes, args.process_id)
    if not multi:
        ensure_devices(args.tp * args.pp)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from jax_sp import SamplingParams

    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    llm = _load(args)
    parallel = llm.parallel
    import jax

    show = jax.process_index() == 0  # every process computes; one prints
    warm = 0.0
    if multi:  # gloo announces each new communicator on stderr: let that happen before the
        # answer streams, not in the middle of it (one silent step compiles what the stream uses)
        for _ in llm.stream(args.prompt, dataclasses.replace(sampling, max_new_tokens=2),
                            chat=not args.no_chat):
            pass
        warm = llm.last_stats.compile_s
    for piece in llm.stream(args.prompt, sampling, chat=not args.no_chat):
        if show:
            print(piece, end="", flush=True)
    s = dataclasses.replace(llm.last_stats, compile_s=llm.last_stats.compile_s + warm)
    hosts = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    if show:
        print(f"\n[{s.new_tokens} tokens, {s.decode_tokens_per_s:.1f} tokens/s decode | prefill "
          f"{s.prompt_tokens} tokens {s.prefill_s * 1e3:.0f} ms (sp={'on' if s.prefill_sp else 'off'})"
          f" | decode {s.decode_s * 1e3:.0f} ms (sp={'on' if s.decode_sp else 'off'}) | compile "
          f"{s.compile_s:.1f} s | {parallel.describe()} on {llm.runner.mesh.size} "
          f"{llm.runtime.mesh.devices.flat[0].platform.upper()} device(s){hosts}]", flush=True)
    return 0


def _serve(args) -> int:
    from jax_sp.distributed import initialize

    if not initialize(args.coordinator, args.num_processes, args.process_id):
        ensure_devices(args.tp * args.pp)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError:
        raise ValueError("jax-sp serve needs starlette and uvicorn: pip install -e '.[serve]'"
                         ) from None
    from jax_sp.server import serve
    from jax_sp.serving import slot_count

    llm = _load(args)
    parallel = llm.parallel
    import jax

    if jax.process_index():  # follow process 0's schedule until it shuts down
        from jax_sp.serving import Engine

        engine = Engine(llm, max_batch=args.max_batch, steps_per_launch=args.steps_per_launch,
                        max_prefill_tokens=args.max_prefill_tokens,
                        prefill_chunk=args.prefill_chunk or None)
        if args.warm:
            engine.warm()
        engine.join()
        return 0
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    hosts = f", {jax.process_count()} processes" if jax.process_count() > 1 else ""
    slots = slot_count(llm, args.max_batch)
    asked = f" (--max-batch {args.max_batch} rounded up)" if slots != args.max_batch else ""
    print(f"serving {name!r} on http://{args.host}:{args.port}/v1 ({parallel.describe()}, "
          f"{slots} slots{asked}{hosts})", flush=True)
    serve(llm, args.host, args.port, args.max_batch, name, args.steps_per_launch,
          args.max_prefill_tokens, args.warm, args.prefill_chunk or None)
    return 0


def _launch_local(args) -> int:
    from jax_sp.distributed import launch_local

    argv = args.argv
    if not argv:
        raise ValueError("launch-local needs a command to run, e.g. jax-sp launch-local 2 -- "
                         "generate \"Hi\" --tp 8")
    return launch_local(args.processes, argv, args.devices_per_process, args.timeout)


def _convert(args) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import time

    from bridges.orbax_source import save
    from bridges.pretrained import load_pretrained

    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
        raise ValueError(f"{args.dst} exists and is not empty (or is a file); choose a new "
                         f"folder for the converted checkpoint")  # before reading anything
    t0 = time.perf_counter()
    cfg, params, tokenizer, stored = load_pretrained(args.src, progress=True)
    try:
        save(args.dst, cfg, params, args.dtype or stored, tokenizer)
    finally:
        if getattr(params, "source", None) is not None:
            params.source.close()
    print(f"wrote {args.dst} ({args.dtype or stored}, {time.perf_counter() - t0:.1f} s); load it "
          f"with LLM.from_pretrained({args.dst!r}) or jax-sp generate --model {args.dst}")
    return 0


_Help = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default


def _layout_options(p, tp_default: int) -> None:
    p.add_argument("--tp", type=_positive, default=tp_default,
                   help="tensor-parallel devices per pipeline stage")
    p.add_argument("--pp", type=_positive, default=1, help="pipeline stages (tp*pp devices)")
    p.add_argument("--attn-dp", type=_positive, default=1,
                   help="attention in this many data-parallel groups of tp/attn-dp devices, "
                        "each with its own sequences and the KV heads split inside the group "
                        "(for models with fewer KV heads than tp)")
    p.add_argument("--comm", default="xla", choices=COMM_CHOICES,
                   help="how SP's all-gathers and reduce-scatters run: xla (sharding "
                        "constraints), ring (explicit collective matmul) or mosaic (Hopper GPUs)")


def _model_options(p) -> None:
    """The model and how it is laid out and stored: what generate and serve load."""
    p.add_argument("--model", default="smollm2", help="smollm2 (embedded), a GGUF file, an "
                   "HF folder or a folder written by `jax-sp convert`")
    _layout_options(p, 1)
    p.add_argument("--sp", default="auto", choices=("auto", "on", "off"),
                   help="sequence parallelism: on, off, or auto (for long prefills only)")
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                   help="compute dtype (None: the checkpoint's; GGUF: float32)")
    p.add_argument("--quantization", default=None, choices=("fp8", "fp8-head"),
                   help="fp8: the layers' projections in FP8, activations quantized per token "
                        "(comm xla or ring; GPU: Ada, Hopper or newer); fp8-head: the LM head too "
                        "(default: none)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="the KV cache's elements: auto (the compute dtype) or fp8 "
                        "(float8_e4m3fn, half the bytes; GPU: Ada, Hopper or newer)")
    p.add_argument("--max-seq-len", type=_positive, default=2048,
                   help="prompt plus new tokens at most, per request (the KV cache's length)")


def _process_options(p, coordinator_help: str) -> None:
    p.add_argument("--coordinator", default=None, help=coordinator_help)
    p.add_argument("--num-processes", type=int, default=None,
                   help="processes in the multi-process job")
    p.add_argument("--process-id", type=int, default=None, help="this process's index")


def _load(args):
    """The LLM of generate's and serve's model options."""
    from jax_sp import LLM, CompileOptions, ParallelConfig

    parallel = ParallelConfig(tp=args.tp, pp=args.pp, sp=args.sp, comm=args.comm,
                              attn_dp=args.attn_dp)
    return LLM.from_pretrained(args.model, parallel=parallel, dtype=args.dtype,
                               max_seq_len=args.max_seq_len, quantization=args.quantization,
                               options=CompileOptions(kv_cache_dtype=args.kv_cache_dtype))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-sp", description=__doc__.splitlines()[0],
                                formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True)
    add = lambda name, **kw: sub.add_parser(name, formatter_class=_Help, **kw)  # noqa: E731

    ins = add("inspect", help="HLO collective census, schedule and memory of each SP mode",
              description="Compile a prefill for sp off and on (no weights are allocated) and "
                          "print what each communicates, where, and its memory.")
    ins.add_argument("--model", default="smollm2",
                     help="model shape: smollm2, llama3.2-1b, llama3-8b, llama3-70b, "
                          "qwen2.5-7b, qwen2.5-1.5b")
    _layout_options(ins, 4)
    ins.add_argument("--tokens", type=_positive, default=1024,
                     help="tokens per sequence (rounded up to a multiple of tp)")
    ins.add_argument("--batch", type=_positive, default=1, help="sequences in the prefill")
    ins.add_argument("--layers", type=int, default=0,
                     help="override the layer count (0: the model's)")
    ins.set_defaults(run=_inspect)

    gen = add("generate", help="stream a completion of one prompt",
              description="Load a model onto tp*pp devices (simulated CPU devices when no "
                          "accelerator is present) and stream the answer, then a stats line.")
    gen.add_argument("prompt", help="the text; the chat template wraps it unless --no-chat")
    _model_options(gen)
    gen.add_argument("--max-new-tokens", type=_positive, default=64,
                     help="tokens to generate at most")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: all)")
    gen.add_argument("--top-p", type=float, default=1.0,
                     help="keep the likeliest tokens up to this probability mass (1: all)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    _process_options(gen, "HOST:PORT of process 0 of a multi-process job (with the next two)")
    gen.set_defaults(run=_generate)

    srv = add("serve", help="serve a model over an OpenAI-compatible HTTP API",
              description="Load a model and serve /v1/completions, /v1/chat/completions, "
                          "/v1/models, /health and /metrics with continuous batching "
                          "(docs/serving.md). Needs the serve extra: pip install -e '.[serve]'.")
    _model_options(srv)
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (loopback; 0.0.0.0 serves every interface)")
    srv.add_argument("--port", type=_positive, default=8000, help="port to listen on")
    srv.add_argument("--max-batch", type=_positive, default=8,
                     help="decode slots: requests decoded together")
    srv.add_argument("--steps-per-launch", type=_positive, default=4,
                     help="decode steps per launch: the host's per-launch work is shared by "
                          "this many steps; a new request joins at the next launch")
    srv.add_argument("--max-prefill-tokens", type=_positive, default=2048,
                     help="admissions prefilled together up to this many padded tokens "
                          "(one stage; a longer prompt alone)")
    srv.add_argument("--prefill-chunk", type=_chunk, default=2048,
                     help="a prompt longer than the largest power of two within this is "
                          "prefilled in chunks of it, one a round while the other slots decode "
                          "(one stage; 0: every prompt whole)")
    srv.add_argument("--warm", action="store_true",
                     help="compile every admission shape and the decode launch before serving "
                          "(else each is compiled when first met, inside a request's latency)")
    srv.add_argument("--served-model-name", default=None,
                     help="the name clients pass as `model` (default: the model's file name)")
    _process_options(srv, "HOST:PORT of process 0 of a multi-process job: process 0 serves, "
                          "the others follow its schedule (with the next two)")
    srv.set_defaults(run=_serve)

    ll = add("launch-local", help="run a jax-sp command as N processes of one "
             "jax.distributed job on this machine (for testing)",
             description="jax-sp launch-local N [options] -- COMMAND ...: process 0's output is "
                         "shown; if one process fails, the others are stopped.")
    ll.add_argument("processes", type=_positive, help="number of processes")
    ll.add_argument("--devices-per-process", type=int, default=None,
                    help="simulated CPU devices for each process (None: as the environment "
                         "says, one without XLA_FLAGS)")
    ll.add_argument("--timeout", type=float, default=None,
                    help="seconds before all are stopped (None: no limit)")
    ll.add_argument("argv", nargs="*", help="after --: the command, e.g. -- generate \"Hi\"")
    ll.set_defaults(run=_launch_local)

    conv = add("convert", help="write a model as an Orbax checkpoint",
               description="Read a model (each tensor once, shard by shard) and write it as an "
                           "Orbax checkpoint that from_pretrained and --model load.")
    conv.add_argument("src", help="smollm2 (embedded), a GGUF file or an HF folder")
    conv.add_argument("dst", help="a new (or empty) folder")
    conv.add_argument("--dtype", default=None, choices=("float32", "bfloat16"),
                      help="stored dtype (None: the source's; GGUF: float32)")
    conv.set_defaults(run=_convert)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = []
    if argv[:1] == ["launch-local"] and "--" in argv:  # the launched command is not ours to parse
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if command:
        args.argv = command
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jax-sp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
