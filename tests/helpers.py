"""Helpers shared by the test suites: seeded random prompts and a whole run of the runner's generator."""

from __future__ import annotations

import torch


def random_prompt(n: int, seed: int) -> list[int]:
    """n token ids in [3, 256), the same for the same seed (ids below 3 are the tiny pairs' specials)."""
    return torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def generate(program, prompt: list[int], max_new_tokens: int, **kw):
    """Run `SpeculativeGenerator(program, **kw)` to the end: (all tokens, its stats, the yielded chunks)."""
    from etspec.runner.generator import SpeculativeGenerator

    gen = SpeculativeGenerator(program, **kw)
    chunks = list(gen.generate(prompt, max_new_tokens))
    return [t for c in chunks for t in c], gen.stats, chunks
