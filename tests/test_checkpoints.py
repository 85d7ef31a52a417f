"""Checkpoints on disk: safetensors folders, GGUF files and Orbax, streamed to device shards."""

import copy
import json
import os
import re
import sys
from pathlib import Path

import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from bridges.streaming import CheckpointError
from conftest import random_prompts
from gguf_writer import quantize_like_gguf, write_gguf
from jax_sp import LLM, ParallelConfig
from jax_sp.cli import main as cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import load_checkpoint  # noqa: E402


def tiny_llama(tie=False, hidden=64, inter=96, heads=4, kv=2, head_dim=16, vocab=96, seed=0):
    hc = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                  num_hidden_layers=3, num_attention_heads=heads,
                                  num_key_value_heads=kv, head_dim=head_dim,
                                  tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(hc).eval()


def logits_close(llm, ref_logits, prompts, tol=1e-5):
    for got, want in zip(llm.logits(prompts), ref_logits):
        assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max())


@pytest.fixture(scope="module")
def odd_model(tmp_path_factory):
    """An untied model whose heads (6 query / 2 KV) and vocabulary (101) tp 4 must pad, saved
    as several safetensors shards."""
    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    folder = tmp_path_factory.mktemp("hf")
    model.save_pretrained(folder, max_shard_size="60KB")
    prompts = random_prompts(101, (7, 12), seed=3)
    return model, str(folder), prompts, LLM.from_torch(model).logits(prompts)


def test_checkpoint_is_sharded(odd_model):
    _, folder, _, _ = odd_model
    shards = [f for f in os.listdir(folder) if f.endswith(".safetensors")]
    assert len(shards) >= 2 and os.path.exists(os.path.join(folder,
                                                            "model.safetensors.index.json"))


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_safetensors_folder_equals_from_torch(odd_model, tp):
    _, folder, prompts, ref = odd_model
    llm = LLM.from_pretrained(folder, parallel=ParallelConfig(tp=tp, sp="on"))
    logits_close(llm, ref, prompts)


def test_safetensors_pipeline_stages_read_their_layers(odd_model):
    _, folder, prompts, ref = odd_model
    llm = LLM.from_pretrained(folder, parallel=ParallelConfig(tp=2, pp=2, sp="on"))
    logits_close(llm, ref, prompts)


def test_each_device_holds_only_its_shard(odd_model):
    _, folder, _, _ = odd_model
    llm = LLM.from_pretrained(folder, parallel=ParallelConfig(tp=4))
    qkv = llm.state["layers"]["attn"]["w_qkv_dkch"][...]  # [L, D, K, G + 2, H]
    assert qkv.shape[2:4] == (4, 5)  # 2 KV groups of 3 query heads padded to 4 groups for tp 4
    assert {s.data.shape[2:4] for s in qkv.addressable_shards} == {(1, 5)}


def test_replicated_kv_heads_load_from_safetensors(tmp_path):
    """2 KV heads at tp 4: each is replicated twice and its group's 2 query heads split between
    the replicas, block by block as each device's shard is read from disk."""
    model = tiny_llama(heads=4, kv=2)
    model.save_pretrained(tmp_path)
    prompts = random_prompts(96, (5, 9), seed=4)
    llm = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=4))
    assert (llm.runtime.plan.kv_repeat, llm.state["layers"]["attn"]["w_qkv_dkch"].shape[2:4]) == (
        2, (4, 3))
    logits_close(llm, LLM.from_torch(model).logits(prompts), prompts)


def _qwen2_with_biases(hf_models):
    model = copy.deepcopy(hf_models("qwen2"))
    with torch.no_grad():  # transformers initialises the biases to zero
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
    return model


def test_qkv_bias_with_replicated_kv_heads_loads_from_safetensors(hf_models, tmp_path):
    """Qwen2's q/k/v biases (random here: transformers initialises them to zero) fused by KV
    group, 2 KV heads at tp 4, streamed from disk block by block."""
    model = _qwen2_with_biases(hf_models)
    model.save_pretrained(tmp_path)
    prompts = random_prompts(model.config.vocab_size, (6, 11), seed=5)
    llm = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=4, sp="on"))
    assert llm.runtime.plan.kv_repeat == 2
    want = LLM.from_torch(model).logits(prompts)
    logits_close(llm, want, prompts)
    with torch.no_grad():  # the reference itself agrees with transformers' logits, biases set
        got = model(torch.tensor([prompts[0]])).logits[0].numpy()
    np.testing.assert_allclose(want[0], got, atol=1e-4 * max(1.0, np.abs(got).max()))


