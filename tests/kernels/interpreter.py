"""Kernel cases under the Triton interpreter, in a process of their own: TRITON_INTERPRET must be set
before triton is imported, and the test process has imported it for the registered ops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(script: str | Path) -> None:
    """Run `script` (a test module whose `__main__` runs its interpreter cases) and require that it
    printed "interpreter cases passed"."""
    script = Path(script).resolve()
    root = str(Path(__file__).resolve().parents[2])  # the script imports tests.kernels.* too
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1", PYTHONPATH=path)
    r = subprocess.run(
        [sys.executable, str(script)], env=env, cwd=script.parent, capture_output=True, text=True, timeout=300
    )
    print(r.stdout)
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    assert "interpreter cases passed" in r.stdout
