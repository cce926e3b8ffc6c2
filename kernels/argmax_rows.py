"""Greedy argmax over a vocabulary for a few rows, split across programs.

``torch.ops.etspec.argmax_rows(x) -> Tensor``: x ``[..., V]`` -> int64 ``[...]``, the first index of each
row's maximum, as ``torch.argmax(x, -1)`` gives it (NaN counts as the maximum, as there).

Why: the argmax at the end of a verify call was one AOTInductor reduction program per row, which walked
the 128256 logits of an 8B row alone (30 µs on an H200, docs/PERFORMANCE.md). Here each row is cut into
``CHUNK``-wide pieces: a first kernel finds each piece's maximum and its first index, a second picks the
first of the pieces' maxima, so the ties resolve to the lowest index as in torch. The config depends on
nothing but V.

CUDA: the two Triton kernels. CPU: ``torch.argmax``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launching import launchable

__all__ = ["CHUNK", "argmax_rows", "launch"]

CHUNK = 4096
"""Logits per program of the first kernel (an 8B row: 32 pieces)."""


@triton.jit
def _piece_max_kernel(x_ptr, val_ptr, idx_ptr, V, PIECES, CHUNK: tl.constexpr):
    row, piece = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = piece * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(x_ptr + row * V + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
    x = tl.where(x != x, float("inf"), x)  # NaN wins, as in torch.argmax
    best, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(val_ptr + row * PIECES + piece, best)
    tl.store(idx_ptr + row * PIECES + piece, piece * CHUNK + at)


@triton.jit
def _pick_kernel(val_ptr, idx_ptr, out_ptr, PIECES, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    p = tl.arange(0, BLOCK)
    vals = tl.load(val_ptr + row * PIECES + p, mask=p < PIECES, other=float("-inf"))
    best, at = tl.max(vals, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * PIECES + at).to(tl.int64))


def launch(x: torch.Tensor, out: torch.Tensor) -> None:
    """Row argmaxes of contiguous x [R, V] into int64 out [R]; the CPU tests call it under the
    interpreter."""
    rows, vocab = x.shape
    pieces = triton.cdiv(vocab, CHUNK)
    vals = torch.empty((rows, pieces), dtype=torch.float32, device=x.device)
    idx = torch.empty((rows, pieces), dtype=torch.int32, device=x.device)
    launchable(_piece_max_kernel)[(rows, pieces)](x, vals, idx, vocab, pieces, CHUNK=CHUNK, num_warps=8)
    block = max(16, triton.next_power_of_2(pieces))
    launchable(_pick_kernel)[(rows,)](vals, idx, out, pieces, BLOCK=block, num_warps=1)


def _check(x: torch.Tensor) -> None:
    torch._check(x.dim() >= 1 and x.shape[-1] >= 1, lambda: "argmax_rows: x must be [..., V] with V >= 1")
    torch._check(x.shape[-1] < 2**31, lambda: "argmax_rows: V must fit in int32")


@triton_op("etspec::argmax_rows", mutates_args={})
def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.empty(x2.shape[0], dtype=torch.int64, device=x.device)
    launch(x2, out)
    return out.view(x.shape[:-1])


@argmax_rows.register_fake
def _argmax_rows_fake(x):
    _check(x)
    return x.new_empty(x.shape[:-1], dtype=torch.int64)


@argmax_rows.register_kernel("cpu")
def _argmax_rows_cpu(x):
    _check(x)
    return torch.argmax(x, dim=-1)
