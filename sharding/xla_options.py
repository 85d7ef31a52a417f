"""Per-compilation XLA options that let XLA:GPU fuse SP's collectives into its matmuls.

XLA decomposes an all-gather feeding a dot (and a dot feeding a reduce-scatter) into a
"windowed einsum" loop of collective-permutes and partial dots when the operands are at least
`xla_gpu_threshold_for_windowed_einsum_mib` MiB; `xla_gpu_multi_streamed_windowed_einsum`
runs the permutes and dots on separate streams so they overlap. jax-sp passes these per
compilation (`jax.jit(..., compiler_options=...)`) for comm="xla" programs that use SP on GPU:
XLA_FLAGS is never touched, and a flag the user already set in XLA_FLAGS wins over ours.
`CompileOptions(xla_options={...})` replaces the defaults ({} turns them off).

If XLA fails to compile with them (it has failed the HLO verifier after
`windowed-einsum-handler`, see benchmarks/xla_windowed_einsum_repro.py), the runtime warns and
compiles again without them.
"""

from __future__ import annotations

import os
import re

WINDOWED_EINSUM = {
    "xla_gpu_threshold_for_windowed_einsum_mib": 0,
    "xla_gpu_multi_streamed_windowed_einsum": True,
}


# Scheduling for overlap (opt-in: `CompileOptions(xla_options={**defaults, **SCHEDULE_OVERLAP})`
# until multi-GPU timings show they slow nothing). XLA:GPU's latency-hiding scheduler is off by
# flag but runs anyway on Hopper and newer when its speed-of-light cost model covers every
# collective of the module (gpu_hlo_schedule.cc IsLHSEnabled); the flag makes it unconditional.
# The overlap limit (default 1) lets two collectives be in flight at once, e.g. the two
# directions of a bidirectional ring.
SCHEDULE_OVERLAP = {
    "xla_gpu_enable_latency_hiding_scheduler": True,
    "xla_gpu_experimental_parallel_collective_overlap_limit": 2,
}


# Inference programs on GPU (prefill and decode; the layer loop slices each layer's weights out of
# the stacked [L, ...] arrays). Measured on an H100, Llama-3.2-1B shape (benchmarks/profile_decode.py
# and a prefill profile since retired; docs/performance.md):
# - XLA's Triton gemms cannot read a slice in place, so each decode step copied the MLP weights
#   (~1 ms/token of memcpy) and a 1x2048 prefill spent 1.4 ms in copies; cuBLAS with
#   dynamic-slice fusion reads them where they lie (prefill 1x2048 9.43 -> 8.32 ms, 8x2048
#   60.6 / 61.9 ms, level within the runs' spread).
# - The dot merger concatenates gate and up (sharing their input) into one [D, 2F] weight, a
#   67 MB copy per layer per step (0.65 ms/token). The pass is named "dot-merger".
# (Matrix-vector products under 10M elements are kept on cuBLAS by the layout, which runs
# them on two rows: see sharding/layout.py `_einsum`.)
INFERENCE = {
    "xla_gpu_enable_dynamic_slice_fusion": True,
    "xla_gpu_enable_triton_gemm": False,
    "xla_disable_hlo_passes": "dot-merger",
}


def collective_matmul_options(platform: str, comm: str, sp: bool, user=None) -> dict:
    """Compiler options for one inference program: the user's when given, else ours on GPU
    (INFERENCE, plus WINDOWED_EINSUM for SP with comm="xla"), minus any flag already in the
    user's XLA_FLAGS."""
    if user is not None:
        return dict(user)
    if platform != "gpu":
        return {}
    ours = dict(INFERENCE)
    if comm == "xla" and sp:
        ours.update(WINDOWED_EINSUM)
    named = set(re.findall(r"--([A-Za-z0-9_]+)", os.environ.get("XLA_FLAGS", "")))
    return {k: v for k, v in ours.items() if k not in named}
