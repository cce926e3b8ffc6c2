"""Attention of many rows (prefill chunks): etspec::sdpa_midm's split kernel in row blocks.

``torch.ops.etspec.sdpa_chunk(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0) -> Tensor``

Takes what etspec::sdpa_midm takes (its docstring: q before RoPE, k/v views of the cache with a bucket
bound, L read on the device, windows, ring caches, a logit softcap, GQA, the output in o_proj's layout)
for any number M of consecutive rows, as a prefill chunk has, up to the export's largest chunk; head
dims up to :data:`MAX_HEAD_DIM`. A K = V layer passes its keys rebuilt from the values (one elementwise
pass per chunk): rebuilding them in the kernel, as sdpa_midm_shared_kv does for a few rows, would repeat
the rotation for every row block.

Why: prefill attention was AOTInductor's SDPA, which ExecuTorch's CUDA backend compiles through the
math path: each chunk repeats K/V per query head and materialises its scores over the whole prefix
(62 s for a 120K prompt on the 1B shape), and its two batched matmuls were prefill's last autotuned
ops (105 s of an 8B export). Here the fixed-config split kernel runs flash-attention style: each
program holds a block of ``rows`` query rows (one query head's consecutive positions) and streams
the keys up to its last row's position, the G query heads of a KV head sharing its tiles through L2.

The grid is (row blocks, Hkv, splits): the split count fills the SMs that the row blocks leave idle
(one split when they fill them, as a full 8B or 1B chunk does), and the reduce kernel combines the
splits by log-sum-exp. Both are planned from M (symbolic under export) and the key span bound only.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch.library import triton_op

from .sdpa_midm import (
    MidmConfig,
    SplitPlan,
    check_args,
    key_span,
    num_sms,
    output_like,
    run_split_reduce,
    sdpa_midm_reference,
    split_span,
)

__all__ = ["MAX_HEAD_DIM", "chunk_config", "launch_chunk", "plan_chunk_splits", "sdpa_chunk"]

MAX_HEAD_DIM = 512
"""Widest head the op takes (Gemma 4's full layers; the row block's fp32 accumulator lives in registers)."""

# Per head dim: 64-row blocks, fewer for the wider heads (the accumulator [rows, D] in fp32), the verify
# kernel's key tile and pipeline otherwise. Not yet swept on a GPU (bench/bench_sdpa_chunk.py --sweep).
CHUNK_CONFIGS: dict[int, MidmConfig] = {
    64: MidmConfig(rows=64),
    128: MidmConfig(rows=64),
    256: MidmConfig(block_n=32, num_stages=2, rows=32),
    512: MidmConfig(block_n=32, num_warps=8, num_stages=2, rows=16),
}


def chunk_config(d: int, element_size: int = 2) -> MidmConfig:
    """The config the op uses for head dim `d` (the nearest of :data:`CHUNK_CONFIGS` above it); fp32
    tiles of 512 take 16 keys, as sdpa_midm's do (Hopper's shared memory)."""
    c = CHUNK_CONFIGS[64 if d <= 64 else 128 if d <= 128 else 256 if d <= 256 else 512]
    return replace(c, block_n=16) if d > 256 and element_size == 4 else c


def plan_chunk_splits(span, hkv: int, row_blocks, n_sm: int, block_n: int, ppsm: int, min_tiles: int):
    """(num_splits, split_len, bound) for a key span over ``hkv`` KV heads of ``row_blocks`` row blocks
    each (ints or SymInts: SymInt-safe ops only). The splits fill the ``ppsm * n_sm`` programs the row
    blocks leave (one split once they fill them); each covers whole ``block_n`` tiles, at least
    ``min_tiles``. ``bound``: a static upper bound of num_splits (a single row block's count)."""
    bound = max(1, ppsm * n_sm // hkv)
    want = torch.sym_max(1, ppsm * n_sm // (hkv * row_blocks))
    return (*split_span(span, want, block_n, min_tiles), bound)


def launch_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    window: int,
    out: torch.Tensor,
    *,
    config: MidmConfig | None = None,
    n_sm: int | None = None,
    ring: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Run the kernels on a chunk of M rows; writes ``out`` ([1, Hq, M, D], unit stride on D) and
    returns it. ``config.rows`` is the row block (a power of two >= 16); ``n_sm`` overrides the SM count
    the plan aims at (tests)."""
    _, hq, m, d = q.shape
    hkv, lb = k.shape[1], k.shape[2]
    c = config or chunk_config(d, q.element_size())
    block_r = c.rows
    r = (hq // hkv) * m
    span = key_span(lb, window, m)
    nsplit, split_len, bound = plan_chunk_splits(
        span, hkv, (r + block_r - 1) // block_r, n_sm or num_sms(q.device), c.block_n, c.ppsm, c.min_tiles
    )
    # the partials are flat and sized by the symbolic split count itself (their row stride), so a full
    # chunk that runs one split holds one partial per row, not room for the bound
    plan = SplitPlan(block_r, nsplit, split_len, nsplit, bound, row_bounds=True)
    return run_split_reduce(
        q, k, v, inv_freq, input_pos, scale, window, out, c, plan, ring=ring, softcap=softcap
    )


def _check_chunk(q, k, v, inv_freq, input_pos, window, ring, softcap):
    check_args(q, k, v, inv_freq, input_pos, window, ring, softcap)
    torch._check(q.shape[3] <= MAX_HEAD_DIM, lambda: f"sdpa_chunk: head dim above {MAX_HEAD_DIM}")
    torch._check(
        ring == 0 or ring >= window + q.shape[2] - 1,
        lambda: "sdpa_chunk: a ring cache must hold the window and the chunk's rows",
    )


@triton_op("etspec::sdpa_chunk", mutates_args={})
def sdpa_chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    window: int = 0,
    ring: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    _check_chunk(q, k, v, inv_freq, input_pos, window, ring, softcap)
    out = output_like(q)
    launch_chunk(q, k, v, inv_freq, input_pos, scale, window, out, ring=ring, softcap=softcap)
    return out


@sdpa_chunk.register_fake
def _sdpa_chunk_fake(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0):
    _check_chunk(q, k, v, inv_freq, input_pos, window, ring, softcap)
    return output_like(q)


@sdpa_chunk.register_kernel("cpu")
def _sdpa_chunk_cpu(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0):
    _check_chunk(q, k, v, inv_freq, input_pos, window, ring, softcap)
    ref = sdpa_midm_reference(q, k, v, inv_freq, input_pos, scale, window, ring, softcap)
    return output_like(q).copy_(ref)
