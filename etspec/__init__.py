"""etspec: EAGLE-3 speculative decoding exported ahead of time to one ExecuTorch program.

The Python API in one import::

    from etspec import Program, SpeculativeGenerator, generate_text

`generate_text(artifact_dir, prompt)` is the one-call path; `Program.load` + `SpeculativeGenerator`
stream token ids round by round. The stages live in etspec.models, .kernels, .export, .runtime,
.runner, .convert and .train; this package only re-exports what a user needs, imported on first use
so that `import etspec.models` does not load the runtime.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Generation": "etspec.runner.api",
    "generate_text": "etspec.runner.api",
    "SpeculativeGenerator": "etspec.runner.generator",
    "GenerationStats": "etspec.runner.stats",
    "EtspecError": "etspec.errors",
    "UsageError": "etspec.errors",
    "ContextLimitError": "etspec.runner.errors",
    "Program": "etspec.runtime.program",
    "ArtifactError": "etspec.runtime.errors",
    "MethodInputError": "etspec.runtime.errors",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'etspec' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
