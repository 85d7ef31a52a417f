"""The overlap census reads XLA's schedule: which collectives run beside compute and which are
exposed — on hand-written scheduled HLO in XLA:GPU's forms, and on compiled programs."""

import dataclasses

import pytest

from jax_sp import ParallelConfig
from jax_sp.inspect import inspect_modes
from jax_sp.presets import preset
from jax_sp.runtime import Runtime
from sharding.hlo import census
from sharding.schedule import format_overlap, overlaps, summarize_overlap

# XLA:GPU's forms, in schedule order: a synchronous collective-permute issued while a GEMM runs
# on another stream (custom-call-start/-done, as the multi-streamed windowed einsum issues
# them); an all-gather pair with a cuBLAS GEMM between start and
# done; a reduce-scatter wrapped in async-start/async-done with only an elementwise fusion
# between; an all-reduce pair the scheduler made synchronous; a synchronous collective-permute;
# a windowed-einsum loop of 8 trips whose permute is started in one trip and finished in the
# next, after that trip's dot fusion (its first permute started before the loop); and an async
# all-reduce whose only neighbour is a fusion calling a computation with a dot.
GPU_HLO = """\
HloModule jit_layer, is_scheduled=true, num_partitions=8

%add (a: bf16[], b: bf16[]) -> bf16[] {
  %a = bf16[] parameter(0)
  %b = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%a, %b)
}

%wrapped_reduce_scatter_computation (param_0: bf16[64,32]) -> bf16[8,32] {
  %param_0 = bf16[64,32]{1,0} parameter(0)
  ROOT %reduce-scatter.1 = bf16[8,32]{1,0} reduce-scatter(%param_0), channel_id=2, replica_groups=[1,8]<=[8], use_global_device_ids=true, dimensions={0}, to_apply=%add
}

%norm_computation (p0: bf16[64,32]) -> bf16[64,32] {
  %p0 = bf16[64,32]{1,0} parameter(0)
  ROOT %m = bf16[64,32]{1,0} multiply(%p0, %p0)
}

%dot_computation (d0: bf16[8,32], d1: bf16[32,32]) -> bf16[8,32] {
  %d0 = bf16[8,32]{1,0} parameter(0)
  %d1 = bf16[32,32]{1,0} parameter(1)
  ROOT %dot.9 = bf16[8,32]{1,0} dot(%d0, %d1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%windowed_dot_general_body_ag (param.1: (bf16[8,32], bf16[32,32], (bf16[8,32], bf16[8,32]), s32[])) -> (bf16[8,32], bf16[32,32], (bf16[8,32], bf16[8,32]), s32[]) {
  %param.1 = (bf16[8,32]{1,0}, bf16[32,32]{1,0}, (bf16[8,32]{1,0}, bf16[8,32]{1,0}), s32[]) parameter(0)
  %gte.0 = bf16[8,32]{1,0} get-tuple-element(%param.1), index=0
  %gte.1 = bf16[32,32]{1,0} get-tuple-element(%param.1), index=1
  %gte.2 = (bf16[8,32]{1,0}, bf16[8,32]{1,0}) get-tuple-element(%param.1), index=2
  %gte.3 = s32[] get-tuple-element(%param.1), index=3
  %dot.fusion = bf16[8,32]{1,0} fusion(%gte.0, %gte.1), kind=kCustom, calls=%dot_computation
  %cp-done = bf16[8,32]{1,0} collective-permute-done(%gte.2)
  %cp-start = (bf16[8,32]{1,0}, bf16[8,32]{1,0}, u32[], u32[]) collective-permute-start(%cp-done), channel_id=5, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  ROOT %tuple.1 = (bf16[8,32]{1,0}, bf16[32,32]{1,0}, (bf16[8,32]{1,0}, bf16[8,32]{1,0}), s32[]) tuple(%dot.fusion, %gte.1, %cp-start, %gte.3)
}

%windowed_dot_general_cond_ag (param.2: (bf16[8,32], bf16[32,32], (bf16[8,32], bf16[8,32]), s32[])) -> pred[] {
  %param.2 = (bf16[8,32]{1,0}, bf16[32,32]{1,0}, (bf16[8,32]{1,0}, bf16[8,32]{1,0}), s32[]) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (p.0: bf16[8,32], p.1: bf16[32,32]) -> bf16[8,32] {
  %p.0 = bf16[8,32]{1,0} parameter(0)
  %p.1 = bf16[32,32]{1,0} parameter(1)
  %gemm-start = ((bf16[8,32]{1,0}, bf16[32,32]{1,0}), bf16[8,32]{1,0}) custom-call-start(%p.0, %p.1), async_execution_thread="parallel", custom_call_target="__cublas$lt$matmul"
  %cp.side = bf16[8,32]{1,0} collective-permute(%p.0), channel_id=8, source_target_pairs={{0,1},{1,0}}
  %gemm-done = bf16[8,32]{1,0} custom-call-done(%gemm-start)
  %all-gather-start = (bf16[8,32]{1,0}, bf16[64,32]{1,0}) all-gather-start(%p.0), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}, use_global_device_ids=true
  %gemm.1 = bf16[8,32]{1,0} custom-call(%p.0, %p.1), custom_call_target="__cublas$gemm"
  %all-gather-done = bf16[64,32]{1,0} all-gather-done(%all-gather-start)
  %rs-start = ((bf16[64,32]{1,0}), bf16[8,32]{1,0}) async-start(%all-gather-done), calls=%wrapped_reduce_scatter_computation
  %norm = bf16[64,32]{1,0} fusion(%all-gather-done), kind=kLoop, calls=%norm_computation
  %rs-done = bf16[8,32]{1,0} async-done(%rs-start), calls=%wrapped_reduce_scatter_computation
  %ar-start = bf16[8,32]{1,0} all-reduce-start(%rs-done), channel_id=3, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add, backend_config={"operation_queue_id":"0","collective_backend_config":{"is_sync":true}}
  %gemm.2 = bf16[8,32]{1,0} custom-call(%p.0, %p.1), custom_call_target="__cublas$lt$matmul"
  %ar-done = bf16[8,32]{1,0} all-reduce-done(%ar-start)
  %cp.0 = bf16[8,32]{1,0} collective-permute(%ar-done), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cp-first = (bf16[8,32]{1,0}, bf16[8,32]{1,0}, u32[], u32[]) collective-permute-start(%cp.0), channel_id=6, source_target_pairs={{0,1},{1,2},{2,3},{3,4},{4,5},{5,6},{6,7},{7,0}}
  %s = s32[] constant(0)
  %init = (bf16[8,32]{1,0}, bf16[32,32]{1,0}, (bf16[8,32]{1,0}, bf16[8,32]{1,0}), s32[]) tuple(%cp.0, %p.1, %cp-first, %s)
  %loop = (bf16[8,32]{1,0}, bf16[32,32]{1,0}, (bf16[8,32]{1,0}, bf16[8,32]{1,0}), s32[]) while(%init), condition=%windowed_dot_general_cond_ag, body=%windowed_dot_general_body_ag, backend_config={"known_trip_count":{"n":"8"}}
  %out = bf16[8,32]{1,0} get-tuple-element(%loop), index=0
  %ar2-start = bf16[8,32]{1,0} all-reduce-start(%out), channel_id=7, replica_groups=[1,8]<=[8], use_global_device_ids=true, to_apply=%add
  %fused.dot = bf16[8,32]{1,0} fusion(%out, %p.1), kind=kCustom, calls=%dot_computation
  ROOT %ar2-done = bf16[8,32]{1,0} all-reduce-done(%ar2-start)
}
"""


