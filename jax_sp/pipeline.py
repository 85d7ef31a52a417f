"""Pipeline parallelism: contiguous layer ranges, one (1, tp) sub-mesh and program set a stage.

Stage s owns layers [start, end) of the model (vLLM's split unless `pp_layers` says otherwise),
its own parameters, KV caches and compiled prefill / decode-step programs. Between stages flows
the carry (hidden, residual), vLLM's IntermediateTensors, across a boundary policy
(`sharding/boundary.py`). A batch is cut into micro-batches; every stage call is dispatched
asynchronously and nothing waits on the host inside a step, so stage k of micro-batch i+1 runs
while stage k+1 of micro-batch i does.

Decode with pp > 1 is one call per stage per token (the stages live on different meshes); it
runs the whole token budget and cuts each row at its first stop token afterwards.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jax_sp import generate as generate_programs
from jax_sp.config import (CompileOptions, ModelConfig, ParallelConfig, SamplingParams,
                           check_parallel)
from jax_sp.generate import Programs, Static, decode_step_fn, prefill_fn
from jax_sp.runtime import Runtime, Stage, to_host
from sharding.boundary import receive, send
from sharding.transfer import move
from sharding.mesh import make_mesh, stage_mesh
from sharding.tokens import place_token_rows, tp_rank_rows


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


@dataclasses.dataclass
class StageRunner:
    runtime: Runtime
    state: object
    programs: Programs


def stage_params(host_params: dict, rt: Runtime) -> dict:
    """The host parameters stage `rt.stage` needs: its slice of the stacked layers, plus the
    embedding / final norm / head where it has them."""
    start, end = rt.stage.start, rt.stage.end
    if hasattr(host_params, "build") or hasattr(host_params, "restore"):  # lazy checkpoints
        return host_params
    return {path: (host_params[path][start:end] if path.startswith("layers/")
                   else host_params[path]) for path in rt.param_names}


class Pipeline:
    def __init__(self, cfg: ModelConfig, parallel: ParallelConfig, dtype, host_params,
                 devices=None, options: CompileOptions | None = None):
        devices = jax.devices() if devices is None else devices
        check_parallel(parallel, cfg, len(devices))
        self.cfg, self.parallel = cfg, parallel
        self.mesh = make_mesh(parallel.tp, parallel.pp, devices)
        self.ranges = split_layers(cfg.num_layers, parallel.pp, parallel.pp_layers)
        self.stages: list[StageRunner] = []
        for s, (start, end) in enumerate(self.ranges):
            rt = Runtime(cfg, parallel, dtype, mesh=stage_mesh(self.mesh, s),
                         stage=Stage(s, parallel.pp, start, end), options=options)
            state = rt.place(stage_params(host_params, rt)) if host_params is not None else None
            self.stages.append(StageRunner(rt, state, Programs(rt)))
        # receive-side hooks, so tests can replay vLLM's two bugs (see sharding/boundary.py)
        self.receive_rows_for_rank, self.gather_residual = tp_rank_rows, True

    def hop(self, carry, to: int, sp: bool):
        """Carry from stage to-1 into stage `to`, by the configured boundary policy."""
        rt = self.stages[to].runtime
        moved = send(carry, rt.carry_sharding())
        return receive(moved, rt.mesh, sp, self.parallel.pp_boundary,
                       self.receive_rows_for_rank, self.gather_residual)

    def to_host(self, x) -> np.ndarray:
        """An output as numpy, the same on every process (see runtime.to_host)."""
        return to_host(x)

    # -- prefill logits -----------------------------------------------------------------------

    def logits(self, tokens, positions, lengths, sp: bool):
        x = tokens
        for s, st in enumerate(self.stages):
            feed = "tokens" if s == 0 else "carry"
            out, _ = st.runtime.prefill_logits(sp, feed=feed)(st.state, x, positions, lengths)
            if s + 1 < len(self.stages):
                x = self.hop(out, s + 1, sp)
        return out

    # -- generation ---------------------------------------------------------------------------

    def _put(self, s: int, x):
        return jax.device_put(x, self.stages[s].runtime.sharding_of(()))

    def steps(self, job, sampling: SamplingParams, rows_for_rank=tp_rank_rows):
        """Yield, for the prefill and then each decode step, the new token of every micro-batch
        (device arrays [B / microbatches], still in flight). rows_for_rank places prompt
        embeddings (see sharding/tokens.py)."""
        m = self.parallel.microbatches
        per = job.batch // m
        greedy = sampling.temperature == 0
        scalars = [self._put(s, sampling.scalars()) for s in range(len(self.stages))]
        caches = [[None] * m for _ in self.stages]
        keys = [[None] * m for _ in self.stages]  # a row keeps its key however the batch splits
        rows = [slice(i * per, (i + 1) * per) for i in range(m)]

        tokens = []
        pre = Static(job.prefill_sp, greedy, sampling.top_k,
                     self.stages[0].runtime.options.prefill_unroll)
        for i, r in enumerate(rows):
            host = (job.kv_len[r], sampling.key_seed(), np.int32(r.start))
            if job.embeds:
                x = place_token_rows(job.inputs[r].reshape(per * job.inputs.shape[1], -1),
                                     self.stages[0].runtime.mesh, job.prefill_sp, rows_for_rank)
            else:
                x = self._put(0, job.inputs[r])
            for s, st in enumerate(self.stages):
                feed = ("embeds" if job.embeds else "tokens") if s == 0 else "carry"
                x, caches[s][i], keys[s][i] = st.programs.run(
                    "prefill", lambda: prefill_fn(st.runtime, pre, feed, job.cache_len), pre,
                    (st.state, x, *self._put(s, host), *scalars[s]), donate=(),
                    variant=(feed, job.cache_len))
                if s + 1 < len(self.stages):
                    x = self.hop(x, s + 1, job.prefill_sp)
            tokens.append(x)
        yield list(tokens)

        dec = Static(job.decode_sp, greedy, sampling.top_k,
                     generate_programs.decode_unroll(self.stages[0].runtime))
        # each stage's positions and step number per micro-batch stay on its devices: every
        # decode step returns the next ones
        pos = [[self._put(s, job.kv_len[r]) for r in rows] for s in range(len(self.stages))]
        steps = [[self._put(s, np.int32(1))] * m for s in range(len(self.stages))]
        for _ in range(1, sampling.max_new_tokens):
            for i in range(m):
                # last stage -> first stage, device to device
                x = move(tokens[i], self.stages[0].runtime.sharding_of(()))
                for s, st in enumerate(self.stages):
                    args = (st.state, caches[s][i], x, pos[s][i], keys[s][i], steps[s][i],
                            *scalars[s])
                    x, caches[s][i], pos[s][i], steps[s][i] = st.programs.run(
                        "decode_step", lambda: decode_step_fn(st.runtime, dec), dec, args)
                    if s + 1 < len(self.stages):
                        x = self.hop(x, s + 1, job.decode_sp)
                tokens[i] = x
            yield list(tokens)

    def generate(self, job, sampling: SamplingParams, rows_for_rank=tp_rank_rows):
        """-> (first tokens [B], later tokens [B, max_new_tokens - 1]) as host arrays, with one
        host sync at the end."""
        steps = list(self.steps(job, sampling, rows_for_rank))
        tokens = np.array([np.concatenate([self.to_host(t) for t in step]) for step in steps],
                          np.int32).T  # [B, max_new_tokens]
        return tokens[:, 0], tokens[:, 1:]
