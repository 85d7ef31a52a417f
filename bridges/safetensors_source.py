"""Hugging Face safetensors folders: one `*.safetensors` file or shards listed in
model.safetensors.index.json, read row range by row range (bridges/streaming.py places them)."""

from __future__ import annotations

import json
import math
import os
import types

import ml_dtypes
import numpy as np

from bridges.hf import config_from_hf
from bridges.streaming import CheckpointError, TensorSource
from models.config import ModelConfig

_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16)}


class SafetensorsSource(TensorSource):
    """A folder of `*.safetensors` files (one, or shards listed in model.safetensors.index.json).
    Headers are parsed here (8-byte length, JSON) so that bf16 needs no framework and rows are
    read with `os.pread`."""

    def __init__(self, folder: str):
        index = os.path.join(folder, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                files = sorted(set(json.load(open(index))["weight_map"].values()))
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a safetensors index ({e})") from None
        else:
            files = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {folder}")
        self.description = f"{folder} ({len(files)} safetensors file(s))"
        self.shapes, self.dtypes, self._where = {}, {}, {}
        self._fds = []
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{path} is listed in the index but missing")
            fd = os.open(path, os.O_RDONLY)
            self._fds.append(fd)
            for key, (shape, dtype, start) in self._header(path, fd).items():
                self.shapes[key], self.dtypes[key] = shape, dtype
                self._where[key] = (fd, start, path)

    @staticmethod
    def _header(path: str, fd: int) -> dict:
        size = os.fstat(fd).st_size
        head = os.pread(fd, 8, 0)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise CheckpointError(f"{path} is not a complete safetensors file (header length "
                                  f"{n}, file size {size} bytes): truncated or corrupted?")
        try:
            header = json.loads(os.pread(fd, n, 8))
        except ValueError as e:
            raise CheckpointError(f"{path} has a corrupted safetensors header ({e})") from None
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key} has dtype {info['dtype']}; "
                                      f"supported: {', '.join(_SAFETENSORS_DTYPES)}")
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if end - begin != math.prod(shape) * dtype.itemsize or 8 + n + end > size:
                raise CheckpointError(
                    f"{path}: tensor {key} needs bytes {8 + n + begin}..{8 + n + end} but the "
                    f"file has {size}: the file is truncated or corrupted")
            out[key] = (shape, dtype, 8 + n + begin)
        return out

    def _read(self, key, sorted_rows):
        fd, start, path = self._where[key]
        shape, dtype = self.shapes[key], self.dtypes[key]
        if len(shape) == 1:
            data = np.frombuffer(os.pread(fd, shape[0] * dtype.itemsize, start), dtype)
            return data[sorted_rows]
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        out = np.empty((len(sorted_rows), *shape[1:]), dtype)
        # runs of consecutive rows are one read each
        breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
        at = 0
        for run in np.split(sorted_rows, breaks):
            nbytes = len(run) * row_bytes
            buf = os.pread(fd, nbytes, start + int(run[0]) * row_bytes)
            if len(buf) != nbytes:
                raise CheckpointError(f"{path}: short read of {key} (file truncated?)")
            out[at: at + len(run)] = np.frombuffer(buf, dtype).reshape(len(run), *shape[1:])
            at += len(run)
        return out

    def close(self):
        for fd in self._fds:
            os.close(fd)
        self._fds = []



def hf_folder_config(folder: str) -> ModelConfig:
    """ModelConfig from a Hugging Face config.json (read as plain JSON: no transformers)."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder} has no config.json; a Hugging Face model folder "
                              f"holds config.json and *.safetensors")
    try:
        raw = json.load(open(path))
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None
    return config_from_hf(types.SimpleNamespace(**raw))


