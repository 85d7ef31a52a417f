"""Weights from any source onto a stage's devices: one protocol, four sources.

A weight source has `keys()` (the jax-sp parameter paths it holds, layers stacked), `shape(path)`
(a parameter's shape as held: unpadded, every layer) and `place(targets, plan, dtype, layers) -> {path: jax.Array}`: for each path a stage needs, a
Target (the parameter's logical axis names, its padded global shape, its sharding), the padding
plan for this tp, the parameter dtype and the stage's [start, end) of the stacked layers.
Every source holds the whole model; each stage asks for its own part.

- `ArrayWeights` (here): a dict of unpadded host arrays (bridges/hf.py's from a torch module,
  jax_sp/train.py's after fine-tuning).
- `bridges.streaming.LazyParams` over a Hugging Face safetensors folder
  (bridges/safetensors_source.py) or a GGUF file (bridges/gguf_source.py): each device's block
  is read from disk on its own.
- `bridges.orbax_source.OrbaxParams`: a `jax-sp convert` checkpoint, restored by Orbax straight
  into the target shardings where no padding is needed.

All of them pad by sharding/padding.py's per-axis index maps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import numpy as np

from sharding.padding import PaddingPlan, pad_param


class Target(NamedTuple):
    names: tuple  # logical axis names ("layers", "embed", "qkv_heads", ...)
    shape: tuple  # global shape after padding (a stage's layers only)
    sharding: jax.sharding.Sharding


@runtime_checkable
class WeightSource(Protocol):
    def keys(self) -> Iterable[str]: ...

    def shape(self, path: str) -> tuple[int, ...]: ...

    def place(self, targets: dict[str, Target], plan: PaddingPlan | None, dtype,
              layers: tuple[int, int]) -> dict[str, jax.Array]: ...


def stage_slice(x, names: tuple, layers: tuple[int, int]):
    """A stacked parameter's layers [start, end); any other parameter as it is."""
    return x[layers[0]:layers[1]] if names and names[0] == "layers" else x


class ArrayWeights:
    """Unpadded host arrays by parameter path (layers stacked), padded and put on the devices
    one parameter at a time."""

    def __init__(self, params: Mapping):
        self.params = params

    def keys(self):
        return self.params.keys()

    def shape(self, path):
        return tuple(np.shape(self.params[path]))

    def place(self, targets, plan, dtype, layers):
        out = {}
        for path, (names, shape, sharding) in targets.items():
            x = pad_param(stage_slice(np.asarray(self.params[path]), names, layers), names, plan)
            if x.shape != tuple(shape):
                raise ValueError(f"parameter {path} has shape {x.shape} after padding; the "
                                 f"model needs {tuple(shape)}")
            out[path] = jax.device_put(x.astype(dtype), sharding)
        return out


def as_weights(params) -> WeightSource:
    """A weight source as it is; a mapping of host arrays as ArrayWeights."""
    return params if isinstance(params, WeightSource) else ArrayWeights(params)


def check_keys(source: WeightSource, expected, whole_model: bool) -> None:
    """Missing parameters are an error; so are unexpected ones when `expected` is the whole
    model's set (a pipeline stage needs only some of a source's)."""
    have, expected = set(source.keys()), set(expected)
    missing = expected - have
    unexpected = have - expected if whole_model else set()
    if missing or unexpected:
        raise ValueError(f"parameters do not match the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