def _by_name(found):
    return {o.collective.name: o for o in found}


def test_hand_written_gpu_schedule_is_read_pair_by_pair():
    found = _by_name(overlaps(GPU_HLO))
    assert set(found) == {"cp.side", "all-gather-start", "reduce-scatter.1", "ar-start", "cp.0",
                          "cp-first", "cp-start", "ar2-start"}
    side = found["cp.side"]  # synchronous, but a GEMM on the other stream runs meanwhile
    assert not side.asynchronous and side.overlapped and side.beside == ["gemm-start"]
    ag = found["all-gather-start"]
    assert ag.asynchronous and ag.overlapped and ag.beside == ["gemm.1"]
    rs = found["reduce-scatter.1"]  # the wrapped form: start and done are the async pair
    assert rs.collective.kind == "reduce-scatter" and rs.computation == "main"
    assert rs.asynchronous and not rs.overlapped  # an elementwise fusion is not compute
    ar = found["ar-start"]  # made synchronous by the scheduler: the GEMM after it waits
    assert not ar.asynchronous and ar.status == "exposed"
    assert not found["cp.0"].asynchronous and not found["cp.0"].overlapped
    loop = found["cp-start"]  # done in the next trip, after that trip's dot fusion
    assert loop.windowed and loop.overlapped and loop.beside == ["dot.fusion"]
    assert loop.collective.count == 8 and loop.collective.dims == (8, 32)  # not the u32[] words
    first = found["cp-first"]  # peeled out of the loop: done in the first trip, after its dot
    assert not first.windowed and first.beside == ["dot.fusion"]
    assert found["ar2-start"].beside == ["fused.dot"]  # a fusion that calls a dot


def test_hand_written_summary_and_report():
    found = overlaps(GPU_HLO)
    summary = summarize_overlap(found)
    outside, layer = summary["outside"], summary["layer"]
    assert outside["all-gather"] == {"overlapped": 1, "exposed": 0, "windowed": 0}
    assert outside["reduce-scatter"]["exposed"] == 1
    assert outside["all-reduce"] == {"overlapped": 1, "exposed": 1, "windowed": 0}
    assert outside["collective-permute"] == {"overlapped": 2, "exposed": 1, "windowed": 0}
    assert layer["collective-permute"] == {"overlapped": 8, "exposed": 0, "windowed": 8}
    text = format_overlap(found)
    assert "synchronous" in text and "[windowed einsum]" in text and "gemm.1" in text


