"""Flax NNX model math for Llama-family decoders. No mesh, no collectives, no parallel modes."""

from models.cache import CACHE_AXES, KVCache
from models.config import ModelConfig, RopeScaling
from models.layout import DENSE, Dense, Layout
from models.llama import IntermediateTensors, Llama

__all__ = ["CACHE_AXES", "DENSE", "Dense", "KVCache", "IntermediateTensors", "Layout", "Llama", "ModelConfig",
           "RopeScaling"]
