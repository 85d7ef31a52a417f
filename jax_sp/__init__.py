"""jax-sp: Megatron-style tensor + sequence parallelism for LLM inference in JAX/XLA.

    from jax_sp import LLM, ParallelConfig, SamplingParams
"""

from jax_sp.config import ModelConfig, ParallelConfig, SamplingParams
from jax_sp.engine import LLM

__all__ = ["LLM", "ModelConfig", "ParallelConfig", "SamplingParams"]
