"""Runtime: one model on one mesh — padding plan, parameter placement, compiled forwards.

Holds no weights of its own: `place` turns host parameters into sharded device arrays, and the
compiled functions take the parameter state as an argument (graphdef + state, as NNX enters jit),
so `jax-sp inspect` can lower them with abstract parameters and never allocate a model.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_sp.attention import choose
from jax_sp.config import (CompileOptions, ModelConfig, ParallelConfig, check_devices_for,
                           check_parallel, check_quantization)
from models import CACHE_AXES, IntermediateTensors, KVCache, Llama, pdl
from models.cache import cache_dtype
from models.quant import (KERNEL_GEMV, Fp8, fp8_axes, is_scale, quantize_weight, scale_of,
                          stored_order)
from sharding.layout import ShardedLayout
from sharding.mesh import make_mesh, tp_mesh
from sharding.mosaic import check_mesh
from sharding.padding import plan_padding
from sharding.rules import named, rules_for
from sharding.weights import Target, as_weights, check_keys
from sharding.xla_options import collective_matmul_options

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype):
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    return jnp.dtype(dtype).type


log = logging.getLogger("jax_sp")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def path_str(path) -> str:
    return "/".join(str(p) for p in path)


@dataclasses.dataclass(frozen=True)
class Stage:
    """Pipeline stage `index` of `count`: layers [start, end)."""

    index: int
    count: int
    start: int
    end: int

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1


class Runtime:
    """One pipeline stage (by default the whole model, pp=1) on its (1, tp) mesh."""

    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype="float32", mesh=None,
                 stage: Stage | None = None, options: CompileOptions | None = None,
                 quantization: str | None = None):
        check_quantization(quantization, parallel)
        if stage is None:
            check_parallel(parallel, cfg, len(jax.devices()) if mesh is None else mesh.size)
            if parallel.pp > 1:
                raise ValueError("pp > 1 runs through jax_sp.runner.Runner, one Runtime a "
                                 "stage")
            stage = Stage(0, 1, 0, cfg.num_layers)
        self.cfg, self.parallel, self.dtype, self.stage = cfg, parallel, resolve_dtype(dtype), stage
        self.options, self.quantization = options or CompileOptions(), quantization
        self.mesh = (make_mesh(parallel.tp, 1, cfg=parallel.cfg, attn_dp=parallel.attn_dp)
                     if mesh is None else mesh)
        check_devices_for(self.options, quantization, self.mesh.devices.flat)
        self.cache_dtype = cache_dtype(self.options.kv_cache_dtype, self.dtype)
        if parallel.comm == "mosaic":  # the kernel wants a one-axis mesh (sharding/mosaic.py)
            check_mesh(self.mesh, self.dtype)
            self.mesh = tp_mesh(self.mesh)
        self.plan = plan_padding(cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
                                 cfg.intermediate_size, parallel.tp,
                                 parallel.tp // parallel.attn_dp)  # heads split in a group
        self.padded_cfg = dataclasses.replace(
            cfg, num_heads=self.plan.padded_heads, num_kv_heads=self.plan.padded_kv_heads,
            vocab_size=self.plan.padded_vocab, intermediate_size=self.plan.padded_mlp,
            head_dim=cfg.head_dim)
        abstract = nnx.eval_shape(lambda: Llama(
            self.padded_cfg, self.dtype, rngs=nnx.Rngs(0), num_layers=stage.end - stage.start,
            first=stage.first, last=stage.last, quantization=quantization))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        # Parameters are laid out by the TP table; SP changes activations only.
        self.param_names = {path_str(p): v.get_metadata()["out_sharding"]
                            for p, v in nnx.to_flat_state(self._abstract_state)}
        platform = self.mesh.devices.flat[0].platform
        # the attention backends of prefills and of one-token decode steps (jax_sp/attention.py)
        # (cuDNN's paged decode views the cache as [L * B, ...] pages, which would merge the
        # batch split of attention groups into the layer axis: those read the layer's slice)
        self.attention, self.decode_attention = choose(
            self.options.attention, platform, self.dtype, cfg.head_dim,
            self.options.paged_decode and parallel.attn_dp == 1)
        # projections run on a multiple of 8 rows on GPU (sharding/layout.py `_einsum`)
        self.row_multiple = self.options.row_multiple or (8 if platform == "gpu" else 1)
        if dict(self.mesh.shape).get("cfg", 1) > 1 or parallel.attn_dp > 1:
            self.row_multiple = 1  # padding rows would land on one half (group) only
        # FP8 projections of few rows on GPU: the Pallas kernel, weight-only at 1-16 rows and on
        # FP8 operands at more (models/quant.py; the faster at each size, docs/fp8.md)
        gemv = self.options.fp8_gemv
        self.fp8_gemv = (("pallas-mixed" if platform == "gpu" else "xla") if gemv == "auto"
                         else gemv) if quantization else "off"
        # a decode step's residual adds and norms inside the FP8 GEMV kernel after each
        # (models/fp8_gemv.py `add_norm`) where it takes them, else in one Pallas kernel each
        # (models/add_norm.py) where an FP8 GEMV kernel then takes its rows as they are: by
        # default on GPU; asked for, interpreted off GPU too
        mode = self.options.add_norm
        kernel = self.fp8_gemv in KERNEL_GEMV
        self.add_norm = ("gemv" if kernel and (mode == "gemv" or (mode == "auto"
                                                                   and platform == "gpu"))
                         else "pallas" if mode == "pallas" else "off")
        self.programs = Programs(self)

    # -- layouts and parameters ---------------------------------------------------------------

    def layout(self, sp: bool) -> ShardedLayout:
        return ShardedLayout(self.mesh, sp, self.parallel.comm, self.row_multiple,
                             self.options.pad_rows_min_weight, self.fp8_gemv, self.add_norm)

    def sharding_of(self, names, sp: bool = False):
        return named(self.mesh, names, rules_for(sp, self.mesh))

    def abstract_state(self):
        """Parameters as ShapeDtypeStructs carrying their target shardings."""
        return self._map_state(lambda path, var: jax.ShapeDtypeStruct(
            var.get_value().shape, var.get_value().dtype,
            sharding=self.sharding_of(self.param_names[path])))

    @property
    def weight_names(self) -> set[str]:
        """The parameters a weight source gives: all but the FP8 scales made on load."""
        return {p for p in self.param_names if not is_scale(p)}

    def place(self, weights):
        """This stage's parameters from a weight source (sharding/weights.py: a dict of unpadded
        host arrays by path, a streamed checkpoint, an Orbax checkpoint), padded by the plan,
        cast and put straight onto their target shardings."""
        source = as_weights(weights)
        scales = set(self.param_names) - self.weight_names
        check_keys(source, self.weight_names, whole_model=self.stage.count == 1)
        targets = {path: Target(self.param_names[path], var.get_value().shape,
                                self.sharding_of(self.param_names[path]))
                   for path, var in ((path_str(p), v) for p, v in
                                     nnx.to_flat_state(self._abstract_state)) if path not in scales}
        layers = (self.stage.start, self.stage.end)
        if not scales:
            arrays = source.place(targets, self.plan, self.dtype, layers)
            return self._map_state(lambda path, var: arrays[path])
        # FP8: one parameter at a time in full precision on the devices, quantized there (a
        # row-parallel weight's per-channel scale spans its shards); an FP8 checkpoint's own
        # scales, placed the same way, keep its values as stored
        checkpoint_scales = getattr(source, "fp8_scales", lambda: None)()
        arrays = {}
        for path, target in targets.items():
            name = path.rpartition("/")[2]
            if scale_of(path) not in scales:  # not stored in FP8
                (arrays[path],) = source.place({path: target}, self.plan, self.dtype,
                                               layers).values()
                continue
            # the source gives the weight in its 16-bit layout; FP8 stores it transposed
            stacked = target.names[:1] == ("layers",)
            axes = fp8_axes(self.quantization, name, stacked)
            order = stored_order(len(target.shape), axes)
            back = np.argsort(order)
            names = tuple(target.names[a] for a in back)
            unstored = {path: Target(names, tuple(target.shape[a] for a in back),
                                     self.sharding_of(names))}
            (x,) = source.place(unstored, self.plan, self.dtype, layers).values()
            given = None
            if checkpoint_scales is not None:  # one value a channel: its contracted axes at 1
                one = tuple(None if a in axes else n for a, n in enumerate(names))
                (g,) = checkpoint_scales.place(
                    {path: Target(one, tuple(1 if a in axes else n for a, n in
                                             enumerate(unstored[path].shape)),
                                  self.sharding_of(one))},
                    self.plan, jnp.float32, layers, first_of=axes).values()
                given = jax.jit(lambda g, axes=axes: jnp.squeeze(g, axes))(g)  # noqa: E731
                del g
            scale_path = scale_of(path)
            fp8 = _quantize(x, given, axes, stacked, Fp8(
                target.sharding, self.sharding_of(self.param_names[scale_path])))
            arrays[path], arrays[scale_path] = fp8.q, fp8.scale
            del x, given
        return self._map_state(lambda path, var: arrays[path])

    def _map_state(self, fn):
        flat = [(p, v.replace(fn(path_str(p), v)))
                for p, v in nnx.to_flat_state(self._abstract_state)]
        return nnx.from_flat_state(flat)

    # -- compilation ---------------------------------------------------------------------------

    def xla_options(self, sp: bool) -> dict:
        return collective_matmul_options(self.mesh.devices.flat[0].platform, self.parallel.comm,
                                         sp, self.options.xla_options)

    def compile(self, fn, args, sp: bool, donate=()):
        """AOT-compile fn for args with this program's XLA options; if XLA fails with them,
        warn and compile without them."""
        with pdl.signalling(self.options.launch_dependents):  # read as kernels are traced
            lowered = jax.jit(fn, donate_argnums=donate).lower(*args)
        options = self.xla_options(sp)
        if not options:
            return lowered.compile()
        try:
            return lowered.compile(options)
        except Exception as e:  # noqa: BLE001 - XLA raises its own runtime error types
            log.warning("XLA could not compile this program with %s (%s); compiling without "
                        "them (for SP: plain all-gather / reduce-scatter, no windowed einsum; "
                        "comm='ring' gives collective matmul without XLA's pass).", options,
                        str(e).splitlines()[0][:300])
            return lowered.compile()

    # -- caches --------------------------------------------------------------------------------

    def carry_sharding(self):
        """Where a stage leaves (hidden, residual): token-sharded in both modes, so each device
        sends 1/tp of the rows to the next stage."""
        return self.sharding_of(("act_tokens", "act_embed"), sp=True)

    def cache_sharding(self):
        return self.sharding_of(CACHE_AXES)

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache inside a traced program, laid out as `cache_sharding`."""
        zeros = jnp.zeros(self._cache_shape(batch, max_len), self.cache_dtype)
        zeros = jax.lax.with_sharding_constraint(zeros, self.cache_sharding())
        return KVCache(zeros, zeros)

    def abstract_cache(self, batch: int, max_len: int) -> KVCache:
        """The cache as ShapeDtypeStructs carrying its sharding (ahead-of-time compiles)."""
        kv = jax.ShapeDtypeStruct(self._cache_shape(batch, max_len), self.cache_dtype,
                                  sharding=self.cache_sharding())
        return KVCache(kv, kv)

    def _cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        c = self.padded_cfg  # [L, B, S, K, H]
        return (self.stage.end - self.stage.start, batch, max_len, c.num_kv_heads, c.head_dim)

    def constrain_carry(self, carry) -> IntermediateTensors:
        return IntermediateTensors(*(jax.lax.with_sharding_constraint(c, self.carry_sharding())
                                     for c in carry))

    # -- the prefill in its logits forms (jax_sp/generate.py prefill_fn) ------------------------

    def logits(self, state, inputs, kv_len_b, sp: bool, out: str = "all"):
        """Run the prefill program in a logits form: out "all" (f32 logits of every row), "last"
        (of each sequence's last token) or "residuals" (the stream after each layer); inputs:
        token ids [B, T] on a first stage, else the previous stage's carry, every row from
        position 0. A stage that is not the last returns its carry."""
        from jax_sp.generate import Static, prefill_fn

        feed = "tokens" if self.stage.first else "carry"
        static = Static.of(self, "prefill", sp)
        return self.programs.run("logits", lambda: prefill_fn(self, static, feed, out), static,
                                 (state, inputs, kv_len_b), donate=(), variant=(feed, out))

    def compile_prefill(self, sp: bool, batch: int, tokens: int, last_only: bool = True):
        """Compile the logits prefill for [batch, tokens] without any weights (abstract state);
        by default the generation form, which needs logits of each sequence's last token only."""
        from jax_sp.generate import Static, prefill_fn

        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        if self.stage.first:
            inputs = ids
        else:
            row = jax.ShapeDtypeStruct((batch * tokens, self.cfg.hidden_size), self.dtype,
                                       sharding=self.carry_sharding())
            inputs = (row, row)
        feed, out = ("tokens" if self.stage.first else "carry"), ("last" if last_only else "all")
        static = Static.of(self, "prefill", sp)
        return self.programs.compile("logits", lambda: prefill_fn(self, static, feed, out),
                                     static, (self.abstract_state(), inputs, lengths), donate=(),
                                     variant=(feed, out))