def test_bf16_checkpoint_stays_bf16(tmp_path):
    model = tiny_llama().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    llm = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=2))
    assert np.dtype(llm.runtime.dtype).name == "bfloat16"
    assert {str(x.dtype) for x in jax_leaves(llm.state)} == {"bfloat16"}
    want = LLM.from_torch(model, dtype="bfloat16", parallel=ParallelConfig(tp=2))
    prompts = random_prompts(96, (9,), seed=1)
    np.testing.assert_array_equal(llm.logits(prompts)[0], want.logits(prompts)[0])


def jax_leaves(state):
    import jax

    return jax.tree.leaves(state)


@pytest.mark.parametrize("qtype", [gguf.GGMLQuantizationType.F32,
                                   gguf.GGMLQuantizationType.Q8_0])
@pytest.mark.parametrize("tp", [1, 2])
def test_gguf_file_equals_from_torch(tmp_path, qtype, tp):
    model = tiny_llama()
    path = str(tmp_path / f"tiny-{qtype.name}.gguf")
    write_gguf(model, path, qtype)
    # the reference: the same weights after the quantization round trip
    ref_model = copy.deepcopy(model)
    ref_model.load_state_dict({k: torch.tensor(quantize_like_gguf(v.float().numpy(), qtype))
                               for k, v in model.state_dict().items()})
    prompts = random_prompts(96, (8, 11), seed=4)
    llm = LLM.from_pretrained(path, parallel=ParallelConfig(tp=tp, sp="on"))
    logits_close(llm, LLM.from_torch(ref_model).logits(prompts), prompts)


def test_embedded_gguf_read_directly_equals_transformers(smollm2):
    """The real file (210 Q4_1 tensors, one Q8_0, 61 F32): our reader (gguf dequantization, llama.cpp q/k order undone) gives
    the logits of transformers' own GGUF loader."""
    cfg, params, _, module = smollm2
    prompts = random_prompts(cfg.vocab_size, (9,), seed=5)
    want = LLM(cfg, params).logits(prompts)[0]
    got = LLM.from_pretrained("smollm2").logits(prompts)[0]
    assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_gguf_rope_scaling_is_refused_not_dropped(tmp_path):
    path = str(tmp_path / "scaled.gguf")
    write_gguf(tiny_llama(), path, rope_scaling=("linear", 4.0))
    with pytest.raises(CheckpointError, match=r"RoPE scaling 'linear'.*not supported"):
        LLM.from_pretrained(path)


def test_gguf_with_q_k_v_biases_equals_transformers(tmp_path):
    """llama.cpp permutes the q and k biases of a llama-arch file as it does their weights."""
    hc = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=16, attention_bias=True)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hc).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.5)
            layer.self_attn.o_proj.bias.zero_()
    path = str(tmp_path / "bias.gguf")
    write_gguf(model, path)
    prompts = random_prompts(96, (12, 5), seed=2)
    llm = LLM.from_pretrained(path, parallel=ParallelConfig(tp=2))
    assert llm.cfg.qkv_bias
    with torch.no_grad():
        for got, ids in zip(llm.logits(prompts), prompts):
            want = model(torch.tensor([ids])).logits[0].numpy()
            np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (4, 1), (2, 2)])
def test_orbax_round_trip(odd_model, tmp_path_factory, tp, pp):
    _, folder, prompts, ref = odd_model
    dst = str(tmp_path_factory.mktemp("orbax") / "ckpt")
    assert cli(["convert", folder, dst]) == 0
    llm = LLM.from_pretrained(dst, parallel=ParallelConfig(tp=tp, pp=pp, sp="on"))
    logits_close(llm, ref, prompts)


