"""Writing --out all at once: the conversion fills a hidden directory beside --out, which takes --out's
place only when complete, so a failed or interrupted run leaves --out (and the user's files) as they were.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ConvertError


def check_out(out: Path, source: Path, force: bool) -> None:
    """Refuse an --out that would lose data: a file, the input's own location, the working directory,
    or (without --force) a non-empty directory."""
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out {out} exists and is not a directory")
    src, dst, cwd = source.resolve(), out.resolve(), Path.cwd()
    if src == dst or dst in src.parents:
        raise ConvertError(f"--out {out} holds the input {source}; replacing it would delete the input")
    if cwd == dst or dst in cwd.parents:
        raise ConvertError(f"--out {out} is or holds the current directory; name a directory beside it")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConvertError(f"--out {out} exists and is not empty (use --force to replace it)")


def _sibling(out: Path, tag: str) -> Path:
    return out.with_name(f".{out.name}.{secrets.token_hex(4)}.{tag}")


def _make_parents(directory: Path) -> list[Path]:
    """Create `directory` and its missing ancestors; return those created, outermost first."""
    missing = [d for d in (directory, *directory.parents) if not d.exists()][::-1]
    for d in missing:
        d.mkdir()
    return missing


def _put_in_place(staged: Path, out: Path) -> None:
    if not out.exists():
        staged.rename(out)
        return
    old = _sibling(out, "old")
    out.rename(old)
    try:
        staged.rename(out)
    except BaseException:
        old.rename(out)
        raise
    if old.is_symlink():  # a linked --out: the link goes, its target is left alone
        old.unlink()
    else:
        shutil.rmtree(old)


@contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield an empty directory beside `out` to write into; on success it replaces `out` (an existing
    `out` is moved aside first and deleted only once the new one is in place); on any failure it is
    deleted, along with the parent directories this created."""
    out = Path(os.path.abspath(out))  # "." and "dir/.." have no name to put a sibling beside
    created = _make_parents(out.parent)
    staged = _sibling(out, "partial")
    staged.mkdir()
    try:
        yield staged
        _put_in_place(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        for d in reversed(created):
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
