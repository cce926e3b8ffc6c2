"""Offline prompt sources for self-distillation: instructions built from the standard library's own
docstrings, function stubs (signature + docstring) to implement, ShareGPT's user messages and prose
openings (`sharegpt.py`), or the user's text/JSONL file.

Nothing here reads an evaluation set (HumanEval, chat benchmarks): prompts the head is later measured on
must never shape its training data.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import random
import re
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

# Pure-Python and C modules present in every CPython build; the list is fixed so the prompts depend only on
# the seed and the Python version (docstrings change between versions).
STDLIB_MODULES = (
    "abc", "argparse", "array", "ast", "base64", "bisect", "calendar", "cmath", "collections",
    "colorsys", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "enum",
    "fnmatch", "fractions", "functools", "glob", "gzip", "hashlib", "heapq", "hmac", "html",
    "http.client", "inspect", "io", "ipaddress", "itertools", "json", "logging", "math", "mimetypes",
    "operator", "os", "os.path", "pathlib", "pickle", "platform", "pprint", "queue", "random", "re",
    "secrets", "shlex", "shutil", "socket", "statistics", "string", "struct", "subprocess", "tempfile",
    "textwrap", "threading", "time", "timeit", "tokenize", "typing", "unicodedata", "urllib.parse",
    "uuid", "warnings", "weakref", "xml.etree.ElementTree", "zipfile", "zlib",
)  # fmt: skip

TEMPLATES = (
    "Explain what `{name}` does in Python, and show a short example of using it.",
    "Write a Python function that does what the documentation says `{name}` does, without calling it: "
    "{summary}",
    'The Python documentation describes `{name}{signature}` as: "{summary}" Explain this in plain words '
    "for a beginner.",
    "Write a small Python program that uses `{name}` and explain each line.",
    "What mistakes do people often make with `{name}`? Show code that avoids them.",
    "Write pytest unit tests for `{name}`.",
    "I am reading code that calls `{name}{signature}`. What do its arguments mean and what does it return?",
    "Implement a simplified version of `{name}` in pure Python. Its documentation says: {summary}",
)
# Stubs of pure-Python stdlib functions to implement: the code-completion shape of coding benchmarks,
# with none of their problems.
CODE_TEMPLATES = (
    "Implement the function below so that it does what its docstring says.\n\n```python\n{stub}```",
    "Write the body of this Python function.\n\n```python\n{stub}```",
    "Here is a function signature and its docstring. Write the implementation.\n\n```python\n{stub}```",
)
MAX_DOC_CHARS = 800
FILE_FIELDS = ("prompt", "instruction", "question", "input", "text")
MAX_SUMMARY_CHARS = 300


class PromptError(ValueError):
    """A prompt source that cannot be read; the message names the file and line."""


@dataclass(frozen=True)
class DocEntry:
    name: str  # e.g. "json.dumps", "collections.Counter.most_common"
    signature: str  # "(obj, *, skipkeys=False, ...)" or ""
    summary: str  # the docstring's first paragraph, on one line
    doc: str = ""  # the docstring's leading paragraphs, up to MAX_DOC_CHARS
    python: bool = False  # a function or method written in Python (its signature is source code)


def _summary(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    first = " ".join(doc.strip().split("\n\n")[0].split())
    return first[:MAX_SUMMARY_CHARS].rstrip()


def _signature(obj: object) -> str:
    try:
        sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""
    return re.sub(r" at 0x[0-9a-f]+", "", sig)  # default values' reprs hold addresses


def _doc(obj: object) -> str:
    paragraphs = (inspect.getdoc(obj) or "").strip().split("\n\n")
    kept = paragraphs[:1]
    for para in paragraphs[1:]:
        if len("\n\n".join([*kept, para])) > MAX_DOC_CHARS:
            break
        kept.append(para)
    return "\n\n".join(kept)[:MAX_DOC_CHARS]


def _documented(name: str, obj: object) -> DocEntry | None:
    summary = _summary(obj)
    # One-liners like "Return self." make poor instructions.
    if len(summary) < 20:
        return None
    return DocEntry(name, _signature(obj), summary, _doc(obj), inspect.isfunction(obj))


def _walk_stdlib() -> list[DocEntry]:
    entries: dict[str, DocEntry] = {}
    for module_name in STDLIB_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:  # a build without e.g. zlib: its prompts are simply absent
            continue
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue  # private, or re-exported from another module
            if not (inspect.isroutine(obj) or inspect.isclass(obj)):
                continue
            name = f"{module_name}.{attr}"
            if (entry := _documented(name, obj)) is not None:
                entries[name] = entry
            if inspect.isclass(obj):
                for method, member in sorted(vars(obj).items()):
                    if not method.startswith("_") and inspect.isroutine(member):
                        entry = _documented(f"{name}.{method}", member)
                        if entry is not None:
                            entries[entry.name] = entry
    return [entries[k] for k in sorted(entries)]


def stdlib_entries() -> list[DocEntry]:
    """Public, documented functions, classes and methods defined in STDLIB_MODULES, sorted by name.

    Collected in a fresh, isolated interpreter: torch and transformers patch stdlib objects when imported
    (inspect.getfile, methods added to logging.Logger), which would make the list depend on what the
    calling process imported before.
    """
    done = subprocess.run([sys.executable, "-I", "-m", __name__], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["no output"]
        raise PromptError(f"collecting stdlib docstrings failed: {lines[-1]}")
    return [DocEntry(**e) for e in json.loads(done.stdout)]


def stdlib_prompts(seed: int = 0) -> list[str]:
    """Instructions about stdlib APIs, in a seeded order that visits every API once before any twice.

    Each entry gets every template once, in its own shuffled order; round r takes each entry's r-th
    template, so the first N prompts name N different APIs when N <= the number of entries.
    """
    rng = random.Random(seed)
    entries = stdlib_entries()
    rng.shuffle(entries)
    orders = [rng.sample(range(len(TEMPLATES)), len(TEMPLATES)) for _ in entries]
    prompts = []
    for r in range(len(TEMPLATES)):
        for entry, order in zip(entries, orders):
            template = TEMPLATES[order[r]]
            prompts.append(template.format(name=entry.name, signature=entry.signature, summary=entry.summary))
    return prompts


def _stub(entry: DocEntry) -> str:
    """`def name(signature):` and the docstring, indented, as the function's source would start."""
    lines = entry.doc.replace('"""', "'''").splitlines()
    body = "".join(f"    {line}\n" if line.strip() else "\n" for line in lines[1:])
    return f'def {entry.name.rsplit(".", 1)[-1]}{entry.signature}:\n    """{lines[0]}\n{body}    """\n'


