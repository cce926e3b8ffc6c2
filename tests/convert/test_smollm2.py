"""The real SmolLM2-135M-Instruct Q4_1 GGUF: converted, then decoded greedily by etspec's TargetModel
(KV cache, one token per step) and by transformers on the GGUF itself (full forward passes)."""

from __future__ import annotations

import pytest
import torch
import transformers

from etspec.convert.cli import main
from etspec.convert.sources import find_smollm2_gguf
from etspec.models.checkpoint import load_target

NEW_TOKENS = 16
GGUF = find_smollm2_gguf()

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        GGUF is None,
        reason="no SmolLM2-135M-Instruct.Q4_1.gguf: set ETSPEC_SMOLLM2_GGUF to the file "
        "(or unpack it under ~/.cache/etspec/)",
    ),
]


def _window(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int8)


@torch.no_grad()
def _etspec_greedy(model, prompt: list[int], n: int) -> list[int]:
    logits = model(torch.tensor([prompt]), torch.arange(len(prompt)), _window(len(prompt)))
    out = [int(logits[0, -1].argmax())]
    while len(out) < n:
        pos = len(prompt) + len(out) - 1
        logits = model(torch.tensor([[out[-1]]]), torch.tensor([pos]), _window(pos + 1))
        out.append(int(logits[0, -1].argmax()))
    return out


@torch.no_grad()
def _hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """Full forward passes, no cache and no generate(): SmolLM2's pad id is its <|im_end|> id."""
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


def test_smollm2_converted_greedy_chat_matches_the_gguf(tmp_path):
    out = tmp_path / "smollm2"
    assert main([str(GGUF), "--out", str(out)]) == 0
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "Explain in one sentence why the sky is blue."}]
    prompt = list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])

    ours = load_target(out, 256)
    with torch.no_grad():
        mine = ours(torch.tensor([prompt]), torch.arange(len(prompt)), _window(len(prompt)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(GGUF.parent), gguf_file=GGUF.name, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        ref = reference(torch.tensor([prompt])).logits
    torch.testing.assert_close(mine, ref, atol=1e-3, rtol=1e-4)

    got = _etspec_greedy(ours, prompt, NEW_TOKENS)
    assert got == _hf_greedy(reference, prompt, NEW_TOKENS)
    text = tok.decode(got)
    assert text.isprintable() and "sky" in text, text  # readable English, no special tokens
