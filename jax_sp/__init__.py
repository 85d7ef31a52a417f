"""jax-sp: Megatron-style tensor + sequence parallelism for LLM inference in JAX/XLA.

    from jax_sp import LLM, ParallelConfig, SamplingParams
"""

from jax_sp.config import CompileOptions, ModelConfig, ParallelConfig, SamplingParams
from jax_sp.engine import LLM, Completion
from models.llama import IntermediateTensors

__all__ = ["LLM", "CompileOptions", "Completion", "IntermediateTensors", "ModelConfig",
           "ParallelConfig", "SamplingParams"]