def test_peak_memory_of_a_1gb_load_stays_under_model_plus_largest_tensor(tmp_path):
    """A ~1 GB bf16 checkpoint at tp 4: the loading process never holds more than the loaded
    parameters plus 1.3x the largest tensor (never two copies of the model)."""
    info = load_checkpoint.write_checkpoint(str(tmp_path / "big"), gb=1.0)
    assert info["bytes"] > 0.9e9
    r = load_checkpoint.measure(str(tmp_path / "big"), tp=4)
    assert r["dtype"] == "bfloat16"
    assert r["loaded_bytes"] >= info["bytes"]
    assert r["above_before"] <= r["loaded_bytes"] + 1.3 * info["largest"], r


# -- errors ------------------------------------------------------------------------------------


def test_truncated_safetensors_names_the_file(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated"):
        LLM.from_pretrained(str(tmp_path))


def save_edited(folder, edit):
    """A tiny model's config and a safetensors file of its state dict after `edit(sd)`."""
    from safetensors.torch import save_file

    model = tiny_llama()
    model.config.save_pretrained(folder)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))
    return str(folder)


def test_missing_tensor_names_key_and_parameter(tmp_path):
    path = save_edited(tmp_path, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError,
                       match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight \(for "
                             r"layers/mlp/w_gate_up_dcf\)"):
        LLM.from_pretrained(path)


def test_wrong_shape_names_key_and_parameter(tmp_path):
    path = save_edited(tmp_path, lambda sd: sd.update(
        {"model.layers.0.self_attn.k_proj.weight": torch.zeros(24, 64)}))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight has shape \(24, 64\).*"
                                              r"layers/attn/w_qkv_dkch"):
        LLM.from_pretrained(path)


def test_unexpected_tensor_is_named(tmp_path):
    path = save_edited(tmp_path, lambda sd: sd.update(
        {"model.layers.0.mlp.extra.weight": torch.zeros(2, 2)}))
    with pytest.raises(CheckpointError, match=r"unexpected.*mlp\.extra\.weight"):
        LLM.from_pretrained(path)


def test_unknown_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"unsupported architecture 'gpt2'.*LlamaForCausalLM.*"
                                         r"MistralForCausalLM.*Qwen2ForCausalLM"):
        LLM.from_pretrained(str(tmp_path))


