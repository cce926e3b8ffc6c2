"""Prompt sources: the stdlib instructions and function stubs are deterministic, plentiful and free of
HumanEval; files give their prompts in order and bad lines are named."""

from __future__ import annotations

import ast
import json
import re

import pytest

from etspec.train.prompts import (
    PromptError,
    file_prompts,
    load_prompts,
    stdlib_code_prompts,
    stdlib_prompts,
)

# A few HumanEval function names (the evaluation set is never downloaded, nor read here).
HUMANEVAL_NAMES = (
    "has_close_elements",
    "separate_paren_groups",
    "truncate_number",
    "below_zero",
    "mean_absolute_deviation",
    "intersperse",
    "parse_nested_parens",
    "filter_by_substring",
    "rolling_max",
    "make_palindrome",
)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return stdlib_prompts(seed=0)


def test_stdlib_prompts_are_deterministic_and_plentiful(prompts):
    assert len(prompts) > 5000 and all(p.strip() for p in prompts)
    assert stdlib_prompts(seed=0) == prompts
    assert load_prompts("stdlib", seed=0) == prompts
    other = stdlib_prompts(seed=1)
    assert other != prompts and sorted(other) == sorted(prompts)
    assert len(set(prompts)) == len(prompts)
    names = [re.search(r"`([\w.]+)", p).group(1) for p in prompts[:1000]]
    assert len(set(names)) == 1000  # the first prompts each name another API
    assert any(p.startswith("Write a Python function that") for p in prompts)
    assert "json.dumps" in {n for p in prompts for n in re.findall(r"`([\w.]+)", p)}


def test_stdlib_prompts_hold_no_humaneval(prompts):
    text = "\n".join(prompts)
    assert not [name for name in HUMANEVAL_NAMES if name in text]
    assert "HumanEval" not in text and "human_eval" not in text


def test_stdlib_code_prompts_are_stubs_that_parse():
    prompts = stdlib_code_prompts(seed=0)
    assert len(prompts) > 1500 and len(set(prompts)) == len(prompts)
    assert load_prompts("stdlib-code", seed=0) == prompts
    assert stdlib_code_prompts(seed=1) != prompts
    stubs = [re.search(r"```python\n(.*)```", p, re.S).group(1) for p in prompts]
    trees = [ast.parse(stub) for stub in stubs]  # each stub is a function with its docstring, no body
    assert all(len(t.body) == 1 and isinstance(t.body[0], ast.FunctionDef) for t in trees)
    assert all(ast.get_docstring(t.body[0]) for t in trees)
    names = [t.body[0].name for t in trees]
    assert len(set(names[:500])) > 400  # mostly different functions (methods like `close` recur)
    assert "harmonic_mean" in names
    text = "\n".join(prompts)
    assert not [name for name in HUMANEVAL_NAMES if name in text]


def test_file_prompts(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \nfirst prompt\n")
    assert file_prompts(txt) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    rows = [
        {"prompt": "a"},
        {"instruction": "b", "output": "ignored"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "c"}]},
        {"conversations": [{"from": "human", "value": "d"}]},
    ]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert load_prompts(str(jsonl)) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("bad.jsonl", '{"prompt": "a"}\n{not json\n', r"bad.jsonl:2: not valid JSON"),
        ("none.jsonl", '{"answer": "a"}\n', r"none.jsonl:1: no prompt found"),
        ("empty.txt", "\n\n", r"holds no prompts"),
        ("binary.txt", b"\xff\xfe\x00", r"cannot read prompts"),
    ],
)
def test_file_prompt_errors_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(PromptError, match=message):
        file_prompts(path)
