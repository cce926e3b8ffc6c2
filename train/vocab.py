"""The draft vocabulary: which target tokens the head's lm_head can propose, as the standard EAGLE-3
`d2t` (draft id -> offset, target = draft + d2t[draft]) and `t2d` (mask over the target vocab)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftVocab:
    ids: torch.Tensor  # [Vd] int64 target ids, ascending: draft id i is target id ids[i]
    vocab_size: int  # the target's vocabulary

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def d2t(self) -> torch.Tensor:
        return self.ids - torch.arange(self.size, device=self.ids.device)

    @property
    def t2d(self) -> torch.Tensor:
        mask = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.ids.device)
        mask[self.ids] = True
        return mask


def most_frequent(sequences: Iterable[torch.Tensor], vocab_size: int, size: int) -> tuple[DraftVocab, float]:
    """The `size` most frequent target tokens of `sequences` (ties: the lower id first), and the share of
    the counted tokens that the draft vocabulary covers."""
    if not 1 <= size <= vocab_size:
        raise ValueError(f"draft vocab size {size} must be between 1 and the target vocab size {vocab_size}")
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for seq in sequences:
        counts += torch.bincount(seq.cpu(), minlength=vocab_size)
    order = torch.sort(counts, descending=True, stable=True).indices  # stable: equal counts keep id order
    chosen = order[:size].sort().values
    total = int(counts.sum())
    coverage = int(counts[chosen].sum()) / total if total else 0.0
    return DraftVocab(chosen, vocab_size), coverage
