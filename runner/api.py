"""`generate_text`: one call from an artifact (or a loaded Program) and a prompt to the generated text."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from etspec.runtime.program import Program

from .generator import SpeculativeGenerator
from .sampling import Sampling
from .stats import GenerationStats
from .text import decode, encode_prompt, load_tokenizer


@dataclass
class Generation:
    """What one generation produced: the text, its token ids and the run's statistics."""

    text: str
    token_ids: list[int]
    stats: GenerationStats


def generate_text(
    model: str | os.PathLike[str] | Program,
    prompt: str,
    max_new_tokens: int = 128,
    *,
    chat: bool = False,
    draft_len: int | None = None,
    speculative: bool = True,
    cuda_graph: bool = False,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
) -> Generation:
    """Up to `max_new_tokens` after `prompt` (wrapped in the chat template when `chat`), speculative unless
    `speculative=False`. Greedy by default: the tokens equal target-only greedy decoding. `temperature` > 0
    samples (with the `top_p` / `top_k` filters; `seed` repeats a run): the tokens are distributed as
    target-only sampling's; the artifact must have been exported with `--sampling`.

    `model` is an artifact directory (loaded for this call, about a second on the CPU) or a loaded
    `Program` to reuse across calls (its directory holds the tokenizer).
    """
    program = model if isinstance(model, Program) else Program.load(Path(model))
    try:
        tok = load_tokenizer(program.directory)
        gen = SpeculativeGenerator(
            program,
            draft_len=draft_len,
            spec=speculative,
            cuda_graph=cuda_graph,
            sampling=Sampling(temperature, top_p, top_k, seed),
        )
        ids = [t for chunk in gen.generate(encode_prompt(tok, prompt, chat), max_new_tokens) for t in chunk]
        return Generation(decode(tok, ids), ids, gen.stats)
    finally:
        if program is not model:
            program.close()
