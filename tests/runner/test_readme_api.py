"""The README's Python API example runs as written, against a real exported artifact."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_python_example_runs(tiny_artifacts, capsys):
    text = README.read_text()
    section = text[text.index("## Python API") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert '"out/demo/smollm2"' in code
    exec(
        compile(code.replace('"out/demo/smollm2"', repr(str(tiny_artifacts("llama")))), "README.md", "exec"),
        {},
    )
    out = capsys.readouterr().out.splitlines()
    stats = max(i for i, line in enumerate(out) if line.startswith("acceptance length "))
    rounds = out[stats + 1 :]
    assert rounds and all(line.startswith("[") and line.endswith("]") for line in rounds)
