"""The one error type of the convert stage."""

from __future__ import annotations

from etspec.errors import UsageError


class ConvertError(UsageError):
    """A user mistake (bad path, not a GGUF, unsupported architecture, occupied --out): one line, exit 2."""
