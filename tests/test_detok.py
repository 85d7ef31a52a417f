"""Incremental detokenization (jax_sp/detok.py): a stream's pieces add up to the whole decode of
its tokens, each token's offset is where its text begins (after the whole characters of the
tokens before it: a token that ends a character split over tokens begins where the character
does), whole characters come out with the token that completes them, and each decode spans a few
tokens
(not the whole list), with the embedded model's byte-level tokenizer and a SentencePiece-style
one (leading spaces, byte fallback)."""

import numpy as np
import pytest

from jax_sp.detok import PARTIAL, TextStream

TEXT = ("Grüße aus Köln, naïve café — ½ × 3 ≈ 1.5; 世界你好! 🙂🙃 👩‍👩‍👧 done.\n"
        "  indented\tline, \"quotes\" and 'apostrophes' don't split.   ")


class Counted:
    """A tokenizer's decode (skip_special_tokens, as LLM._detok), counting the ids it is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.spans = tokenizer, []

    def __call__(self, ids):
        self.spans.append(len(ids))
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


def streamed(tokenizer, ids):
    decode = Counted(tokenizer)
    text = TextStream(decode)
    pieces = [text.add(t) for t in ids]
    last = text.finish()
    return text, pieces, last, decode


def check_whole(tokenizer, ids, exact=True):
    """The pieces and the offsets against decoding every prefix whole (of valid UTF-8 text:
    a U+FFFD at the end of a prefix is a character its next tokens complete). Not exact: byte
    fallback decodes a prefix that ends inside a character as one U+FFFD for each byte of the
    run, the whole characters before in it among them, which the stream has (more than the
    prefix's whole characters, never more than the whole text)."""
    text, pieces, last, decode = streamed(tokenizer, ids)
    whole = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) + last == text.text == whole
    assert not any(p.endswith(PARTIAL) for p in pieces)
    assert len(text.offsets) == len(ids)
    split = 0
    for i in range(len(ids) + 1):
        prefix = tokenizer.decode(ids[:i], skip_special_tokens=True)
        split += prefix.endswith(PARTIAL)  # the tokens so far end inside a character
        whole_chars = prefix.rstrip(PARTIAL)
        # after token i - 1 the text is every whole character so far, and token i begins there
        so_far = "".join(pieces[:i])
        assert so_far == whole_chars if exact else (
            whole.startswith(so_far) and so_far.startswith(whole_chars))
        if i < len(ids):
            assert text.offsets[i] == len(so_far)
    return text, decode, split


def test_pieces_and_offsets_match_whole_decodes_with_split_characters(smollm2):
    tokenizer = smollm2[2]
    ids = tokenizer.encode(TEXT * 3, add_special_tokens=False)
    text, decode, split = check_whole(tokenizer, ids)
    assert split > 0  # the emoji and CJK characters span several byte-level tokens
    # two decodes a token (the window and its head) and two to finish, none of the whole text
    assert len(decode.spans) == 2 * len(ids) + 2
    assert max(decode.spans) <= 12 < len(ids) // 4


def test_a_stop_string_before_a_split_character_comes_with_its_token(smollm2):
    """A byte-level token holding a space and a character's first bytes (" ≈" splits so): the
    space comes out with it, not with the next token, so a stop string ending there ("3 ") is
    seen at that token, as a whole decode sees it."""
    tokenizer = smollm2[2]
    ids = tokenizer.encode("1 × 3 ≈ 1.5", add_special_tokens=False)
    text, pieces, last, _ = streamed(tokenizer, ids)
    eager = [i for i, p in enumerate(pieces) if p and tokenizer.decode(ids[:i + 1]).endswith(
        PARTIAL)]
    assert eager and "".join(pieces[:eager[0] + 1]) == "1 × 3 "


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_with_invalid_bytes_stream_to_the_whole_decode(smollm2, seed):
    """Arbitrary ids (single bytes among them, so UTF-8 that never completes) and special
    tokens, which decode skips."""
    tokenizer = smollm2[2]
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, tokenizer.vocab_size, 300).tolist()
    ids[::7] = rng.integers(0, 260, len(ids[::7])).tolist()  # the byte tokens
    ids[5::50] = [tokenizer.eos_token_id] * len(ids[5::50])
    text, pieces, last, _ = streamed(tokenizer, ids)
    assert "".join(pieces) + last == text.text == tokenizer.decode(ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def sentencepiece():
    """A small BPE tokenizer in Llama-2's style: Metaspace (a leading "▁" for spaces, dropped
    at the start of a decode) and byte tokens (<0xE4> ...) for characters outside its
    vocabulary, which are ordinary tokens (decode with skip_special_tokens keeps them)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"]
                                        + [f"<0x{b:02X}>" for b in range(256)]
                                        + list("▁abcdefghijklmnopqrstuvwxyz"))}
    merges = [("▁", "t"), ("▁t", "h"), ("▁th", "e"), ("o", "v"), ("ov", "e"), ("ove", "r"),
              ("▁", "q"), ("▁q", "u")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first",
                                                 split=False)
    bpe.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


def test_a_sentencepiece_style_tokenizer_keeps_its_spaces(sentencepiece):
    """Decoding a window alone would drop its first token's leading space; the window's head
    keeps it. Characters outside the vocabulary come as UTF-8 bytes (<0xE4> ...)."""
    ids = sentencepiece.encode("the quick café 世界 🙂 over the lazy dog",
                               add_special_tokens=False)
    assert any(sentencepiece.convert_ids_to_tokens(i).startswith("<0x") for i in ids)
    text, decode, split = check_whole(sentencepiece, ids, exact=False)
    assert split > 0 and text.text.count(" ") == 8
    # byte fallback decodes a run of byte tokens that is not whole UTF-8 as one U+FFFD a byte
    # ("世" and the first bytes of "界": four of them), so the window's text is not its head's
    # plus more: those tokens decode the whole list, as every token did before
    whole = [n for n in decode.spans if n > 12]
    assert 0 < len(whole) <= split and len(decode.spans) == 2 * len(ids) + 2 + len(whole)


@pytest.mark.parametrize("seed", range(3))
def test_random_byte_fallback_ids_keep_streaming(sentencepiece, seed):
    """Runs of byte tokens that are not whole UTF-8 make byte fallback rewrite text already
    streamed (a character's bytes become one U+FFFD each): the stream goes on with the whole
    decode's text from there, at its length, as it streamed before (nothing held back for good,
    no U+FFFD left at a piece's end but the last)."""
    rng = np.random.default_rng(seed)
    letters = [sentencepiece.convert_tokens_to_ids(c) for c in "▁abcdefgh"]
    ids = [int(rng.choice(letters)) if rng.random() < 0.6 else int(rng.integers(3, 259))
           for _ in range(200)]
    text, pieces, last, decode = streamed(sentencepiece, ids)
    whole = sentencepiece.decode(ids, skip_special_tokens=True)
    assert len(text.text) == len(whole) and text.text[-1] == whole[-1]
    assert not any(p.endswith(PARTIAL) for p in pieces)
    assert sum(decode.spans) < len(ids) ** 2 / 4  # mostly windows, not whole decodes
