"""Checkpoints streamed straight to device shards: Hugging Face safetensors folders and GGUF files.

A checkpoint is read through a `TensorSource`: its tensor names (Hugging Face keys), shapes and
dtypes, and `read_rows(key, rows)`, which reads only the requested rows of a tensor from disk
(`os.pread` of the row ranges for safetensors, so nothing is memory-mapped into the process;
row blocks dequantized on their own for GGUF). `LazyParams` maps a source onto jax-sp's
parameters with the key table of `bridges/hf.py`, checks every name and shape before anything is
allocated, and builds each parameter with `jax.make_array_from_callback`: each device's block is
assembled from the rows it holds — column splits, row splits, KV-head replication and head /
vocabulary / MLP padding included — so the whole model never sits in host memory and no device
holds more than its shard. bfloat16 stays bfloat16 from file to device.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import sys
import time
import types
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np

from bridges.hf import GROUPED, _groups, check_names, config_from_hf, sizes_of
from models.config import ModelConfig
from sharding.padding import PaddingPlan

CHUNK_BYTES = 64 << 20  # rows are read at most this many bytes at a time


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file, key and parameter."""


# -- sources ---------------------------------------------------------------------------------


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


# llama.cpp's tensor names -> Hugging Face keys ({i}: layer)
GGUF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}  # GGUF arch -> HF model_type


def _gguf_to_hf(name: str) -> str | None:
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        pattern = ".".join(["blk", "{i}", *parts[2:]])
        hf = GGUF_NAMES.get(pattern)
        return hf.format(i=parts[1]) if hf else None
    return GGUF_NAMES.get(name)


class _GGUFTensor(NamedTuple):
    name: str
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # memory-mapped: elements, or bytes per row for block-quantized types


