"""Runtime: one model on one mesh — padding plan, parameter placement, compiled forwards.

Holds no weights of its own: `place` turns host parameters into sharded device arrays, and the
compiled functions take the parameter state as an argument (graphdef + state, as NNX enters jit),
so `jax-sp inspect` can lower them with abstract parameters and never allocate a model.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jax_sp.attention import choose
from jax_sp.config import CompileOptions, ModelConfig, ParallelConfig, check_parallel
from models import CACHE_AXES, IntermediateTensors, KVCache, Llama
from sharding.layout import ShardedLayout
from sharding.mesh import make_mesh, tp_mesh
from sharding.mosaic import check_mesh
from sharding.padding import pad_param, plan_padding
from sharding.rules import RULES, named
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
                 stage: Stage | None = None, options: CompileOptions | None = None):
        if stage is None:
            check_parallel(parallel, cfg, len(jax.devices()) if mesh is None else mesh.size)
            if parallel.pp > 1:
                raise ValueError("pp > 1 runs through jax_sp.pipeline.Pipeline, one Runtime a "
                                 "stage")
            stage = Stage(0, 1, 0, cfg.num_layers)
        self.cfg, self.parallel, self.dtype, self.stage = cfg, parallel, resolve_dtype(dtype), stage
        self.options = options or CompileOptions()
        self.mesh = make_mesh(parallel.tp, 1) if mesh is None else mesh
        if parallel.comm == "mosaic":  # the kernel wants a one-axis mesh (sharding/mosaic.py)
            check_mesh(self.mesh, self.dtype)
            self.mesh = tp_mesh(self.mesh)
        self.plan = plan_padding(cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size,
                                 cfg.intermediate_size, parallel.tp)
        self.padded_cfg = dataclasses.replace(
            cfg, num_heads=self.plan.padded_heads, num_kv_heads=self.plan.padded_kv_heads,
            vocab_size=self.plan.padded_vocab, intermediate_size=self.plan.padded_mlp,
            head_dim=cfg.head_dim)
        abstract = nnx.eval_shape(lambda: Llama(
            self.padded_cfg, self.dtype, rngs=nnx.Rngs(0), num_layers=stage.end - stage.start,
            first=stage.first, last=stage.last))
        self.graphdef, self._abstract_state = nnx.split(abstract)
        # Parameters are laid out by the TP table; SP changes activations only.
        self.param_names = {path_str(p): v.get_metadata()["out_sharding"]
                            for p, v in nnx.to_flat_state(self._abstract_state)}
        platform = self.mesh.devices.flat[0].platform
        # the attention backends of prefills and of one-token decode steps (jax_sp/attention.py)
        self.attention, self.decode_attention = choose(
            self.options.attention, platform, self.dtype, cfg.head_dim, self.options.paged_decode)
        # projections run on a multiple of 8 rows on GPU (sharding/layout.py `_einsum`)
        self.row_multiple = self.options.row_multiple or (8 if platform == "gpu" else 1)

    # -- layouts and parameters ---------------------------------------------------------------

    def layout(self, sp: bool) -> ShardedLayout:
        return ShardedLayout(self.mesh, sp, self.parallel.comm, self.row_multiple,
                             self.options.pad_rows_min_weight)

    def sharding_of(self, names, sp: bool = False):
        return named(self.mesh, names, RULES["on" if sp else "off"])

    def abstract_state(self):
        """Parameters as ShapeDtypeStructs carrying their target shardings."""
        return self._map_state(lambda path, var: jax.ShapeDtypeStruct(
            var.get_value().shape, var.get_value().dtype,
            sharding=self.sharding_of(self.param_names[path])))

    def place(self, host_params):
        """Pad (plan), cast and put each host parameter straight onto its target sharding.
        host_params: unpadded arrays by parameter path, or a lazy checkpoint
        (`bridges.checkpoint.LazyParams`) that builds each device's block from disk."""
        expected = set(self.param_names)
        missing, unexpected = expected - set(host_params), set(host_params) - expected
        if hasattr(host_params, "build") or hasattr(host_params, "restore"):
            unexpected = set()  # a checkpoint holds every stage's parameters
        if missing or unexpected:
            raise ValueError(f"parameters do not match the model: missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)}")
        if hasattr(host_params, "restore"):  # an Orbax checkpoint (bridges/orbax_io.py)
            targets = {path: (self.param_names[path], var.get_value().shape,
                              self.sharding_of(self.param_names[path]))
                       for path, var in ((path_str(p), v) for p, v in
                                         nnx.to_flat_state(self._abstract_state))}
            arrays = host_params.restore(targets, self.plan, self.dtype,
                                         (self.stage.start, self.stage.end))
            return self._map_state(lambda path, var: arrays[path])

        def put(path, var):
            names = self.param_names[path]
            if hasattr(host_params, "build"):  # a lazy checkpoint (bridges/checkpoint.py)
                return host_params.build(path, names, self.plan, var.get_value().shape,
                                         self.sharding_of(names), self.dtype,
                                         layer_offset=self.stage.start)
            x = pad_param(np.asarray(host_params[path]), names, self.plan)
            want = var.get_value().shape
            if x.shape != want:
                raise ValueError(f"parameter {path} has shape {x.shape} after padding; the model "
                                 f"needs {want}")
            return jax.device_put(x.astype(self.dtype), self.sharding_of(names))

        return self._map_state(put)

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

    def jit(self, fn, sp: bool):
        """Like jax.jit, compiled through `compile` once per input shapes."""
        return _Jitted(self, fn, sp)

    # -- caches --------------------------------------------------------------------------------

    def carry_sharding(self):
        """Where a stage leaves (hidden, residual): token-sharded in both modes, so each device
        sends 1/tp of the rows to the next stage."""
        return self.sharding_of(("act_tokens", "act_embed"), sp=True)

    def cache_sharding(self):
        return self.sharding_of(CACHE_AXES)

    def empty_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache inside a traced program, laid out as `cache_sharding`."""
        zeros = jnp.zeros(self._cache_shape(batch, max_len), self.dtype)
        zeros = jax.lax.with_sharding_constraint(zeros, self.cache_sharding())
        return KVCache(zeros, zeros)

    def abstract_cache(self, batch: int, max_len: int) -> KVCache:
        """The cache as ShapeDtypeStructs carrying its sharding (ahead-of-time compiles)."""
        kv = jax.ShapeDtypeStruct(self._cache_shape(batch, max_len), self.dtype,
                                  sharding=self.cache_sharding())
        return KVCache(kv, kv)

    def _cache_shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        c = self.padded_cfg  # [L, B, S, K, H]
        return (self.stage.end - self.stage.start, batch, max_len, c.num_kv_heads, c.head_dim)

    # -- compiled forwards ---------------------------------------------------------------------

    @functools.cache
    def prefill_logits(self, sp: bool, collect_residuals: bool = False, last_only: bool = False,
                       feed: str = "tokens", unroll: int = 1):
        """jit: (state, inputs, positions_bt, kv_len_b) -> (out, residuals); inputs are token ids
        [B, T] (feed="tokens") or the previous stage's carry (feed="carry"); out is the carry
        on a stage that is not the last, else f32 logits of every row [B*T, V] or, with
        last_only, of each sequence's last token [B, V]. unroll: the layer loop's unroll
        factor."""
        layout = self.layout(sp)
        vocab = self.cfg.vocab_size

        def run(state, inputs, positions_bt, kv_len_b):
            model = nnx.merge(self.graphdef, state)
            b, t = positions_bt.shape
            rows = jnp.arange(b) * t + kv_len_b - 1 if last_only else None
            out = model(positions_bt, kv_len_b, rows_r=rows, layout=layout,
                        collect_residuals=collect_residuals, fresh=True,
                        attention=self.attention, unroll=unroll,
                        **({"carry": inputs} if feed == "carry" else {"tokens_bt": inputs}))
            if out.carry is not None:
                return self.constrain_carry(out.carry), out.residuals
            # vocab-parallel first, so that the replication below gathers the [T, V] logits and
            # not the [D, V] LM head; replicated: every process can then be handed the same copy
            logits = jax.lax.with_sharding_constraint(out.logits, self.sharding_of((None, "vocab")))
            logits = logits[:, :vocab].astype(jnp.float32)
            return jax.lax.with_sharding_constraint(logits, self.sharding_of(())), out.residuals

        return self.jit(run, sp)

    def constrain_carry(self, carry) -> IntermediateTensors:
        return IntermediateTensors(*(jax.lax.with_sharding_constraint(c, self.carry_sharding())
                                     for c in carry))

    def compile_prefill(self, sp: bool, batch: int, tokens: int, last_only: bool = True):
        """Compile `prefill_logits` for [batch, tokens] without any weights (abstract state);
        by default the generation form, which needs logits of each sequence's last token only."""
        ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
        lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
        if self.stage.first:
            inputs = ids
        else:
            row = jax.ShapeDtypeStruct((batch * tokens, self.cfg.hidden_size), self.dtype,
                                       sharding=self.carry_sharding())
            inputs = (row, row)
        fn = self.prefill_logits(sp, False, last_only, "tokens" if self.stage.first else "carry")
        return fn.compile(self.abstract_state(), inputs, ids, lengths)


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


class _Jitted:
    def __init__(self, rt: Runtime, fn, sp: bool):
        self.rt, self.fn, self.sp, self.compiled = rt, fn, sp, {}

    def compile(self, *args):
        key = input_key(args[1:])
        if key not in self.compiled:
            self.compiled[key] = self.rt.compile(self.fn, args, self.sp)
        return self.compiled[key]

    def __call__(self, *args):
        return self.compile(*args)(*args)


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
