"""Exceptions raised by etspec.runtime.

Every failure the runtime can detect is turned into one of these, with a message that names the
file, method, delegate or C function involved. Nothing here should ever end in a crash of the
process: malformed inputs are rejected in Python before any native code sees them.
"""

from __future__ import annotations

from etspec.errors import EtspecError


class ArtifactError(EtspecError, ValueError):
    """A .pte/.ptd/.so artifact is malformed, truncated or inconsistent."""


class UnsupportedLayoutError(ArtifactError):
    """The artifact is well formed but uses a layout this runtime does not read."""


class MissingBlobError(ArtifactError, KeyError):
    """A named-data entry (shared object, weights blob, weight storage) is not in the loaded files."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class AotiCallError(EtspecError, RuntimeError):
    """A call into an AOTInductor model container returned an error code."""

    def __init__(self, method: str, function: str, code: int, detail: str = "") -> None:
        self.method = method
        self.function = function
        self.code = code
        self.detail = detail
        msg = f"[{method}] {function} failed (AOTIRuntimeError {code})"
        if detail:
            # the first line is the error; the rest (a C++ backtrace) stays in .detail
            first = detail.strip().splitlines()[0] if detail.strip() else ""
            msg += f": {first}"
        super().__init__(msg)


class ConstantBindingError(EtspecError, RuntimeError):
    """Constants (weights, mutable buffers) could not be loaded or shared across methods."""


class MethodInputError(EtspecError, ValueError):
    """A method was called with the wrong number, dtype, shape or device of inputs."""
