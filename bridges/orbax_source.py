"""jax-sp checkpoints in Orbax: `jax-sp convert SRC DST` writes one, `from_pretrained` reads it
(a weight source, sharding/weights.py).

Layout of DST: `jax_sp.json` (the ModelConfig and the parameter dtype), `params/` (an Orbax
StandardCheckpointer tree of the unpadded, layer-stacked parameters, nested by path), and
`tokenizer/` when the source had one. Restoring asks Orbax for each parameter directly in its
target sharding, so every device reads its own shard, wherever the parameter needs no padding for
this tp and the whole layer stack is wanted (pp=1); other parameters (padded heads, vocabulary or
MLP; a pipeline stage's layer range) come through host memory one parameter at a time and are
padded and placed like any other weight.

An FP8 source (a safetensors folder of F8_E4M3 weights and their scales) is written as the
weights its values and scales give, in the checkpoint's dtype, and its scales beside them in
`fp8_scales/` (float32, one per output channel: each FP8 weight's shape with its contracted axes
at 1): loaded with quantization="fp8", `fp8_scales()` gives them back and the weights come back
as the FP8 values the source stored (a 16-bit dequantized value divided by its scale rounds to
the same e4m3 value: 8 significant bits against e4m3's 4), as the safetensors folder itself
loads.

Format 2 (q apart from k/v: `w_q_dnh` [D, N, H], `w_kv_dckh` [D, 2, K, H], and their biases) is
read too: those two come through host memory and are fused by KV group on load.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np

from bridges.hf import group_qkv
from models.config import ModelConfig, RopeScaling
from models.quant import fp8_axes, fp8_weights
from sharding.padding import pad_param
from sharding.weights import Target, as_weights, stage_slice

MARKER = "jax_sp.json"
SCALES = "fp8_scales"  # an FP8 source's weight scales, beside params/
FORMAT = 3  # 2: k/v and gate/up stored fused; 3: q/k/v fused by KV group (w_qkv_dkch)
# format 2's q and k/v parameters -> the fused one (and the axis of the heads in q)
FORMAT2_QKV = {"layers/attn/w_qkv_dkch": ("layers/attn/w_q_dnh", "layers/attn/w_kv_dckh", 2),
               "layers/attn/b_qkv_kch": ("layers/attn/b_q_nh", "layers/attn/b_kv_ckh", 1)}


def is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def _nest(flat: dict) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        path = f"{prefix}/{k}" if prefix else k
        out.update(_flatten(v, path) if isinstance(v, dict) else {path: v})
    return out


def save(dst: str, cfg: ModelConfig, params, dtype: str, tokenizer=None) -> None:
    """Write `params` (a weight source, or a dict of unpadded arrays) as an Orbax checkpoint in
    dst, one parameter at a time through the host's CPU device."""
    import orbax.checkpoint as ocp

    if os.path.exists(dst) and os.listdir(dst):
        raise ValueError(f"{dst} exists and is not empty; choose a new folder")
    os.makedirs(dst, exist_ok=True)
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    source = as_weights(params)
    # unpadded, every layer, on the host: stacked parameters are the "layers/..." paths
    targets = {path: Target(("layers",) if path.startswith("layers/") else (),
                            source.shape(path), cpu) for path in source.keys()}
    flat = source.place(targets, None, np.dtype(jax.numpy.dtype(dtype)), (0, cfg.num_layers))
    scales = _fp8_scales(source, targets, cfg.num_layers)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(os.path.abspath(os.path.join(dst, "params")), _nest(flat))
        if scales:
            ckpt.save(os.path.abspath(os.path.join(dst, SCALES)), _nest(scales))
    config = dataclasses.asdict(cfg)
    json.dump({"format": FORMAT, "dtype": dtype, "config": config, SCALES: bool(scales)},
              open(os.path.join(dst, MARKER), "w"), indent=1)
    if tokenizer is not None:
        tokenizer.save_pretrained(os.path.join(dst, "tokenizer"))


def _fp8_scales(source, targets: dict, layers: int) -> dict:
    """An FP8 source's scale of every weight it stores in FP8 (any that quantization="fp8" or
    "fp8-head" quantizes), one per output channel on the host: {path: float32 array of the
    weight's shape with its contracted axes at 1}; {} for any other source."""
    view = getattr(source, "fp8_scales", lambda: None)()
    if view is None:
        return {}
    out = {}
    for path, (names, shape, sharding) in targets.items():
        name = path.rpartition("/")[2]
        if name not in fp8_weights("fp8-head"):
            continue
        axes = fp8_axes("fp8-head", name, names[:1] == ("layers",))
        one = tuple(1 if a in axes else n for a, n in enumerate(shape))
        (scale,) = view.place({path: Target(names, one, sharding)}, None, np.float32,
                              (0, layers), first_of=axes).values()
        if np.asarray(scale).any():  # 0: a tensor the source does not store in FP8
            out[path] = scale
    return out


def open_checkpoint(path: str):
    """-> (ModelConfig, OrbaxParams, dtype name) for a folder written by `save`."""
    meta = json.load(open(os.path.join(path, MARKER)))
    if meta.get("format") not in (2, FORMAT):
        raise ValueError(
            f"{path}: jax-sp checkpoint format {meta.get('format')}, this version reads formats "
            f"2 and {FORMAT} (k/v and gate/up fused); convert the original Hugging Face weights "
            f"again with `jax-sp convert`")
    c = dict(meta["config"])
    if c.get("rope_scaling"):
        c["rope_scaling"] = RopeScaling(**c["rope_scaling"])
    cfg = ModelConfig(**c)
    params = OrbaxParams(os.path.abspath(os.path.join(path, "params")),
                         fuse_qkv=meta["format"] == 2,
                         scales=os.path.abspath(os.path.join(path, SCALES))
                         if meta.get(SCALES) else None)
    return cfg, params, meta["dtype"]


