"""Constant methods: argument-less methods of the program that return a value fixed at export.

The emitter accepts bool/int/float/str/dtype/tensor and lists of them (ExecuTorch
``exir/emit/_emitter.py`` ``_emit_prim_getters``); the manifest is a ``str`` method, which
``executorch.runtime`` returns as a Python ``str`` and the flatbuffer holds as ``String``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from etspec.artifact import MANIFEST_METHOD, Manifest

_CONST_SCALARS = (bool, int, float, str, torch.dtype)


def manifest_constant_methods(manifest: Manifest) -> dict[str, Any]:
    """The constant methods every etspec program carries: the manifest and the scalars a
    runner wants without parsing JSON (same names as ExecuTorch's LLM runners use where one
    exists, e.g. ``get_max_seq_len``)."""
    consts: dict[str, Any] = {
        MANIFEST_METHOD: manifest.to_json(),
        "get_format_version": manifest.format_version,
        "get_max_seq_len": manifest.max_seq_len,
        "get_max_prefill_chunk": manifest.max_prefill_chunk,
        "get_draft_len": manifest.draft_len,
        "get_vocab_size": manifest.vocab_size,
        "get_hidden_size": manifest.hidden_size,
    }
    if manifest.eos_token_ids:
        consts["get_eos_ids"] = list(manifest.eos_token_ids)
    return consts


def check_constant_methods(consts: Mapping[str, Any], exported: Mapping[str, Any]) -> None:
    """Refuse, before any lowering, constant methods the emitter would reject or the runtime misread."""

    def ok(v: Any) -> bool:
        if isinstance(v, _CONST_SCALARS) or isinstance(v, torch.Tensor):
            return True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        return False

    for name, value in consts.items():
        if name in exported:
            raise ValueError(f"constant method {name!r} clashes with an exported method")
        if not ok(value):
            raise TypeError(
                f"constant method {name!r}: {type(value).__name__} is not emittable "
                "(use bool/int/float/str/dtype/tensor or a list of them)"
            )
        if isinstance(value, (list, tuple)) and len(value) == 0:
            # An empty list flattens to no values; the runtime would return nothing at all.
            raise ValueError(f"constant method {name!r} is an empty list")
