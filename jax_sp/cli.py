"""The `jax-sp` command line: inspect (and, as they land, generate and bench).

On a CPU-only machine, simulated devices must be requested before jax is imported, so this
module parses arguments first and imports jax (through jax_sp) only afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys


def ensure_devices(count: int) -> None:
    """Ask XLA for `count` simulated host devices unless the user already chose a number.
    Only affects the CPU platform; on a GPU machine the GPUs are still what jax uses."""
    flags = os.environ.get("XLA_FLAGS", "")
    if count > 1 and "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def _inspect(args) -> int:
    ensure_devices(args.tp * args.pp)
    from jax_sp.inspect import format_reports, inspect_modes
    from jax_sp.presets import preset

    cfg = preset(args.model)
    if args.layers:
        cfg = dataclasses.replace(cfg, num_layers=args.layers)
    reports = inspect_modes(cfg, args.tp, args.tokens, args.batch, args.comm)
    print(f"model {args.model}: " + format_reports(cfg, args.tp, args.tokens, args.batch,
                                                   reports))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jax-sp", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)

    ins = sub.add_parser("inspect", help="HLO collective census and memory of each SP mode")
    ins.add_argument("--model", default="smollm2",
                     help="model shape: smollm2, llama3.2-1b, llama3-8b, llama3-70b")
    ins.add_argument("--tp", type=int, default=4)
    ins.add_argument("--pp", type=int, default=1)
    ins.add_argument("--tokens", type=int, default=1024, help="tokens per sequence")
    ins.add_argument("--batch", type=int, default=1)
    ins.add_argument("--layers", type=int, default=0, help="override the layer count")
    ins.add_argument("--comm", default="xla", choices=("xla", "ring"))
    ins.set_defaults(run=_inspect)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except ValueError as e:
        print(f"jax-sp: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
