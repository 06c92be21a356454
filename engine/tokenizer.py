"""Tokenizers: byte-level for the random-weight presets, ``tokenizer.json`` for Hugging Face folders.

Both give ``encode(text) -> ids`` (BOS first, as Llama's tokenizer does) and ``decode(ids) -> str``
(special tokens skipped). :class:`IncrementalDetokenizer` turns a growing id list into growing text
without re-decoding everything and without emitting half a UTF-8 character.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from phaselens.engine.config import BYTE_BOS_ID, BYTE_EOS_ID, BYTE_VOCAB


class Tokenizer(Protocol):
    """What the engine and the API server need from a tokenizer."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes; 256 is BOS, 257 EOS (engine/config.py).

    Ids it does not know (the random-weight presets' vocabularies may be larger) decode to U+FFFD.
    """

    bos_token_id: int | None = BYTE_BOS_ID
    eos_token_ids: tuple[int, ...] = (BYTE_EOS_ID,)
    vocab_size = BYTE_VOCAB + 2

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [BYTE_BOS_ID, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run = bytearray()
        for i in ids:
            if 0 <= i < BYTE_VOCAB:
                run.append(i)
                continue
            if run:
                out.append(run.decode("utf-8", errors="replace"))
                run = bytearray()
            if i not in (BYTE_BOS_ID, BYTE_EOS_ID):
                out.append("\ufffd")
        if run:
            out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library."""

    def __init__(self, path: str | Path, bos_token_id: int | None, eos_token_ids: tuple[int, ...]) -> None:
        from tokenizers import Tokenizer as _Tok

        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: no tokenizer.json")
        try:
            self._tok = _Tok.from_file(str(path))
        except Exception as exc:  # the Rust library raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from None
        self.path = path
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


_MAX_UTF8_BYTES = 4


class IncrementalDetokenizer:
    """Text of a growing list of output ids, decoding only a short window each time (vLLM's method).

    A token's text depends on its neighbours (byte pieces, leading spaces), so the window re-decodes from
    the last stable offset and keeps back text ending in U+FFFD (an incomplete character) until it completes.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.text = ""
        self._prefix = 0
        self._read = 0

    def add(self, ids: list[int]) -> str:
        """Text after ``ids`` (all output ids so far); returns the full text."""
        prefix_text = self.tokenizer.decode(ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(ids[self._prefix:])
        # A trailing U+FFFD may be half a character still arriving; a UTF-8 character has at most 4 bytes,
        # so after 4 more ids it is a real replacement character (an id the tokenizer does not know) and is
        # emitted. Without that bound, a stream of unknown ids would hold back all text until the end, and
        # each step would re-decode the whole output.
        pending = len(ids) - self._read
        complete = not new_text.endswith("\ufffd") or pending >= _MAX_UTF8_BYTES
        if len(new_text) > len(prefix_text) and complete:
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(ids)
        return self.text

    def flush(self, ids: list[int]) -> str:
        """At the end: whatever is held back, replacement characters included."""
        prefix_text = self.tokenizer.decode(ids[self._prefix:self._read])
        new_text = self.tokenizer.decode(ids[self._prefix:])
        if len(new_text) > len(prefix_text):
            self.text += new_text[len(prefix_text):]
        self._prefix = self._read = len(ids)
        return self.text
