"""comm="mosaic": refused with a clear error where the kernel cannot run, and the wrapper around
JAX's all-gather matmul kernel (padding each device's rows to the kernel's tile, reshaping the
fused weights) checked against plain einsums. The kernel itself runs on Hopper GPUs only: on CPU
the wrapper is driven by the same all-gather + matmul written with jax.lax."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import random_prompts
from jax_sp import LLM, ParallelConfig
from sharding.mesh import make_mesh, tp_mesh
from sharding.mosaic import TILE_M, mosaic_column, projection_fits


def _gather_then_matmul(x_ld, w_df, axis):
    """What the kernel computes, per device: every device's rows times this device's columns."""
    assert x_ld.shape[0] % TILE_M == 0  # the wrapper pads to the kernel's tile height
    return jax.lax.all_gather(x_ld, axis, tiled=True) @ w_df


@pytest.mark.parametrize("tp,rows", [(2, 5), (4, 33), (8, 128), (8, 130)])
@pytest.mark.parametrize("spec,w_shape", [("TD,DKCH->TKCH", (12, 8, 3, 4)),
                                          ("TD,DCF->TCF", (12, 2, 40))])
def test_wrapper_pads_rows_and_reshapes_weights_like_the_einsum(tp, rows, spec, w_shape):
    mesh = tp_mesh(make_mesh(tp))  # the runtime's mesh for comm="mosaic"
    rng = np.random.default_rng(tp * rows)
    x = jnp.asarray(rng.standard_normal((tp * rows, w_shape[0])), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    feature = 1 if spec.startswith("TD,DK") else 2
    w_spec = P(*("tp" if i == feature else None for i in range(len(w_shape))))
    x = jax.device_put(x, NamedSharding(mesh, P("tp", None)))
    w = jax.device_put(w, NamedSharding(mesh, w_spec))
    got = jax.jit(lambda x, w: mosaic_column(mesh, spec, x, w, _gather_then_matmul))(x, w)
    np.testing.assert_allclose(np.asarray(got), np.asarray(jnp.einsum(spec, x, w)),
                               rtol=1e-5, atol=1e-5)
    assert got.sharding.spec[feature] == "tp"


def test_projections_that_miss_the_tiles_are_left_to_the_ring():
    assert projection_fits("TD,DKCH->TKCH", (4096, 8, 6, 128), 8)  # Llama-3-8B q/k/v: 768/dev
    assert projection_fits("TD,DCF->TCF", (8192, 2, 28672), 8)  # Llama-3-70B gate/up
    assert not projection_fits("TD,DV->TV", (4096, 128256), 8)  # 16032 columns a device
    assert projection_fits("TD,DCF->TCF", (576, 2, 1536), 4)  # SmolLM2 gate/up: 768/device
    assert not projection_fits("TD,DCF->TCF", (576, 2, 1536), 8)  # 384/device
    assert not projection_fits("TD,DCF->TCF", (4000, 2, 1024), 4)  # D not a multiple of 64


def test_mosaic_is_refused_off_hopper_with_what_would_work(hf_models):
    model = hf_models("llama")
    with pytest.raises(ValueError, match=r"comm='mosaic' cannot run here: it is a GPU kernel "
                                         r"and the mesh is on cpu; use comm='ring'"):
        LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on", comm="mosaic"))
    # nothing is left behind: the same model serves with a comm that runs here
    llm = LLM.from_torch(model, parallel=ParallelConfig(tp=2, sp="on", comm="ring"))
    assert len(llm.logits(random_prompts(model.config.vocab_size, (6,)))[0]) == 6


def test_cli_offers_every_comm_mode():
    from jax_sp.cli import COMM_CHOICES
    from jax_sp.config import COMM_MODES

    assert COMM_CHOICES == COMM_MODES


@pytest.mark.parametrize("device,dtype,why", [
    (dict(platform="gpu", compute_capability="8.0", device_kind="NVIDIA A100"), jnp.bfloat16,
     r"needs a Hopper GPU \(compute capability 9.x\) and the device is NVIDIA A100 \(8.0\)"),
    (dict(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200"), jnp.float32,
     "computes in bfloat16 or float16, not float32"),
    (dict(platform="gpu", compute_capability="9.0", device_kind="NVIDIA H200"), jnp.bfloat16,
     "must span every device of the process in id order"),
])
def test_each_reason_the_kernel_cannot_run_is_named(device, dtype, why):
    """The checks run in order on the mesh's devices (described here, since this machine has no
    GPU); the last case is a mesh of GPUs this process does not own."""
    from types import SimpleNamespace

    from sharding.mosaic import check_mesh

    devices = np.array([SimpleNamespace(id=i, **device) for i in range(2)])
    mesh = SimpleNamespace(devices=devices, shape={"tp": 2})
    with pytest.raises(ValueError, match=why + r".*use comm='ring'"):
        check_mesh(mesh, dtype)


def test_the_model_runs_on_the_one_axis_mesh_mosaic_uses(hf_models):
    """comm="mosaic" runs its programs on a mesh of the tp axis alone: the rest of the model (here
    with the ring in the kernel's place) gives HF's logits on it."""
    from bridges.hf import load_module
    from conftest import hf_logits
    from jax_sp.runtime import Runtime

    model = hf_models("llama")
    cfg, params = load_module(model)
    rt = Runtime(cfg, ParallelConfig(tp=4, sp="on", comm="ring"), mesh=tp_mesh(make_mesh(4)))
    (prompt,) = random_prompts(cfg.vocab_size, (12,))
    ids = np.asarray([prompt], np.int32)
    logits = rt.logits(rt.place(params), ids, np.asarray([12], np.int32), sp=True)
    np.testing.assert_allclose(np.asarray(logits), hf_logits(model, [prompt])[0], atol=1e-4)
