"""Moving an array between two equally sized meshes, also when they sit on different processes.

Within one process (or when XLA moves data between the two device sets itself) this is
`jax.device_put`. Across jax.distributed processes XLA:CPU's cross-host device_put did not
complete (jax 0.10), so there the move is a collective: the two meshes are stacked into one
(2, ...) mesh, the source rows and a zero buffer on the destination rows form one global array,
and a `ppermute` along the stacking axis carries every shard to the device in the same tp
position of the destination mesh. Every process makes the same call (multi-controller).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P


def _processes(mesh: Mesh) -> frozenset:
    return frozenset(d.process_index for d in mesh.devices.flat)


def move(x: jax.Array, dst: NamedSharding) -> jax.Array:
    """x (on a NamedSharding of one mesh) onto `dst`: the same spec on another mesh of the same
    size."""
    src = x.sharding
    if jax.process_count() == 1 or _processes(src.mesh) == _processes(dst.mesh):
        return jax.device_put(x, dst)
    spec = tuple(None if a == "pp" else a for a in src.spec)
    spec += (None,) * (x.ndim - len(spec))
    # the stage meshes' pp axes have size 1: stacked along it as "hop", the other axes kept
    axes = ("hop", *src.mesh.axis_names[1:])
    union = Mesh(np.concatenate([src.mesh.devices, dst.mesh.devices]), axes,
                 axis_types=(AxisType.Auto,) * len(axes))
    stacked = NamedSharding(union, P("hop", *spec))
    mine = {s.device: s.data for s in x.addressable_shards}
    shard_shape = stacked.shard_shape((2, *x.shape))
    parts = []
    for d in stacked.addressable_devices:
        if d in mine:
            parts.append(jnp.expand_dims(mine[d], 0))
        else:
            parts.append(jax.device_put(np.zeros(shard_shape, x.dtype), d))
    glob = jax.make_array_from_single_device_arrays((2, *x.shape), stacked, parts)
    out = _hop(union, P("hop", *spec))(glob)
    targets = set(dst.mesh.devices.flat)
    arrays = [s.data[0] for s in out.addressable_shards if s.device in targets]
    return jax.make_array_from_single_device_arrays(x.shape, dst, arrays, dtype=x.dtype)


@functools.cache
def _hop(mesh: Mesh, spec: P):
    body = functools.partial(jax.lax.ppermute, axis_name="hop", perm=[(0, 1)])
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec,
                                 check_vma=False))
