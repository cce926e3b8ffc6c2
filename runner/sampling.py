"""Sampling settings and the per-round randomness the sampled methods take as inputs (docs/design.md §10).

The graphs hold no random state: before each call the runner fills persistent device buffers from one
seeded generator (uniforms for the accept tests, Exp(1) noise for the draws), so a captured CUDA graph
replays with fresh values and the same seed reproduces a run on the same backend.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from etspec.artifact import Manifest

__all__ = ["Sampling", "SamplingInputs"]


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy decoding (the argmax methods; top_p / top_k must stay off). top_k = 0 and
    top_p = 1 switch those filters off. seed None draws one (reported by `SamplingInputs.seed`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        t, p, k = self.temperature, self.top_p, self.top_k
        if not (isinstance(t, (int, float)) and math.isfinite(t) and t >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {t}")
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {p}")
        if not (isinstance(k, int) and not isinstance(k, bool) and k >= 0):
            raise ValueError(f"top_k must be an integer >= 0 (0 = off), got {k}")
        if t == 0 and (p < 1 or k > 0):
            raise ValueError("top_p / top_k filter sampled tokens: they need a temperature > 0 (0 is greedy)")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class SamplingInputs:
    """The sampled methods' extra inputs, allocated once: params [3] (temperature, top_p, top_k), verify
    accept uniforms [1, k+1] and noise [1, 1, V], draft noise [1, k, Vd], and the placeholder draft
    distributions of a row with no drafts (target-only steps)."""

    def __init__(self, manifest: Manifest, sampling: Sampling, device: torch.device):
        if manifest.draft_vocab_size is None:
            raise ValueError("the manifest lacks draft_vocab_size, which sampling needs")
        k, vd = manifest.draft_len, manifest.draft_vocab_size
        self.seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator(device=device).manual_seed(self.seed)
        f32 = dict(dtype=torch.float32, device=device)
        self.params = torch.tensor([sampling.temperature, sampling.top_p, float(sampling.top_k)], **f32)
        self._accept_u = torch.zeros(1, k + 1, **f32)
        self._verify_noise = torch.zeros(1, 1, manifest.vocab_size, **f32)
        self._draft_noise = torch.zeros(1, k, vd, **f32)
        self.no_drafts = torch.zeros(1, k + 1, vd, **f32)

    def verify(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh (accept_u [1, rows], noise [1, 1, V]) for one target_verify_sample call."""
        u = self._accept_u[:, :rows]
        u.uniform_(generator=self.generator)
        return u, self._verify_noise.exponential_(generator=self.generator)

    def draft(self) -> torch.Tensor:
        """Fresh Exp(1) noise [1, k, Vd] for one draft_sample call."""
        return self._draft_noise.exponential_(generator=self.generator)
