"""The device mesh, and the per-stage sub-meshes of a pipeline.

Axes ("pp", "cfg", "tp"): pipeline stages, classifier-free guidance's branches (cfg=2) and the
tensor-parallel group. With attention data-parallel groups (ParallelConfig(attn_dp=G), G > 1)
the tp devices are laid out as G groups of tp/G: axes ("pp", "cfg", "attn_dp", "attn_tp"). The
tensor-parallel group is then the two axes together (`tp_axes`), so everything that splits over
tp (embedding, MLP, LM head, SP's token shards) splits over both, and attention splits its
heads over "attn_tp" and its sequences over "attn_dp" (sharding/rules.py).

Axes are Auto (GSPMD propagation), because jax-sp states layouts as sharding constraints that
XLA completes; `jax.make_mesh` would default to Explicit axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("pp", "cfg", "tp")
ATTN_DP_AXES = ("pp", "cfg", "attn_dp", "attn_tp")


def make_mesh(tp: int, pp: int = 1, devices=None, cfg: int = 1, attn_dp: int = 1) -> Mesh:
    """pp x cfg x tp devices: a pipeline stage's cfg groups (classifier-free guidance's two
    branches with ParallelConfig(cfg=2); one otherwise) of tp devices each; with attn_dp > 1
    each tp group as attn_dp attention groups of tp / attn_dp devices."""
    if devices is None:  # process by process: a tp row stays inside one host when it fits
        devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    devices = list(devices)
    if tp * pp * cfg > len(devices):
        raise ValueError(
            f"tp*pp*cfg = {tp}*{pp}*{cfg} = {tp * pp * cfg} devices are needed but only "
            f"{len(devices)} {devices[0].platform.upper()} device(s) are present; use "
            f"tp*pp*cfg <= {len(devices)}"
            + (" or set XLA_FLAGS=--xla_force_host_platform_device_count=N before importing jax"
               if devices[0].platform == "cpu" else ""))
    grid = np.array(devices[: tp * pp * cfg], dtype=object)
    if attn_dp == 1:
        return Mesh(grid.reshape(pp, cfg, tp), AXES, axis_types=(AxisType.Auto,) * len(AXES))
    if tp % attn_dp:
        raise ValueError(f"attn_dp={attn_dp} does not divide tp={tp}")
    return Mesh(grid.reshape(pp, cfg, attn_dp, tp // attn_dp), ATTN_DP_AXES,
                axis_types=(AxisType.Auto,) * len(ATTN_DP_AXES))


def tp_axes(mesh: Mesh) -> str | tuple[str, str]:
    """The mesh axes of the tensor-parallel group: "tp", or ("attn_dp", "attn_tp") (in that
    order: a device's rank in the group is attn_dp index * attn_tp size + attn_tp index)."""
    return ("attn_dp", "attn_tp") if "attn_dp" in mesh.axis_names else "tp"


def tp_size(mesh: Mesh) -> int:
    """Devices in the tensor-parallel group."""
    shape = dict(mesh.shape)
    return shape["attn_dp"] * shape["attn_tp"] if "attn_dp" in shape else shape["tp"]


def attn_dp_size(mesh: Mesh) -> int:
    """Attention data-parallel groups (1: none)."""
    return dict(mesh.shape).get("attn_dp", 1)


def tp_mesh(mesh: Mesh) -> Mesh:
    """The mesh's tp axis alone, for a mesh whose other axes have size 1: Mosaic GPU's collective
    kernels address their peers by one device index and refuse a mesh of more axes."""
    assert mesh.devices.size == mesh.shape["tp"], mesh.shape
    return Mesh(mesh.devices.reshape(-1), ("tp",), axis_types=(AxisType.Auto,))


def stage_mesh(mesh: Mesh, stage: int) -> Mesh:
    """The sub-mesh that runs pipeline stage `stage` (the mesh's axes, pp of size 1)."""
    return Mesh(mesh.devices[stage: stage + 1], mesh.axis_names,
                axis_types=(AxisType.Auto,) * len(mesh.axis_names))
