"""Incremental detokenization: the text of a growing list of token ids, each new token decoded
with the few tokens before it instead of the whole list (vLLM's incremental detokenizer).

Decoding the whole list again for every new token (what a stream did before) costs O(n) per
token, O(n^2) per stream: for a 4,096-token answer about 8 million token decodes on the serving
host's CPU. Here each decode spans the tokens of the last piece of text and the new ones, so
a stream costs O(n). The window keeps the previous piece's tokens as context because a
tokenizer's decode is not additive token by token: SentencePiece-style decoders drop the
leading space of the first token they are given, and byte-level tokens can split a character
(its text waits, without emitting U+FFFD, until the character is whole; the whole characters
before it do not wait). Where decoding the window rewrites the text of its first tokens (byte
fallback decodes a run of byte tokens that is not whole UTF-8 as one U+FFFD a byte, the bytes of
an emitted character among them) the token's text comes from decoding the whole list, as every
token's did before, at the same length.
"""

from __future__ import annotations

from typing import Callable, Sequence

PARTIAL = "\ufffd"  # what decode gives for the bytes of a character not yet complete


class TextStream:
    """`add` token ids one at a time; `text` is their text so far (a character split over tokens
    appears once its last token is added), `offsets[i]` where token i's text begins in it
    (after the whole characters of the tokens before it). `finish` adds what an incomplete last
    character leaves (as U+FFFD, as a whole decode would). decode: ids -> str, the tokenizer's
    (e.g. `LLM._detok`)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.offsets: list[int] = []
        # the window: ids[_prefix:_read] made the last whole piece of text (the context the
        # tokens after them are decoded with); ids[_read:]'s text begins at text[_base]
        self._prefix = self._read = self._base = 0

    def _tail(self) -> str:
        """The text of ids[_read:], its last character possibly incomplete."""
        head = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if window.startswith(head):
            return window[len(head):]
        return self._decode(self.ids)[self._base:]  # not prefix-stable here: decode it whole

    def add(self, token: int) -> str:
        """Append one token; returns the text it adds ("" while a character is split)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        tail = self._tail()
        ready = tail.rstrip(PARTIAL)  # a character split over tokens waits for its last one
        new = ready[len(self.text) - self._base:]
        self.text += new
        if ready and len(ready) == len(tail):  # all whole: these tokens become the context
            self._prefix, self._read, self._base = self._read, len(self.ids), len(self.text)
        return new

    def finish(self) -> str:
        """The rest of the text: a last character left incomplete decodes as U+FFFD."""
        new = self._tail()[len(self.text) - self._base:]
        self.text += new
        self._prefix = self._read = len(self.ids)
        self._base = len(self.text)
        return new
