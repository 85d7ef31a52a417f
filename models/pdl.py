"""Programmatic dependent launch (PDL) from jax-sp's Pallas kernels.

On Hopper and later GPUs XLA launches a program's kernels with CUDA's programmatic stream
serialization (`xla_gpu_enable_pdl`, on by default in the XLA that jax 0.11 ships), and each of
its kernels waits at its start (`griddepcontrol.wait`) until the kernel before it has finished
and its writes are visible. The next kernel may launch once every block of the running one has
either exited or executed `griddepcontrol.launch_dependents`; XLA executes it only in its Triton
GEMMs, so the kernel after any other launches when its last block ends. With
`CompileOptions(launch_dependents=True)` jax-sp's Pallas kernels (the FP8 GEMV, decode
attention, the add-and-norm) execute `launch_dependents` as each block starts, so the kernel
after them launches while their last wave still runs: its blocks take the multiprocessors that
wave leaves idle, wait there, and start the moment it completes. Where the next kernel is not
launched that way (PDL off, a cuBLAS or NCCL kernel) the instruction changes nothing.

Off by default: XLA signals early only from its own Triton GEMMs, and reads what such a kernel
writes with coherent loads in the kernel after it, what any other kernel writes with
non-coherent ones (`ld.global.nc`, defined only on data that does not change while the reader
runs). The kernels after a Pallas kernel get the latter, and with an early signal that kernel is
still writing when they launch. The results came out identical in every run measured
(benchmarks/pdl.py checks the tokens), which shows the loads saw the data in practice, not that
they must. Measured: docs/performance.md#programmatic-dependent-launch.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

_SIGNAL = contextvars.ContextVar("jax_sp_launch_dependents", default=False)


@contextlib.contextmanager
def signalling(on: bool):
    """Kernels traced inside signal `launch_dependents` (if `on`); Runtime.compile traces each
    program inside `signalling(CompileOptions.launch_dependents)`."""
    token = _SIGNAL.set(bool(on))
    try:
        yield
    finally:
        _SIGNAL.reset(token)


def enabled(interpret: bool) -> bool:
    """Whether a kernel traced now signals `launch_dependents`: inside `signalling(True)`, not
    interpreted, and not on a GPU before Hopper (PTX has the instruction from sm_90 on)."""
    if interpret or not _SIGNAL.get():
        return False
    if jax.default_backend() != "gpu":  # lowered for CUDA elsewhere (tests): as asked
        return True
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return int(str(capability).split(".")[0]) >= 9
    except ValueError:  # not a CUDA device (ROCm reports an architecture name)
        return False


def first_index(ref, signal: bool):
    """ref[0] of a kernel's int32 [1] index ref (the layer the kernel reads), loaded first; with
    `signal` passed through `launch_dependents`, so that the signal comes after that one load
    and before every other."""
    index = ref[...]
    return (launch_dependents(index) if signal else index)[0]


def launch_dependents(index):
    """`index` (an int32 array in a Pallas Triton kernel) passed through inline PTX that first
    executes `griddepcontrol.launch_dependents`. The kernel takes its loads' addresses from the
    result, so the instruction runs before them, as the block starts."""
    from jax.experimental.pallas import triton as plgpu

    (out,) = plgpu.elementwise_inline_asm(
        "griddepcontrol.launch_dependents;\n\tmov.b32 $0, $1;", args=[index],
        constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(index.shape, index.dtype)])
    return out
