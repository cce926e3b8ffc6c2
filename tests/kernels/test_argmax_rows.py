"""CPU tests of etspec::argmax_rows: the Triton kernels under the interpreter (this file run as a script in
its own process, since TRITON_INTERPRET must be set before triton is imported) against torch.argmax,
ties across and within pieces, NaN, and export with a dynamic row count."""

from __future__ import annotations

import sys

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.argmax_rows import CHUNK
from tests.kernels.interpreter import run_interpreted

register_ops()


def make(rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=gen) * 4).to(dtype)


def with_ties(x: torch.Tensor) -> torch.Tensor:
    """Row 0: its maximum copied to a later piece and to a later spot of the same piece (the first
    index must win); row 1 (if any): a maximum shared by the last element only."""
    x = x.clone()
    first = int(x[0].argmax())
    top = x[0, first].clone()
    for at in (first + 1, first + CHUNK + 3, x.shape[1] - 1):
        if at < x.shape[1]:
            x[0, at] = top
    if x.shape[0] > 1:
        x[1, -1] = x[1].max() + 1
    return x


# rows, vocab, dtype: one piece, several with a ragged last one, an 8B vocabulary
INTERP_CASES = [
    (1, 100, torch.float32),
    (3, 3 * CHUNK + 17, torch.bfloat16),
    (5, 2 * CHUNK, torch.float16),
    (2, 128256, torch.bfloat16),
]


def run_interp_cases() -> int:
    """Run the kernels under the interpreter (called in a subprocess)."""
    from etspec.kernels.argmax_rows import launch

    for i, (rows, vocab, dt) in enumerate(INTERP_CASES):
        x = with_ties(make(rows, vocab, dt, seed=i))
        out = torch.full((rows,), -1, dtype=torch.int64)
        launch(x, out)
        assert torch.equal(out, torch.argmax(x, dim=-1)), (i, out, torch.argmax(x, dim=-1))
        print(f"case {i}: {out.tolist()}")
    x = make(2, 3 * CHUNK, torch.float32, seed=9)
    x[0, CHUNK + 5] = float("nan")
    out = torch.full((2,), -1, dtype=torch.int64)
    launch(x, out)
    assert torch.equal(out, torch.argmax(x, dim=-1)), "NaN must count as the maximum"
    print("interpreter cases passed")
    return 0


def test_interpreted_kernels_match_torch_argmax():
    run_interpreted(__file__)


def test_cpu_impl_and_shapes():
    x = make(5, 300, torch.bfloat16, seed=1).view(1, 5, 300)
    got = torch.ops.etspec.argmax_rows(x)
    assert got.shape == (1, 5) and got.dtype == torch.int64
    assert torch.equal(got, torch.argmax(x, dim=-1))


def test_bad_arguments_raise():
    with pytest.raises(RuntimeError, match=r"x must be \[..., V\]"):
        torch.ops.etspec.argmax_rows(torch.ones(2, 0))


class _Greedy(torch.nn.Module):
    def forward(self, x):
        return torch.ops.etspec.argmax_rows(x)


def test_export_with_dynamic_rows():
    m = torch.export.Dim("m", min=1, max=8)
    ep = torch.export.export(_Greedy(), (torch.randn(1, 4, 64),), dynamic_shapes=({1: m},), strict=True)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "argmax_rows" in str(n.target)]
    assert len(nodes) == 1 and isinstance(nodes[0].meta["val"].shape[1], torch.SymInt)
    x = torch.randn(1, 7, 64)
    assert torch.equal(ep.module()(x), torch.argmax(x, dim=-1))


if __name__ == "__main__":
    sys.exit(run_interp_cases())
