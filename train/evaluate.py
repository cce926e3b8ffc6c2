"""Acceptance length of a head: etspec's eager reference loop (`speculative_greedy`) on held-out prompts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from etspec.models.greedy import speculative_greedy
from etspec.models.speculator import Speculator


@dataclass
class Acceptance:
    draft_len: int
    prompts: int
    rounds: int
    tokens: int

    @property
    def length(self) -> float:
        """Tokens committed per verify pass over all rounds of all prompts: mean(accepted) + 1."""
        return self.tokens / self.rounds if self.rounds else 0.0


@torch.no_grad()
def acceptance(
    spec: Speculator,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: tuple[int, ...] = (),
    progress: bool = False,
) -> Acceptance:
    """Greedy chain decoding of each prompt; rounds are pooled, so long generations weigh more."""
    rounds = committed = 0
    # The reference loop builds its index tensors with plain factories: place them with the model.
    with torch.device(spec.target.embed_tokens.weight.device):
        for prompt in tqdm(prompts, desc="acceptance", unit="prompt", disable=not progress):
            gen = speculative_greedy(spec, prompt, max_new_tokens, eos=eos)
            rounds += gen.rounds
            committed += sum(gen.accepted) + gen.rounds
    return Acceptance(spec.draft_len, len(prompts), rounds, committed)
