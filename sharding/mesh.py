"""The ("pp", "cfg", "tp") device mesh, and the per-stage sub-meshes of a pipeline.

Axes are Auto (GSPMD propagation), because jax-sp states layouts as sharding constraints that
XLA completes; `jax.make_mesh` would default to Explicit axes.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

AXES = ("pp", "cfg", "tp")


def make_mesh(tp: int, pp: int = 1, devices=None, cfg: int = 1) -> Mesh:
    """pp x cfg x tp devices: a pipeline stage's cfg groups (classifier-free guidance's two
    branches with ParallelConfig(cfg=2); one otherwise) of tp devices each."""
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
    grid = np.array(devices[: tp * pp * cfg], dtype=object).reshape(pp, cfg, tp)
    return Mesh(grid, AXES, axis_types=(AxisType.Auto,) * len(AXES))


def tp_mesh(mesh: Mesh) -> Mesh:
    """The mesh's tp axis alone, for a mesh whose other axes have size 1: Mosaic GPU's collective
    kernels address their peers by one device index and refuse a mesh of more axes."""
    assert mesh.devices.size == mesh.shape["tp"], mesh.shape
    return Mesh(mesh.devices.reshape(-1), ("tp",), axis_types=(AxisType.Auto,))


def stage_mesh(mesh: Mesh, stage: int) -> Mesh:
    """The sub-mesh that runs pipeline stage `stage` (shape (1, cfg, tp))."""
    return Mesh(mesh.devices[stage: stage + 1], AXES, axis_types=(AxisType.Auto,) * len(AXES))
