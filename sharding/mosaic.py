"""comm="mosaic": the column side of SP as JAX's Mosaic GPU all-gather matmul kernel.

`jax.experimental.pallas.ops.gpu.collective_matmul_mgpu.all_gather_lhs_matmul` runs the
all-gather inside the GEMM: each device multiplies the token chunk it holds while its TMA engine
copies that chunk to the next device's scratch buffer (peer memory, CUDA peer access; no NVSHMEM
in one process, no NVLink multicast). Per device:

  x In[T_tp, D] = [L, D], w In[D, F_tp]  ->  Out[T, F_tp]

as `sharding.collective_matmul.all_gather_matmul`. The reduce-scatter side stays the ring
(`ring_row`): the kernel library's reduce-scatter uses multimem (NVLink multicast), which jax-sp
never turns on.

Where the kernel applies (`check_mesh`): a GPU of compute capability 9.x (its wgmma pipeline is
Hopper's), bfloat16 or float16, one process owning every device of the mesh, the tp axis spanning
them all in device-id order. Per call it needs D % 64 == 0 and F_tp % 256 == 0 (the tiles of
`TILE_*`); token rows are padded here to a multiple of 128 per device. A projection that does
not fit (the LM head's vocabulary shard, a few sampled rows) runs on the ring instead. The
kernel addresses its peers by one device index, so the runtime runs comm="mosaic" programs on a
mesh of the tp axis alone (`sharding.mesh.tp_mesh`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

TILE_M, TILE_N, TILE_K = 128, 128, 64  # wg_dimension N: a CTA covers 2 * TILE_N columns


def check_mesh(mesh, dtype) -> None:
    """ValueError unless the kernel can run on this mesh and dtype, naming why and what would
    work instead."""
    devices = list(mesh.devices.flat)
    d0 = devices[0]
    why = None
    if d0.platform != "gpu":
        why = f"it is a GPU kernel and the mesh is on {d0.platform}"
    elif not str(getattr(d0, "compute_capability", "")).startswith("9"):
        why = (f"it needs a Hopper GPU (compute capability 9.x) and the device is "
               f"{d0.device_kind} ({getattr(d0, 'compute_capability', '?')})")
    elif jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        why = f"it computes in bfloat16 or float16, not {jnp.dtype(dtype).name}"
    elif jax.process_count() != 1:
        why = f"it runs in one process owning every GPU ({jax.process_count()} processes here)"
    elif devices != sorted(jax.devices(), key=lambda d: d.id) or mesh.shape["tp"] != len(devices):
        why = (f"its tp axis must span every device of the process in id order (the mesh "
               f"holds {[d.id for d in devices]} of {len(jax.devices())} devices)")
    if why:
        raise ValueError(f"comm='mosaic' cannot run here: {why}; use comm='ring' (explicit "
                         f"collective matmul, any backend) or comm='xla'")


def fits(d: int, f_local: int) -> bool:
    """Whether a [D] x [D, F_tp] projection fits the kernel's tiles."""
    return d % TILE_K == 0 and f_local % (2 * TILE_N) == 0


@functools.cache
def _config():
    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    return hm.TuningConfig(tile_m=TILE_M, tile_n=TILE_N, tile_k=TILE_K, max_concurrent_steps=4,
                           grid_minor_dim=hm.MatmulDimension.N, grid_tile_width=8,
                           wg_dimension=hm.MatmulDimension.N)


def kernel_all_gather_matmul(x_ld, w_df, axis: str = "tp"):
    """The Mosaic GPU kernel: x_ld [L, D] (L a multiple of TILE_M), w_df [D, F_tp] ->
    [n*L, F_tp]. Call inside shard_map."""
    from jax.experimental.pallas.ops.gpu.collective_matmul_mgpu import all_gather_lhs_matmul

    return all_gather_lhs_matmul(x_ld, w_df, axis, config=_config(), dtype=x_ld.dtype)


def gathered_matmul(x_ld, w_df, kernel=kernel_all_gather_matmul, axis: str = "tp"):
    """all-gather(x) @ w with x's rows padded per device to the kernel's tile height: the padding
    rows of every device's chunk are dropped from the gathered product. Inside shard_map."""
    n = jax.lax.axis_size(axis)
    rows = x_ld.shape[0]
    pad = -rows % TILE_M
    if pad:
        x_ld = jnp.pad(x_ld, ((0, pad), (0, 0)))
    out = kernel(x_ld, w_df, axis)  # [n * (rows + pad), F_tp]
    if pad:
        out = out.reshape(n, rows + pad, -1)[:, :rows].reshape(n * rows, -1)
    return out


def mosaic_column(mesh, spec: str, x_td, w, kernel=kernel_all_gather_matmul):
    """A column-parallel projection of token-sharded x through the kernel, e.g. spec
    "TD,DKCH->TKCH" (w split over its first letter outside D and C, as `ring_column`)."""
    ins, out = spec.split("->")
    rhs = ins.split(",")[1]
    feature = next(c for c in rhs if c not in "DC")
    d_axis = rhs.index("D")

    def body(x_ld, w_local):
        w_df = jnp.moveaxis(w_local, d_axis, 0).reshape(w_local.shape[d_axis], -1)
        y = gathered_matmul(x_ld, w_df, kernel)
        return y.reshape(y.shape[0], *[w_local.shape[rhs.index(c)] for c in out[1:]])

    specs = lambda letters: P(*("tp" if c == feature else None for c in letters))  # noqa: E731
    # the kernel addresses its peers by one device index: the runtime gives comm="mosaic" a
    # mesh of the tp axis alone (sharding.mesh.tp_mesh), and a program has one mesh
    return jax.shard_map(body, mesh=mesh, in_specs=(P("tp", None), specs(rhs)),
                         out_specs=specs(out), check_vma=False)(x_td, w)


def projection_fits(spec: str, w_shape, tp: int) -> bool:
    """Whether `mosaic_column(spec, x, w)` fits the kernel's tiles on tp devices."""
    rhs = spec.split("->")[0].split(",")[1]
    feature = next(c for c in rhs if c not in "DC")
    d = w_shape[rhs.index("D")]
    f_local = int(np.prod([s for c, s in zip(rhs, w_shape) if c != "D"])) // tp
    return w_shape[rhs.index(feature)] % tp == 0 and fits(d, f_local)
