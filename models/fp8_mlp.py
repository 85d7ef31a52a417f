"""The MLP of one decode row as one kernel: down(silu(gate(x)) * up(x)) with FP8 weights, read
weight-only (x in 16 bits, each FP8 block widened in registers as models/fp8_gemv.py does).

Why: a batch-1 step runs its projections as separate kernels, and each pays a ramp-up and a
tail (about 7 us on an H200, docs/fp8.md) that no tile removes: the multiprocessors that finish
gate/up's last blocks early wait for the kernel to end before down_proj starts, and SiLU·up is
a kernel of its own in between. Here the two projections are one stream of work items pulled
from a queue, so down_proj's blocks run on the multiprocessors gate/up's tail leaves idle:

- item t < n_a (gate/up): intermediate channels [t * bi, (t + 1) * bi): gate and up for one
  row, scaled and rounded to x's dtype as the separate product writes them, then
  silu(gate) * up stored in x's dtype; then the item counts itself done in its chunk's counter
  (a chunk is the bk intermediate channels one down item reads).
- item n_a + s (down_proj, chunk-major): chunk c = s // (D / bn) and output channels n = s %
  (D / bn): waits until its chunk's counter says every gate/up item of the chunk is done, then
  one float32 partial sum of bn channels over the chunk's bk columns. The last of the chunks
  of a block of channels to finish (a counter per block) adds the block's partial sums in chunk
  order (the same order whichever program is last: the result does not depend on timing), scales
  and writes them.

Items are taken in order from an atomic queue, so an item that waits only waits for items
already taken by running programs: no deadlock whatever the grid and however many of its
programs fit on the device at once (a static split of items over programs would need them all
resident). The counters live in `workspace`, int32 zeros that the kernel leaves as it found them:
the last program to exit sets them back to zero, after every other program has exited.
Atomics are acquire-release at GPU scope (Pallas' Triton lowering), and a CTA barrier orders
each item's stores before the atomic that publishes them. `interpret=True` runs the same kernel
through Pallas' interpreter (programs one after another: the queue then hands every item to the
first program, in order, and its waits hold already).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# tiles: gate/up items of BLOCK_I intermediate channels walked in BLOCK_D columns; down items of
# BLOCK_N output channels over a chunk of CHUNK intermediate channels (benchmarks/fp8_gemv.py
# --mlp sweeps them)
BLOCK_I, BLOCK_D, BLOCK_N, CHUNK = 8, 4096, 16, 2048
PROGRAMS_PER_SM = 8
NUM_WARPS, STAGES = 4, 2
QUEUE, EXITED, COUNTERS = 0, 1, 2  # workspace slots: the queue, exited programs, then counters


def plan(d: int, i: int, block_i: int = BLOCK_I, block_d: int = BLOCK_D, block_n: int = BLOCK_N,
         chunk: int = CHUNK, interpret: bool = False):
    """(block_i, block_d, block_n, chunk) for a [1, d] row through gate/up [2, i, d] and down
    [d, i], or None when the kernel does not take the shapes: each tile shrinks to the largest
    power of two dividing its axis (Triton's blocks are powers of two), and on GPU must keep at
    least 8 channels and 256 columns (smaller ones would leave the CUDA-core loop mostly
    overhead: such a model takes the separate kernels)."""
    bi, bd, bn, ch = (min(n & -n, tile) for n, tile in ((i, block_i), (d, block_d),
                                                         (d, block_n), (i, chunk)))
    if ch % bi or (not interpret and (min(bi, bn) < 8 or min(bd, ch) < 256)):
        return None
    return bi, bd, bn, ch


def workspace_size(d: int, i: int, interpret: bool = False, **tiles) -> int:
    """The int32 slots `fp8_mlp` needs in its workspace (a power of two: Triton's blocks are):
    the queue, the exit count, a counter per chunk and one per block of output channels; 0
    where `plan` refuses the shapes."""
    shape = plan(d, i, interpret=interpret, **tiles)
    if shape is None:
        return 0
    bi, bd, bn, ch = shape
    n = COUNTERS + i // ch + d // bn
    return 1 << (n - 1).bit_length()


def default_programs() -> int:
    """PROGRAMS_PER_SM programs per multiprocessor of the first device (132 SMs if unknown)."""
    return PROGRAMS_PER_SM * (getattr(jax.devices()[0], "core_count", None) or 132)


def fp8_mlp(x, gate_up, gate_up_scale, down, down_scale, layer, workspace, *,
            block_i: int = BLOCK_I, block_d: int = BLOCK_D, block_n: int = BLOCK_N,
            chunk: int = CHUNK, programs: int | None = None, num_warps: int = NUM_WARPS,
            num_stages: int = STAGES, interpret: bool | None = None):
    """x [1, D] (16-bit); gate_up [L, 2, I, D] float8_e4m3fn (0: gate, 1: up) with scales
    [L, 2, I]; down [L, D, I] with scales [L, D]; layer an int32 scalar; workspace int32 zeros of
    at least `workspace_size(D, I)` (left zero) -> [1, D] in x's dtype: down(silu(gate) * up),
    each product accumulated in float32, scaled per output channel and rounded to x's dtype as
    the separate products are. Raises ValueError for shapes `plan` refuses."""
    from jax.experimental import pallas as pl

    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    if x.ndim != 2 or x.shape[0] != 1:
        raise ValueError(f"fp8_mlp: takes one row [1, D], not x {x.shape}")
    d = x.shape[1]
    n_layers, two, i, dg = gate_up.shape
    if (two, dg) != (2, d) or down.shape != (n_layers, d, i) or gate_up_scale.shape != (
            n_layers, 2, i) or down_scale.shape != (n_layers, d):
        raise ValueError(f"fp8_mlp: x {x.shape}, gate_up {gate_up.shape} {gate_up_scale.shape}, "
                         f"down {down.shape} {down_scale.shape} do not fit (want [1, D], "
                         f"[L, 2, I, D] [L, 2, I], [L, D, I] [L, D])")
    tiles = dict(block_i=block_i, block_d=block_d, block_n=block_n, chunk=chunk)
    shape = plan(d, i, interpret=interpret, **tiles)
    if shape is None:
        raise ValueError(f"fp8_mlp: D {d} and I {i} need power-of-two divisors of at least 8 "
                         f"and 256 on GPU for tiles {tiles}")
    bi, bd, bn, ch = shape
    size = workspace_size(d, i, interpret=interpret, **tiles)
    if workspace.dtype != jnp.int32 or workspace.shape != (size,):
        raise ValueError(f"fp8_mlp: workspace must be int32 zeros of shape ({size},), got "
                         f"{workspace.dtype} {workspace.shape}")
    programs = programs or (2 if interpret else default_programs())
    params = None
    if not interpret:
        from jax.experimental.pallas import triton as plgpu
        params = plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    chunks = i // ch
    kernel = functools.partial(_kernel, bi=bi, bd=bd, bn=bn, ch=ch, chunks=chunks,
                               programs=programs, barrier=not interpret)
    index = jnp.reshape(jnp.asarray(layer, jnp.int32), (1,))
    out, _, _ = pl.pallas_call(
        kernel, grid=(programs,), interpret=interpret, compiler_params=params, name="fp8_mlp",
        out_shape=(jax.ShapeDtypeStruct((1, d), x.dtype),
                   jax.ShapeDtypeStruct((i,), x.dtype),  # silu(gate) * up
                   jax.ShapeDtypeStruct((chunks, d), jnp.float32)),  # down's partial sums
    )(index, x, gate_up, gate_up_scale, down, down_scale, workspace)
    return out


def _kernel(layer_ref, x_ref, gq_ref, gs_ref, dq_ref, ds_ref, ws_ref, out_ref, act_ref,
            part_ref, *, bi, bd, bn, ch, chunks, programs, barrier):
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    f32, i32 = jnp.float32, jnp.int32
    layer = layer_ref[0]
    d, i = x_ref.shape[1], act_ref.shape[0]
    n_a, blocks = i // bi, d // bn
    total = n_a + chunks * blocks
    dtype = x_ref.dtype

    zero = layer * 0  # traced: the interpreter's discharge of an atomic takes no constants

    def count(slot, value):  # atomic add on a workspace slot, returning what it held
        return plgpu.atomic_add(ws_ref, (zero + slot,), zero + value)

    def gate_up(t):
        channels = pl.ds(pl.multiple_of(t * bi, bi), bi)

        def step(k, acc):
            cols = pl.ds(pl.multiple_of(k * bd, bd), bd)
            xb = x_ref[0, cols].astype(f32)[None, :]
            return tuple(a + jnp.sum(gq_ref[layer, h, channels, cols].astype(f32) * xb, axis=1)
                         for h, a in enumerate(acc))

        g, u = jax.lax.fori_loop(0, d // bd, step, (jnp.zeros((bi,), f32),) * 2)
        # rounded as the separate product writes gate and up
        g = (g * gs_ref[layer, 0, channels]).astype(dtype).astype(f32)
        u = (u * gs_ref[layer, 1, channels]).astype(dtype).astype(f32)
        act_ref[channels] = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)
        if barrier:  # every thread's stores before the release (the interpreter has none)
            plgpu.debug_barrier()
        count(COUNTERS + t * bi // ch, 1)

    def down(s):
        c, n = s // blocks, s % blocks

        def spin(_):  # acquire: the chunk's silu(gate) * up after this
            return count(COUNTERS + c, 0)

        jax.lax.while_loop(lambda done: done < ch // bi, spin, spin(0))
        cols = pl.ds(pl.multiple_of(c * ch, ch), ch)
        channels = pl.ds(pl.multiple_of(n * bn, bn), bn)
        h = plgpu.load(act_ref.at[cols], volatile=True).astype(f32)[None, :]
        part_ref[c, channels] = jnp.sum(dq_ref[layer, channels, cols].astype(f32) * h, axis=1)
        if barrier:
            plgpu.debug_barrier()
        finished = count(COUNTERS + chunks + n, 1)

        @pl.when(finished == chunks - 1)  # the block's last chunk: add the chunks in order
        def _():
            acc = jax.lax.fori_loop(
                0, chunks, lambda k, a: a + plgpu.load(part_ref.at[k, channels],
                                                         volatile=True),
                jnp.zeros((bn,), f32))
            out_ref[0, channels] = (acc * ds_ref[layer, channels]).astype(out_ref.dtype)

    def work(t):
        jax.lax.cond(t < n_a, gate_up, lambda t: down(t - n_a), t)
        return count(QUEUE, 1)

    jax.lax.while_loop(lambda t: t < total, work, count(QUEUE, 1))

    @pl.when(count(EXITED, 1) == programs - 1)  # every other program has left: reset
    def _():
        ws_ref[...] = jnp.zeros(ws_ref.shape, i32)