def test_a_done_that_is_never_found_is_exposed():
    unpaired = GPU_HLO.replace("  %all-gather-done = bf16[64,32]{1,0} all-gather-done("
                               "%all-gather-start)\n", "")
    ag = _by_name(overlaps(unpaired))["all-gather-start"]
    assert ag.asynchronous and not ag.overlapped


@pytest.mark.parametrize("comm", ["xla", "ring"])
def test_compiled_cpu_program_every_collective_is_scheduled_synchronously(comm):
    """XLA:CPU runs collectives synchronously: the schedule of a real SP prefill lists each
    collective of the census, in its layer, as exposed."""
    cfg = dataclasses.replace(preset("smollm2"), num_layers=2, vocab_size=1024)
    rt = Runtime(cfg, ParallelConfig(tp=4, sp="on", comm=comm))
    text = rt.compile_prefill(True, 1, 64).as_text()
    found = overlaps(text, cfg.num_layers)
    assert [o.collective for o in found] == census(text, cfg.num_layers)
    layer = [o for o in found if o.collective.scope == "layer"]
    kinds = {o.collective.kind for o in layer}
    assert kinds == ({"collective-permute"} if comm == "ring" else
                     {"all-gather", "reduce-scatter"})
    assert all(not o.asynchronous and o.status == "exposed" for o in found)


def test_inspect_reports_the_schedule():
    cfg = dataclasses.replace(preset("smollm2"), num_layers=2, vocab_size=1024)
    off, on = inspect_modes(cfg, 2, 32)
    assert on.overlap_summary(2)["layer"]["all-gather"]["exposed"] == 2
    assert off.overlap_summary(2)["layer"]["all-reduce"]["exposed"] == 2


def test_xla_gpu_windowed_einsum_program_as_compiled():
    """A program XLA:GPU (jax 0.11.2) compiled for a mocked 8-GPU topology
    (benchmarks/mock_gpu_compile.py --hlo-dir, case sp-xla: Llama-3-8B layers, tp 8, SP, 4096
    tokens). Read by hand: in the q/k/v all-gather loop the first permute is issued before any
    GEMM (exposed); the second runs while the GEMMs of the local and first received chunks run
    on the other stream; in the o_proj reduce-scatter loop a permute issued right after its
    chain's GEMM finished, with no other GEMM started yet, is exposed."""
    import gzip
    import os

    from sharding.hlo import windowed_einsum_loops

    path = os.path.join(os.path.dirname(__file__), "data", "llama3-8b_sp-xla.hlo.txt.gz")
    with gzip.open(path, "rt") as f:
        text = f.read()
    assert windowed_einsum_loops(text) == {"windowed_dot_general_body_ag": 2,
                                           "windowed_dot_general_body_rs": 2}
    found = _by_name(overlaps(text, 2))
    first, second = found["collective-permute.74.2"], found["collective-permute.75.2"]
    assert first.windowed and not first.asynchronous and not first.overlapped
    assert not second.asynchronous and second.beside == ["custom-call-start.16",
                                                         "custom-call-start.17"]
    assert found["collective-permute-start.3"].beside == ["custom-call-start.4"]
    assert not found["collective-permute.36.2"].overlapped
    layer = summarize_overlap(list(found.values()), 2)["layer"]["collective-permute"]
    # per layer: the two all-gather loops' 8 permutes each, the two reduce-scatter loops' 7
    # (one moves two buffers) and one permute of each reduce-scatter in the layer body
    assert layer["overlapped"] + layer["exposed"] == 32 and layer["windowed"] == 30


def test_xla_gpu_ring_program_as_compiled():
    """The ring (comm="ring", SCHEDULE_OVERLAP's two transfers in flight) as XLA:GPU (jax 0.11.2)
    scheduled it for a mocked 8-GPU topology (benchmarks/mock_gpu_compile.py, case
    sp-ring-overlap, Llama-3-8B layers, tp 8, 4096 tokens). Read by hand: each step starts its two
    transfers (one per direction), issues the products of the chunks in hand, then waits for
    both; the first step's transfers run beside the product of the device's own chunk."""
    import gzip
    import os

    path = os.path.join(os.path.dirname(__file__), "data",
                        "llama3-8b_sp-ring-overlap.hlo.txt.gz")
    with gzip.open(path, "rt") as f:
        found = overlaps(f.read(), 2)
    layer = [o for o in found if o.collective.scope == "layer"]
    # 4 kernels a layer, 7 hops each (4 forward, 3 backward): as async pairs of one chunk
    assert len(layer) == 28 and all(o.asynchronous for o in layer)
    assert {o.collective.dims for o in layer} == {(512, 4096)}
    assert all(o.overlapped for o in layer)
    first = _by_name(found)
    assert first["collective-permute-start"].beside == ["dynamic_slice_fusion"]
    assert first["collective-permute-start.3"].beside == ["dynamic_slice_fusion.1",
                                                          "dynamic_slice_fusion.2"]
