"""Strict torch.export through export_methods holds no copy of the tensors it traces: TorchDynamo's
real-value cache would keep a clone of every parameter, buffer and input (a second copy of the weights
and KV caches on the model's device, for a whole method's trace); export_methods lets each clone go as
soon as it is made."""

from __future__ import annotations

import weakref

import torch
from torch._dynamo.variables import builder

from etspec.export.torch_export import export_methods


class _Cached(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(64, 64, bias=False)
        self.register_buffer("cache", torch.randn(32, 64), persistent=False)

    def forward(self, x):
        self.cache[:1].copy_(x)
        return self.proj(self.cache).sum(0, keepdim=True)


def _most_clone_bytes_alive(monkeypatch, export) -> int:
    """The most bytes of Dynamo's real-value clones alive at once while `export` runs."""
    alive, most = [0], [0]
    own = builder.clone_input

    def counting(value, *args, **kwargs):
        out = own(value, *args, **kwargs)
        n = out.numel() * out.element_size()
        alive[0] += n
        most[0] = max(most[0], alive[0])
        weakref.finalize(out, lambda: alive.__setitem__(0, alive[0] - n))
        return out

    monkeypatch.setattr(builder, "clone_input", counting)
    export()
    return most[0]


def test_export_methods_keeps_no_clone_of_traced_tensors(monkeypatch):
    init = torch._dynamo.output_graph.SubgraphTracer.__init__
    x = (torch.randn(1, 64),)
    weight, cache = 64 * 64 * 4, 32 * 64 * 4
    plain = _most_clone_bytes_alive(monkeypatch, lambda: torch.export.export(_Cached(), x, strict=True))
    assert plain >= weight + cache  # plain strict export holds copies of the weight and the cache at once
    module = _Cached()
    methods = {"m": (module, x, None)}
    ours = _most_clone_bytes_alive(monkeypatch, lambda: export_methods(methods, progress=None))
    assert ours <= weight  # one clone at a time, freed at once
    ep = export_methods({"m": (module, x, None)}, progress=None)["m"]
    ref = _Cached()
    ref.load_state_dict(module.state_dict())
    ref.cache.copy_(module.cache)
    assert torch.allclose(ep.module()(*x), ref(*x))
    assert torch._dynamo.output_graph.SubgraphTracer.__init__ is init  # restored
