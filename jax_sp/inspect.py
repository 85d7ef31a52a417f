"""`jax-sp inspect`: what each parallel mode communicates and how much memory it needs.

Compiles a prefill of the given shape for sp off and on (abstract weights: nothing is allocated)
and prints the HLO collective census, the schedule of each collective (overlapped by compute or
exposed, `sharding/schedule.py`) and XLA's per-device memory analysis of each.
"""

from __future__ import annotations

import dataclasses

from jax_sp.config import ModelConfig, ParallelConfig
from jax_sp.runtime import Runtime
from sharding.hlo import census, format_census, summarize, windowed_einsum_loops
from sharding.schedule import format_overlap, overlaps, summarize_overlap


@dataclasses.dataclass
class ModeReport:
    mode: str
    collectives: list
    memory: dict
    windowed_einsum: dict
    overlap: list  # sharding.schedule.Overlap of each collective

    def summary(self, layers: int) -> dict:
        return summarize(self.collectives, layers)

    def overlap_summary(self, layers: int) -> dict:
        return summarize_overlap(self.overlap, layers)


def memory_of(compiled) -> dict:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, k + "_in_bytes", 0)) for k in
            ("argument_size", "output_size", "temp_size", "generated_code_size")}


def inspect_modes(cfg: ModelConfig, tp: int, tokens: int, batch: int = 1, comm: str = "xla",
                  modes=("off", "on"), attn_dp: int = 1) -> list[ModeReport]:
    reports = []
    for mode in modes:
        rt = Runtime(cfg, ParallelConfig(tp=tp, sp=mode, comm=comm, attn_dp=attn_dp))
        compiled = rt.compile_prefill(mode == "on", batch, tokens)
        text = compiled.as_text()
        reports.append(ModeReport(mode, census(text, cfg.num_layers), memory_of(compiled),
                                  windowed_einsum_loops(text), overlaps(text, cfg.num_layers)))
    return reports


def format_reports(cfg: ModelConfig, tp: int, tokens: int, batch: int,
                   reports: list[ModeReport], attn_dp: int = 1) -> str:
    groups = f" in {attn_dp} attention groups" if attn_dp > 1 else ""
    out = [f"prefill of {batch}x{tokens} tokens, tp={tp}{groups}, D={cfg.hidden_size}, "
           f"L={cfg.num_layers} (layer rows: per layer, inside the scan over layers)"]
    for r in reports:
        out.append(format_census(r.collectives, cfg.num_layers, f"\nsp={r.mode}:"))
        s = r.summary(cfg.num_layers).get("layer", {})
        wire = sum(v["wire_bytes"] for v in s.values())
        out.append(f"  per-layer wire bytes/device: {wire / 2**20:.3f} MiB; temp memory/device: "
                   f"{r.memory['temp_size'] / 2**20:.1f} MiB")
        loops = ", ".join(f"{k.rsplit('_', 1)[-1]} {v}" for k, v in r.windowed_einsum.items())
        out.append(format_overlap(r.overlap, cfg.num_layers,
                                  f"  schedule (windowed-einsum loops: {loops}):"))
    return "\n".join(out)


def boundary_report(cfg: ModelConfig, tp: int, pp: int, tokens: int, batch: int = 1,
                    dtype="float32") -> dict:
    """Per-stage layer ranges and, per boundary, what each policy moves: the rows each device
    sends to the next stage and the receive-side collectives (from the compiled receive)."""
    import jax
    import jax.numpy as jnp

    from jax_sp.runner import split_layers
    from jax_sp.runtime import resolve_dtype
    from sharding.boundary import vllm_receive_fn
    from sharding.mesh import make_mesh, stage_mesh

    ranges = split_layers(cfg.num_layers, pp)
    mesh = stage_mesh(make_mesh(tp, pp), 1)
    rows, width = batch * tokens, cfg.hidden_size
    itemsize = jnp.dtype(resolve_dtype(dtype)).itemsize
    tensor = rows * width * itemsize
    arg = jax.ShapeDtypeStruct((rows, width), resolve_dtype(dtype),
                               sharding=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("tp", None)))
    report = {"stages": [{"stage": s, "layers": [a, b]} for s, (a, b) in enumerate(ranges)],
              "boundaries": pp - 1, "tensor_bytes": tensor, "policies": {}}
    for sp in (False, True):
        gather = census(vllm_receive_fn(mesh, sp).lower(arg, arg).compile().as_text())
        send = 2 * tensor // tp  # hidden + residual, each device its rows
        report["policies"][f"sp={'on' if sp else 'off'}"] = {
            "scattered": {"send_bytes_per_device": send, "receive_collectives": [] if sp else [
                ("all-gather", (rows, width), (tp - 1) / tp * tensor)] * 2,
                "note": "" if sp else "inside the stage: its TP layout wants them whole"},
            "gather": {"send_bytes_per_device": send,
                       "receive_collectives": [(c.kind, c.dims, c.wire_bytes) for c in gather]}}
        # scattered + SP: the tensors arrive in the layout the stage's first norm wants
    return report


def format_boundary_report(r: dict) -> str:
    out = ["stages: " + ", ".join(f"{s['stage']}: layers [{s['layers'][0]}, {s['layers'][1]})"
                                  for s in r["stages"])]
    out.append(f"per boundary ({r['boundaries']} in all), hidden and residual of "
               f"{r['tensor_bytes'] / 2**20:.3f} MiB each:")
    for mode, policies in r["policies"].items():
        for name, p in policies.items():
            recv = p["receive_collectives"]
            wire = sum(w for *_, w in recv)
            what = ", ".join(f"{k} {list(d)}" for k, d, _ in recv) or "none"
            what += f"; {p['note']}" if p.get("note") else ""
            out.append(f"  {mode:7} {name:9} send {p['send_bytes_per_device'] / 2**20:8.3f} "
                       f"MiB/device; receive {wire / 2**20:8.3f} MiB/device ({what})")
    return "\n".join(out)