class GGUFSource(TensorSource):
    """A GGUF file, memory-mapped, dequantized a block of rows at a time: F32, F16, BF16, Q8_0,
    Q4_0, Q4_1, Q4_K, Q6_K and the other types `gguf.quants` knows. llama.cpp stores Llama q/k
    rows permuted for its RoPE; rows are mapped back to Hugging Face order on read.

    The metadata and tensor table come from `gguf.GGUFReader` the first time a file is read and
    from `bridges.cache` after that (`table`): the reader's parse of the vocabulary arrays is
    most of a small model's load time, and nothing here needs them."""

    def __init__(self, path: str, table: dict | None = None):
        import gguf

        self.gguf = gguf
        self.description = path
        if table is None:
            table = self.read_table(path)
        self.table = table
        self.fields = table["fields"]
        self._mm = np.memmap(path, np.uint8, "r")
        self.arch = self.field("general.architecture")
        if self.arch not in GGUF_ARCHITECTURES:
            raise CheckpointError(f"{path}: unsupported GGUF architecture {self.arch!r}; "
                                  f"supported: {', '.join(GGUF_ARCHITECTURES)}")
        self.shapes, self.dtypes, self._tensors = {}, {}, {}
        unknown = []
        for name, type_id, dims, offset in table["tensors"]:
            key = _gguf_to_hf(name)
            if key is None:
                unknown.append(name)
                continue
            qtype = gguf.GGMLQuantizationType(type_id)
            shape = tuple(int(n) for n in reversed(dims))  # GGUF lists ne0 (columns) first
            self.shapes[key] = shape
            self.dtypes[key] = np.dtype(np.float32)  # dequantized (F16 kept as F16)
            if qtype == gguf.GGMLQuantizationType.F16:
                self.dtypes[key] = np.dtype(np.float16)
            self._tensors[key] = _GGUFTensor(name, qtype, self._view(qtype, shape, offset))
        if unknown:
            raise CheckpointError(f"{path}: {len(unknown)} GGUF tensor(s) not in the key table: "
                                  f"{', '.join(unknown[:5])}")
        self.num_heads = int(self.field(f"{self.arch}.attention.head_count"))
        self.num_kv_heads = int(self.field(f"{self.arch}.attention.head_count_kv",
                                           self.num_heads))

    @staticmethod
    def read_table(path: str) -> dict:
        """{"fields": every scalar and string of the metadata, "tensors": [name, type, dims,
        absolute data offset]} through gguf.GGUFReader (JSON, for the cache)."""
        import gguf

        try:
            reader = gguf.GGUFReader(path)
        except Exception as e:  # noqa: BLE001 - the gguf package raises plain errors
            raise CheckpointError(f"could not read GGUF file {path}: {type(e).__name__}: {e} "
                                  f"(truncated or corrupted?)") from None
        fields = {}
        for name, f in reader.fields.items():
            if f.types and f.types[0] != gguf.GGUFValueType.ARRAY:
                value = f.contents()
                fields[name] = value.item() if hasattr(value, "item") else value
        tensors = [[t.name, int(t.tensor_type), [int(n) for n in t.shape], int(t.data_offset)]
                   for t in reader.tensors]
        return {"fields": fields, "tensors": tensors}

    def _view(self, qtype, shape, offset) -> np.ndarray:
        """The tensor's bytes in the file as the array gguf.GGUFReader gives: elements for
        F32/F16/BF16-like types, [rows, bytes] for block-quantized ones."""
        q = self.gguf.GGMLQuantizationType
        block, size = self.gguf.GGML_QUANT_SIZES[qtype]
        n_bytes = int(np.prod(shape)) * size // block
        raw = self._mm[offset: offset + n_bytes]
        if qtype == q.F32:
            return raw.view(np.float32).reshape(shape)
        if qtype == q.F16:
            return raw.view(np.float16).reshape(shape)
        return raw.reshape(self.gguf.quants.quant_shape_to_byte_shape(shape, qtype))

    def field(self, name, default=None):
        if name not in self.fields:
            if default is None:
                raise CheckpointError(f"{self.description}: GGUF metadata {name!r} is missing")
            return default
        return self.fields[name]

    def config(self) -> ModelConfig:
        a = self.arch
        scaling = self.field(f"{a}.rope.scaling.type", "none")
        if scaling != "none":
            raise CheckpointError(f"{self.description}: RoPE scaling {scaling!r} (GGUF "
                                  f"{a}.rope.scaling.type) is not supported; load the Hugging "
                                  f"Face folder, whose llama3 rope_scaling is")
        d = int(self.field(f"{a}.embedding_length"))
        n = self.num_heads
        fields = types.SimpleNamespace(
            model_type=GGUF_ARCHITECTURES[a], architectures=[a],
            vocab_size=self.shapes["model.embed_tokens.weight"][0], hidden_size=d,
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.field(f"{a}.block_count")),
            num_attention_heads=n, num_key_value_heads=self.num_kv_heads,
            head_dim=int(self.field(f"{a}.rope.dimension_count", d // n)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon")),
            rope_theta=float(self.field(f"{a}.rope.freq_base", 10000.0)),
            tie_word_embeddings="lm_head.weight" not in self.shapes,
            max_position_embeddings=int(self.field(f"{a}.context_length", 4096)),
            attention_bias="model.layers.0.self_attn.q_proj.bias" in self.shapes)
        return config_from_hf(fields)

    def _permuted(self, key: str) -> int:
        """Heads whose rows llama.cpp permuted in this tensor (0: none)."""
        if self.arch != "llama":
            return 0
        if key.endswith(("q_proj.weight", "q_proj.bias")):  # convert_hf_to_gguf permutes both
            return self.num_heads
        if key.endswith(("k_proj.weight", "k_proj.bias")):
            return self.num_kv_heads
        return 0

    def _read(self, key, sorted_rows):
        t = self._tensors[key]
        heads = self._permuted(key)
        rows = sorted_rows
        if heads:  # HF row n*H + j*H/2 + i is llama.cpp's row n*H + 2*i + j
            h = self.shapes[key][0] // heads
            n, r = np.divmod(rows, h)
            j, i = np.divmod(r, h // 2)
            rows = n * h + 2 * i + j
        raw = np.asarray(t.data[rows] if t.data.ndim > 1 else t.data[rows])
        qt = self.gguf.GGMLQuantizationType
        if t.tensor_type in (qt.F32, qt.F16):
            return raw
        out = self.gguf.quants.dequantize(raw, t.tensor_type)
        return out.reshape(len(rows), *self.shapes[key][1:]).astype(np.float32)


# -- parameters --------------------------------------------------------------------------------


def _index_map(letter: str, size: int, plan: PaddingPlan | None) -> np.ndarray:
    """For each position of a padded axis, the source index it copies (-1: zero)."""
    if plan is None:
        return np.arange(size)
    group = plan.num_heads // plan.num_kv_heads
    if letter == "N":
        real = plan.num_heads
        return np.where(np.arange(plan.kv_groups * group) < real,
                        np.arange(plan.kv_groups * group), -1)
    if letter == "K":
        g = np.repeat(np.arange(plan.kv_groups), plan.kv_repeat)
        return np.where(g < plan.num_kv_heads, g, -1)
    if letter in ("V", "F"):
        padded = plan.padded_vocab if letter == "V" else plan.padded_mlp
        return np.where(np.arange(padded) < size, np.arange(padded), -1)
    return np.arange(size)


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

    def unpadded_shape(self, path: str) -> tuple[int, ...]:
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
              layer_offset: int = 0) -> jax.Array:
        """The padded parameter `path` of global `shape` as a device array with `sharding`;
        for stacked parameters, layers [layer_offset, layer_offset + shape[0]).

        One device at a time: its block is filled in place (layer by layer for stacked
        parameters), copied to the device and dropped before the next device's is read, so the
        host holds at most one device block beyond what is already placed (and the memory the
        reads freed goes back to the OS as they go)."""
        e = self.entries[path]
        stacked = names[0] == "layers"
        dtype = np.dtype(dtype)
        shards = []
        for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
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


__all__ = ["CheckpointError", "GGUFSource", "LazyParams", "SafetensorsSource",
           "TensorSource", "hf_folder_config"]