def test_truncated_gguf_names_the_file(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(tiny_llama(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"tiny\.gguf"):
        LLM.from_pretrained(str(path))


def test_convert_refuses_a_non_empty_destination(odd_model, tmp_path, capsys):
    _, folder, _, _ = odd_model
    (tmp_path / "keep.txt").write_text("mine")
    assert cli(["convert", folder, str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    # checked before the source is read: a source that would fail to load is never opened
    assert cli(["convert", str(tmp_path / "keep.txt"), str(tmp_path)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_orbax_checkpoint_of_format_2_is_fused_on_load(hf_models, tmp_path):
    """Format 2 stored q apart from k/v (w_q_dnh [L, D, N, H], w_kv_dckh [L, D, 2, K, H] and
    their biases); such a checkpoint, made here from a format-3 one, loads with the same logits,
    KV heads replicated at tp 4 included."""
    import orbax.checkpoint as ocp

    model = _qwen2_with_biases(hf_models)
    model.save_pretrained(tmp_path / "hf")
    new, old = tmp_path / "new", tmp_path / "old"
    assert cli(["convert", str(tmp_path / "hf"), str(new)]) == 0
    with ocp.StandardCheckpointer() as ckpt:
        tree = jax.tree.map(np.asarray, ckpt.restore(str(new / "params")))
    attn = tree["layers"]["attn"]
    for fused, q_name, kv_name in (("w_qkv_dkch", "w_q_dnh", "w_kv_dckh"),
                                   ("b_qkv_kch", "b_q_nh", "b_kv_ckh")):
        x = attn.pop(fused)  # [..., K, G + 2, H]
        *lead, k, c, h = x.shape
        attn[q_name] = x[..., : c - 2, :].reshape(*lead, k * (c - 2), h)
        attn[kv_name] = np.moveaxis(x[..., c - 2:, :], -2, -3)  # [..., 2, K, H]
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(str((old / "params").resolve()), tree)
    meta = json.loads((new / "jax_sp.json").read_text())
    (old / "jax_sp.json").write_text(json.dumps(dict(meta, format=2)))
    prompts = random_prompts(model.config.vocab_size, (6, 11), seed=6)
    want = LLM.from_torch(model).logits(prompts)
    for tp in (1, 4):
        logits_close(LLM.from_pretrained(str(old), parallel=ParallelConfig(tp=tp)), want, prompts)


def test_orbax_checkpoint_of_an_older_format_asks_for_a_new_convert(odd_model, tmp_path):
    """Format 1 stored k/v and gate/up as separate parameters; reading it as fused would fail
    deep inside Orbax, so the marker file is checked first."""
    _, folder, _, _ = odd_model
    dst = tmp_path / "ckpt"
    assert cli(["convert", folder, str(dst)]) == 0
    marker = dst / "jax_sp.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps(dict(meta, format=1)))
    with pytest.raises(ValueError, match=r"format 1, this version reads formats 2 and 3.*jax-sp "
                                         r"convert"):
        LLM.from_pretrained(str(dst))
    assert json.loads(marker.read_text())["format"] == 1


def test_gguf_metadata_and_tokenizer_come_from_the_cache_after_a_first_load(smollm2, monkeypatch):
    """After one load of a GGUF file, its metadata and tokenizer come from the cache: neither
    gguf's reader nor transformers' GGUF conversion runs again, and the cached tokenizer encodes,
    templates and decodes as transformers' conversion does."""
    import gguf

    from bridges import cache

    cfg, params, tokenizer, _ = smollm2
    from bridges.pretrained import embedded_gguf

    first = LLM.from_pretrained("smollm2")
    path = embedded_gguf("smollm2")  # the first load (here or earlier) stored its entry
    assert cache.read_table(path) and cache.tokenizer_folder(path).startswith(cache.root())

    def refuse(*args, **kwargs):
        raise AssertionError("the cache was not used")

    monkeypatch.setattr(gguf, "GGUFReader", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    cached = LLM.from_pretrained("smollm2")
    chats = ["What is the capital of France?", "Write the word café and the emoji 🎉."]
    assert [cached.encode(c) for c in chats] == [
        list(tokenizer.apply_chat_template([{"role": "user", "content": c}],
                                           add_generation_prompt=True, tokenize=True)
             ["input_ids"]) for c in chats]
    ids = tokenizer.encode(chats[1])
    assert cached.tokenizer.encode(chats[1]) == ids
    assert cached.tokenizer.decode(ids) == tokenizer.decode(ids)
    assert cached.tokenizer.eos_token_id == tokenizer.eos_token_id
    prompts = random_prompts(cfg.vocab_size, (7,), seed=9)
    np.testing.assert_array_equal(cached.logits(prompts)[0], first.logits(prompts)[0])


def test_a_changed_gguf_file_is_read_again_and_an_unwritable_cache_only_warns(
        tmp_path, monkeypatch, caplog):
    from bridges import cache

    model = tiny_llama()
    path = tmp_path / "tiny.gguf"
    write_gguf(model, str(path))
    monkeypatch.setenv("JAX_SP_CACHE", str(tmp_path / "cache"))
    prompts = random_prompts(96, (5,), seed=1)
    want = LLM.from_pretrained(str(path)).logits(prompts)[0]
    entry = cache.entry(str(path))
    assert os.path.isfile(os.path.join(entry, "table.json"))
    write_gguf(tiny_llama(seed=1), str(path))  # same name and size, new weights and mtime
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    assert cache.entry(str(path)) != entry
    other = LLM.from_pretrained(str(path)).logits(prompts)[0]
    assert not np.allclose(other, want)
    (tmp_path / "blocked").write_text("a file where the cache folder would be")
    monkeypatch.setenv("JAX_SP_CACHE", str(tmp_path / "blocked"))
    with caplog.at_level("WARNING", logger="jax_sp"):
        again = LLM.from_pretrained(str(path)).logits(prompts)[0]
    assert "could not write the cache entry" in caplog.text
    np.testing.assert_array_equal(again, other)


def _fp8_checkpoint(model, folder, per_channel=True, drop_scale=None, head=False,
                    scale_shape=None, scale_name="weight_scale"):
    """model saved in the common HF FP8 layout: each layer projection's weight (and with head
    the LM head's) in float8_e4m3fn beside its weight_scale ([out, 1] per channel, or one per
    tensor; scale_shape: every scale broadcast to that shape instead; scale_name: the scales'
    name) and a static input_scale, with the attention's KV-cache scales (llm-compressor's
    self_attn.k_scale / v_scale per channel; per tensor the older k_proj / v_proj.output_scale
    and AutoFP8's self_attn.kv_scale); returns the model with the weights those values
    dequantize to."""
    from safetensors.torch import save_file

    model.save_pretrained(folder)
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    exact = copy.deepcopy(model)
    for key in [k for k in state if k.endswith("proj.weight")
                or (head and k == "lm_head.weight")]:
        w = state[key].float()
        amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax()
        scale = amax / 448.0
        q = (w / scale).to(torch.float8_e4m3fn)
        state[key] = q
        if key != drop_scale:
            state[key.replace("weight", scale_name)] = (scale.float() if scale_shape is None else
                                     scale.float().max().expand(scale_shape).clone())
        state[key.replace("weight", "input_scale")] = torch.tensor(1.0)
        if key.endswith("k_proj.weight") and per_channel:
            for kv in "kv":
                state[key.replace("k_proj.weight", f"{kv}_scale")] = torch.tensor(0.02)
        elif key.endswith(("k_proj.weight", "v_proj.weight")) and not per_channel:
            state[key.replace("weight", "output_scale")] = torch.tensor([0.02])
            state[key[:key.index("self_attn.") + 10] + "kv_scale"] = torch.tensor(0.02)
        exact.state_dict()[key].copy_(q.float() * scale)
    for f in os.listdir(folder):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(folder, f))
    save_file(state, os.path.join(folder, "model.safetensors"))
    return exact


@pytest.mark.parametrize("per_channel,tp", [(True, 2), (False, 4)])
def test_fp8_hf_checkpoint_loads_as_the_weights_it_stores(tmp_path, caplog, monkeypatch,
                                                          per_channel, tp):
    """F8_E4M3 weights with per-channel or per-tensor weight_scale are dequantized on read: the
    logits of the model whose weights are those values; quantization="fp8" runs on them too.
    The checkpoint's KV-cache scales are skipped with a warning (the FP8 cache runs
    unscaled). Per channel, every stack is quantized layer by layer, as a large one is."""
    if per_channel:
        monkeypatch.setattr("jax_sp.runtime.QUANTIZE_BY_LAYER_BYTES", 0)
    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    exact = _fp8_checkpoint(model, tmp_path, per_channel)
    prompts = random_prompts(101, (7, 12), seed=4)
    ref = LLM.from_torch(exact).logits(prompts)
    with caplog.at_level("WARNING", logger="bridges.safetensors_source"):
        llm = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=tp, sp="on"),
                                  progress=False)
    assert re.search(rf"{(2 if per_channel else 3) * model.config.num_hidden_layers} attention "
                     r"scale tensor\(s\) "
                     r"\(model\.layers\.0\.self_attn\.(k_scale|k_proj\.output_scale)",
                     caplog.text), caplog.text
    logits_close(llm, ref, prompts)
    fp8 = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=tp),
                              quantization="fp8", progress=False)
    assert all(np.linalg.norm(a - b) / np.linalg.norm(a) < 0.1
               for a, b in zip(ref, fp8.logits(prompts)))
    # quantization="fp8" keeps the checkpoint's FP8 values: its weights dequantize to exactly
    # what the checkpoint's do (a per-tensor scale becomes each channel's); requantizing per
    # channel from their maxima would round every channel but the tensor's largest again
    from jax_sp.train import unpadded_params

    params = unpadded_params(fp8.runtime, fp8.state)
    hf = exact.state_dict()
    for path, key in [("layers/mlp/w_down_fd", "mlp.down_proj.weight"),
                      ("layers/attn/w_o_nhd", "self_attn.o_proj.weight")]:
        q, scale = params[path].astype(np.float32), params[path.replace("/w_", "/s_w_")]
        got = q * scale.reshape(*scale.shape, *[1] * (q.ndim - scale.ndim))  # [L, D, ...]
        for layer in range(got.shape[0]):
            want = hf[f"model.layers.{layer}.{key}"].numpy()  # [D, F] / [D, N*H]
            np.testing.assert_array_equal(got[layer].reshape(want.shape), want)


def test_an_fp8_lm_head_keeps_the_checkpoint_s_values_with_fp8_head(tmp_path):
    """quantization="fp8-head" places an FP8 checkpoint's LM head with its own scales (split
    over the vocabulary, 101 padded to 102 at tp 2): the head dequantizes to exactly what the
    checkpoint's does."""
    from jax_sp.train import unpadded_params

    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    exact = _fp8_checkpoint(model, tmp_path, per_channel=True, head=True)
    llm = LLM.from_pretrained(str(tmp_path), parallel=ParallelConfig(tp=2),
                              quantization="fp8-head", progress=False)
    params = unpadded_params(llm.runtime, llm.state)
    got = params["head_dv"].astype(np.float32) * params["s_head_dv"][:, None]  # [V, D]
    np.testing.assert_array_equal(got, exact.state_dict()["lm_head.weight"].numpy())


@pytest.mark.parametrize("per_channel,dtype", [(False, None), (True, "bfloat16")])
def test_an_fp8_checkpoint_converted_to_orbax_keeps_its_fp8_values(tmp_path, per_channel,
                                                                    dtype):
    """`jax-sp convert` of an FP8 checkpoint writes the weights its values and scales give (the
    logits of the dequantized model) and its scales beside them: loaded with
    quantization="fp8" (tp 2, padded heads), every FP8 weight dequantizes to exactly what the
    checkpoint's does, as loading the safetensors folder gives, also through a bfloat16 copy
    (requantized per channel from their maxima, all but each channel's largest value would
    round again)."""
    from jax_sp.train import unpadded_params

    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    exact = _fp8_checkpoint(model, tmp_path / "fp8", per_channel=per_channel)
    prompts = random_prompts(101, (7, 12), seed=4)
    assert cli(["convert", str(tmp_path / "fp8"), str(tmp_path / "orbax")]
               + (["--dtype", dtype] if dtype else [])) == 0
    if dtype is None:
        logits_close(LLM.from_pretrained(str(tmp_path / "orbax"), progress=False),
                     LLM.from_torch(exact).logits(prompts), prompts)
    fp8 = [unpadded_params(llm.runtime, llm.state) for llm in (
        LLM.from_pretrained(str(tmp_path / where), parallel=ParallelConfig(tp=2),
                            quantization="fp8", progress=False) for where in ("orbax", "fp8"))]
    paths = [p for p in fp8[1] if p.rpartition("/")[2].startswith("s_w_")]
    assert len(paths) == 4
    for path in paths:
        for scale_path in (path, path.replace("/s_w_", "/w_")):
            np.testing.assert_array_equal(np.asarray(fp8[0][scale_path], np.float32),
                                          np.asarray(fp8[1][scale_path], np.float32))


def test_fp8_hf_checkpoint_with_block_wise_scales_is_refused_by_name(tmp_path):
    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    _fp8_checkpoint(model, tmp_path, scale_shape=(1, 1))  # [1, 1] is one scale: loads
    LLM.from_pretrained(str(tmp_path), progress=False)
    _fp8_checkpoint(model, tmp_path, scale_shape=(1, 2))  # 128x128 blocks of [out, 96]
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.\S+_scale has shape \[1, "
                       r"2\]; expected one scale .*block-wise FP8 scales are not supported"):
        LLM.from_pretrained(str(tmp_path), progress=False)
    _fp8_checkpoint(model, tmp_path, scale_shape=(1, 2), scale_name="weight_scale_inv")
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.\S+\.weight has a \S+"
                       r"weight_scale_inv: block-wise FP8 scales are not supported"):
        LLM.from_pretrained(str(tmp_path), progress=False)


def test_fp8_hf_checkpoint_without_a_scale_names_the_tensor(tmp_path):
    model = tiny_llama(hidden=48, inter=72, heads=6, kv=2, head_dim=8, vocab=101)
    key = "model.layers.1.mlp.down_proj.weight"
    _fp8_checkpoint(model, tmp_path, drop_scale=key)
    with pytest.raises(CheckpointError, match=f"FP8 tensor {key} has no {key}_scale"):
        LLM.from_pretrained(str(tmp_path), progress=False)
