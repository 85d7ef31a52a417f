"""Which of jax-sp's Pallas kernels signal griddepcontrol.launch_dependents (models/pdl.py):
with launch_dependents="auto" only those whose next kernel is one of jax-sp's own, reading
their output as they write it; the last layer's down_proj only while its layer index is below
the last; the kernels lowered for CUDA carry the (predicated) instruction where asked."""

import sys

import jax
import jax.numpy as jnp
import pytest

from conftest import lowered_for_cuda, signal_position, triton_kernels
from jax_sp import LLM, CompileOptions, ModelConfig, ParallelConfig, SamplingParams
from jax_sp.runtime import random_params
from models import pdl
from models.fp8_gemv import fp8_gemv


def _kernel_ir(rows, n, splits=1, below=None):
    spec = jax.ShapeDtypeStruct
    args = (spec((rows, 4096), jnp.bfloat16), spec((4, n, 4096), jnp.float8_e4m3fn),
            spec((4, n), jnp.float32), spec((), jnp.int32))
    with pdl.followed_by_kernel(True, below=below):
        text = lowered_for_cuda(
            lambda x, q, s, l: fp8_gemv(x, q, s, l, splits=splits, interpret=False), *args)
    (kernel,) = triton_kernels(text)
    return kernel


def test_auto_signals_only_where_the_next_kernel_reads_the_output_as_written():
    """"auto" inside followed_by_kernel(True): one row and 32 rows (a whole tensor-core tile)
    signal; 5 rows (padded to 16, then sliced) and split partial sums (added by XLA) do not;
    `below` predicates the instruction on the layer index; outside the context nothing
    signals."""
    with pdl.signalling("auto"):
        assert signal_position(_kernel_ir(1, 1024)) == (1, 1)
        assert signal_position(_kernel_ir(32, 1024)) == (1, 1)
        assert signal_position(_kernel_ir(5, 1024)) == (0, None)
        assert signal_position(_kernel_ir(1, 1024, splits=2)) == (0, None)
        kernel = _kernel_ir(1, 1024, below=3)
        assert signal_position(kernel) == (1, 1)
        assert "setp.lt.s32 p, $1, 3" in kernel and "@p griddepcontrol.launch_dependents" in kernel
    with pdl.signalling(True):  # True: every kernel, unpredicated
        assert signal_position(_kernel_ir(1, 1024, splits=2)) == (1, 1)
        assert "setp.lt" not in _kernel_ir(1, 1024, below=3)
    assert signal_position(_kernel_ir(1, 1024)) == (0, None)


# 4 query / 2 KV heads of 16 (the decode attention kernel's powers of two), odd V; D wide
# enough that o_proj and down_proj need no split of their contracted axis (>= 264 programs)
CFG = ModelConfig(vocab_size=101, hidden_size=2048, intermediate_size=48, num_layers=3,
                  num_heads=4, num_kv_heads=2, head_dim=16)


def _decisions(monkeypatch, tp, batch, add_norm="pallas"):
    """(kernel, its [N, K] for an FP8 GEMV, asked to signal, below) for each kernel the decode
    program traces, in order, with launch_dependents="auto"; and the tokens."""
    seen = []
    wanted = pdl.wanted

    def spy(direct=True):
        caller = sys._getframe(2)  # the kernel's wrapper, through pdl.enabled
        kernel = caller.f_globals["__name__"].rsplit(".", 1)[-1]
        shape = (caller.f_locals["n"], caller.f_locals["k"]) if kernel == "fp8_gemv" else None
        seen.append((kernel, shape, wanted(direct), pdl.below()))
        return seen[-1][2]

    monkeypatch.setattr(pdl, "wanted", spy)
    llm = LLM(CFG, random_params(CFG), parallel=ParallelConfig(tp=tp), dtype="float32",
              max_seq_len=32, quantization="fp8-head",
              options=CompileOptions(fp8_gemv="pallas", add_norm=add_norm, attention="pallas",
                                     launch_dependents="auto"))
    prompts = [[3, 1, 4, 1, 5]] * batch
    llm.generate(prompts, SamplingParams(max_new_tokens=1))  # the prefill program alone
    prefill = len(seen)
    # and the decode program
    tokens = [c.token_ids for c in llm.generate(prompts, SamplingParams(max_new_tokens=3))]
    return seen[prefill:], tokens


