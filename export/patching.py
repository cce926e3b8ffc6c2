"""Replacing a class attribute for the length of a block: how export hooks calls ExecuTorch makes anyway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def patched(cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Iterator[None]:
    """Replace ``cls.name`` by ``make(original)`` (bound as the class sees it) until the block ends."""
    own = cls.__dict__.get(name)
    setattr(cls, name, staticmethod(make(getattr(cls, name))))
    try:
        yield
    finally:
        if own is None:
            delattr(cls, name)
        else:
            setattr(cls, name, own)
