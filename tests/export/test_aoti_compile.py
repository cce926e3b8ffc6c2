"""Which CUDA methods AOTInductor autotunes: with etspec's kernels on, target_verify holds no aten matmul or
SDPA and compiles untuned; prefill, and any method left with one, stays tuned (draft: its catch-up rows'
K/V projections). The options hook
is checked against a stand-in backend (the CUDA compile itself runs only on the GPU box)."""

from __future__ import annotations

import operator
from dataclasses import replace

import pytest
import torch

from etspec.export.aoti_compile import matmul_ops, methods_to_tune, tuned_per_method
from etspec.export.methods import method_specs
from etspec.export.torch_export import export_methods
from etspec.fixtures.tiny import random_target, tiny_draft_config, tiny_target_config
from etspec.models.config import parse_draft_config
from etspec.models.draft import Eagle3Draft
from etspec.models.layers import ALL_KERNELS, PLAIN_OPS, FewRowsKernels
from etspec.models.speculator import Speculator

METHODS = ("prefill", "target_verify", "draft")


def _exported(family: str, kernels: FewRowsKernels):
    target = random_target(family, 160, seed=0, kernels=kernels)
    dcfg = parse_draft_config(tiny_draft_config(tiny_target_config(family)))
    draft = Eagle3Draft(dcfg, 160, own_embedding=False, kernels=kernels).eval().requires_grad_(False)
    specs = method_specs(Speculator(target, draft, 3), 16)
    return export_methods({n: specs[n] for n in METHODS}, progress=None)


@pytest.mark.parametrize(
    "family, kernels, tuned",
    [
        # every verify op is one of etspec's kernels; draft keeps its catch-up K/V projections
        ("llama", ALL_KERNELS, {"prefill", "draft"}),
        # Gemma 2's layers verify through the kernel with their attention logit softcap
        ("gemma2", ALL_KERNELS, {"prefill", "draft"}),
        # without the linear kernel every method has matmuls
        ("llama", FewRowsKernels(sdpa_midm=True, reductions=True), set(METHODS)),
        ("llama", PLAIN_OPS, set(METHODS)),
        # the many-row linear kernel takes prefill's and the draft's catch-up projections: prefill keeps
        # only its SDPA, the draft nothing
        ("llama", replace(ALL_KERNELS, linear_chunk=True), {"prefill"}),
        # ... and with the many-row attention kernel, no method has a matmul left
        ("llama", replace(ALL_KERNELS, linear_chunk=True, sdpa_chunk=True), set()),
    ],
    ids=[
        "llama-all-kernels",
        "gemma2-softcap",
        "llama-no-linear-rows",
        "llama-plain",
        "llama-chunk",
        "llama-chunk-attention",
    ],
)
def test_only_methods_with_a_matmul_are_tuned(family, kernels, tuned):
    eps = _exported(family, kernels)
    assert {m for m, on in methods_to_tune(eps).items() if on} == tuned
    assert all(methods_to_tune(eps, every_method=True).values())
    for m in METHODS:
        assert bool(matmul_ops(eps[m])) == (m in tuned), (m, matmul_ops(eps[m]))
    projections = matmul_ops(eps["prefill"]) & {"linear", "matmul"}
    assert bool(projections) != kernels.linear_chunk
    chunk_attention = [n for n in eps["prefill"].graph.nodes if "sdpa_chunk" in str(n.target)]
    assert len(chunk_attention) == (random_target(family, 8, 0).cfg.num_layers if kernels.sdpa_chunk else 0)


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text"])
def test_sliding_layers_take_the_kernels(family):
    """Sliding layers' verify attention is etspec::sdpa_midm over their window and their projections
    etspec::linear_rows, like the full layers': target_verify holds no aten matmul or SDPA and compiles
    untuned."""
    eps = _exported(family, ALL_KERNELS)
    verify = eps["target_verify"]
    assert not matmul_ops(verify), matmul_ops(verify)
    assert not methods_to_tune(eps)["target_verify"]
    windows = [
        n.args[6] if len(n.args) > 6 else n.kwargs.get("window", 0)
        for n in verify.graph.nodes
        if n.op == "call_function" and "sdpa_midm" in str(n.target)
    ]
    assert 0 in windows and any(w > 0 for w in windows), windows  # full and sliding layers


