"""Frozen, validated configs: ModelConfig (from models/), ParallelConfig, CompileOptions,
SamplingParams.

Each config checks itself in `__post_init__`; `check_parallel` checks a ParallelConfig against a
model and the devices present. Errors name the value and say what would work.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from models.config import ModelConfig, RopeScaling
from models.quant import FP8_GEMV_MODES, QUANTIZATIONS

__all__ = ["CompileOptions", "ModelConfig", "ParallelConfig", "RopeScaling", "SamplingParams",
           "check_devices", "check_parallel"]

SP_MODES = ("off", "on", "auto")
COMM_MODES = ("xla", "ring", "mosaic")
BOUNDARIES = ("scattered", "gather")
ATTENTION_MODES = ("auto", "xla", "cudnn", "pallas")
KV_CACHE_DTYPES = ("auto", "fp8")
ADD_NORM_MODES = ("auto", "xla", "pallas", "gemv")

# sp="auto" uses SP for forwards of at least this many (padded) tokens: the threshold measured
# for a tp where GPU timings exist (None: SP was slower at every size, so auto never uses it),
# else DEFAULT_SP_MIN_TOKENS. See docs/modes.md, "Choosing sp_min_tokens", for the measurements.
DEFAULT_SP_MIN_TOKENS = 256  # 4 simulated CPU devices: where SP starts to save memory
# 2 H100s over NVLink: SP with comm="xla" 0.66-0.96x of TP per layer below 4096 tokens, 0.97-1.02x
# from there, and whole 4-layer models 2-25% slower at every size up to 16384. 4 H200s over
# NVLink (Llama-3-8B layers): SP 0.60-0.78x per layer (xla; ring 0.76-0.82x) and whole models
# 0.60-0.81x at 1024-16384 tokens. None: auto never uses SP at that tp.
MEASURED_SP_MIN_TOKENS: dict[int, int | None] = {2: None, 4: None}


def _positive_int(owner, name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the model is split over devices. tp: tensor-parallel degree (devices per stage); pp:
    pipeline stages; sp: "off" (Megatron TP), "on" (TP + sequence parallelism), "auto" (SP for
    forwards of >= sp_min_tokens padded tokens, TP otherwise; default: `sp_threshold`); comm:
    "xla" (sharding annotations, XLA's collectives and its windowed einsums on GPU), "ring"
    (explicit shard_map collective matmul) or "mosaic" (SP's all-gathers inside JAX's Mosaic
    GPU all-gather matmul kernel, the reduce-scatters as "ring"; Hopper GPUs, 16-bit, one
    process owning every device). Pipeline: pp_layers (layer count of each stage; default
    vLLM's even split with the remainder on the stages before the last), pp_boundary
    ("scattered": (hidden, residual) stay token-sharded across a hop; "gather": vLLM's
    gather-on-receive), microbatches (a batch is cut into this many, and stage k of micro-batch
    i+1 runs while stage k+1 of micro-batch i does). cfg: classifier-free guidance's two
    branches batched on the same devices (1) or each on its half of the devices (2).
    attn_dp: attention in this many data-parallel groups of tp / attn_dp devices (SGLang's DP
    attention): each group attends for its own share of the batch with the KV heads split over
    its devices, so a model with fewer KV heads than tp stores each once per group instead of
    replicating them tp / K times; embedding, MLP and LM head stay split over all tp devices
    (docs/attn_dp.md)."""

    tp: int = 1
    pp: int = 1
    sp: str = "auto"
    comm: str = "xla"
    sp_min_tokens: int | None = None  # None: this tp's default (sp_threshold)
    pp_layers: tuple[int, ...] | None = None
    pp_boundary: str = "scattered"
    microbatches: int = 1
    cfg: int = 1
    attn_dp: int = 1

    def __post_init__(self):
        _positive_int("ParallelConfig", "tp", self.tp)
        _positive_int("ParallelConfig", "pp", self.pp)
        _positive_int("ParallelConfig", "attn_dp", self.attn_dp)
        if self.tp % self.attn_dp:
            divisors = [d for d in range(1, self.tp + 1) if self.tp % d == 0]
            raise ValueError(f"ParallelConfig.attn_dp={self.attn_dp} must divide tp={self.tp} "
                             f"(attention runs in attn_dp groups of tp / attn_dp devices); "
                             f"use one of {divisors}")
        if self.attn_dp > 1 and (self.comm == "mosaic" or self.cfg > 1):
            raise ValueError(f"ParallelConfig(attn_dp={self.attn_dp}) runs with comm='xla' or "
                             f"'ring' and cfg=1, not comm={self.comm!r}, cfg={self.cfg} (Mosaic's "
                             f"kernel takes a one-axis mesh; cfg=2 splits the batch itself)")
        if isinstance(self.cfg, bool) or self.cfg not in (1, 2):
            raise ValueError(f"ParallelConfig.cfg must be 1 (guidance's two branches batched on "
                             f"the same devices) or 2 (each branch on its half of the devices), "
                             f"got {self.cfg!r}")
        if self.cfg == 2 and (self.pp > 1 or self.comm != "xla"):
            raise ValueError(f"ParallelConfig(cfg=2) runs one pipeline stage with comm='xla' "
                             f"(the branches' halves split the batch, which the ring's and "
                             f"Mosaic's token layouts do not), not pp={self.pp}, "
                             f"comm={self.comm!r}")
        if self.sp_min_tokens is not None:
            _positive_int("ParallelConfig", "sp_min_tokens", self.sp_min_tokens)
        if self.sp not in SP_MODES:
            raise ValueError(f"ParallelConfig.sp must be one of {SP_MODES}, got {self.sp!r}")
        if self.comm not in COMM_MODES:
            raise ValueError(f"ParallelConfig.comm must be one of {COMM_MODES}, got {self.comm!r}")
        if self.pp_boundary not in BOUNDARIES:
            raise ValueError(f"ParallelConfig.pp_boundary must be one of {BOUNDARIES}, got "
                             f"{self.pp_boundary!r}")
        _positive_int("ParallelConfig", "microbatches", self.microbatches)
        if self.pp_layers is not None:
            object.__setattr__(self, "pp_layers", tuple(self.pp_layers))
            if len(self.pp_layers) != self.pp or any(
                    isinstance(n, bool) or not isinstance(n, int) or n < 1
                    for n in self.pp_layers):
                raise ValueError(f"ParallelConfig.pp_layers must list {self.pp} positive layer "
                                 f"counts (one per stage), got {self.pp_layers!r}")

    @property
    def sp_threshold(self) -> int | None:
        """sp="auto"'s threshold: sp_min_tokens, or when that is None the default for this tp
        (looked up here, not at construction, so dataclasses.replace(config, tp=...) gets its
        own); None: auto never uses SP at this tp."""
        if self.sp_min_tokens is not None:
            return self.sp_min_tokens
        return MEASURED_SP_MIN_TOKENS.get(self.tp, DEFAULT_SP_MIN_TOKENS)

    def use_sp(self, padded_tokens: int) -> bool:
        """Whether a forward of this many padded tokens runs with SP."""
        if self.sp == "auto":
            threshold = self.sp_threshold
            return self.tp > 1 and threshold is not None and padded_tokens >= threshold
        return self.sp == "on"

    def describe(self) -> str:
        pp = f" boundary={self.pp_boundary} microbatches={self.microbatches}" if self.pp > 1 else ""
        cfg = f" cfg={self.cfg}" if self.cfg > 1 else ""
        cfg += f" attn_dp={self.attn_dp}" if self.attn_dp > 1 else ""
        return f"tp={self.tp} pp={self.pp} sp={self.sp} comm={self.comm}{pp}{cfg}"


