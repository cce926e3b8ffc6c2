"""GPU tests of etspec::linear_rows (run on the GPU box): the projections of the Llama-3.2-1B and
Llama-3.1-8B shapes and their EAGLE-3 heads against float64, every row count 1..16, poisoned outputs,
row independence (a row's bits do not depend on the other rows: target-only and speculative decoding
must agree), and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.linear_rows import MAX_ROWS, launch
from tests.kernels.test_linear_rows import TOL, make, ref64, rel_err

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BF16 = torch.bfloat16
TOL_GPU = {**TOL, torch.float32: 1e-4}  # fp32 dots run in full precision ("ieee"), not tf32


def _shapes(h: int, kv: int, inter: int, vocab: int) -> list[tuple[int, list[int], str]]:
    """(K, column widths, gated) of one layer's calls: qkv, o, gate+up, down, lm_head, draft fc/qkv."""
    return [
        (h, [h, kv, kv], ""),
        (h, [h], ""),
        (h, [inter], "silu"),
        (inter, [h], ""),
        (h, [vocab], ""),
        (3 * h, [h], ""),
        (2 * h, [h, kv, kv], ""),
    ]


CASES = [(k, ns, g, m, BF16) for k, ns, g in _shapes(2048, 512, 8192, 128256) for m in (1, 5)]
CASES += [(k, ns, g, m, BF16) for k, ns, g in _shapes(4096, 1024, 14336, 32000) for m in (1, 8)]
CASES += [
    (4096, [14336], "gelu_tanh", 3, BF16),
    (1000, [333, 77], "", 16, BF16),  # ragged K and N
    (2048, [2048], "", 7, torch.float16),
    (512, [256, 64, 64], "", 4, torch.float32),
    (640, [1000], "silu", 2, torch.float32),
]


@pytest.mark.parametrize("k,ns,gated,m,dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_float64(k, ns, gated, m, dtype):
    x, ws = make(m, k, ns, dtype, seed=k + m if gated else k + m + sum(ns), gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    w1, w2, w3 = (ws + [None, None])[:3]
    n = ns[0] if gated else sum(ns)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    launch(x, w1, w2, w3, gated, out)
    assert torch.isfinite(out).all(), "unwritten output"
    assert rel_err(out, ref64(x, ws, gated)) < TOL_GPU[dtype]
    # the op itself (allocates its output; [1, m, K] like the models' calls)
    got = torch.ops.etspec.linear_rows(x.view(1, m, k), *ws, gated=gated)
    assert got.shape == (1, m, n)
    torch.testing.assert_close(got[0], out, rtol=0, atol=0)


@pytest.mark.parametrize("gated", ["", "silu"])
def test_rows_are_independent_bit_for_bit(gated):
    """Each row's result is identical whatever the other rows are and however many there are."""
    x, ws = make(MAX_ROWS, 2048, [2048, 512, 512], BF16, seed=1, gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    full = torch.ops.etspec.linear_rows(x, *ws, gated=gated)
    for m in range(1, MAX_ROWS + 1):
        part = torch.ops.etspec.linear_rows(x[:m].clone(), *ws, gated=gated)
        assert torch.equal(part, full[:m]), f"M={m}"
    y = x.clone()
    y[1:] = torch.randn_like(y[1:])
    assert torch.equal(torch.ops.etspec.linear_rows(y, *ws, gated=gated)[0], full[0])


def test_cuda_graph_replay():
    x, ws = make(5, 4096, [4096, 1024, 1024], BF16, seed=2)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    out = torch.empty(5, 6144, dtype=BF16, device="cuda")
    launch(x, *ws, "", out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        launch(x, *ws, "", out)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(BF16))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref64(x, ws)) < TOL_GPU[BF16]