@pytest.mark.parametrize("family", ["gemma3_text", "gemma4_text"])
def test_sliding_prefill_takes_the_chunk_kernel(family):
    """Gemma 3/4 with both many-row kernels: prefill's full layers (Gemma 4's K = V ones with keys rebuilt
    from the values) and sliding layers (over their window) attend through etspec::sdpa_chunk, and it
    compiles untuned."""
    eps = _exported(family, replace(ALL_KERNELS, linear_chunk=True, sdpa_chunk=True))
    prefill = eps["prefill"]
    assert not matmul_ops(prefill), matmul_ops(prefill)
    windows = [
        n.args[6] if len(n.args) > 6 else n.kwargs.get("window", 0)
        for n in prefill.graph.nodes
        if n.op == "call_function" and "sdpa_chunk" in str(n.target)
    ]
    assert 0 in windows and any(w > 0 for w in windows), windows


def test_matmul_ops_sees_matmuls_inside_nested_graphs():
    class Cond(torch.nn.Module):
        def forward(self, p, x, w):
            return torch.cond(p, lambda x, w: x @ w, lambda x, w: x + 1, (x, w))

    ep = torch.export.export(Cond(), (torch.tensor(True), torch.randn(2, 2), torch.randn(2, 2)))
    assert matmul_ops(ep)


class _Backend:
    """Stands in for ExecuTorch's CudaBackend: options from the method's compile specs."""

    @classmethod
    def method_name_from_compile_specs(cls, compile_specs):
        return compile_specs[0]

    @classmethod
    def get_aoti_compile_options(cls, compile_specs):
        return {"max_autotune": True, "other": 1}


def test_untuned_methods_get_max_autotune_off_and_each_compile_reports(monkeypatch):
    seen: list[dict] = []
    monkeypatch.setattr(torch._inductor, "aot_compile", lambda gm, inputs, options: seen.append(options))
    said: list[str] = []
    with tuned_per_method(_Backend, {"prefill": True, "draft": False}, said.append):
        for method in ("prefill", "draft"):
            options = _Backend.get_aoti_compile_options([method])
            torch._inductor.aot_compile(None, (), options=options)
    assert seen == [{"max_autotune": True, "other": 1}, {"max_autotune": False, "other": 1}]
    assert said[0].startswith("prefill: AOTInductor") and "with autotuning" in said[0]
    assert said[1].startswith("draft: AOTInductor") and "without autotuning" in said[1]
    assert "C++ compile" in said[1] and "GEMM tuning" in said[1]
    # the hooks are gone after the block
    assert _Backend.get_aoti_compile_options(["draft"])["max_autotune"] is True
    assert "get_aoti_compile_options" in vars(_Backend)


_VIEWS = {"view", "_unsafe_view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "alias"}
_VIEWS |= {"split", "split_with_sizes", str(operator.getitem)}


def _op(node) -> str:
    """aten.transpose.int -> transpose; etspec.linear_rows.default -> linear_rows."""
    return getattr(node.target, "_opname", str(node.target)) if node.op == "call_function" else node.op


@pytest.mark.parametrize("family", ["llama", "gemma4_text"])
def test_verify_attention_takes_the_projections_as_they_are(family):
    """The split-K kernels rotate the queries themselves and write their output in o_proj's layout: in
    target_verify only views lie between a query projection (or its qk-norm) and the attention op,
    and between the op and o_proj (no RoPE kernel, no transposing copy)."""
    ep = _exported(family, ALL_KERNELS)["target_verify"]
    attn = [n for n in ep.graph.nodes if _op(n).startswith("sdpa_midm")]
    assert attn
    for node in attn:
        q = node.args[0]
        while _op(q) in _VIEWS:
            q = q.args[0]
        assert _op(q) not in {"add", "cat", "clone"}, f"{node}: q reaches the op through {q.target}"
        if family == "llama":
            assert _op(q) == "linear_rows"
        out = node
        while len(out.users) == 1 and _op(out) in _VIEWS | {_op(node)}:
            (out,) = out.users
        assert _op(out) == "linear_rows", f"{node}: o_proj reads it through {out.target}"
