"""Errors of the runner stage that mean "the user asked for something this artifact cannot do"."""

from __future__ import annotations


class UsageError(ValueError):
    """A bad flag, prompt or combination: reported as one line, exit code 2."""


class ContextLimitError(UsageError):
    """The prompt leaves no room to generate within the program's max_seq_len."""