def _parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def stdlib_code_prompts(seed: int = 0) -> list[str]:
    """Stubs of the stdlib's documented Python functions and methods to implement, in a seeded order
    that visits every function once (with a random one of CODE_TEMPLATES) before any twice."""
    rng = random.Random(seed)
    # Methods shared by several classes (aliases, copies) give one stub; defaults whose repr is not code
    # (`<object ...>`) rule a stub out.
    stubs = [s for s in dict.fromkeys(_stub(e) for e in stdlib_entries() if e.python) if _parses(s)]
    rng.shuffle(stubs)
    orders = [rng.sample(range(len(CODE_TEMPLATES)), len(CODE_TEMPLATES)) for _ in stubs]
    return [
        CODE_TEMPLATES[order[r]].format(stub=stub)
        for r in range(len(CODE_TEMPLATES))
        for stub, order in zip(stubs, orders)
    ]


def _jsonl_prompt(obj: object) -> str | None:
    if not isinstance(obj, dict):
        return None
    for key in FILE_FIELDS:
        if isinstance(obj.get(key), str) and obj[key].strip():
            return obj[key].strip()
    for key in ("messages", "conversations"):  # the first user turn of a chat record
        for turn in obj.get(key) or []:
            if isinstance(turn, dict) and turn.get("role", turn.get("from")) in ("user", "human"):
                text = turn.get("content", turn.get("value"))
                if isinstance(text, str) and text.strip():
                    return text.strip()
    return None


def file_prompts(path: str | Path) -> list[str]:
    """Prompts from a file, in file order, duplicates dropped.

    `.jsonl`: one JSON object per line with a string field (prompt, instruction, question, input or
    text) or a chat record (messages / conversations; the first user turn). Any other file: one prompt
    per non-empty line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PromptError(f"cannot read prompts from {path}: {e}") from None
    prompts: dict[str, None] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                text = _jsonl_prompt(json.loads(line))
            except json.JSONDecodeError as e:
                raise PromptError(f"{path}:{number}: not valid JSON ({e.msg})") from None
            if text is None:
                raise PromptError(
                    f"{path}:{number}: no prompt found (expected a string field {'/'.join(FILE_FIELDS)} "
                    "or a messages list with a user turn)"
                )
        else:
            text = line.strip()
        prompts[text] = None
    if not prompts:
        raise PromptError(f"{path} holds no prompts")
    return list(prompts)


CODE_CHARS = set("=(){}[]<>`#_*|\\")


def prose_opening(text: str, rng: random.Random, words: tuple[int, int] = (5, 16)) -> str | None:
    """The first 5-16 words of a random prose sentence of `text`, or None: sentences shorter than 8
    words, not starting with a capital letter, or holding a character of code or markup (CODE_CHARS)
    are skipped, and at least 3 words of the sentence are left to continue."""
    sentences = [s.split() for s in re.split(r"(?<=[.!?])\s+|\n+", text)]
    prose = [w for w in sentences if len(w) >= 8 and w[0][0].isupper() and not CODE_CHARS & set("".join(w))]
    if not prose:
        return None
    sentence = rng.choice(prose)
    return " ".join(sentence[: rng.randint(words[0], min(words[1], len(sentence) - 3))])


def _sharegpt(seed: int) -> list[str]:
    from .sharegpt import sharegpt_prompts  # imports this module: loaded on use

    return sharegpt_prompts(seed)


def _sharegpt_text(seed: int) -> list[str]:
    from .sharegpt import sharegpt_text_prompts

    return sharegpt_text_prompts(seed)


BUILT_IN = {
    "stdlib": stdlib_prompts,
    "stdlib-code": stdlib_code_prompts,
    "sharegpt": _sharegpt,
    "sharegpt-text": _sharegpt_text,
}
# Sources continued as plain text, never wrapped in a chat template.
PLAIN_SOURCES = ("self-text", "sharegpt-text")


def load_prompts(source: str, seed: int = 0) -> list[str]:
    """A built-in source (BUILT_IN) or a file path (see file_prompts)."""
    return BUILT_IN[source](seed) if source in BUILT_IN else file_prompts(source)


if __name__ == "__main__":
    print(json.dumps([asdict(e) for e in _walk_stdlib()]))
