"""The error bases every stage shares: what etspec raises on purpose, and the user mistakes among them.

The CLIs print an :class:`EtspecError` as one line (never a traceback); a :class:`UsageError` also
exits with status 2.
"""

from __future__ import annotations


class EtspecError(Exception):
    """Base of every error etspec raises on purpose, with a message that names what failed."""


class UsageError(EtspecError, ValueError):
    """A user mistake (a bad flag, path, prompt or combination): one line, exit code 2."""