def test_a_decode_step_signals_from_the_kernels_that_feed_its_own(monkeypatch):
    """One row on one device: each add-and-norm feeds an FP8 GEMV and signals, q/k/v feeds the
    decode attention kernel, o_proj the add-and-norm, down_proj the next layer's add-and-norm
    (below the last layer); gate/up (SiLU·up in its epilogue, down_proj next: measured slower
    with the signal), the decode attention (combined by XLA) and the LM head (sampling in XLA)
    do not."""
    d, f, v = 2048, 48, 101
    qkv, o, gate_up, down, head = (4 + 4) * 16, d, 2 * f, d, v
    steps, _ = _decisions(monkeypatch, 1, 1)
    assert steps[:-1] == [("add_norm", None, True, None), ("fp8_gemv", (qkv, d), True, None),
                      ("decode_attention", None, False, None),
                      ("fp8_gemv", (o, 4 * 16), True, None), ("add_norm", None, True, None),
                      ("fp8_gemv", (gate_up, d), False, None),
                      ("fp8_gemv", (down, f), True, 2)]
    assert steps[-1] == ("fp8_gemv", (head, d), False, None)


def test_with_the_norms_in_the_gemvs_the_step_runs_no_kernel_between_them(monkeypatch):
    """add_norm="gemv": q/k/v and gate/up add and normalize in their own FP8 kernels, so a
    one-row decode step traces no add-and-norm kernel; q/k/v still signals the decode
    attention, o_proj and down_proj (below the last layer) the kernel that now reads their sum
    (gate/up's, the next layer's q/k/v); the tokens are XLA's norms'."""
    d, f, v = 2048, 48, 101
    qkv, o, gate_up, down, head = (4 + 4) * 16, d, 2 * f, d, v
    steps, tokens = _decisions(monkeypatch, 1, 1, add_norm="gemv")
    assert steps == [("fp8_gemv", (qkv, d), True, None), ("decode_attention", None, False, None),
                     ("fp8_gemv", (o, 4 * 16), True, None), ("fp8_gemv", (gate_up, d), False, None),
                     ("fp8_gemv", (down, f), True, 2), ("fp8_gemv", (head, d), False, None)]
    xla = LLM(CFG, random_params(CFG), parallel=ParallelConfig(tp=1), dtype="float32",
              max_seq_len=32, quantization="fp8-head",
              options=CompileOptions(fp8_gemv="pallas", add_norm="xla", attention="pallas"))
    assert tokens == [c.token_ids for c in xla.generate([[3, 1, 4, 1, 5]],
                                                        SamplingParams(max_new_tokens=3))]


@pytest.mark.parametrize("tp,batch,signals", [
    (2, 1, [True, True, False, False, True, False, False, False]),
    (1, 3, [False] * 8)])
def test_no_signal_where_a_collective_or_a_padding_comes_next(monkeypatch, tp, batch, signals):
    """tp 2: o_proj's and down_proj's partial sums are all-reduced next, so neither signals (the
    norms and q/k/v, column-parallel, still do); 3 rows: each GEMV pads them to a 16-row tile
    and slices its result, so no GEMV signals, and no norm (the next kernel is that padding)."""
    steps, _ = _decisions(monkeypatch, tp, batch)
    assert [k for k, _, _, _ in steps] == ["add_norm", "fp8_gemv", "decode_attention",
                                           "fp8_gemv", "add_norm", "fp8_gemv", "fp8_gemv",
                                           "fp8_gemv"]
    assert [w for _, _, w, _ in steps] == signals