class Programs:
    """AOT-compiled programs of one Runtime, keyed by (name, static, variant, input shapes);
    variant holds what the input shapes do not show (a prefill's feed, output form and cache
    length, a decode loop's step budget). The only program cache: every program of a stage is
    compiled here, through `Runtime.compile`."""

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.compiled: dict[tuple, jax.stages.Compiled] = {}
        self.compile_seconds: dict[tuple, float] = {}
        self.last: dict[str, tuple] = {}  # program name -> key of the executable last run
        self.calls: collections.Counter = collections.Counter()  # executions per program name

    def compile(self, name: str, make, static, args, donate=(1,), variant=None):
        """The executable of program `name` for these arguments (built by `make()` and
        compiled unless already); args[donate] (the cache) are donated."""
        key = (name, static, variant, input_key(args[1:]))
        if key not in self.compiled:
            t0 = time.perf_counter()
            self.compiled[key] = self.rt.compile(_named(make(), name), args, static.sp, donate)
            self.compile_seconds[key] = time.perf_counter() - t0
        self.last[name] = key
        return self.compiled[key]

    def run(self, name: str, make, static, args, donate=(1,), variant=None):
        """Run program `name` on args (compiled on first use for these input shapes)."""
        compiled = self.compile(name, make, static, args, donate, variant)
        self.calls[name] += 1
        return compiled(*args)

    def total_compile_s(self) -> float:
        return sum(self.compile_seconds.values())

    def hlo(self, name: str) -> str:
        """Optimized HLO of the executable that last ran under `name`."""
        return self.compiled[self.last[name]].as_text()


