"""The runner: a model on its stages, and the prefill and decode calls that generate with it.

A runner is a list of stages: one for pp = 1, pp for a pipeline. Stage s owns layers [start, end)
of the model (vLLM's split unless `pp_layers` says otherwise) on its (1, tp) sub-mesh: a Runtime,
its placed parameters, its compiled programs (jax_sp/generate.py) and the small device constants
its calls reuse. Between stages flows the carry (hidden, residual), vLLM's IntermediateTensors,
across a boundary policy (sharding/boundary.py).

Generation: per micro-batch (a pipeline cuts its batch in `microbatches`), one prefill launch per
stage; then either one on-device loop for every later token (one stage: `decode`), or one
decode-step launch per stage and token (streaming, and pipelines, whose stages live on
different meshes). Every call is dispatched asynchronously and nothing waits on the host inside
a step, so stage k of micro-batch i+1 runs while stage k+1 of micro-batch i does. A pipeline
runs the whole token budget; the caller cuts each row at its first stop token.

Batches: a forward's tokens are right-padded per sequence to a compile bucket that is a
multiple of tp (so SP splits B*T rows evenly); pad tokens sit after the real ones, are masked
as keys, and their outputs are dropped. Batches are padded to a power of two (and to a
multiple of tp, times the micro-batches, when decode runs with SP or through a pipeline) with
inactive rows. A prefill of B*T padded tokens runs with SP when `parallel.use_sp(B*T)`; decode
steps (B tokens) run plain TP unless sp="on" forces SP everywhere.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import numpy as np

from jax_sp.config import CompileOptions, ModelConfig, ParallelConfig, SamplingParams
from jax_sp.config import check_parallel
from jax_sp.generate import Static, decode_loop_fn, decode_step_fn, prefill_fn
from jax_sp.runtime import Runtime, Stage, round_up, to_host
from sharding.boundary import receive, send
from sharding.mesh import make_mesh, stage_mesh
from sharding.tokens import place_token_rows, tp_rank_rows
from sharding.transfer import move
from sharding.weights import as_weights, check_keys

log = logging.getLogger("jax_sp")


def split_layers(num_layers: int, pp: int, counts=None) -> list[tuple[int, int]]:
    """[start, end) of each stage. Default: vLLM's `get_pp_indices` — an even split with the
    remainder given to the stages before the last (5 over 2: 3+2; 7 over 4: 2+2+2+1)."""
    if counts is None:
        counts = [num_layers // pp] * pp
        for i in range(2, num_layers % pp + 2):
            counts[-i] += 1
    if len(counts) != pp or sum(counts) != num_layers or min(counts) < 1:
        raise ValueError(f"layer split {list(counts)} does not give {pp} non-empty stages "
                         f"covering {num_layers} layers")
    ends = np.cumsum(counts)
    return [(int(e - n), int(e)) for e, n in zip(ends, counts)]


MIN_BUCKET = 16


def bucket(num_tokens: int, tp: int) -> int:
    """Compile bucket for a per-sequence length: the next power of two (>= MIN_BUCKET), rounded up
    to a multiple of tp, so nearby lengths share one compiled function."""
    return round_up(pow2_at_least(num_tokens, MIN_BUCKET), tp)


@dataclasses.dataclass
class Batch:
    """A padded generation batch: `rows` real sequences padded to `batch`."""

    rows: int
    lengths: list[int]
    batch: int
    inputs: np.ndarray  # token ids [B, T] or embeddings [B, T, D]
    kv_len: np.ndarray  # [B]: real tokens per row (1 for padding rows)
    cache_len: int  # S
    prefill_sp: bool
    decode_sp: bool
    embeds: bool
    active: np.ndarray | None = None  # [B] rows that decode (None: the first `rows`)


@dataclasses.dataclass
class StageRunner:
    runtime: Runtime
    state: object
    constants: dict = dataclasses.field(default_factory=dict)

    @property
    def programs(self):
        return self.runtime.programs


@dataclasses.dataclass
class Generation:
    """A generation in flight: per micro-batch its first tokens, and per stage and micro-batch
    the KV cache and the rows' sampling keys."""

    tokens: list
    caches: list
    keys: list


