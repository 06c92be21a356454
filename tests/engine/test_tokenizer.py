"""Byte tokenizer, tokenizer.json via the tokenizers library, incremental detokenization."""

from __future__ import annotations

import pytest

from phaselens.engine.config import BYTE_BOS_ID, BYTE_EOS_ID
from phaselens.engine.tokenizer import ByteTokenizer, HFTokenizer, IncrementalDetokenizer


def test_byte_tokenizer_round_trips_utf8_with_bos() -> None:
    tok = ByteTokenizer()
    text = "héllo, wörld ✓ 日本"
    ids = tok.encode(text)
    assert ids[0] == BYTE_BOS_ID and ids[1:] == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.encode("ab", add_bos=False) == [97, 98]


def test_byte_tokenizer_skips_specials_and_replaces_unknown_ids() -> None:
    tok = ByteTokenizer()
    assert tok.decode([BYTE_BOS_ID, 104, 105, BYTE_EOS_ID]) == "hi"
    assert tok.decode([104, 999, 105]) == "h\ufffdi"
    assert tok.decode([0xE2, 0x9C]) == "\ufffd"  # a cut UTF-8 sequence


def test_incremental_detokenizer_holds_back_partial_characters() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("a✓b日", add_bos=False)
    det = IncrementalDetokenizer(tok)
    seen = []
    for n in range(1, len(ids) + 1):
        seen.append(det.add(ids[:n]))
    assert "\ufffd" not in "".join(seen)
    assert seen[-1] == "a✓b日"
    assert seen[1] == "a"  # first byte of ✓ held back


def test_incremental_detokenizer_flush_gives_the_rest() -> None:
    tok = ByteTokenizer()
    det = IncrementalDetokenizer(tok)
    ids = [104, 0xE2]
    det.add(ids[:1])
    det.add(ids)
    assert det.text == "h"
    assert det.flush(ids) == "h\ufffd"


def _bpe_tokenizer_json(path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    out = str(path / "tokenizer.json")
    tok.save(out)
    return out


def test_hf_tokenizer_json(tmp_path) -> None:
    path = _bpe_tokenizer_json(tmp_path)
    tok = HFTokenizer(path, bos_token_id=0, eos_token_ids=(1,))
    ids = tok.encode("the lazy fox")
    assert ids[0] == 0
    assert tok.decode(ids) == "the lazy fox"
    det = IncrementalDetokenizer(tok)
    for n in range(1, len(ids)):
        det.add(ids[1:n + 1])
    assert det.flush(ids[1:]) == "the lazy fox"


def test_hf_tokenizer_bad_files_name_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFTokenizer(tmp_path / "tokenizer.json", 0, (1,))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        HFTokenizer(bad, 0, (1,))


def test_unknown_ids_stream_without_holding_back_everything() -> None:
    """Ids the byte tokenizer does not know are real U+FFFD: out after at most 4 more ids, not at the end."""
    from phaselens.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer

    detok = IncrementalDetokenizer(ByteTokenizer())
    ids: list[int] = []
    lengths = []
    for i in range(20):
        ids.append(1000 + i)  # unknown to the byte tokenizer
        lengths.append(len(detok.add(ids)))
    assert lengths[-1] >= 20 - 4
    assert detok.flush(ids) == "\ufffd" * 20


def test_multibyte_character_is_not_split() -> None:
    from phaselens.engine.tokenizer import ByteTokenizer, IncrementalDetokenizer

    tok = ByteTokenizer()
    ids = tok.encode("aé€😀b", add_bos=False)
    detok = IncrementalDetokenizer(tok)
    seen = []
    for n in range(1, len(ids) + 1):
        seen.append(detok.add(ids[:n]))
    assert all("\ufffd" not in text for text in seen)
    assert detok.flush(ids) == "aé€😀b"
