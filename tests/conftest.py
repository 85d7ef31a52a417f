"""Test setup: 8 simulated CPU devices (set before jax is imported) and tiny HF models with
deliberately awkward sizes: 9 query / 3 KV heads, vocabularies and MLP widths no tp divides."""

import os

# LLVM's optimization level 0 for the CPU code XLA emits: the tests run tiny models, so their
# time is XLA's compiles, and this cuts the suite's by about a fifth; XLA's own passes (SPMD
# partitioning, fusion, scheduling) run as they do at any level
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8"
                           + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# GGUF metadata and converted tokenizers (bridges/cache.py) go to a folder of this test session,
# shared with the processes tests start, never to the user's cache
os.environ.setdefault("JAX_SP_CACHE", __import__("tempfile").mkdtemp(prefix="jax-sp-cache-"))
# XLA's persistent compilation cache in that folder: tests build the same tiny models on the
# same meshes many times, and an identical program (same HLO, same options) is compiled once
# per session instead of once per test (about a third of the suite's time)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.environ["JAX_SP_CACHE"], "xla"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from jax_sp import SamplingParams  # noqa: E402


def _build(kind: str, seed: int = 0):
    """"llama" (3 layers), "llamaN" (N layers, for pipeline splits), "qwen2", "mistral"."""
    torch.manual_seed(seed)
    if kind.startswith("llama"):  # 9 query / 3 KV heads (SmolLM2's), V and F divisible by no tp
        cfg = transformers.LlamaConfig(
            vocab_size=101, hidden_size=45, intermediate_size=50,
            num_hidden_layers=int(kind[5:] or 3),
            num_attention_heads=9, num_key_value_heads=3, head_dim=6, rms_norm_eps=1e-5,
            max_position_embeddings=4096, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 32})
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":  # q/k/v bias, 2 KV heads (< tp 4, 8: replicated), tied embeddings
        cfg = transformers.Qwen2Config(
            vocab_size=97, hidden_size=44, intermediate_size=76, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=6, rms_norm_eps=1e-6,
            max_position_embeddings=256, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":  # sliding window shorter than the prompts
        cfg = transformers.MistralConfig(
            vocab_size=89, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, sliding_window=16,
            max_position_embeddings=256)
        model = transformers.MistralForCausalLM(cfg)
    else:
        raise KeyError(kind)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: perturb them so they matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.config.eos_token_id = model.generation_config.eos_token_id = None  # no stop token
    return model.eval().float()


@pytest.fixture(scope="session")
def hf_models():
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = _build(kind)
        return cache[kind]

    return get


def hf_logits(model, prompts):
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().numpy() for p in prompts]


# seeded sampling, with a seed whose key jax makes from its low 32 bits
SAMPLED = SamplingParams(max_new_tokens=6, temperature=0.9, top_k=20, seed=-3)


def random_prompts(vocab, lengths, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randint(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="session")
def smollm2():
    """(ModelConfig, parameters, tokenizer, HF module) of the embedded SmolLM2-135M-Instruct."""
    import transformers as tf

    from bridges.hf import load_module
    from bridges.pretrained import embedded_gguf

    path = embedded_gguf("smollm2")
    folder, name = os.path.split(path)
    module = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                     dtype=torch.float32).eval()
    tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    cfg, params = load_module(module)
    return cfg, params, tokenizer, module


def hf_greedy(model, prompts, max_new_tokens, eos_token_id=None):
    """HF transformers' greedy continuation of each prompt (EOS included when it stops)."""
    import copy

    config = copy.deepcopy(model.generation_config)
    config.eos_token_id = eos_token_id  # None: no stop token at all
    config.max_new_tokens, config.do_sample, config.pad_token_id = max_new_tokens, False, 0
    out = []
    for p in prompts:
        with torch.no_grad():
            ids = model.generate(torch.tensor([p]), generation_config=config,
                                 attention_mask=torch.ones(1, len(p), dtype=torch.long))
        out.append(ids[0, len(p):].tolist())
    return out


def lowered_for_cuda(fn, *specs) -> str:
    """The StableHLO text of `fn` lowered for CUDA on this machine (no GPU needed): Pallas
    kernels go through their Triton lowering and sit in the module as Triton custom calls,
    whose payload XLA compiles only on a GPU. An op the lowering cannot take raises here."""
    import jax
    from jax import export

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    return export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(
        *specs).mlir_module()


def triton_kernels(text: str) -> list[str]:
    """The Triton IR of each Pallas kernel in a module lowered for CUDA (`lowered_for_cuda`'s
    text), read back from the custom calls' payload: what the GPU would compile. Uses
    JAX-internal MLIR bindings (jaxlib carries Triton's dialect for Pallas)."""
    from jax._src.interpreters import mlir
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    calls = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and ir.StringAttr(
                            inner.operation.attributes["call_target_name"]).value == (
                                "__gpu$xla.gpu.triton"):
                        calls.append(inner.operation)
                    walk(inner.operation)
    walk(ir.Module.parse(text, context=mlir.make_ir_context()).operation)
    kernels = []
    for call in calls:
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        context = ir.Context()
        triton.dialect.register_dialect(context)
        payload = ir.StringAttr(config["ir"]).value_bytes
        kernels.append(str(ir.Module.parse(payload, context=context)))
    return kernels


def signal_position(kernel: str):
    """(how many griddepcontrol.launch_dependents a kernel's Triton IR holds, how many loads
    come before the first)."""
    lines = kernel.splitlines()
    at = [i for i, line in enumerate(lines) if "griddepcontrol.launch_dependents" in line]
    loads = [i for i, line in enumerate(lines) if "tt.load" in line]
    return len(at), sum(i < at[0] for i in loads) if at else None