class Runner:
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype, host_params,
                 options: CompileOptions | None = None, devices=None,
                 quantization: str | None = None):
        devices = jax.devices() if devices is None else devices
        check_parallel(parallel, cfg, len(devices))
        self.cfg, self.parallel = cfg, parallel
        self.mesh = make_mesh(parallel.tp, parallel.pp, devices, parallel.cfg, parallel.attn_dp)
        self.ranges = split_layers(cfg.num_layers, parallel.pp, parallel.pp_layers)
        self.stages: list[StageRunner] = []
        for s, (start, end) in enumerate(self.ranges):
            rt = Runtime(cfg, parallel, dtype, mesh=stage_mesh(self.mesh, s),
                         stage=Stage(s, parallel.pp, start, end), options=options,
                         quantization=quantization)
            self.stages.append(StageRunner(rt, None))
        if host_params is not None:  # every stage reads its part of one source
            weights = as_weights(host_params)
            check_keys(weights, {p for st in self.stages for p in st.runtime.weight_names},
                       whole_model=True)
            for st in self.stages:
                st.state = st.runtime.place(weights)
        # receive-side hooks, so tests can replay vLLM's two bugs (see sharding/boundary.py)
        self.receive_rows_for_rank, self.gather_residual = tp_rank_rows, True

    def hop(self, carry, to: int, sp: bool):
        """Carry from stage to-1 into stage `to`, by the configured boundary policy."""
        rt = self.stages[to].runtime
        moved = send(carry, rt.carry_sharding())
        return receive(moved, rt.mesh, sp, self.parallel.pp_boundary,
                       self.receive_rows_for_rank, self.gather_residual)

    def put(self, s: int, x):
        """Host values onto stage s's devices, replicated."""
        return jax.device_put(x, self.stages[s].runtime.sharding_of(()))

    def constants(self, s: int, *values) -> list:
        """Small host values that repeat from call to call (the seed, the sampling scalars, the
        stop ids) as replicated device arrays on stage s, each copied there once: every array in
        a host-to-device copy costs the host about 50 us on an H100 machine
        (benchmarks/host_overhead.py)."""
        cache = self.stages[s].constants
        keys = [(v.dtype.str, v.shape, v.tobytes()) for v in map(np.asarray, values)]
        new = {k: v for k, v in zip(keys, values) if k not in cache}
        if len(cache) + len(new) > 256:
            cache.clear()
            new = dict(zip(keys, values))
        cache.update(zip(new, self.put(s, tuple(new.values()))))
        return [cache[k] for k in keys]

    @property
    def row_unit(self) -> int:
        """What a batch's rows (a micro-batch's) are a multiple of: tp when decode's rows are
        split over it (SP) or cross pipeline hops, and the parts that split the batch (cfg's
        halves, attention groups)."""
        p = self.parallel
        decode_sp = p.sp == "on" and p.tp > 1
        return math.lcm(p.tp if (decode_sp or len(self.stages) > 1) else 1, p.cfg, p.attn_dp)

    def batch(self, rows: list, max_new_tokens: int, embeds: bool,
              size: int | None = None) -> Batch:
        """Checked prompts (token ids [T_i] or embeddings [T_i, D]) padded into one batch (of
        `size` rows when given)."""
        tp, m = self.parallel.tp, self.parallel.microbatches if len(self.stages) > 1 else 1
        lengths = [len(r) for r in rows]
        decode_sp = self.parallel.sp == "on" and tp > 1
        # each micro-batch gets the same share
        batch = size or round_up(pow2_at_least(len(rows)), self.row_unit * m)
        if self.parallel.attn_dp > 1:  # rows fill the groups in order; padding after them
            groups = self.parallel.attn_dp * m
            busy = -(-len(rows) // (batch // groups))
            if busy < groups:
                idle_groups(len(rows), groups, groups - busy)
        t = bucket(max(lengths), tp)
        prefill_sp = self.parallel.use_sp(batch // m * t)  # the tokens of one forward
        kv_len = np.ones(batch, np.int32)  # inactive rows: one dummy token
        kv_len[: len(rows)] = lengths
        inputs = (np.zeros((batch, t, self.cfg.hidden_size), self.stages[0].runtime.dtype)
                  if embeds else np.zeros((batch, t), np.int32))
        for b, x in enumerate(rows):
            inputs[b, : len(x)] = x
        # a multiple of 16: the Pallas decode kernel's blocks of keys tile the cache
        cache_len = max(-(-t // 16) * 16, pow2_at_least(max(lengths) + max_new_tokens,
                                                         MIN_BUCKET))
        return Batch(len(rows), lengths, batch, inputs, kv_len, cache_len, prefill_sp,
                     decode_sp, embeds)

    def guided_batch(self, cond: list, uncond: list, max_new_tokens: int) -> Batch:
        """Classifier-free guidance's batch (one stage): the prompts in rows [0, n), their
        unconditional contexts in rows [H, H + n), H = n rounded up to a power of two (and so
        that 2H splits as decode needs); the other rows are one-token dummies that do not
        decode."""
        n, tp, cfg = len(cond), self.parallel.tp, self.parallel.cfg
        unit = tp if self.parallel.sp == "on" and tp > 1 else 1
        # 2H rows: a multiple of unit (and with cfg=2, of 2 * unit: each half splits alike)
        # and of the attention groups
        groups = self.parallel.attn_dp
        half = round_up(pow2_at_least(n), math.lcm(unit * cfg // math.gcd(unit * cfg, 2),
                                                   groups // math.gcd(groups, 2)))
        dummy = [np.zeros(1, np.int32)] * (half - n)
        job = self.batch(list(cond) + dummy + list(uncond) + dummy, max_new_tokens, False,
                         size=2 * half)
        active = np.zeros(2 * half, bool)
        active[:n] = active[half:half + n] = True
        return dataclasses.replace(job, rows=n, lengths=job.lengths[:n], active=active)

    def compile_s(self) -> float:
        return sum(st.programs.total_compile_s() for st in self.stages)

    # -- logits -------------------------------------------------------------------------------

    def logits(self, tokens, lengths, sp: bool, out: str = "all"):
        """Prefill logits through every stage (a device array of the last stage's; see
        Runtime.logits for `out`)."""
        x = tokens
        for s, st in enumerate(self.stages):
            x = st.runtime.logits(st.state, x, lengths, sp, out if st.runtime.stage.last else
                                  "all")
            if s + 1 < len(self.stages):
                x = self.hop(x, s + 1, sp)
        return x

    # -- generation ---------------------------------------------------------------------------

    def _sampling(self, s: int, sampling: SamplingParams) -> list:
        return self.constants(s, *sampling.scalars())  # temperature, top_p

    def prefill(self, job, sampling: SamplingParams, rows_for_rank=tp_rank_rows) -> Generation:
        """The prefill of every micro-batch through every stage: the first new tokens (device
        arrays [B / microbatches], still in flight), the caches and the keys. rows_for_rank
        places prompt embeddings (see sharding/tokens.py)."""
        m = self.parallel.microbatches if len(self.stages) > 1 else 1
        per = job.batch // m
        run = Generation([], [[None] * m for _ in self.stages],
                         [[None] * m for _ in self.stages])
        for i in range(m):
            rows = slice(i * per, (i + 1) * per)
            if job.embeds:  # each device keeps its own rows of the padded embeddings
                x = place_token_rows(job.inputs[rows].reshape(per * job.inputs.shape[1], -1),
                                     self.stages[0].runtime.mesh, job.prefill_sp, rows_for_rank)
                kv_len = self.put(0, job.kv_len[rows])
            else:  # one host-to-device copy
                x, kv_len = self.put(0, (job.inputs[rows], job.kv_len[rows]))
            for s, st in enumerate(self.stages):
                feed = ("embeds" if job.embeds else "tokens") if s == 0 else "carry"
                static = Static.of(st.runtime, "prefill", job.prefill_sp, sampling)
                if s:
                    kv_len = self.put(s, job.kv_len[rows])
                args = (st.state, x, kv_len,
                        *self.constants(s, sampling.key_seed(), np.int32(rows.start)),
                        *self._sampling(s, sampling))
                x, run.caches[s][i], run.keys[s][i] = st.programs.run(
                    "prefill", lambda: prefill_fn(st.runtime, static, feed, "token",  # noqa: B023
                                                  job.cache_len),
                    static, args, donate=(), variant=(feed, "token", job.cache_len))
                if s + 1 < len(self.stages):
                    x = self.hop(x, s + 1, job.prefill_sp)
            run.tokens.append(x)
        return run

    def decode(self, run: Generation, job, sampling: SamplingParams, stop) -> np.ndarray:
        """Every new token after the first, as a host array [B, n] (-1 once a row of a
        one-stage model has stopped): one stage decodes in one on-device loop, a pipeline one
        step at a time."""
        if len(self.stages) > 1:
            rest = [np.concatenate([to_host(t) for t in step]) for step in self.steps(run, job,
                                                                                       sampling)]
            return np.array(rest, np.int32).T.reshape(job.batch, len(rest))
        st = self.stages[0]
        steps = pow2_at_least(sampling.max_new_tokens - 1)
        static = Static.of(st.runtime, "decode", job.decode_sp, sampling)
        active = np.arange(job.batch) < job.rows if job.active is None else job.active
        pos, active = self.put(0, (job.kv_len, active))
        n_steps, stop_ids = self.constants(0, np.int32(sampling.max_new_tokens - 1),
                                           np.array(stop or (-1,), np.int32))
        args = (st.state, run.caches[0][0], run.tokens[0], pos, active, n_steps, stop_ids,
                run.keys[0][0], *self._sampling(0, sampling))
        out, _ = st.programs.run("decode", lambda: decode_loop_fn(st.runtime, static, steps),
                                 static, args, variant=steps)
        return to_host(out)

    def steps(self, run: Generation, job, sampling: SamplingParams):
        """Yield, for each decode step after the prefill, the new token of every micro-batch
        (device arrays, still in flight): one decode-step program per stage and token. Each
        stage keeps its positions and step number per micro-batch on its devices: every step
        returns the next ones."""
        m = len(run.tokens)
        per = job.batch // m
        tokens = list(run.tokens)
        static = Static.of(self.stages[0].runtime, "decode", job.decode_sp, sampling)
        pos = [[self.put(s, job.kv_len[i * per:(i + 1) * per]) for i in range(m)]
               for s in range(len(self.stages))]
        step = [[self.constants(s, np.int32(1))[0]] * m for s in range(len(self.stages))]
        for _ in range(1, sampling.max_new_tokens):
            for i in range(m):
                x = tokens[i]
                if len(self.stages) > 1:  # last stage -> first stage, device to device
                    x = move(x, self.stages[0].runtime.sharding_of(()))
                for s, st in enumerate(self.stages):
                    args = (st.state, run.caches[s][i], x, pos[s][i], run.keys[s][i],
                            step[s][i], *self._sampling(s, sampling))
                    x, run.caches[s][i], pos[s][i], step[s][i] = st.programs.run(
                        "decode_step", lambda: decode_step_fn(st.runtime, static),  # noqa: B023
                        static, args)
                    if s + 1 < len(self.stages):
                        x = self.hop(x, s + 1, job.decode_sp)
                tokens[i] = x
            yield list(tokens)


_IDLE_NOTED: set = set()


def idle_groups(rows: int, groups: int, idle: int) -> None:
    """Say (once per size) that a batch leaves attention groups without sequences."""
    if (rows, groups, idle) not in _IDLE_NOTED:
        _IDLE_NOTED.add((rows, groups, idle))
        log.info("%d sequence(s) for %d attention groups (attn_dp x micro-batches): %d "
                 "group(s) attend to padding rows only", rows, groups, idle)


def pow2_at_least(n: int, floor: int = 1) -> int:
    size = floor
    while size < n:
        size *= 2
    return size
