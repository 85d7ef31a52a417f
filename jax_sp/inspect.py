"""`jax-sp inspect`: what each parallel mode communicates and how much memory it needs.

Compiles a prefill of the given shape for sp off and on (abstract weights: nothing is allocated)
and prints the HLO collective census and XLA's per-device memory analysis of each.
"""

from __future__ import annotations

import dataclasses

from jax_sp.config import ModelConfig, ParallelConfig
from jax_sp.runtime import Runtime
from sharding.hlo import census, format_census, summarize, windowed_einsum_loops


@dataclasses.dataclass
class ModeReport:
    mode: str
    collectives: list
    memory: dict
    windowed_einsum: dict

    def summary(self, layers: int) -> dict:
        return summarize(self.collectives, layers)


def memory_of(compiled) -> dict:
    m = compiled.memory_analysis()
    return {k: int(getattr(m, k + "_in_bytes", 0)) for k in
            ("argument_size", "output_size", "temp_size", "generated_code_size")}


def inspect_modes(cfg: ModelConfig, tp: int, tokens: int, batch: int = 1, comm: str = "xla",
                  modes=("off", "on")) -> list[ModeReport]:
    reports = []
    for mode in modes:
        rt = Runtime(cfg, ParallelConfig(tp=tp, sp=mode, comm=comm))
        compiled = rt.compile_prefill(mode == "on", batch, tokens)
        text = compiled.as_text()
        reports.append(ModeReport(mode, census(text, cfg.num_layers), memory_of(compiled),
                                  windowed_einsum_loops(text)))
    return reports


def format_reports(cfg: ModelConfig, tp: int, tokens: int, batch: int,
                   reports: list[ModeReport]) -> str:
    out = [f"prefill of {batch}x{tokens} tokens, tp={tp}, D={cfg.hidden_size}, "
           f"L={cfg.num_layers} (layer rows: per layer, inside the scan over layers)"]
    for r in reports:
        out.append(format_census(r.collectives, cfg.num_layers, f"\nsp={r.mode}:"))
        s = r.summary(cfg.num_layers).get("layer", {})
        wire = sum(v["wire_bytes"] for v in s.values())
        out.append(f"  per-layer wire bytes/device: {wire / 2**20:.3f} MiB; temp memory/device: "
                   f"{r.memory['temp_size'] / 2**20:.1f} MiB")
    return "\n".join(out)
