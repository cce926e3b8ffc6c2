"""SentencePiece ("llama") GGUF vocabularies, such as Gemma 3's, come out of transformers as a Unigram
model whose scores are really merge ranks; the converter rebuilds them as BPE. Checked against an
independent tokenizer written here the way llama.cpp reads such a vocabulary: within each word, merge the
adjacent pair whose joined piece has the highest score, until none joins."""

from __future__ import annotations

from collections import Counter

import pytest
import transformers
from transformers.integrations.ggml import GGUFGemmaConverter

from etspec.convert.gguf_to_hf import GgufInfo, _sentencepiece_as_bpe

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
# merged pieces in merge order (the earlier, the higher its score), then the single characters
PIECES = [
    "▁t",
    "he",
    "▁the",
    "in",
    "er",
    "▁th",
    "ing",
    "▁in",
    "ter",
    "▁inter",
    "est",
    "▁b",
    "▁be",
    "st",
    "▁best",
]
CHARS = list("▁thebinrsgxy")
TEXTS = ["the best thing", "interesting", "the beginning in inter", "xy bethe thy nest", "  the  "]


def _vocab() -> list[tuple[str, float]]:
    return [(t, -1000.0) for t in SPECIALS] + [(p, -float(i)) for i, p in enumerate(PIECES + CHARS)]


def _llama_cpp_pieces(text: str, scores: dict[str, float]) -> list[str]:
    """llama.cpp's SentencePiece-as-BPE: spaces become '▁', then, over the whole text, the adjacent pair
    whose joined piece scores highest is merged (the leftmost of equals), until no pair joins."""
    parts = list(text.replace(" ", "▁"))
    while True:
        joins = [(scores[a + b], -i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in scores]
        if not joins:
            return parts
        i = -max(joins)[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


@pytest.fixture()
def gemma_like(tmp_path):
    """transformers' GGUF Gemma tokenizer for the vocabulary, as the GGUF loader builds it."""
    vocab = _vocab()
    spec = {
        "tokens": [t for t, _ in vocab],
        "scores": [s for _, s in vocab],
        "token_type": [3] * len(SPECIALS) + [1] * (len(vocab) - len(SPECIALS)),
        "bos_token_id": 2,
        "eos_token_id": 1,
        "unk_token_id": 3,
        "padding_token_id": 0,
    }
    backend = GGUFGemmaConverter(spec).converted()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


def _reloaded_as_gemma(tok, directory) -> transformers.PreTrainedTokenizerBase:
    tok.save_pretrained(directory)
    return transformers.GemmaTokenizer.from_pretrained(directory)


def test_rebuilt_vocabulary_merges_as_llama_cpp_does(gemma_like, tmp_path):
    scores = dict(_vocab())
    before = _reloaded_as_gemma(gemma_like, tmp_path / "before")
    _sentencepiece_as_bpe(gemma_like, GgufInfo("gemma3", Counter(), (), tokenizer_model="llama"))
    after = _reloaded_as_gemma(gemma_like, tmp_path / "after")
    split_into_chars = 0
    for text in TEXTS:
        want = _llama_cpp_pieces(text, scores)
        got = after.convert_ids_to_tokens(after(text, add_special_tokens=False).input_ids)
        assert got == want, text
        assert after.decode(after(text, add_special_tokens=False).input_ids) == text
        old = before.convert_ids_to_tokens(before(text, add_special_tokens=False).input_ids)
        split_into_chars += old != want
    assert split_into_chars == len(TEXTS)  # what the rebuild fixes: the reloaded Unigram gave characters


def test_other_tokenizers_are_left_alone(gemma_like):
    """A byte-level BPE ("gpt2") GGUF, and a SentencePiece vocabulary already read as BPE, keep theirs."""
    before = gemma_like.backend_tokenizer.to_str()
    _sentencepiece_as_bpe(gemma_like, GgufInfo("llama", Counter(), (), tokenizer_model="gpt2"))
    assert gemma_like.backend_tokenizer.to_str() == before
