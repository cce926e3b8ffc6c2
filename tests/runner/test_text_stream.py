"""Streamed text equals the full decode, also when characters are split across tokens."""

from __future__ import annotations

import random

import pytest

from etspec.fixtures.tiny import write_byte_tokenizer
from etspec.runner.text import TextStream, decode


@pytest.fixture(scope="module")
def byte_tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("bytetok")
    write_byte_tokenizer(d)
    return AutoTokenizer.from_pretrained(str(d))


def _stream(tok, ids: list[int], sizes: list[int]) -> list[str]:
    stream, pieces, i = TextStream(tok), [], 0
    for n in sizes:
        pieces.append(stream.push(ids[i : i + n]))
        i += n
    pieces.append(stream.push(ids[i:]))
    pieces.append(stream.flush())
    return pieces


@pytest.mark.parametrize("text", ["héllo wörld", "中文字符 and 😀🎉 emoji", "naïve café — ½ ∑"])
def test_split_characters_are_printed_whole(byte_tok, text):
    ids = list(text.encode())  # the byte tokenizer: token id = byte, so every multi-byte char is split
    assert decode(byte_tok, ids) == text
    for sizes in ([1] * len(ids), [2, 3] * len(ids), [5, 1, 4, 2] * len(ids)):
        pieces = _stream(byte_tok, ids, sizes)
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces)  # no stand-in character is ever printed


def test_random_bytes_stream_equals_full_decode(byte_tok):
    """Invalid sequences keep their U+FFFD (as the full decode does); nothing is lost or doubled."""
    rng = random.Random(0)
    for _ in range(200):
        ids = [
            rng.choice([rng.randrange(256), rng.randrange(0x80, 0x100)]) for _ in range(rng.randrange(1, 40))
        ]
        sizes = [rng.randrange(1, 5) for _ in ids]
        assert "".join(_stream(byte_tok, ids, sizes)) == decode(byte_tok, ids)