class OrbaxParams:
    """The parameters of an Orbax checkpoint: a weight source (sharding/weights.py). scales:
    the folder of an FP8 source's scales (`fp8_scales`)."""

    def __init__(self, directory: str, fuse_qkv: bool = False, scales: str | None = None):
        import orbax.checkpoint as ocp

        self.directory, self.scales = directory, scales
        with ocp.StandardCheckpointer() as ckpt:
            meta = ckpt.metadata(directory)
        tree = getattr(meta, "item_metadata", None) or meta
        tree = getattr(tree, "tree", tree)
        self.meta = _flatten(dict(tree))
        # fused path -> its format-2 parts, for the parts this checkpoint has
        self.fused = {path: parts for path, parts in FORMAT2_QKV.items()
                      if fuse_qkv and parts[0] in self.meta}
        stored = {p for q, kv, _ in self.fused.values() for p in (q, kv)}
        self.paths = [p for p in self.meta if p not in stored] + list(self.fused)

    def keys(self):
        return list(self.paths)

    def fp8_scales(self) -> "_Scales | None":
        """The FP8 source's scales this checkpoint keeps, placed as their weights are (one
        value a channel: targets of the weight's shape with its contracted axes at 1), or None
        when the source was not FP8; jax_sp/runtime.py places them as it does LazyParams'."""
        return None if self.scales is None else _Scales(self.scales)

    def __iter__(self):
        return iter(self.paths)

    def shape(self, path: str) -> tuple[int, ...]:
        if path in self.fused:  # format 2: q [.., N, H] and k/v [.., 2, K, H] -> [.., K, C, H]
            q_path, kv_path, axis = self.fused[path]
            q, kv = tuple(self.meta[q_path].shape), tuple(self.meta[kv_path].shape)
            k = kv[axis + 1]
            return (*q[:axis], k, q[axis] // k + 2, *q[axis + 1:])
        return tuple(self.meta[path].shape)

    def place(self, targets: dict, plan, dtype, layers: tuple[int, int]) -> dict:
        """targets: path -> Target(names, padded shape, sharding) -> {path: device array}."""
        import orbax.checkpoint as ocp

        cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
        start, end = layers
        # a parameter whose devices all belong to other processes (a pipeline stage held
        # elsewhere) is not read here: this process only makes its (shard-less) global array
        out = {path: jax.make_array_from_single_device_arrays(tuple(shape), sharding, [],
                                                              dtype=dtype)
               for path, (_, shape, sharding) in targets.items()
               if not sharding.addressable_devices}
        needed = {p for path in targets if path not in out
                  for p in (self.fused[path][:2] if path in self.fused else (path,))}
        abstract, direct = {}, {}
        for path in needed:
            m = self.meta[path]
            shape, stored = tuple(m.shape), np.dtype(m.dtype)
            want = targets.get(path)
            whole = want is not None and (not want[0] or want[0][0] != "layers" or (
                start == 0 and end == shape[0]))
            direct[path] = want is not None and whole and tuple(want[1]) == shape
            sharding = want[2] if direct[path] else cpu
            abstract[path] = jax.ShapeDtypeStruct(shape, stored, sharding=sharding)
        if not abstract:  # every process restores (Orbax synchronises them): the smallest
            path = min(self.meta, key=lambda p: np.prod(self.meta[p].shape))  # one, if no other
            abstract[path] = jax.ShapeDtypeStruct(tuple(self.meta[path].shape),
                                                  np.dtype(self.meta[path].dtype), sharding=cpu)
        tree = _nest(abstract)
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckpt:
            restored = _flatten(ckpt.restore(self.directory, args=ocp.args.PyTreeRestore(
                item=tree, restore_args=ocp.checkpoint_utils.construct_restore_args(tree),
                partial_restore=True)))
        for path, (names, shape, sharding) in targets.items():
            if path in out:
                continue
            if path in self.fused:  # format 2: q [.., N, H] and k/v [.., 2, K, H]
                q_path, kv_path, axis = self.fused[path]
                q, kv = np.asarray(restored.pop(q_path)), np.asarray(restored.pop(kv_path))
                host = group_qkv(q, kv[..., 0, :, :], kv[..., 1, :, :], axis)
                del q, kv
            else:
                x = restored.pop(path)
                if direct[path]:
                    out[path] = x.astype(dtype) if x.dtype != dtype else x
                    continue
                host = np.asarray(x)
                del x
            host = stage_slice(host, names, layers)
            out[path] = jax.device_put(pad_param(host, names, plan).astype(dtype), sharding)
        return out


class _Scales(OrbaxParams):
    """An FP8 source's scales (`fp8_scales/`): a weight the source did not store in FP8 has
    none, and gets 0 (quantize_weight then takes its channels' maxima)."""

    def place(self, targets: dict, plan, dtype, layers: tuple[int, int],
              first_of: tuple = ()) -> dict:
        stored = {path: t for path, t in targets.items() if path in self.meta}
        out = super().place(stored, plan, dtype, layers) if stored else {}
        for path, (_, shape, sharding) in targets.items():
            if path not in out:
                out[path] = jax.device_put(np.zeros(shape, dtype), sharding)
        return out
