"""Checkpoint files streamed straight to device shards, whatever the tensor file format.

A tensor file is read through a `TensorSource`: its tensor names (Hugging Face keys), shapes
and dtypes, and `read_rows(key, rows)`, which reads only the requested rows of a tensor
(bridges/safetensors_source.py: `os.pread` of the row ranges, nothing memory-mapped;
bridges/gguf_source.py: row blocks dequantized on their own). `LazyParams` maps a source onto
jax-sp's parameters with the key table of bridges/hf.py, checks every name and shape before
anything is allocated, and is a weight source (sharding/weights.py): each device's block is
assembled from the rows it holds (column splits, row splits, KV-head replication and head /
vocabulary / MLP padding, by sharding/padding.py's index maps), so the whole model never sits in
host memory and no device holds more than its shard. bfloat16 stays bfloat16 from file to
device.
"""

from __future__ import annotations

import ctypes
import functools
import math
import sys
import time

import jax
import numpy as np

from bridges.hf import GROUPED, _groups, check_names, sizes_of
from models.config import ModelConfig
from sharding.padding import index_map

CHUNK_BYTES = 64 << 20  # rows are read at most this many bytes at a time
# the letters of bridges/hf.py's parameter dims that padding touches -> their logical axes
PADDED_AXES = {"N": "heads", "K": "kv_heads", "V": "vocab", "F": "mlp"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key and parameter."""


class TensorSource:
    """Tensors by Hugging Face key. Subclasses give `shapes`, `dtypes` and `_read(key, rows)`."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    description: str

    def keys(self):
        return self.shapes.keys()

    def read_rows(self, key: str, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (any order, repeats allowed) of tensor `key`: [len(rows), *shape[1:]]."""
        rows = np.asarray(rows, np.int64)
        shape = self.shapes[key]
        if len(shape) == 0 or not rows.size:
            return np.zeros((len(rows), *shape[1:]), self.dtypes[key])
        uniq, back = np.unique(rows, return_inverse=True)
        return self._read(key, uniq)[back]

    def _read(self, key: str, sorted_rows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def close(self):
        pass



def _index_map(letter: str, size: int, plan) -> np.ndarray:
    """For each position of a padded axis, the source index it copies (-1: zero)."""
    return index_map(PADDED_AXES.get(letter, ""), size, plan)


def _flat_index(maps: list[np.ndarray], sizes: list[int]) -> np.ndarray:
    """Row-major flat source index of every combination of the per-letter maps (-1 if any is)."""
    flat = np.zeros(1, np.int64)
    valid = np.ones(1, bool)
    for m, size in zip(maps, sizes):
        flat = (flat[:, None] * size + np.maximum(m, 0)[None, :]).reshape(-1)
        valid = (valid[:, None] & (m >= 0)[None, :]).reshape(-1)
    return np.where(valid, flat, -1)


class Progress:
    """The weights' progress on stderr: tensors and bytes done. mode "live": one line updated
    in place (a terminal); "line": one line when done, if that took a second or more (stderr
    is not a terminal); "off": nothing."""

    def __init__(self, total_tensors: int, total_bytes: int, mode: str):
        self.n, self.total, self.bytes, self.total_bytes = 0, total_tensors, 0, total_bytes
        self.mode, self.t0 = mode, time.perf_counter()

    def step(self, nbytes: int):
        self.n += 1
        self.bytes += nbytes
        seconds = time.perf_counter() - self.t0
        done = self.n == self.total
        if self.mode == "live" or (self.mode == "line" and done and seconds >= 1.0):
            sys.stderr.write(f"{'' if self.mode == 'line' else chr(13)}jax-sp: loading weights: "
                             f"{self.n}/{self.total} tensors, {self.bytes / 1e9:.2f}/"
                             f"{self.total_bytes / 1e9:.2f} GB, {seconds:.1f} s"
                             f"{chr(10) if done else ''}")
            sys.stderr.flush()


class LazyParams:
    """jax-sp parameters (unpadded, stacked over layers) backed by a TensorSource: `keys()` are
    jax-sp parameter paths, `build` makes one padded, sharded device array without ever holding
    the whole tensor. All names and shapes are checked on construction."""

    def __init__(self, source: TensorSource, cfg: ModelConfig, progress: bool | None = None):
        self.source, self.cfg = source, cfg
        expected = check_names(cfg, source.keys(), source.description, CheckpointError)
        self.sizes = sizes_of(cfg)
        # path -> dims, transpose and keys: per layer (or once), the HF key of each C part
        self.entries: dict[str, dict] = {}
        for hf_key, path, layer, transpose, dims, part in expected:
            shape = source.shapes[hf_key]
            target = tuple(self.sizes[d] for d in dims.replace("C", ""))
            stored = tuple(reversed(shape)) if transpose else shape
            if not _groups(stored, target):
                raise CheckpointError(
                    f"{source.description}: tensor {hf_key} has shape {shape}, which does not "
                    f"fit parameter {path} [{dims}] = {target}"
                    + ("" if part is None else f" (part {part})"))
            e = self.entries.setdefault(path, {"dims": GROUPED.get(path, dims),
                                               "transpose": transpose,
                                               "stacked": layer is not None, "keys": {}})
            e["keys"].setdefault(layer, []).append(hf_key)  # KEY_TABLE lists parts in order
        for e in self.entries.values():
            e["keys"] = list(e["keys"].values())
        self.total_bytes = sum(self._bytes(e["keys"]) for e in self.entries.values())
        mode = {True: "live", False: "off"}.get(progress) or (
            "live" if sys.stderr.isatty() else "line")
        self.progress = Progress(len(self.entries), self.total_bytes, mode)

    def _bytes(self, keys) -> int:
        return sum(math.prod(self.source.shapes[k]) * self.source.dtypes[k].itemsize
                   for parts in keys for k in parts)

    def keys(self):
        return self.entries.keys()

    def shape(self, path: str) -> tuple[int, ...]:
        e = self.entries[path]
        sizes = dict(self.sizes, C=self.cfg.num_heads // self.cfg.num_kv_heads + 2) if (
            path in GROUPED) else self.sizes
        dims = tuple(sizes[d] for d in e["dims"])
        return (len(e["keys"]), *dims) if e["stacked"] else dims

    def __iter__(self):
        return iter(self.entries)

    def _split(self, dims: str, transpose: bool, shape) -> tuple[str, str]:
        """The target letters that the stored tensor's rows and columns hold."""
        if len(shape) == 1:
            return dims, ""
        rows = shape[0]  # stored [out, in]; transposed, the target is [in..., out...]
        acc, cut = 1, 0
        letters = dims if not transpose else dims[::-1]
        while acc < rows:  # rows are the leading letters in stored order
            acc *= self.sizes[letters[cut]]
            cut += 1
        row_letters = letters[:cut] if not transpose else letters[:cut][::-1]
        col_letters = "".join(c for c in dims if c not in row_letters)
        return row_letters, col_letters

    def block(self, hf_key: str, dims: str, transpose: bool, plan, index, dtype) -> np.ndarray:
        """One layer's padded block `index` (slices over the padded target dims) of a tensor."""
        shape = self.source.shapes[hf_key]
        row_letters, col_letters = self._split(dims, transpose, shape)
        padded = {c: _index_map(c, self.sizes[c], plan) for c in dims}
        sel = {c: padded[c][s] for c, s in zip(dims, index)}
        rows = _flat_index([sel[c] for c in row_letters], [self.sizes[c] for c in row_letters])
        cols = (_flat_index([sel[c] for c in col_letters], [self.sizes[c] for c in col_letters])
                if col_letters else None)
        out = np.zeros((len(rows), len(cols) if cols is not None else 1), dtype)
        real = np.flatnonzero(rows >= 0)
        row_bytes = (shape[1] if len(shape) > 1 else 1) * self.source.dtypes[hf_key].itemsize
        step = max(1, CHUNK_BYTES // row_bytes)
        for at in range(0, len(real), step):  # bounded reads; columns kept per chunk
            which = real[at: at + step]
            data = self.source.read_rows(hf_key, rows[which])
            if cols is not None:
                data = np.where(cols >= 0, data[:, np.maximum(cols, 0)], 0)
            out[which] = data.reshape(len(which), -1).astype(dtype, copy=False)
        # rows then columns in stored order -> the target's letter order
        got = out.reshape([len(sel[c]) for c in row_letters + col_letters])
        order = [(row_letters + col_letters).index(c) for c in dims]
        return np.ascontiguousarray(got.transpose(order))

    def build(self, path: str, names: tuple, plan, shape, sharding, dtype,
              layer_offset: int = 0, first_of: tuple = ()) -> jax.Array:
        """The padded parameter `path` of global `shape` as a device array with `sharding`;
        for stacked parameters, layers [layer_offset, layer_offset + shape[0]). first_of: axes
        of size 1 in `shape` that hold the parameter's first position only (on every padded
        axis a real one), unsharded.

        One device at a time: its block is filled in place (layer by layer for stacked
        parameters), copied to the device and dropped before the next device's is read, so the
        host holds at most one device block beyond what is already placed (and the memory the
        reads freed goes back to the OS as they go)."""
        e = self.entries[path]
        stacked = names[:1] == ("layers",)
        dtype = np.dtype(dtype)
        shards = []
        for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
            index = tuple(slice(0, 1) if a in first_of else s for a, s in enumerate(index))
            sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)]
            host = np.empty(sizes, dtype)
            if stacked:
                layers = range(*index[0].indices(shape[0]))
                for i, layer in enumerate(layers):
                    self._fill(host[i], e, e["keys"][layer_offset + layer], plan, index[1:])
            else:
                self._fill(host, e, e["keys"][0], plan, index)
            shard = jax.device_put(host, device)
            shard.block_until_ready()
            del host
            _release_freed_memory()
            shards.append(shard)
        # dtype: a process that holds none of the sharding's devices has no shard to infer it
        # from (a pipeline stage, or a mesh, on other processes)
        out = jax.make_array_from_single_device_arrays(tuple(shape), sharding, shards,
                                                       dtype=dtype)
        keys = e["keys"][layer_offset: layer_offset + shape[0]] if stacked else e["keys"]
        self.progress.step(self._bytes(keys))
        return out

    def fp8_scales(self) -> "LazyParams | None":
        """The checkpoint's FP8 scale of every parameter value, placed as the parameters are
        (TensorSource.scale_view), or None when the source stores no FP8 tensors. A weight's
        values share their output channel's scale: place it with `first_of` its contracted
        axes, one value a channel."""
        view = getattr(self.source, "scale_view", lambda: None)()
        return None if view is None else LazyParams(view, self.cfg, progress=False)

    def place(self, targets, plan, dtype, layers, first_of: tuple = ()):
        """The weight-source protocol (sharding/weights.py): each target built device by device,
        a stage's layers [start, end) of the stacked ones (first_of: as `build`)."""
        return {path: self.build(path, t.names, plan, t.shape, t.sharding, dtype,
                                 layer_offset=layers[0], first_of=first_of)
                for path, t in targets.items()}

    def _fill(self, host, e, parts, plan, index):
        """Write one layer's block `index` of parameter entry e into host; parts: the HF key of
        each C part (one key when e has no C axis)."""
        dims = e["dims"]
        if dims in GROUPED.values():
            self._fill_qkv(host, e, parts, plan, index)
            return
        if "C" not in dims:
            host[...] = self.block(parts[0], dims, e["transpose"], plan, index, host.dtype)
            return
        axis = dims.index("C")
        rest = index[:axis] + index[axis + 1:]
        for j, part in enumerate(range(*index[axis].indices(len(parts)))):
            host[(slice(None),) * axis + (j,)] = self.block(
                parts[part], dims.replace("C", ""), e["transpose"], plan, rest, host.dtype)

    def _fill_qkv(self, host, e, parts, plan, index):
        """One layer's block of the fused q/k/v weight [D, K'', C'', H] (bias [K'', C'', H]),
        C'' = G'' + 2: each KV replica's G'' = G / r query heads, then its k and v. The query
        heads of replicas [a, b) are the padded heads [a*G'', b*G''), in order."""
        dims, transpose = e["dims"], e["transpose"]
        axis = dims.index("K")
        group = (plan.padded_heads // plan.padded_kv_heads if plan is not None
                 else self.cfg.num_heads // self.cfg.num_kv_heads)
        ks, cs = index[axis], index[axis + 1]
        start = ks.start or 0  # device blocks are contiguous
        stop = start + host.shape[axis]
        rest = index[:axis] + index[axis + 2:]
        q_dims = dims.replace("KC", "N")
        q = self.block(parts[0], q_dims, transpose, plan,
                       rest[:axis] + (slice(start * group, stop * group),) + rest[axis:],
                       host.dtype)
        q = q.reshape(*q.shape[:axis], stop - start, group, *q.shape[axis + 1:])
        kv_dims = dims.replace("C", "")
        for j, c in enumerate(range(*cs.indices(group + 2))):
            out = (slice(None),) * (axis + 1) + (j,)
            if c < group:
                host[out] = q[(slice(None),) * (axis + 1) + (c,)]
            else:
                host[out] = self.block(parts[1 + c - group], kv_dims, transpose, plan,
                                       index[:axis + 1] + index[axis + 2:], host.dtype)


@functools.cache
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def _release_freed_memory():
    """Give memory freed by the last block's reads back to the OS. glibc keeps freed blocks of
    up to 32 MB in its heaps (the mmap threshold grows to the largest block freed), so
    without this the reads of a 1 GB checkpoint leave ~100 MB resident that nothing uses."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


