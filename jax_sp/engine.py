"""LLM: the public engine. Loads weights onto a mesh, checks what users give it, and returns
completions, logits and stats.

The engine is the API's edge: prompts (strings through the optional tokenizer, conversations,
token ids, embeddings) and sampling settings are checked here, once, with errors that say what
would work; what passes is handed to the runner (jax_sp/runner.py), which pads it into a batch
and runs the compiled programs on the stages, trusting its input. The engine never sees a mesh.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from jax_sp.config import (CompileOptions, ModelConfig, ParallelConfig, SamplingParams,
                           check_devices, check_parallel, check_quantization)
from jax_sp.detok import TextStream
from jax_sp.runner import Batch, Runner, bucket
from jax_sp.runtime import resolve_dtype, to_host
from models.quant import Fp8, embedding_rows
from sharding.tokens import tp_rank_rows

EMBED_DTYPES = ("float32", "bfloat16", "float16")


def check_max_seq_len(max_seq_len) -> None:
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"max_seq_len must be a positive integer (prompt plus new tokens), "
                         f"got {max_seq_len!r}; e.g. max_seq_len=2048")


ROLES = ("system", "user", "assistant")


def _is_conversation(p) -> bool:
    return isinstance(p, (list, tuple)) and len(p) > 0 and all(isinstance(m, dict) for m in p)


def _check_conversation(i: int, messages) -> None:
    for j, m in enumerate(messages):
        if m.get("role") not in ROLES or not isinstance(m.get("content"), str) or set(m) - {
                "role", "content"}:
            raise ValueError(f"prompt {i}, message {j} is {m!r}; a message is {{'role': one of "
                             f"{ROLES}, 'content': a string}}")


def _token_ids(i: int, p) -> np.ndarray:
    """Prompt i's token ids as a new integer array: any integer type, a list, a numpy array or
    a torch tensor (transposed, sliced, strided: read as it is, copied, never written into or
    kept), never bools or floats (which would be truncated silently)."""
    if p is None or isinstance(p, (dict, bytes)) or not hasattr(p, "__len__"):
        raise TypeError(f"prompt {i} is {type(p).__name__}; a prompt is a string, a list of "
                        f"token ids or a conversation (a list of {{'role', 'content'}} messages)")
    if hasattr(p, "detach") and hasattr(p, "cpu"):  # a torch tensor, of any strides
        p = p.detach().cpu().numpy()
    if isinstance(p, np.ndarray) and p.dtype.kind in "iu":
        return np.array(p).reshape(-1)  # a copy: the caller's array is never aliased
    ids = np.asarray(p).reshape(-1) if isinstance(p, np.ndarray) else list(p)
    for t in (ids.tolist() if isinstance(ids, np.ndarray) else ids):
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"prompt {i} has the token id {t!r} ({type(t).__name__}); token "
                            f"ids are integers, e.g. [1, 2, 3]")
    return np.asarray([int(t) for t in ids])  # int64, or object beyond it


@dataclasses.dataclass
class Completion:
    token_ids: list[int]
    text: str | None
    finish_reason: str  # "stop" (a stop token, included in token_ids) or "length"


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    prefill_s: float  # run time, compile excluded
    decode_s: float  # run time of the new tokens after the first, compile excluded
    compile_s: float  # spent compiling during this call (0 once warm)
    prefill_sp: bool
    decode_sp: bool

    @property
    def decode_tokens_per_s(self) -> float:
        return (self.new_tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


class LLM:
    def __init__(self, cfg: ModelConfig, host_params, *, parallel: ParallelConfig | None = None,
                 dtype="float32", max_seq_len: int = 2048, tokenizer=None,
                 options: CompileOptions | None = None, quantization: str | None = None):
        self.cfg = cfg
        self.parallel = parallel or ParallelConfig()
        check_max_seq_len(max_seq_len)
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.runner = Runner(cfg, self.parallel, dtype, host_params, options=options,
                             quantization=quantization)
        first = self.runner.stages[0]  # the whole model when pp=1
        self.runtime, self.state, self.programs = first.runtime, first.state, first.programs
        self.last_stats: GenerationStats | None = None
        self._embed = jax.jit(lambda table, ids: embedding_rows(table, ids, self.runtime.dtype))

    @classmethod
    def from_torch(cls, module, tokenizer=None, *, parallel: ParallelConfig | None = None,
                   dtype="float32", max_seq_len: int = 2048,
                   options: CompileOptions | None = None, quantization: str | None = None):
        """From an HF LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM module."""
        from bridges.hf import load_module  # torch is imported only on this path

        cfg, params = load_module(module)
        return cls(cfg, params, parallel=parallel, dtype=dtype, max_seq_len=max_seq_len,
                   tokenizer=tokenizer, options=options,
                   quantization=quantization)

    @classmethod
    def from_pretrained(cls, name_or_path: str = "smollm2", *,
                        parallel: ParallelConfig | None = None, dtype: str | None = None,
                        max_seq_len: int = 2048, progress: bool | None = None,
                        options: CompileOptions | None = None, quantization: str | None = None):
        """"smollm2" (the embedded SmolLM2-135M-Instruct), a GGUF file, a Hugging Face folder
        (config.json + *.safetensors) or a folder written by `jax-sp convert` (Orbax). Each
        device reads its own shard from disk; dtype None keeps the checkpoint's (bfloat16 stays
        bfloat16; GGUF dequantizes to float32). progress: stages of a second or more on
        stderr (True: the weights' counter updated in place; None, the default: so on a
        terminal, else a line per stage when it ends; False: silent)."""
        from bridges.pretrained import load_pretrained

        # what can be checked before reading anything is, and the rest as soon as the
        # configuration is read: before the tokenizer and the weights
        parallel = parallel or ParallelConfig()
        check_max_seq_len(max_seq_len)
        if dtype is not None:
            resolve_dtype(dtype)
        check_quantization(quantization, parallel)
        check_devices(parallel, len(jax.devices()))
        cfg, params, tokenizer, stored = load_pretrained(
            name_or_path, progress,
            check=lambda cfg: check_parallel(parallel, cfg, len(jax.devices())))
        try:
            return cls(cfg, params, parallel=parallel, dtype=dtype or stored,
                       max_seq_len=max_seq_len, tokenizer=tokenizer, options=options,
                   quantization=quantization)
        finally:
            source = getattr(params, "source", None)
            if source is not None:
                source.close()

    # -- inputs --------------------------------------------------------------------------------

    def encode(self, prompt, chat: bool = True) -> list[int]:
        """Text -> ids through the tokenizer (its chat template when chat and it has one). A
        conversation, a list of {"role", "content"} messages, always goes through the chat
        template."""
        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer; pass token ids instead, e.g. [[1, 2]]")
        template = getattr(self.tokenizer, "chat_template", None)
        if isinstance(prompt, str) and not (chat and template):
            return list(self.tokenizer.encode(prompt))
        if not template:
            raise ValueError("a conversation needs a tokenizer with a chat template; this one "
                             "has none: pass the text itself with chat=False")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def _check_ids(self, prompts, chat: bool = True) -> list[np.ndarray]:
        """The API's edge for prompts: each a string, a conversation or token ids, checked once
        (the compiled programs trust what passes)."""
        if isinstance(prompts, (str, bytes, dict)) or not hasattr(prompts, "__len__") or not len(
                prompts):
            raise ValueError("expected a non-empty list of prompts: strings (with a tokenizer), "
                             "token-id lists, e.g. [[1, 2, 3]], or conversations, lists of "
                             "{'role', 'content'} messages")
        if all(isinstance(p, dict) for p in prompts):  # one conversation, given alone
            prompts = [list(prompts)]
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if not p:
                    raise ValueError(f"prompt {i} is an empty string; give it some text")
                ids = np.asarray(self.encode(p, chat), np.int64)
            elif _is_conversation(p):
                _check_conversation(i, p)
                ids = np.asarray(self.encode(p), np.int64)
            else:
                ids = _token_ids(i, p)
            if not ids.size:
                raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
            if ids.dtype.kind in "iu":
                bad = ids[(ids < 0) | (ids >= self.cfg.vocab_size)].tolist()
            else:  # Python ints beyond int64: compared one by one
                bad = [int(t) for t in ids if not 0 <= int(t) < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id(s) {bad[:5]} outside "
                                 f"[0, {self.cfg.vocab_size})")
            ids = ids.astype(np.int32)
            if len(ids) > self.max_seq_len:
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than max_seq_len="
                                 f"{self.max_seq_len}")
            out.append(ids)
        return out

    def _check_embeds(self, prompt_embeds) -> list[np.ndarray]:
        if isinstance(prompt_embeds, np.ndarray) or not len(prompt_embeds):
            raise ValueError("prompt_embeds must be a non-empty list of arrays [T_i, D]")
        out = []
        for i, x in enumerate(prompt_embeds):
            x = np.asarray(x)
            if x.dtype.name not in EMBED_DTYPES:
                raise ValueError(f"prompt_embeds[{i}] has dtype {x.dtype}; use one of "
                                 f"{EMBED_DTYPES}")
            if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.cfg.hidden_size:
                raise ValueError(f"prompt_embeds[{i}] has shape {x.shape}; expected [T, "
                                 f"{self.cfg.hidden_size}] with T >= 1 (what LLM.embed returns)")
            if len(x) > self.max_seq_len:
                raise ValueError(f"prompt_embeds[{i}] has {len(x)} rows, more than max_seq_len="
                                 f"{self.max_seq_len}")
            finite = np.isfinite(x)
            if not finite.all():
                row, col = map(int, np.argwhere(~finite)[0])
                raise ValueError(f"prompt_embeds[{i}] holds {x[row, col]} at [{row}, {col}] "
                                 f"({int((~finite).sum())} values are not finite); embeddings "
                                 f"must be finite numbers")
            out.append(x)
        return out

    def _pack(self, prompts: list[np.ndarray]):
        """Right-pad to a shared bucket: tokens [B, T], lengths [B]; with attention groups B is
        padded to a multiple of attn_dp with one-token rows (each group owns B / attn_dp whole
        sequences), which come after the prompts'."""
        t = bucket(max(len(p) for p in prompts), self.parallel.tp)
        groups = self.parallel.attn_dp
        prompts = list(prompts) + [np.zeros(1, np.int32)] * (-len(prompts) % groups)
        tokens = np.zeros((len(prompts), t), np.int32)
        for b, ids in enumerate(prompts):
            tokens[b, : len(ids)] = ids
        return tokens, np.array([len(p) for p in prompts], np.int32)

    # -- forwards ------------------------------------------------------------------------------

    def logits(self, prompts) -> list[np.ndarray]:
        """Full prefill logits of each prompt: a list of float32 arrays [T_i, V]."""
        ids = self._check_ids(prompts, chat=False)
        tokens, lengths = self._pack(ids)
        sp = self.parallel.use_sp(tokens.size)
        logits = to_host(self.runner.logits(tokens, lengths, sp)).reshape(*tokens.shape, -1)
        return [logits[b, :n] for b, n in enumerate(lengths[:len(ids)])]

    def embed(self, prompts) -> list[np.ndarray]:
        """Input embeddings of token-id prompts: a list of [T_i, D] arrays, in the form that
        `generate(prompt_embeds=...)` takes."""
        prompts = self._check_ids(prompts, chat=False)
        table = self.state["embed_vd"][...]
        if "s_embed_vd" in self.state:  # a tied embedding in FP8 ("fp8-head")
            table = Fp8(table, self.state["s_embed_vd"][...])
        return [to_host(self._embed(table, self.runner.put(0, np.array(p, np.int32))))
                for p in prompts]

    def residual_stream(self, prompts, sp: bool):
        """The residual stream after each layer, [L, B*T, D], as sharded device arrays (for
        inspecting layouts; pp=1)."""
        if self.parallel.pp > 1:
            raise ValueError("residual_stream inspects a single-stage model (pp=1)")
        tokens, lengths = self._pack(self._check_ids(prompts, chat=False))
        return self.runtime.logits(self.state, tokens, lengths, sp, out="residuals")

    # -- generation ----------------------------------------------------------------------------

    def _prepare(self, prompts, prompt_embeds, sampling: SamplingParams, chat: bool,
                 negative_prompts=None) -> Batch:
        """Validate and pad a batch for prefill and decode (with guidance: the prompts and
        their unconditional contexts, `Runner.guided_batch`)."""
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompts and prompt_embeds"
                             + (", not both" if prompts is not None else ""))
        if negative_prompts is not None and not sampling.guided:
            raise ValueError("negative_prompts are classifier-free guidance's unconditional "
                             "contexts: set SamplingParams(guidance_scale=s) with s != 1 too")
        rows = (self._check_ids(prompts, chat) if prompts is not None
                else self._check_embeds(prompt_embeds))
        if sampling.guided:
            return self._guided(rows, negative_prompts, sampling, chat,
                                prompt_embeds is not None)
        self._check_lengths(rows, sampling)
        return self.runner.batch(rows, sampling.max_new_tokens, prompts is None)

    def _guided(self, rows, negative_prompts, sampling, chat: bool, embeds: bool) -> Batch:
        if embeds:
            raise ValueError("classifier-free guidance takes token prompts, not prompt_embeds")
        if self.parallel.pp > 1:
            raise ValueError(f"classifier-free guidance runs on one pipeline stage (pp=1), "
                             f"not pp={self.parallel.pp}: both halves of a row pair are "
                             f"sampled together")
        negs = [] if negative_prompts is None else self._check_ids(negative_prompts, chat)
        if len(negs) > len(rows):
            raise ValueError(f"{len(negs)} negative prompts for {len(rows)} prompts: give at "
                             f"most one per prompt (a prompt without one is guided by its "
                             f"last token, as transformers does)")
        uncond = [np.asarray(negs[i]) if i < len(negs) else np.asarray(r)[-1:]
                  for i, r in enumerate(rows)]
        self._check_lengths(rows, sampling)
        self._check_lengths(uncond, sampling, "negative prompt")
        return self.runner.guided_batch(rows, uncond, sampling.max_new_tokens)

    def _check_lengths(self, rows, sampling: SamplingParams, what: str = "prompt"):
        for i, n in enumerate(len(r) for r in rows):
            if n + sampling.max_new_tokens > self.max_seq_len:
                fix = (f"lower max_new_tokens to {self.max_seq_len - n}" if n < self.max_seq_len
                       else "raise max_seq_len (LLM(..., max_seq_len=...))")
                raise ValueError(
                    f"{what} {i} has {n} tokens; with max_new_tokens={sampling.max_new_tokens} "
                    f"that exceeds max_seq_len={self.max_seq_len}; shorten the {what} or {fix}")

    def _sampling(self, sampling) -> SamplingParams:
        """The API's edge for sampling settings: a SamplingParams (None: the defaults) whose
        stop ids are in the vocabulary (a top_k of the vocabulary or more: top_k 0)."""
        if sampling is None:
            return SamplingParams()
        if not isinstance(sampling, SamplingParams):
            hint = (f"SamplingParams(**{sampling!r})" if isinstance(sampling, dict)
                    else "SamplingParams(max_new_tokens=32, temperature=0.0)")
            raise TypeError(f"sampling must be a SamplingParams, got {type(sampling).__name__}; "
                            f"use {hint}")
        bad = [t for t in sampling.stop_token_ids or () if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"SamplingParams.stop_token_ids has {bad[:5]} outside the "
                             f"vocabulary [0, {self.cfg.vocab_size})")
        if sampling.top_k >= self.cfg.vocab_size:  # keeps every token, as top_k=0 does
            sampling = dataclasses.replace(sampling, top_k=0)
        return sampling

    def _stop_ids(self, sampling: SamplingParams) -> tuple[int, ...]:
        if sampling.stop_token_ids is not None:
            return sampling.stop_token_ids
        eos = getattr(self.tokenizer, "eos_token_id", None)
        return () if eos is None else (int(eos),)

    def generate(self, prompts=None, sampling: SamplingParams | None = None, *,
                 prompt_embeds=None, chat: bool = True, negative_prompts=None,
                 _rows_for_rank=tp_rank_rows):
        """Generate for a batch of prompts (strings, token-id lists, conversations) or of
        prompt_embeds ([T_i, D] arrays). Strings go through the tokenizer's chat template unless
        chat=False. Returns one Completion per prompt. With SamplingParams(guidance_scale=s):
        classifier-free guidance, negative_prompts (at most one per prompt, in the prompts'
        forms) the unconditional contexts (a prompt without one: its last token)."""
        sampling = self._no_logprobs(self._sampling(sampling))
        job = self._prepare(prompts, prompt_embeds, sampling, chat, negative_prompts)
        stop = self._stop_ids(sampling)
        c0, t0 = self.runner.compile_s(), time.perf_counter()
        run = self.runner.prefill(job, sampling, _rows_for_rank)
        if run.tokens[0].is_fully_addressable:  # start the first tokens' copy to the host
            run.tokens[0].copy_to_host_async()
        jax.block_until_ready(run.tokens)
        t1, c1 = time.perf_counter(), self.runner.compile_s()
        out = np.zeros((job.batch, 0), np.int32)
        if sampling.max_new_tokens > 1:
            out = self.runner.decode(run, job, sampling, stop)
        first = np.concatenate([to_host(t) for t in run.tokens])
        t2, c2 = time.perf_counter(), self.runner.compile_s()

        completions = []
        for b in range(job.rows):
            ids = [int(first[b])] + [int(t) for t in out[b] if t >= 0]
            ids = ids[: sampling.max_new_tokens]
            cut = next((i for i, t in enumerate(ids) if t in stop), None)
            reason = "length"
            if cut is not None:
                ids, reason = ids[: cut + 1], "stop"
            completions.append(Completion(ids, self._detok(ids, stop), reason))
        new = sum(len(c.token_ids) for c in completions)
        self.last_stats = GenerationStats(sum(job.lengths), new, t1 - t0 - (c1 - c0),
                                          t2 - t1 - (c2 - c1), c2 - c0, job.prefill_sp,
                                          job.decode_sp)
        return completions

    @staticmethod
    def _no_logprobs(sampling: SamplingParams) -> SamplingParams:
        if sampling.logprobs is not None:
            raise ValueError("SamplingParams.logprobs is served by the continuous-batching "
                             "engine (jax_sp.serving.Engine, jax-sp serve); generate and stream "
                             "do not compute log-probabilities: leave logprobs=None here")
        return sampling

    def _detok(self, ids, stop=()):
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in ids if t not in stop], skip_special_tokens=True)

    def stream(self, prompt, sampling: SamplingParams | None = None, *, chat: bool = True):
        """Yield the text of one prompt piece by piece as tokens are decoded (needs a
        tokenizer). One compiled call per token and stage; each token comes to the host to be
        printed."""
        sampling = self._no_logprobs(self._sampling(sampling))
        if sampling.guided:
            raise ValueError("stream does not run classifier-free guidance; use generate(..., "
                             "negative_prompts=...) with SamplingParams(guidance_scale=s)")
        if self.tokenizer is None:
            raise ValueError("stream needs a tokenizer; use generate() for token ids")
        job = self._prepare([prompt], None, sampling, chat)  # bad input fails here, not later
        return self._stream(job, sampling)

    def _stream(self, job: Batch, sampling: SamplingParams):
        stop = self._stop_ids(sampling)
        c0, t0, t1, c1 = self.runner.compile_s(), time.perf_counter(), None, None
        text = TextStream(lambda ids: self._detok(ids, stop))
        for token in self._token_stream(job, sampling):
            if t1 is None:
                t1, c1 = time.perf_counter(), self.runner.compile_s()
            if piece := text.add(token):
                yield piece
            if token in stop:
                break
        if piece := text.finish():  # what the last token left half a character of
            yield piece
        ids = text.ids
        t2, c2 = time.perf_counter(), self.runner.compile_s()
        self.last_stats = GenerationStats(job.lengths[0], len(ids), t1 - t0 - (c1 - c0),
                                          t2 - t1 - (c2 - c1), c2 - c0, job.prefill_sp,
                                          job.decode_sp)

    def _token_stream(self, job: Batch, sampling: SamplingParams):
        """Row 0's tokens one at a time, as host ints."""
        run = self.runner.prefill(job, sampling)
        yield int(to_host(run.tokens[0])[0])
        for step in self.runner.steps(run, job, sampling):
            yield int(to_host(step[0])[0])
