"""Hugging Face safetensors folders: one `*.safetensors` file or shards listed in
model.safetensors.index.json, read row range by row range (bridges/streaming.py places them).

FP8 checkpoints in the common HF layout (vLLM's and llm-compressor's "fp8" format) load too:
a `*.weight` in F8_E4M3 beside its `*.weight_scale` (one float per tensor, or one per output
channel, [out] or [out, 1]) is dequantized row by row as it is read; a static `*.input_scale`
is not needed (quantization="fp8" scales activations per token) and is skipped, as are the
attention's calibrated scales (`self_attn.k_scale`, `v_scale`, ...; the FP8 KV cache runs
unscaled), with a warning. Block-wise scales are refused. The model then runs in its dtype, or
in FP8 again with quantization="fp8", with the values and scales it stores (`scale_view`: a
per-tensor scale becomes every output channel's)."""

from __future__ import annotations

import json
import logging
import math
import os
import types

import ml_dtypes
import numpy as np

from bridges.hf import config_from_hf
from bridges.streaming import CheckpointError, TensorSource
from models.config import ModelConfig

log = logging.getLogger(__name__)
_FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
# an FP8 checkpoint's calibrated attention scales (llm-compressor's and vLLM's kv-cache schemes:
# self_attn.k_scale / v_scale, q_scale and prob_scale; older ones: k_proj.output_scale,
# AutoFP8's self_attn.kv_scale)
_ATTENTION_SCALES = tuple(f"self_attn.{n}" for n in ("k_scale", "v_scale", "q_scale",
                                                     "prob_scale", "kv_scale")) + tuple(
    f"self_attn.{p}_proj.output_scale" for p in "qkv")
_SAFETENSORS_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
                       "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": _FP8}


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
        # as on disk; `shapes` and `dtypes` are what reads return (FP8 dequantized)
        self._stored, self._stored_shapes = dict(self.dtypes), dict(self.shapes)
        self._scales = self._fp8_scales()

    def _fp8_scales(self) -> dict[str, np.ndarray]:
        """FP8 weight key -> its scale, [1] or [out] (read whole: it is small); the scale
        tensors themselves are no parameters and leave the key list."""
        scales = {}
        for key in [k for k, d in self._stored.items() if d == _FP8]:
            name = key + "_scale"
            if key + "_scale_inv" in self.shapes:  # DeepSeek-V3's, Qwen3-FP8's
                raise CheckpointError(f"{self._where[key][2]}: {key} has a {key}_scale_inv: "
                                      f"block-wise FP8 scales are not supported (one scale "
                                      f"per tensor or per output channel is what loads)")
            if name not in self.shapes:
                raise CheckpointError(f"{self._where[key][2]}: FP8 tensor {key} has no {name}; "
                                      f"an FP8 checkpoint stores each weight's scale beside it")
            out = self.shapes[key][0]
            if math.prod(self.shapes[name]) != 1 and tuple(self.shapes[name]) not in (
                    (out,), (out, 1)):
                block = " (block-wise FP8 scales are not supported)" if len(
                    self.shapes[name]) == 2 and self.shapes[name][1] > 1 else ""
                raise CheckpointError(f"{self._where[name][2]}: {name} has shape "
                                      f"{list(self.shapes[name])}; expected one scale ([] or "
                                      f"[1]), or one per output channel ([{out}] or [{out}, "
                                      f"1]){block}")
            scales[key] = self._read(name, np.arange(self.shapes[name][0]) if
                                     self.shapes[name] else None).astype(np.float32).reshape(-1)
            self.dtypes[key] = np.dtype(np.float32)
        for key in [k for k in self.shapes if k.endswith((".weight_scale", ".input_scale"))
                    and k.rsplit(".", 1)[0] + ".weight" in self._stored]:
            del self.shapes[key], self.dtypes[key]
        attention = [k for k in self.shapes if k.endswith(_ATTENTION_SCALES)]
        if attention:
            log.warning("%s: %d attention scale tensor(s) (%s, ...) are not used: the FP8 KV "
                        "cache (kv_cache_dtype='fp8') stores keys and values unscaled, "
                        "saturated at +-448", self.description, len(attention), attention[0])
            for key in attention:
                del self.shapes[key], self.dtypes[key]
        return scales

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
        data = self._read_stored(key, sorted_rows)
        scale = getattr(self, "_scales", {}).get(key)
        if scale is None:
            return data
        scale = scale if scale.size == 1 else scale[sorted_rows]
        return data.astype(np.float32) * scale.reshape(-1, *[1] * (data.ndim - 1))

    def scale_view(self) -> TensorSource | None:
        """None without FP8 tensors; else a source of the same tensors whose values are each
        value's FP8 scale (0 for a tensor that is not FP8): placed as the parameters are, it
        gives every parameter value its checkpoint scale, so quantization="fp8" keeps the
        checkpoint's FP8 values (models/quant.py quantize_weight's `scale`)."""
        return _ScaleView(self) if self._scales else None

    def _read_stored(self, key, sorted_rows):
        fd, start, path = self._where[key]
        shape, dtype = self._stored_shapes[key], self._stored[key]
        if len(shape) == 0:
            return np.frombuffer(os.pread(fd, dtype.itemsize, start), dtype)
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



class _ScaleView(TensorSource):
    def __init__(self, source: SafetensorsSource):
        self.source, self.shapes, self.description = source, source.shapes, source.description
        self.dtypes = {k: np.dtype(np.float32) for k in source.shapes}

    def _read(self, key, sorted_rows):
        shape = (len(sorted_rows), *self.shapes[key][1:])
        scale = self.source._scales.get(key)
        if scale is None:
            return np.zeros(shape, np.float32)
        scale = scale if scale.size == 1 else scale[sorted_rows]
        return np.broadcast_to(scale.reshape(-1, *[1] * (len(shape) - 1)), shape)


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