def _named(fn, name: str):
    """fn under the program's name: XLA calls its module jit_<name>, which HLO dumps and
    profiles (each kernel's hlo_module) show."""
    def program(*args):
        return fn(*args)
    program.__name__ = program.__qualname__ = name
    return program


def to_host(x) -> np.ndarray:
    """A device array as numpy on this process. Under jax.distributed an output may span other
    processes' devices or live on some processes only (a last pipeline stage's, or a mesh that
    leaves a process out): it is replicated over its own devices and, when some process holds
    none of them, broadcast from the lowest process that does. Every process makes the same
    calls (multi-controller), so every process gets the same value."""
    if not isinstance(x, jax.Array) or jax.process_count() == 1:
        return np.asarray(x)
    owners = {d.process_index for d in x.sharding.device_set}
    if not x.is_fully_replicated:
        x = jax.device_put(x, jax.sharding.NamedSharding(x.sharding.mesh,
                                                         jax.sharding.PartitionSpec()))
    if len(owners) == jax.process_count():  # every process holds a copy now
        return np.asarray(x.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    local = (np.asarray(x.addressable_shards[0].data) if x.addressable_shards
             else np.zeros(x.shape, x.dtype))
    wire = np.uint8 if local.dtype == np.bool_ else local.dtype  # broadcast adds: no bools
    out = multihost_utils.broadcast_one_to_all(local.astype(wire),
                                               is_source=jax.process_index() == min(owners))
    return np.asarray(out).astype(local.dtype)


def input_key(args) -> tuple:
    """Shapes and dtypes of a call's array arguments: what a compiled program is specific to."""
    return tuple((getattr(a, "shape", ()), str(getattr(a, "dtype", type(a).__name__)))
                 for a in jax.tree.leaves(args))


def random_params(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Unpadded float32 host parameters for benchmarks and inspection: normal(0, 0.02) weights,
    unit norm scales, zero biases (the model's initialisers, drawn with numpy for speed)."""
    rng = np.random.default_rng(seed)
    abstract = nnx.eval_shape(lambda: Llama(cfg, jnp.float32, rngs=nnx.Rngs(0)))
    params = {}
    for p, v in nnx.to_flat_state(nnx.state(abstract)):
        shape, name = v.get_value().shape, str(p[-1])
        if name == "scale":
            params[path_str(p)] = np.ones(shape, np.float32)
        elif name.startswith("b_"):
            params[path_str(p)] = np.zeros(shape, np.float32)
        else:
            params[path_str(p)] = (0.02 * rng.standard_normal(shape, np.float32))
    return params


# a stack whose float32 copy would take more bytes than this is quantized layer by layer
QUANTIZE_BY_LAYER_BYTES = 256 << 20


def _quantize(w, scale, axes, stacked: bool, shardings: Fp8) -> Fp8:
    """quantize_weight(w, axes, scale) into `shardings`. XLA computes it in a float32 copy of
    w, so a large stacked weight goes one layer at a time into FP8 buffers updated in place:
    the float32 then spans one layer, not the stack (whose float32 copy, twice its 16-bit
    bytes, set the load's peak memory)."""
    if not stacked or w.size * 4 <= QUANTIZE_BY_LAYER_BYTES:
        return jax.jit(lambda w, s: quantize_weight(w, axes, s), out_shardings=shardings)(
            w, scale)
    inner = tuple(a - 1 for a in axes)
    shape = jax.eval_shape(lambda w: quantize_weight(w, axes), w)
    q, s = jax.jit(lambda: (jnp.zeros(shape.q.shape, shape.q.dtype),
                            jnp.zeros(shape.scale.shape, shape.scale.dtype)),
                   out_shardings=(shardings.q, shardings.scale))()

    def step(q, s, w, scale, i):
        pick = lambda a: jax.lax.dynamic_index_in_dim(a, i, 0, keepdims=False)  # noqa: E731
        layer = quantize_weight(pick(w), inner, None if scale is None else pick(scale))
        return (jax.lax.dynamic_update_index_in_dim(q, layer.q, i, 0),
                jax.lax.dynamic_update_index_in_dim(s, layer.scale, i, 0))

    step = jax.jit(step, donate_argnums=(0, 1), out_shardings=(shardings.q, shardings.scale))
    for i in range(w.shape[0]):
        q, s = step(q, s, w, scale, np.int32(i))
    return Fp8(q, s)
