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

Where the next kernel reads what a signalling kernel writes, it must not read it the way XLA's
fusions read the output of a kernel that does not signal. XLA signals early only from its own
Triton GEMMs, and reads what such a kernel writes with coherent loads in the kernel after it,
what any other kernel writes with non-coherent ones (`ld.global.nc`, defined only on data that
does not change while the reader runs). An XLA fusion after a Pallas kernel gets the latter, and
with an early signal that kernel is still writing when the fusion launches. So the default,
`launch_dependents="auto"`, signals only where the model knows that the next kernel is one of
jax-sp's own, whose loads are Triton's (`ld.global`, no `.nc`; `followed_by_kernel`): the FP8
GEMVs and add-and-norms of a decode step that hand their rows straight to one another
(models/llama.py; benchmarks/pdl_schedule.py checks XLA's schedule).
`True` signals from every kernel; the results came out identical in every run measured
(benchmarks/pdl.py checks the tokens), which shows the loads saw the data in practice, not that
they must. Measured: docs/performance.md#programmatic-dependent-launch.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

MODES = ("auto", True, False)  # CompileOptions.launch_dependents
_SIGNAL = contextvars.ContextVar("jax_sp_launch_dependents", default=False)
# (the next kernel is jax-sp's own, only while the kernel's layer index is below this or None)
_NEXT = contextvars.ContextVar("jax_sp_next_kernel", default=(False, None))


@contextlib.contextmanager
def _set(var, value):
    token = var.set(value)
    try:
        yield
    finally:
        var.reset(token)


def signalling(mode):
    """Kernels traced inside signal `launch_dependents` as `mode` says (one of MODES: "auto"
    where `followed_by_kernel(True)` says the next kernel is jax-sp's own, True everywhere,
    False nowhere); Runtime.compile traces each program inside
    `signalling(CompileOptions.launch_dependents)`."""
    if mode not in MODES:
        raise ValueError(f"launch_dependents must be one of {MODES}, got {mode!r}")
    return _set(_SIGNAL, mode)


def followed_by_kernel(ours: bool, below: int | None = None):
    """Kernels traced inside hand their output straight to a kernel of jax-sp's own (`ours`),
    which reads it with coherent loads: with signalling("auto") they may signal. `below`: only
    while the layer index they read is below it (a layer's last kernel: after the last layer
    comes whatever follows the layers). The model sets it around each call whose next kernel it
    knows; a layout that adds a collective after a kernel sets it False around that kernel."""
    return _set(_NEXT, (bool(ours), below))


def below() -> int | None:
    """The layer index below which a kernel traced now signals (`followed_by_kernel`; with
    signalling("auto"): True signals from every layer)."""
    return _NEXT.get()[1] if _SIGNAL.get() == "auto" else None


def wanted(direct: bool = True) -> bool:
    """Whether a kernel traced now is asked to signal: inside `signalling(True)`, or inside
    `signalling("auto")` and `followed_by_kernel(True)` when the kernel writes its output itself
    (`direct`: no XLA op of its own after it, such as the sum of split partial products)."""
    mode = _SIGNAL.get()
    return mode is True or (mode == "auto" and direct and _NEXT.get()[0])


def enabled(interpret: bool, direct: bool = True) -> bool:
    """Whether a kernel traced now signals `launch_dependents`: `wanted`, and neither
    interpreted nor on a GPU before Hopper (PTX has the instruction from sm_90 on)."""
    if not wanted(direct) or interpret:
        return False
    if jax.default_backend() != "gpu":  # lowered for CUDA elsewhere (tests): as asked
        return True
    capability = getattr(jax.devices()[0], "compute_capability", None)
    try:
        return int(str(capability).split(".")[0]) >= 9
    except ValueError:  # not a CUDA device (ROCm reports an architecture name)
        return False


def first_index(ref, signal: bool, below: int | None = None):
    """ref[0] of a kernel's int32 [1] index ref (the layer the kernel reads), loaded first; with
    `signal` passed through `launch_dependents` (executed only while the index is below `below`,
    if given), so that the signal comes after that one load and before every other."""
    index = ref[...]
    return (launch_dependents(index, below) if signal else index)[0]


def launch_dependents(index, below: int | None = None):
    """`index` (an int32 array in a Pallas Triton kernel) passed through inline PTX that first
    executes `griddepcontrol.launch_dependents` (with `below`: only where the index is below
    it). The kernel takes its loads' addresses from the result, so the instruction runs before
    them, as the block starts."""
    from jax.experimental.pallas import triton as plgpu

    signal = "griddepcontrol.launch_dependents;"
    if below is not None:
        signal = (f"{{\n\t.reg .pred p;\n\tsetp.lt.s32 p, $1, {int(below)};\n\t@p {signal}"
                  f"\n\t}}")
    (out,) = plgpu.elementwise_inline_asm(
        f"{signal}\n\tmov.b32 $0, $1;", args=[index],
        constraints="=r,r", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(index.shape, index.dtype)])
    return out