def check_devices(parallel: ParallelConfig, num_devices: int) -> None:
    need = parallel.tp * parallel.pp * parallel.cfg
    if need > num_devices:
        cpu = jax.devices()[0].platform == "cpu"
        what = "tp*pp*cfg" if parallel.cfg > 1 else "tp*pp"
        sizes = f"{parallel.tp}*{parallel.pp}" + (f"*{parallel.cfg}" if parallel.cfg > 1 else "")
        raise ValueError(
            f"{what} = {sizes} = {need} devices are needed but {num_devices} "
            f"are present; choose {what} <= {num_devices}"
            + (f", or simulate {need} CPU devices: set XLA_FLAGS="
               f"--xla_force_host_platform_device_count={need} in the environment before jax "
               f"is imported (the jax-sp CLI does this itself)" if cpu else ""))


def check_quantization(quantization, parallel: ParallelConfig) -> None:
    """quantization: None (the model's dtype), "fp8" (the layers' projections) or "fp8-head"
    (the LM head too; models/quant.py), with comm="xla" or "ring"."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if quantization and parallel.comm == "mosaic":
        raise ValueError(f"quantization={quantization!r} runs with comm='xla' or 'ring' (their "
                         f"gathers carry the FP8 tokens); comm='mosaic' has no FP8 kernel")


def check_fp8_devices(devices, what: str = "quantization='fp8' needs FP8 matmuls",
                      instead: str = "quantization=None") -> None:
    """FP8 matmuls (and the FP8 conversions of jax-sp's kernels) on GPU need Ada, Hopper or
    newer (compute capability 8.9+); XLA:CPU emulates them."""
    for d in devices:
        cc = getattr(d, "compute_capability", None)
        if d.platform == "gpu" and cc is not None and float(cc) < 8.9:
            raise ValueError(f"{what}: {d.device_kind} (compute capability {cc}) has none; use "
                             f"an H100/H200 or newer, or {instead}")


def check_devices_for(options: CompileOptions, quantization: str | None, devices) -> None:
    """What a runtime's FP8 settings need of its devices (`check_fp8_devices`)."""
    if quantization:
        check_fp8_devices(devices)
    if options.kv_cache_dtype == "fp8":
        check_fp8_devices(devices, "kv_cache_dtype='fp8' needs FP8 conversions",
                          "kv_cache_dtype='auto'")


def check_parallel(parallel: ParallelConfig, model: ModelConfig, num_devices: int) -> None:
    check_devices(parallel, num_devices)
    if parallel.pp > model.num_layers:
        raise ValueError(
            f"pp={parallel.pp} stages cannot split {model.num_layers} layers; use "
            f"pp <= {model.num_layers}")
    if parallel.pp_layers is not None and sum(parallel.pp_layers) != model.num_layers:
        raise ValueError(
            f"pp_layers={parallel.pp_layers} adds up to {sum(parallel.pp_layers)} layers but the "
            f"model has {model.num_layers}")


@dataclasses.dataclass(frozen=True)
class CompileOptions:
    """How the programs are compiled, apart from the parallel layout; the defaults are what
    measurements chose (docs/performance.md).

    attention: how prefill and one-token decode steps attend: "xla" (einsums and a softmax,
    Q_CHUNK queries at a time), "cudnn" (cuDNN flash attention; GPU, bfloat16/float16; decode
    steps of sliding-window models stay on xla), "pallas" (decode steps through jax-sp's fused
    kernel, models/decode_attention.py: RoPE, cache write and attention in one launch;
    interpreted off GPU; prefill as "auto") or "auto" (on GPU in 16-bit: cudnn prefill and
    pallas decode, cudnn decode where the kernel does not apply; xla elsewhere).
    paged_decode: cuDNN decode steps read the stacked cache as a paged pool (False: slice the
    layer out first). decode_unroll / prefill_unroll: the layer loop's unroll factor in decode /
    prefill programs (>= the layer count unrolls it; decode None: every layer on GPU, a loop
    elsewhere). row_multiple: projections onto weights of at least pad_rows_min_weight elements
    run on a multiple of this many rows (None: 8 on GPU, 1 elsewhere; sharding/layout.py).
    fp8_gemv: with quantization="fp8", how projections of at most 64 rows (decode steps, short
    prompts) run: weight-only (16-bit activations times the widened FP8 weight) through
    jax-sp's Pallas kernel ("pallas", models/fp8_gemv.py; interpreted off GPU) or an XLA dot
    ("xla"), or "off": W8A8 as longer inputs run, or "pallas-w8a8": W8A8 too, but through the
    kernel, whose tensor-core dot then takes FP8 operands (on Hopper Triton widens both to
    float16 for it), or "pallas-f16": the kernel weight-only, with 2-64 rows rounded to float16
    so that its tile widens the weight to float16 (one conversion a pair of values on Hopper,
    where bfloat16 takes three), or "pallas-mixed": the kernel weight-only at 1-16 rows (in
    float16 from 2, as fast there as W8A8) and W8A8 at 17-64 rows (the rows a program runs:
    with sp="on" or pp > 1 a batch is padded to a multiple of tp, with attention groups to one
    of attn_dp, and the serving engine decodes every slot) ("auto": pallas-mixed on GPU, xla
    elsewhere). Where the kernel runs gate/up on one row it also computes silu(gate) * up.
    kv_cache_dtype: "auto" (the model's dtype) or "fp8": keys and values stored as
    float8_e4m3fn, saturated at +-448 with no scale (vLLM's kv_cache_dtype="fp8" without
    calibrated scales), half a 16-bit cache's bytes; attention widens them as it reads
    (docs/fp8.md#the-kv-cache). Any weights, any attention mode.
    add_norm: how an inference forward of at most 64 rows (a decode step) adds each sublayer's
    output to the residual stream and normalizes the sum: "xla" as XLA fuses it (two kernels:
    the add and mean square, then the scaling), "pallas" in one Pallas kernel
    (models/add_norm.py; interpreted off GPU; no gradient, so training keeps XLA's), "gemv":
    inside jax-sp's FP8 GEMV kernel of the projection after it (q/k/v, gate/up) where that
    kernel takes one row on each device's whole rows (models/fp8_gemv.py `add_norm`; the norm
    folded into the product), else in the Pallas kernel where the FP8 GEMV kernel then takes
    the rows as they are (unpadded, in their own dtype), which lets it signal that kernel
    (docs/fp8.md#the-weight-only-kernel), else xla; interpreted off GPU; "auto": gemv on GPU
    with the FP8 kernel (the default fp8_gemv), xla elsewhere.
    launch_dependents: which of jax-sp's Pallas kernels (FP8 GEMV, decode attention, add_norm)
    signal `griddepcontrol.launch_dependents` as each block starts, so that on Hopper the kernel
    after one launches while its last wave runs (models/pdl.py): "auto" those whose next kernel
    is one of jax-sp's own, reading their output as they write it (a decode step's FP8 GEMVs
    and add-and-norms, one row on one device); True every one (XLA compiles the fusions after
    them with non-coherent loads, which assume the data no longer changes); False none.
    xla_options: per-compilation XLA options (None: jax-sp's defaults, sharding/xla_options.py;
    {}: none)."""

    attention: str = "auto"
    paged_decode: bool = True
    decode_unroll: int | None = None
    prefill_unroll: int = 1
    row_multiple: int | None = None
    pad_rows_min_weight: int = 1 << 20
    fp8_gemv: str = "auto"
    kv_cache_dtype: str = "auto"
    add_norm: str = "auto"
    launch_dependents: bool | str = "auto"
    xla_options: tuple | None = None

    def __post_init__(self):
        if self.attention not in ATTENTION_MODES:
            raise ValueError(f"CompileOptions.attention must be one of {ATTENTION_MODES}, got "
                             f"{self.attention!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"CompileOptions.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.fp8_gemv not in FP8_GEMV_MODES:
            raise ValueError(f"CompileOptions.fp8_gemv must be one of {FP8_GEMV_MODES}, got "
                             f"{self.fp8_gemv!r}")
        if self.add_norm not in ADD_NORM_MODES:
            raise ValueError(f"CompileOptions.add_norm must be one of {ADD_NORM_MODES}, got "
                             f"{self.add_norm!r}")
        if not (isinstance(self.launch_dependents, bool) or self.launch_dependents == "auto"):
            raise ValueError(f"CompileOptions.launch_dependents must be 'auto', True or False, "
                             f"got {self.launch_dependents!r}")
        for name in ("decode_unroll", "row_multiple"):
            if getattr(self, name) is not None:
                _positive_int("CompileOptions", name, getattr(self, name))
        _positive_int("CompileOptions", "prefill_unroll", self.prefill_unroll)
        _positive_int("CompileOptions", "pad_rows_min_weight", self.pad_rows_min_weight)
        if self.xla_options is not None:
            object.__setattr__(self, "xla_options", tuple(sorted(dict(self.xla_options).items())))


MAX_LOGPROBS = 20  # most likely tokens a request may ask the log-probabilities of (OpenAI's)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1.0 disable those filters. stop_token_ids None
    means the tokenizer's EOS (when there is a tokenizer). logprobs (the serving engine's, not
    `generate`'s): with each new token its log-probability and the `logprobs` most likely
    tokens' (0-20), under the model's distribution before temperature and filters (vLLM's raw
    logprobs); None: none."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None
    guidance_scale: float | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "logprobs"):  # numpy integers as Python ones
            if isinstance(getattr(self, name), np.integer):
                object.__setattr__(self, name, int(getattr(self, name)))
        _positive_int("SamplingParams", "max_new_tokens", self.max_new_tokens)

        def real(v):  # a Python, numpy or 0-d array number (not a bool)
            dtype = getattr(v, "dtype", None)
            if dtype is not None and getattr(v, "shape", None) == ():
                return np.issubdtype(dtype, np.number)
            return not isinstance(v, bool) and isinstance(v, (int, float))
        if not real(self.temperature) or not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be a number >= 0 (0 = greedy), "
                             f"got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or (
                self.top_k < 0):
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0 (0 = off), got "
                             f"{self.top_k!r}")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1] (1 = off), got "
                             f"{self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"SamplingParams.seed must be an integer, got {self.seed!r}")
        # plain Python numbers from here on (numpy's do not serialize: a multi-process
        # engine sends each request's settings to the other processes as JSON)
        for name, kind in (("temperature", float), ("top_p", float), ("top_k", int),
                           ("seed", int)):
            object.__setattr__(self, name, kind(getattr(self, name)))
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.guidance_scale is not None and (
                isinstance(self.guidance_scale, bool)
                or not isinstance(self.guidance_scale, (int, float, np.floating))
                or not self.guidance_scale > 0):
            raise ValueError(f"SamplingParams.guidance_scale must be a number > 0 (1: no "
                             f"guidance; transformers' classifier-free guidance), got "
                             f"{self.guidance_scale!r}")
        if self.guidance_scale is not None:
            object.__setattr__(self, "guidance_scale", float(self.guidance_scale))
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not isinstance(
                self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise ValueError(f"SamplingParams.logprobs must be None or an integer in "
                             f"[0, {MAX_LOGPROBS}], got {self.logprobs!r}")

    def scalars(self) -> tuple:
        """(temperature, top_p) as the float32 scalars the sampling programs trace; temperature
        is kept off 0 (greedy programs never divide by it)."""
        return np.float32(max(self.temperature, 1e-6)), np.float32(self.top_p)

    @property
    def guided(self) -> bool:
        """Whether classifier-free guidance runs (a scale other than 1)."""
        return self.guidance_scale is not None and float(self.guidance_scale) != 1.0

    def key_seed(self) -> np.unsignedinteger:
        """The seed as the prefill programs take it to make the rows' keys: what
        jax.random.PRNGKey keeps of a Python int, its low 32 bits (all 64 with 64-bit types
        on), as an unsigned scalar of that width."""
        if jax.config.jax_enable_x64:
            return np.uint64(int(self.seed) % 2**64)
        return np.uint32(int(self.seed) % 2**32)
