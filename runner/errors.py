"""Errors of the runner stage that mean "the user asked for something this artifact cannot do"."""

from __future__ import annotations

from etspec.errors import UsageError

__all__ = ["ContextLimitError", "UsageError"]


class ContextLimitError(UsageError):
    """The prompt leaves no room to generate within the program's max_seq_len."""
