"""The training-time-test forward is the inference protocol: step i at index t of `ttt_hidden` gives the
logits `Eagle3Draft.draft` gives at chain step i anchored at t, when the chain is fed the true tokens."""

from __future__ import annotations

import pytest
import torch

from etspec.fixtures.tiny import random_draft, tiny_draft_config, tiny_target_config
from etspec.train import ttt
from etspec.train.ttt import ttt_hidden

T, STEPS, H, V = 11, 4, 64, 256
LENGTHS = (T, 8)  # the second sequence is right-padded


@pytest.fixture(scope="module")
def case():
    cfg = tiny_draft_config(tiny_target_config("llama"))
    head = random_draft(cfg, seed=0, max_seq_len=T + STEPS)
    gen = torch.Generator().manual_seed(1)
    embed = torch.nn.Embedding(V, H)
    torch.nn.init.normal_(embed.weight, generator=gen)
    tokens = torch.randint(0, V, (len(LENGTHS), T), generator=gen)
    taps = torch.randn(len(LENGTHS), T, 3 * H, generator=gen)
    for b, n in enumerate(LENGTHS):
        tokens[b, n:], taps[b, n:] = 0, 0.0
    return head.eval(), embed.requires_grad_(False), tokens, taps


def _gap(head, embed, tokens, taps) -> float:
    """Largest |TTT logits - draft() logits| over every anchor t and chain step i of both sequences."""
    with torch.no_grad():
        train_logits = [head.step_logits(h) for h in ttt_hidden(head, embed, taps, tokens, STEPS)]
    real_step_out = head.step_out
    gap = 0.0
    for b, n in enumerate(LENGTHS):
        for t in range(n - 1):  # catch-up rows 0..t read x_1..x_{t+1}
            k = min(STEPS, n - 1 - t)  # chain step i reads x_{t+1+i}, which must exist
            forced = iter(tokens[b, t + 2 : t + 1 + k].view(-1, 1, 1))
            calls = []

            def embed_fed(ids, calls=calls, forced=forced):
                # The catch-up call embeds the given tokens; each chained step gets the true next token
                # instead of the draft's own guess (teacher forcing).
                calls.append(ids)
                return embed(ids if len(calls) == 1 else next(forced))

            seen = []

            def step_out(*args, seen=seen):
                out = real_step_out(*args)
                seen.append(out[0])
                return out

            head.step_out = step_out
            try:
                with torch.no_grad():
                    feature = head.fc(taps[b : b + 1, : t + 1])
                    head.draft(
                        embed_fed, tokens[b : b + 1, 1 : t + 2], feature, torch.arange(t + 1), t + 1, k
                    )
            finally:
                del head.step_out
            assert len(seen) == k and len(calls) == k
            for i in range(k):
                gap = max(gap, float((seen[i][0, 0] - train_logits[i][b, t]).abs().max()))
    return gap


def test_ttt_steps_equal_the_draft_method(case):
    head, embed, tokens, taps = case
    assert _gap(head, embed, tokens, taps) < 1e-4  # fp32; measured ~1e-6
    with torch.no_grad():  # the steps differ from each other, so the equality is not a trivial one
        hs = ttt_hidden(head, embed, taps, tokens, STEPS)
    assert min(float((hs[i] - hs[i + 1]).abs().max()) for i in range(STEPS - 1)) > 0.1


def test_a_different_mask_is_caught(case, monkeypatch):
    """EAGLE's / SpecForge's trainers hide step-0 keys t-i+1..t from step i; etspec's draft method
    does not, and the comparison above tells the two apart."""
    head, embed, tokens, taps = case
    real_mask = ttt.ttt_mask

    def shifted(length, step, device):
        mask = real_mask(length, step, device).clone()
        for j in range(step):
            idx = torch.arange(j, length)
            mask[idx, idx - j] = False
        return mask

    monkeypatch.setattr(ttt, "ttt_mask", shifted)
    assert _gap(head, embed, tokens, taps) > 1e-2
