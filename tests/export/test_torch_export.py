"""Strict torch.export through export_methods holds no copy of the tensors it traces: TorchDynamo's
real-value cache would keep a clone of every parameter, buffer and input (a second copy of the weights
and KV caches on the model's device, for a whole method's trace); export_methods lets each clone go as
soon as it is made."""

from __future__ import annotations

import weakref

import torch
from torch._dynamo.variables import builder

from etspec.export.methods import method_specs
from etspec.export.torch_export import export_methods
from etspec.fixtures.shaped import write_random_pair
from etspec.kernels import register_ops
from etspec.models.checkpoint import load_speculator
from etspec.models.layers import FewRowsKernels


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


def test_k_eq_v_methods_export_over_the_whole_kv_range(tmp_path):
    """A K = V layer computes its keys from a cache slice [:kv_len] by elementwise ops, which ask whether
    the slice is contiguous: with a cache of exactly max_seq_len rows that is kv_len == max_seq_len, a
    guard strict export refuses over kv_len <= max_seq_len (the CUDA forms; the XNNPACK forms too)."""
    register_ops()
    small = dict(hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4)
    small.update(num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=2)
    layers = ["sliding_attention"] * 5 + ["full_attention"]
    small.update(sliding_window=8, num_hidden_layers=6, layer_types=layers)
    target, draft = write_random_pair(tmp_path, "gemma-4-31b-12l", draft_vocab_size=64, **small)
    kernels = FewRowsKernels(sdpa_midm=True, linear_rows=True, reductions=True)
    spec = load_speculator(target, draft, 128, 3, torch.float32, kernels=kernels, device="cpu", max_rows=16)
    exported = export_methods(method_specs(spec, 16), progress=None)
    assert set(exported) >= {"prefill", "target_verify", "draft"}
