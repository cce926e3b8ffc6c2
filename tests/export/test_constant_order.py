"""prefill and target_verify read the target's weights in one order, so their CUDA weights blobs are
byte-identical and the .ptd holds the target once (export.constant_order.constants_in_first_use_order
says why). Checked on the exported graphs, with the few-rows kernels on as in a CUDA export;
`bench/blob_report.py` checks the blobs themselves on the GPU box."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from etspec.export.constant_order import constants_in_first_use_order, warn_unshared_blobs
from etspec.export.methods import method_specs
from etspec.export.torch_export import export_methods
from etspec.fixtures.tiny import random_target, tiny_draft_config, tiny_target_config
from etspec.models.config import parse_draft_config
from etspec.models.draft import Eagle3Draft
from etspec.models.layers import ALL_KERNELS
from etspec.models.speculator import Speculator

TARGET = ("prefill", "target_verify")


# Llama's layers plus q/k/v biases; sandwich norms; K = V layers (no v_proj) beside plain ones
@pytest.mark.parametrize(
    "family,chunk",
    [("qwen2", False), ("gemma2", False), ("gemma4_text", False), ("gemma4_text", True), ("qwen2", True)],
)
def test_prefill_and_verify_read_constants_in_one_order(family, chunk):
    # untrained weights: only the graph matters; max_seq_len as test_speculative's few-rows pairs; `chunk`:
    # prefill through both many-row kernels
    both = replace(ALL_KERNELS, linear_chunk=chunk, sdpa_chunk=chunk)
    target = random_target(family, 160, seed=0, kernels=both)
    dcfg = parse_draft_config(tiny_draft_config(tiny_target_config(family)))
    draft = Eagle3Draft(dcfg, 160, own_embedding=False, kernels=both).eval().requires_grad_(False)
    specs = method_specs(Speculator(target, draft, 3), 16)
    eps = export_methods({n: specs[n] for n in TARGET}, progress=None)
    prefill, verify = (constants_in_first_use_order(eps[n]) for n in TARGET)
    assert any(".bias" in f for f in prefill) == (family == "qwen2")
    assert prefill == verify, next((a, b) for a, b in zip(prefill, verify) if a != b)
    said: list[str] = []
    warn_unshared_blobs(eps, said.append)
    assert said == []


class _Pair(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(4, 4, bias=False)
        self.b = torch.nn.Linear(4, 4, bias=False)


class _Reads(torch.nn.Module):
    """A method over the shared `pair`, reading its weights a-first or b-first."""

    def __init__(self, pair: _Pair, b_first: bool):
        super().__init__()
        self.pair, self.b_first = pair, b_first

    def forward(self, x):
        return self.pair.b(x) + self.pair.a(x) if self.b_first else self.pair.a(x) + self.pair.b(x)


def test_warns_when_methods_read_shared_weights_in_other_orders():
    pair = _Pair()
    x = (torch.randn(2, 4),)
    methods = {"one": (_Reads(pair, False), x, None), "two": (_Reads(pair, True), x, None)}
    eps = export_methods(methods, progress=None)
    assert constants_in_first_use_order(eps["one"]) == ["pair.a.weight", "pair.b.weight"]
    assert constants_in_first_use_order(eps["two"]) == ["pair.b.weight", "pair.a.weight"]
    said: list[str] = []
    warn_unshared_blobs(eps, said.append)
    assert len(said) == 1 and "one and two read the same weights in different orders" in said[0]
    methods["two"] = (_Reads(pair, False), x, None)
    said.clear()
    warn_unshared_blobs(export_methods(methods, progress=None), said.append)
    assert said == []
