"""Incremental detokenization: the text of a growing list of token ids, each new token decoded
with the few tokens before it instead of the whole list (vLLM's incremental detokenizer).

Decoding the whole list again for every new token (what a stream did before) costs O(n) per
token, O(n^2) per stream: for a 4,096-token answer about 8 million token decodes on the serving
host's CPU. Here each decode spans the tokens of the last piece of text and the new ones, so
a stream costs O(n). The window keeps the previous piece's tokens as context because a
tokenizer's decode is not additive token by token: SentencePiece-style decoders drop the
leading space of the first token they are given, and byte-level tokens can split a character
(the text waits, without emitting U+FFFD, until the character is whole). A tokenizer whose decode
of the window is not an extension of its decode of the window's head (text clean-up rules that
look across tokens) gets the whole list decoded for that token, as before.
"""

from __future__ import annotations

from typing import Callable, Sequence

PARTIAL = "\ufffd"  # what decode gives for the bytes of a character not yet complete


class TextStream:
    """`add` token ids one at a time; `text` is their text so far (a character split over tokens
    appears once its last token is added), `offsets[i]` where token i's text begins in it.
    `finish` adds what an incomplete last character leaves (as U+FFFD, as a whole decode
    would). decode: ids -> str, the tokenizer's (e.g. `LLM._detok`)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self.ids: list[int] = []
        self.text = ""
        self.offsets: list[int] = []
        self._prefix = 0  # the window: ids[_prefix:_read] made the last piece of text
        self._read = 0

    def add(self, token: int) -> str:
        """Append one token; returns the text it completes ("" while a character is split)."""
        self.offsets.append(len(self.text))
        self.ids.append(token)
        head = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        if window.startswith(head):
            new = window[len(head):]
        else:  # decode is not prefix-stable here: the whole text, as a full decode gives it
            whole = self._decode(self.ids)
            new = whole[len(self.text):] if whole.startswith(self.text) else ""
        if not new or new.endswith(PARTIAL):
            return ""
        self.text += new
        self._prefix, self._read = self._read, len(self.ids)
        return new

    def finish(self) -> str:
        """The rest of the text: a last character left incomplete decodes as U+FFFD."""
        head = self._decode(self.ids[self._prefix:self._read])
        window = self._decode(self.ids[self._prefix:])
        new = window[len(head):] if window.startswith(head) else ""
        self.text += new
        self._prefix = self._read = len(self.ids)
        return new
