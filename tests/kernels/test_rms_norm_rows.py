"""CPU tests of etspec::rms_norm_rows / add_rms_norm_rows: the Triton kernel under the interpreter (this
file run as a script in its own process, since TRITON_INTERPRET must be set before triton is imported),
the CPU implementation against the eager RMSNorm, argument errors, and export with a dynamic row count."""

from __future__ import annotations

import sys

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.rms_norm_rows import MAX_WIDTH, STYLES
from etspec.models.layers import RMSNorm
from tests.kernels.interpreter import run_interpreted

register_ops()

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
EPS = 1e-6


def ref64(x, w, style, delta=None):
    """Float64 math written apart from the kernel module: (x + delta rounded to x's dtype, the norm)."""
    s = x if delta is None else (x.double() + delta.double()).to(x.dtype)
    h = s.double()
    h = h / torch.sqrt((h * h).mean(-1, keepdim=True) + EPS)
    scale = 1.0 + w.double() if style == "offset" else w.double()
    return s, h * scale


def make(rows, n, dtype, seed, style):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, n, generator=gen) * 3).to(dtype)
    d = torch.randn(rows, n, generator=gen).to(dtype)
    w = (torch.randn(n, generator=gen) * (0.1 if style == "offset" else 1.0)).to(dtype)
    return x, d, w


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# rows, width, dtype, style, with the add: ragged widths (not a power of two), one and many rows
INTERP_CASES = [
    (1, 64, torch.float32, "llama", False),
    (3, 100, torch.float32, "offset", True),
    (5, 257, torch.bfloat16, "llama", True),
    (8, 96, torch.bfloat16, "fp32", False),
    (2, 1000, torch.float16, "offset", False),
    (16, 48, torch.bfloat16, "fp32", True),
]


def run_interp_cases() -> int:
    """Run the Triton kernel under the interpreter on poisoned outputs (called in a subprocess)."""
    from etspec.kernels.rms_norm_rows import launch

    for i, (rows, n, dt, style, add) in enumerate(INTERP_CASES):
        x, d, w = make(rows, n, dt, seed=i, style=style)
        out = torch.full_like(x, float("nan"))
        total = torch.full_like(x, float("nan")) if add else None
        launch(x, d if add else None, w, EPS, style, out, total)
        s_ref, ref = ref64(x, w, style, d if add else None)
        assert torch.isfinite(out).all(), f"case {i}: unwritten output"
        err = rel_err(out, ref)
        assert err < TOL[dt], (i, err)
        if add and dt == torch.bfloat16:  # the interpreter casts to bf16 by truncation: one ulp
            assert ((total.double() - s_ref.double()).abs() <= s_ref.double().abs() / 128).all(), i
        elif add:
            assert torch.equal(total, s_ref), f"case {i}: the sum is not x + delta rounded once"
        print(f"case {i}: rel_err {err:.2e}")
    print("interpreter cases passed")
    return 0


def test_interpreted_kernel_matches_float64():
    run_interpreted(__file__)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_impl_is_the_eager_norm(style, dtype):
    """The CPU implementation (what eager few-row calls run) equals RMSNorm's own forward bit for bit."""
    x, d, w = make(6, 72, dtype, seed=3, style=style)
    norm = RMSNorm(72, EPS, style).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(w)
        eager_sum = x + d
        want = norm(eager_sum.view(1, 6, 72))
        got = torch.ops.etspec.rms_norm_rows(eager_sum.view(1, 6, 72), w, EPS, style)
        total, normed = torch.ops.etspec.add_rms_norm_rows(x.view(1, 6, 72), d.view(1, 6, 72), w, EPS, style)
    assert torch.equal(got, want) and torch.equal(normed, want)
    assert torch.equal(total[0], eager_sum) and got.shape == (1, 6, 72)
    assert rel_err(normed[0], ref64(x, w, style, d)[1]) < TOL[dtype]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w: torch.ops.etspec.rms_norm_rows(x, w, EPS, "unit"), "style must be one of"),
        (lambda x, w: torch.ops.etspec.rms_norm_rows(x, w[:8], EPS, "llama"), r"weight must be \[N\]"),
        (lambda x, w: torch.ops.etspec.rms_norm_rows(x, w.double(), EPS, "llama"), "dtypes differ"),
        (lambda x, w: torch.ops.etspec.add_rms_norm_rows(x, x[:, :1], w, EPS, "llama"), "one shape"),
        (
            lambda x, w: torch.ops.etspec.rms_norm_rows(
                torch.ones(1, MAX_WIDTH + 1), torch.ones(MAX_WIDTH + 1), EPS, "llama"
            ),
            f"at most {MAX_WIDTH}",
        ),
    ],
)
def test_bad_arguments_raise(call, match):
    x, w = torch.randn(1, 3, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match=match):
        call(x, w)


class _TwoNorms(torch.nn.Module):
    def __init__(self, n=32):
        super().__init__()
        self.a = RMSNorm(n, EPS, rows_kernel=True)
        self.b = RMSNorm(n, EPS, rows_kernel=True)

    def forward(self, x, delta):
        h, y = self.a.add_norm(x, delta, rows=True)
        return h, self.b(y, rows=True)


def test_export_keeps_one_node_per_norm_with_dynamic_rows():
    mod = _TwoNorms().eval().requires_grad_(False)
    with torch.no_grad():
        for norm in (mod.a, mod.b):
            norm.weight.copy_(torch.randn(32))
    m = torch.export.Dim("m", min=1, max=8)
    args = (torch.randn(1, 4, 32), torch.randn(1, 4, 32))
    with torch.no_grad():
        ep = torch.export.export(mod, args, dynamic_shapes=({1: m}, {1: m}), strict=True)
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "etspec" in str(n.target)]
    assert len(targets) == 2 and "add_rms_norm_rows" in targets[0] and "rms_norm_rows" in targets[1]
    runner = ep.module()
    for rows in (1, 7):
        x, d = torch.randn(1, rows, 32), torch.randn(1, rows, 32)
        h, y = runner(x, d)
        torch.testing.assert_close(h, x + d, rtol=0, atol=0)
        torch.testing.assert_close(y, mod.b(mod.a(x + d)), rtol=0, atol=0)


def test_norms_that_the_kernel_cannot_take_keep_the_eager_ops():
    assert not RMSNorm(MAX_WIDTH + 8, EPS, rows_kernel=True).rows_kernel
    assert not RMSNorm(64, EPS, "unit", rows_kernel=True).rows_kernel
    assert RMSNorm(64, EPS, "offset", rows_kernel=True).rows_kernel


if __name__ == "__main__":
    sys.exit(run_interp_cases())
