"""``torch.export`` of the method wrappers, one program per method, and their manifest signatures.

Independent of the model code: callers hand in ``nn.Module`` wrappers (one per method, all holding the
*same* model object so parameter/buffer FQNs agree across methods); :func:`etspec.export.lower.lower`
then lowers the programs together.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.export import ExportedProgram

from etspec.artifact import MethodSig

from .manifest import method_signature
from .progress import Progress, print_progress, timed

#: One method to export: (wrapper module, example args, torch.export dynamic_shapes or None).
MethodSpec = tuple[nn.Module, tuple, Any]


def _freeze(module: nn.Module) -> None:
    # Lowering deep-copies the graph's constants; parameters that require grad make that fail
    # (probe lesson) and would put autograd ops into the graph.
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


class _Discarding(dict):
    """A real-value cache that keeps nothing: each clone is freed as soon as it is made."""

    def __setitem__(self, key: Any, value: Any) -> None:
        pass


@contextmanager
def no_real_value_copies() -> Iterator[None]:
    """Strict ``torch.export`` (TorchDynamo) without its copy of every tensor the trace touches.

    Dynamo keeps a clone of each parameter, buffer and input it wraps in its tracer's
    ``real_value_cache`` (``torch._dynamo.variables.builder``), in case the trace must run nodes on real
    values (``torch._dynamo.utils.get_real_value``): a second copy of the weights and KV caches on the
    model's device for the whole of a method's trace. That doubled a 12-layer Gemma-4-31B-shaped model
    at 128K (40 GB) past an 80 GB GPU. Here the cache keeps nothing, so each clone is freed at once; a
    real value, if one is asked for, is computed from the live module instead, which etspec's methods
    never mutate while tracing. The tracer is torch-internal: where it has no such cache, nothing changes.
    """
    from torch._dynamo import output_graph

    tracer = output_graph.SubgraphTracer
    own = tracer.__dict__["__init__"]

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        own(self, *args, **kwargs)
        if isinstance(getattr(self, "real_value_cache", None), dict):
            self.real_value_cache = _Discarding()

    tracer.__init__ = init
    try:
        yield
    finally:
        tracer.__init__ = own


def export_methods(
    methods: Mapping[str, MethodSpec],
    strict: bool = True,
    progress: Progress | None = print_progress,
) -> dict[str, ExportedProgram]:
    """``torch.export`` each method under ``no_grad``; returns {method name: program}.

    Methods are exported one by one but must be *lowered* together (see
    :func:`etspec.export.lower.lower`) for their buffers to be shared. The exported programs keep
    references to the module's parameters (no copies), and the trace makes none
    (:func:`no_real_value_copies`), so exporting three wrappers of one 8B model costs 1x weights.
    """
    progress = progress or (lambda _msg: None)
    out: dict[str, ExportedProgram] = {}
    for name, (module, args, dynamic_shapes) in methods.items():
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} must be an identifier")
        _freeze(module)
        with timed(progress, f"torch.export {name}"), torch.no_grad(), no_real_value_copies():
            out[name] = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=strict)
    return out


def method_signatures(
    methods: Mapping[str, MethodSpec], exported: Mapping[str, ExportedProgram]
) -> dict[str, MethodSig]:
    """Manifest signatures for each exported method, with the ``Dim`` names of its spec."""
    return {name: method_signature(exported[name], methods[name][2]) for name in exported}
