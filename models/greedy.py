"""Eager reference loops over the Speculator's methods: target-only greedy and the docs/design.md §4 rounds.

These are the ground truth the exported programs and the runner are tested against, and the engine of the
in-memory demo. Both stop at the same budget (max_new_tokens, EOS, or the context limit of
max_seq_len - draft_len), so their outputs are comparable token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .speculator import Speculator


@dataclass
class Generation:
    tokens: list[int]
    accepted: list[int] = field(default_factory=list)  # drafts accepted per round (j)
    stop_reason: str = "max_new_tokens"

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per verify pass: mean(j) + 1."""
        return sum(self.accepted) / len(self.accepted) + 1 if self.accepted else 0.0


def _window(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int8)


def prefill(spec: Speculator, prompt: list[int], chunk: int) -> tuple[int, torch.Tensor]:
    """Chunked prefill; returns the pending token and the features of every prompt position."""
    feats = []
    next_token = None
    for s in range(0, len(prompt), chunk):
        e = min(s + chunk, len(prompt))
        tokens = torch.tensor([prompt[s:e]])
        next_token, feat = spec.prefill(tokens, torch.arange(s, e), _window(e))
        feats.append(feat)
    return int(next_token[0]), torch.cat(feats, dim=1)


def _budget(spec: Speculator, prompt: list[int], max_new_tokens: int) -> tuple[int, str]:
    """The token budget and the stop reason it implies. The room rule (each verify writes k+1 rows past
    the committed length) is the one of `etspec.runner.limits.room`, restated here: models/ imports
    nothing of runner/, whose copy reads an artifact's manifest rather than a model."""
    room = spec.max_seq_len - spec.draft_len - len(prompt)
    if room < 1:
        raise ValueError(
            f"prompt of {len(prompt)} tokens leaves no room to generate within max_seq_len "
            f"{spec.max_seq_len} (draft_len {spec.draft_len})"
        )
    return (max_new_tokens, "max_new_tokens") if max_new_tokens <= room else (room, "context_limit")


@torch.no_grad()
def target_greedy(
    spec: Speculator, prompt: list[int], max_new_tokens: int, chunk: int = 64, eos: tuple[int, ...] = ()
) -> Generation:
    budget, reason = _budget(spec, prompt, max_new_tokens)
    pending, _ = prefill(spec, prompt, chunk)
    out: list[int] = []
    n = len(prompt)
    while True:
        out.append(pending)
        if pending in eos:
            return Generation(out, stop_reason="eos")
        if len(out) >= budget:
            return Generation(out, stop_reason=reason)
        ids, _ = spec.target_verify(torch.tensor([[pending]]), torch.tensor([n]), _window(n + 1))
        pending, n = int(ids[0, 0]), n + 1


@torch.no_grad()
def speculative_greedy(
    spec: Speculator, prompt: list[int], max_new_tokens: int, chunk: int = 64, eos: tuple[int, ...] = ()
) -> Generation:
    """Greedy EAGLE-3 chain decoding; lossless against target_greedy."""
    budget, reason = _budget(spec, prompt, max_new_tokens)
    k = spec.draft_len
    pending, feats = prefill(spec, prompt, chunk)
    n = len(prompt)
    # Catch-up rows: the pair (feature at p, token at p+1) sits at draft position p.
    next_tokens = prompt[1:] + [pending]
    rows = list(range(n))
    out: list[int] = []
    accepted: list[int] = []
    while True:
        for s in range(0, len(rows), chunk):  # long catch-ups (the prompt) go in chunks too
            e = min(s + chunk, len(rows))
            pos = torch.tensor(rows[s:e])
            drafts = spec.draft(
                torch.tensor([next_tokens[s:e]]), feats[:, s:e], pos, _window(rows[e - 1] + 1)
            )
        d = drafts[0].tolist()
        ids, feats_v = spec.target_verify(
            torch.tensor([[pending] + d]), torch.arange(n, n + k + 1), _window(n + k + 1)
        )
        a = ids[0].tolist()
        j = 0
        while j < k and d[j] == a[j]:
            j += 1
        accepted.append(j)
        for tok in [pending] + d[:j]:
            out.append(tok)
            if tok in eos:
                return Generation(out, accepted, "eos")
            if len(out) >= budget:
                return Generation(out, accepted, reason)
        next_tokens = d[:j] + [a[j]]
        feats = feats_v[:, : j + 1]
        rows = list(range(n, n + j + 1))
        pending, n = a[j], n + j + 1
