"""RMSNorm of a few rows, optionally after the residual add, in one fixed-config kernel.

``torch.ops.etspec.rms_norm_rows(x, weight, eps, style) -> normed``
``torch.ops.etspec.add_rms_norm_rows(x, delta, weight, eps, style) -> (x + delta, normed)``

- ``x``/``delta`` ``[..., N]`` (N <= ``MAX_WIDTH``), one dtype; ``weight`` ``[N]`` in that dtype.
- ``style`` is `models.layers.RMSNorm`'s: "llama" rounds the normalized row to x's dtype, then scales
  it by the weight (one rounding more); "offset" (Gemma 2/3) scales by (1 + w) in fp32; "fp32" (Gemma 4)
  by w in fp32. The sum ``x + delta`` is rounded to x's dtype before it is normalized, as the eager
  model's separate add does.

Why: the norms of a verify call were AOTInductor-generated reductions whose configs it picks by timing
at compile time. On an 8B verify 30 of the 65 took 3-4x longer than the other 35 doing the same work
(docs/PERFORMANCE.md), and which ones depends on what else the GPU ran during the export. Here the
config is a function of N alone: one program per row, the whole row in registers, so the artifact's
speed no longer depends on compile-time timing. The add variant keeps the residual add inside the
norm's kernel, as Inductor's fusion did.

CUDA: the Triton kernel. CPU: the reference math (the eager model's).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launching import launchable

__all__ = ["MAX_WIDTH", "STYLES", "add_rms_norm_rows", "launch", "rms_norm_reference", "rms_norm_rows"]

MAX_WIDTH = 16384
"""Widest row the kernel takes (the row lives in registers); wider norms stay with the eager ops."""

STYLES = ("llama", "offset", "fp32")


def _num_warps(block: int) -> int:
    """Warps per row: 8-16 values per thread, at most 16 warps."""
    return max(1, min(16, block // 256))


@triton.jit
def _rms_norm_rows_kernel(
    x_ptr,
    d_ptr,
    w_ptr,
    sum_ptr,
    out_ptr,
    N,
    eps,
    HAS_DELTA: tl.constexpr,
    STYLE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        d = tl.load(d_ptr + row * N + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + d.to(tl.float32)).to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + row * N + cols, x, mask=mask)
    h = x.to(tl.float32)
    mean_sq = tl.sum(h * h, axis=0) / N
    h = h * tl.math.rsqrt(mean_sq + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if STYLE == 0:  # llama: round the normalized row, then scale in the input dtype
        y = h.to(out_ptr.dtype.element_ty).to(tl.float32) * w
    elif STYLE == 1:  # offset
        y = h * (1.0 + w)
    else:  # fp32
        y = h * w
    tl.store(out_ptr + row * N + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch(
    x: torch.Tensor,
    delta: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    style: str,
    out: torch.Tensor,
    sum_out: torch.Tensor | None = None,
) -> None:
    """Norm the rows of contiguous x (+ delta) [R, N] into out (and the sum into sum_out); the CPU tests
    call it under the interpreter."""
    rows, n = x.shape
    block = triton.next_power_of_2(n)
    launchable(_rms_norm_rows_kernel)[(rows,)](
        x,
        x if delta is None else delta,
        weight,
        out if sum_out is None else sum_out,
        out,
        n,
        eps,
        HAS_DELTA=delta is not None,
        STYLE=STYLES.index(style),
        BLOCK=block,
        num_warps=_num_warps(block),
    )


def _check(x: torch.Tensor, weight: torch.Tensor, style: str, delta: torch.Tensor | None = None) -> None:
    torch._check(style in STYLES, lambda: f"rms_norm_rows: style must be one of {STYLES}, got {style!r}")
    torch._check(
        weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: "rms_norm_rows: weight must be [N] for x [..., N]",
    )
    torch._check(x.shape[-1] <= MAX_WIDTH, lambda: f"rms_norm_rows: rows of at most {MAX_WIDTH} values")
    torch._check(weight.dtype == x.dtype, lambda: "rms_norm_rows: x and weight dtypes differ")
    if delta is not None:
        torch._check(
            delta.shape == x.shape and delta.dtype == x.dtype,
            lambda: "add_rms_norm_rows: x and delta must have one shape and dtype",
        )


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    """The op's math as the eager model writes it (also its CPU implementation)."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if style == "offset":
        return (h * (1.0 + weight.float())).to(x.dtype)
    if style == "fp32":
        return (h * weight.float()).to(x.dtype)
    return weight * h.to(x.dtype)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


@triton_op("etspec::rms_norm_rows", mutates_args={})
def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str) -> torch.Tensor:
    _check(x, weight, style)
    x2 = _rows(x)
    out = torch.empty_like(x2)
    launch(x2, None, weight.contiguous(), eps, style, out)
    return out.view(x.shape)


@rms_norm_rows.register_fake
def _rms_norm_rows_fake(x, weight, eps, style):
    _check(x, weight, style)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@rms_norm_rows.register_kernel("cpu")
def _rms_norm_rows_cpu(x, weight, eps, style):
    _check(x, weight, style)
    return rms_norm_reference(x, weight, eps, style).contiguous()


@triton_op("etspec::add_rms_norm_rows", mutates_args={})
def add_rms_norm_rows(
    x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, style: str
) -> tuple[torch.Tensor, torch.Tensor]:
    _check(x, weight, style, delta)
    x2, d2 = _rows(x), _rows(delta)
    total, out = torch.empty_like(x2), torch.empty_like(x2)
    launch(x2, d2, weight.contiguous(), eps, style, out, total)
    return total.view(x.shape), out.view(x.shape)


@add_rms_norm_rows.register_fake
def _add_rms_norm_rows_fake(x, delta, weight, eps, style):
    _check(x, weight, style, delta)
    like = torch.empty_like(x, memory_format=torch.contiguous_format)
    return like, torch.empty_like(like)


@add_rms_norm_rows.register_kernel("cpu")
def _add_rms_norm_rows_cpu(x, delta, weight, eps, style):
    _check(x, weight, style, delta)
    total = (x + delta).contiguous()
    return total, rms_norm_reference(total, weight, eps, style).contiguous()
