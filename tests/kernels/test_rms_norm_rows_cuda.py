"""GPU tests of etspec::rms_norm_rows / add_rms_norm_rows (run on the GPU box): the widths of the
Llama-3.2-1B / 3.1-8B / Gemma-4-31B hidden states and an EAGLE-3 head's 3H input, every style, against
float64, poisoned outputs, the sum exactly x + delta, within one rounding of the eager norm, row
independence and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.rms_norm_rows import MAX_WIDTH, launch
from etspec.models.layers import RMSNorm
from tests.kernels.test_rms_norm_rows import EPS, TOL, make, ref64, rel_err

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BF16 = torch.bfloat16
CASES = [(n, m, BF16, "llama") for n in (2048, 4096, 12288) for m in (1, 8)]
CASES += [
    (5376, 3, BF16, "fp32"),
    (2304, 5, BF16, "offset"),
    (MAX_WIDTH, 2, BF16, "llama"),
    (1000, 16, BF16, "llama"),  # ragged
    (4096, 4, torch.float32, "llama"),
    (640, 7, torch.float16, "offset"),
]


@pytest.mark.parametrize("n,m,dtype,style", CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("add", [False, True], ids=["norm", "add+norm"])
def test_matches_float64(n, m, dtype, style, add):
    x, d, w = (t.cuda() for t in make(m, n, dtype, seed=n + m, style=style))
    out = torch.full_like(x, float("nan"))
    total = torch.full_like(x, float("nan")) if add else None
    launch(x, d if add else None, w, EPS, style, out, total)
    s_ref, ref = ref64(x, w, style, d if add else None)
    assert torch.isfinite(out).all(), "unwritten output"
    assert rel_err(out, ref) < TOL[dtype]
    if add:
        assert torch.equal(total, x + d)  # the eager add, bit for bit
    # within one rounding of the eager norm (the sum of squares runs in another order)
    norm = RMSNorm(n, EPS, style).to(device="cuda", dtype=dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        eager = norm(s_ref)
    ulp = eager.float().abs() * (2**-7 if dtype == BF16 else 2**-10 if dtype == torch.float16 else 2**-18)
    assert ((out.float() - eager.float()).abs() <= ulp + 1e-30).all()
    # the ops themselves, on [1, m, n] as the models call them
    if add:
        got_sum, got = torch.ops.etspec.add_rms_norm_rows(x[None], d[None], w, EPS, style)
        assert torch.equal(got_sum[0], total)
    else:
        got = torch.ops.etspec.rms_norm_rows(x[None], w, EPS, style)
    assert got.shape == (1, m, n) and torch.equal(got[0], out)


def test_rows_are_independent():
    """A row's bits do not depend on the other rows (target-only and speculative calls must agree)."""
    x, d, w = (t.cuda() for t in make(8, 4096, BF16, seed=1, style="llama"))
    total, out = torch.ops.etspec.add_rms_norm_rows(x, d, w, EPS, "llama")
    for r in (0, 5, 7):
        one_sum, one = torch.ops.etspec.add_rms_norm_rows(x[r : r + 1], d[r : r + 1], w, EPS, "llama")
        assert torch.equal(one[0], out[r]) and torch.equal(one_sum[0], total[r])


def test_cuda_graph_replay():
    x, d, w = (t.cuda() for t in make(5, 4096, BF16, seed=2, style="llama"))
    static_x, static_d = x.clone(), d.clone()
    torch.ops.etspec.add_rms_norm_rows(static_x, static_d, w, EPS, "llama")  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        total, out = torch.ops.etspec.add_rms_norm_rows(static_x, static_d, w, EPS, "llama")
    for seed in (3, 4):
        nx, nd, _ = (t.cuda() for t in make(5, 4096, BF16, seed=seed, style="llama"))
        static_x.copy_(nx)
        static_d.copy_(nd)
        graph.replay()
        want_sum, want = torch.ops.etspec.add_rms_norm_rows(nx, nd, w, EPS, "llama")
        assert torch.equal(total, want_sum) and torch.equal(out, want)
