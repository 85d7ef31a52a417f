"""GGUF files (llama.cpp's format), memory-mapped and dequantized a block of rows at a time
(bridges/streaming.py places them)."""

from __future__ import annotations

import types
from typing import NamedTuple

import numpy as np

from bridges.hf import config_from_hf
from bridges.streaming import CheckpointError, TensorSource
from models.config import ModelConfig

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


