"""Weight-streaming linear layers for a few rows: the verify block (k+1 rows) and the draft's one row.

``torch.ops.etspec.linear_rows(x, w1, w2=None, w3=None, gated="") -> Tensor``

- ``x`` ``[..., K]`` with at most ``MAX_ROWS`` rows in all (the leading dims flattened); the weights are
  ``nn.Linear`` weights ``[N_i, K]`` (contiguous), all in x's dtype. No bias: callers add it.
- ``gated == ""``: ``y = x @ cat(w1, w2, w3).T``, ``[..., N1 + N2 + N3]``: q/k/v in one launch.
- ``gated in ("silu", "gelu_tanh")``: ``y = act(x @ w1.T) * (x @ w2.T)``, ``[..., N1]``: an MLP's gate
  and up projections with the activation and product fused (fp32, one rounding at the end).

Why: at a handful of rows a linear layer is a GEMV, bound by reading the weight once. ExecuTorch's CUDA
backend compiles matmuls to AOTInductor's Triton mm templates, tiled for matrices; at one to eight rows
they ran at 50-75% of copy bandwidth and were most of target_verify's time (docs/PERFORMANCE.md).

CUDA: one Triton kernel, grid = (column blocks of all weights, K splits). A program streams a
``[BLOCK_N, K / splits]`` slab of one weight in ``[BLOCK_N, BLOCK_K]`` tiles (contiguous along K) against
the rows, padded to 16 for ``tl.dot``. A long-K matrix with too few column blocks to keep the SMs
streaming (the 1B down projection: 64 blocks on 132 SMs) is split along K (:func:`plan_split_k`): each
split stores an fp32 partial and a second kernel adds them in split order (and applies the gate). The
split count depends only on the weight shape and the SM count, never on M, and the sums run in a fixed
order, so a row's result does not depend on the other rows or on M and is deterministic. CPU: the
reference math in fp32.

``torch.ops.etspec.linear_chunk`` (same arguments, any number of rows) runs the same kernel with 64-row
blocks (grid = column blocks x row blocks), for the many-row calls: a prefill chunk and the draft's
catch-up rows. Why: fixed tiles in place of AOTInductor's mm templates, which ExecuTorch's CUDA backend
autotunes by timing at export (most of prefill's compile time, and a choice that depends on whatever else
the GPU ran then).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch.library import triton_op

from .launching import INTERPRET, launchable

__all__ = [
    "MAX_ROWS",
    "RowsConfig",
    "default_config",
    "launch",
    "linear_chunk",
    "linear_rows",
    "linear_rows_reference",
    "plan_split_k",
]

MAX_ROWS = 16
"""Most rows one call takes (the rows are one padded tl.dot operand)."""

ACTS = ("silu", "gelu_tanh")


@dataclass(frozen=True)
class RowsConfig:
    """Tiles of the kernel: ``block_n`` columns per program, ``block_k`` the K tile (capped at K's next
    power of two), Triton ``num_warps``/``num_stages``; ``split_k`` K splits (0: :func:`plan_split_k`);
    ``block_m`` rows per program (more rows take more programs, one per row block)."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 0
    block_m: int = MAX_ROWS


# Per mode (H200 sweep of block_n x block_k x warps x stages over the 1B/8B projections at 1 and 8 rows,
# bench/bench_linear_rows.py --sweep; docs/kernels.md): 32-column blocks with 256-wide K tiles for plain
# calls, 64 x 128 for gated ones (two weight tiles per step): the tiles that recur at the top.
PLAIN_CONFIG = RowsConfig(block_n=32, block_k=256, num_warps=4, num_stages=4)
GATED_CONFIG = RowsConfig(block_n=64, block_k=128, num_warps=4, num_stages=3)

# etspec::linear_chunk (the many-row calls: a prefill chunk, the draft's catch-up rows): the same kernel
# with 64-row blocks, so a 256-row chunk reads each weight slab from HBM once and from L2 three more times.
# Not yet swept: 64 x 128 x 64 is the middle of the tiles AOTInductor's autotuning picked for 256-row
# chunks of the Gemma-4-31B shape (128 x 128 x 64 and 64 x 128 x 128), with the smaller row block so
# that a 256-row chunk of a narrow matrix still gives more programs than SMs. No K splits.
CHUNK_CONFIG = RowsConfig(block_n=128, block_k=64, num_warps=4, num_stages=4, split_k=1, block_m=64)
CHUNK_GATED_CONFIG = RowsConfig(block_n=64, block_k=64, num_warps=4, num_stages=4, split_k=1, block_m=64)


# K splits (plan_split_k) only for a long K (SPLIT_MIN_K_TILES tiles or more) under a grid of at most one
# column block per two SMs: the one regime where splitting paid on an H200 (the 1B down projection, 64
# blocks x 32 tiles: 19.5 -> 13.6 µs). Elsewhere the partials' round trip and the second launch cost more
# than the extra programs bring (8B o: 12.3 -> 16.3 µs at 4 splits); bench/bench_linear_rows.py --sweep,
# docs/kernels.md. MIN_SPLIT_TILES: fewest tiles per split (shorter ones spend their time filling the
# pipeline).
SPLIT_MIN_K_TILES = 32
SPLIT_MAX_BLOCKS_PER_SM = 0.5
MAX_SPLIT_K = 8
MIN_SPLIT_TILES = 8
_REDUCE_BLOCK = 256


def default_config(gated: str, chunk: bool = False) -> RowsConfig:
    """The config etspec::linear_rows (or with `chunk`, etspec::linear_chunk) uses for a plain
    (``gated == ""``) or gated call."""
    if chunk:
        return CHUNK_GATED_CONFIG if gated else CHUNK_CONFIG
    return GATED_CONFIG if gated else PLAIN_CONFIG


def plan_split_k(blocks: int, k_tiles: int, n_sm: int) -> int:
    """K splits for a grid of `blocks` column blocks over `k_tiles` K tiles on `n_sm` SMs (static: the
    shapes and the SM count only): 1 outside the regime where splits pay, else the largest power of two
    that keeps ``MIN_SPLIT_TILES`` tiles per split and the grid within two programs per SM."""
    if blocks > SPLIT_MAX_BLOCKS_PER_SM * n_sm or k_tiles < SPLIT_MIN_K_TILES:
        return 1
    split = 1
    while (
        split * 2 <= MAX_SPLIT_K and blocks * split * 2 <= 2 * n_sm and k_tiles >= split * 2 * MIN_SPLIT_TILES
    ):
        split *= 2
    return split


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 1:  # silu
        return g / (1.0 + tl.exp(-g))
    # gelu, tanh approximation; tanh(a) = 2 * sigmoid(2a) - 1
    a = 0.7978845608028654 * (g + 0.044715 * g * g * g)
    return g * (1.0 - 1.0 / (1.0 + tl.exp(2.0 * a)))


@triton.jit
def _dot(x, w, acc, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    # x [BM, BK], w [BN, BK] -> acc [BM, BN] += x @ w.T
    if UPCAST:  # interpreter only: its bf16 tl.dot is wrong
        return tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
    if FP32_DOT:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@triton.jit
def _prefetch_l2(pf_ptr, PF_N, PF_K, PF_LINES: tl.constexpr, PF_STEP: tl.constexpr, PF_ROWS: tl.constexpr):
    # this program's share of the next weight's rows, each row's first PF_LINES 128-byte lines (PF_STEP
    # elements apart): fire-and-forget L2 prefetches, so nothing waits for them
    nprog = tl.num_programs(0) * tl.num_programs(1)
    me = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    share = tl.cdiv(PF_N, nprog)
    lines = tl.arange(0, PF_LINES)
    for r0 in range(me * share, tl.minimum(PF_N, (me + 1) * share), PF_ROWS):
        rows = tl.minimum(r0 + tl.arange(0, PF_ROWS), PF_N - 1)  # a repeated row is a repeated hint
        ptrs = pf_ptr + rows.to(tl.int64)[:, None] * PF_K + (lines * PF_STEP)[None, :]
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )


@triton.jit
def _linear_rows_kernel(
    x_ptr,
    w1_ptr,
    w2_ptr,
    w3_ptr,
    out_ptr,
    part_ptr,
    M,
    K,
    K_SPLIT,
    N1,
    N2,
    N3,
    stride_xm,
    stride_om,
    pf_ptr,  # the weight the next call will stream (PF_LINES > 0): its first lines go to L2 at the end
    PF_N,
    PF_K,
    SPLIT: tl.constexpr,  # K splits: 1 stores the result, more store fp32 partials
    GATES: tl.constexpr,  # partials per split: 1, or 2 for gated calls (gate and up)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACT: tl.constexpr,  # 0: plain (concatenated columns), 1: silu-gated, 2: gelu_tanh-gated
    EVEN_K: tl.constexpr,
    FP32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    PF_LINES: tl.constexpr = 0,  # 128-byte lines of each next-weight row to prefetch; 0: none
    PF_STEP: tl.constexpr = 64,  # elements per 128-byte line
    PF_ROWS: tl.constexpr = 16,  # next-weight rows per prefetch step
):
    # axis 0 walks the row blocks of one column block before the next column block, so the programs
    # that read one weight slab run together and all but the first find it in L2
    m_blocks = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0) // m_blocks
    row0 = (tl.program_id(0) % m_blocks) * BLOCK_M
    sid = tl.program_id(1)
    nb1 = tl.cdiv(N1, BLOCK_N)
    nb2 = tl.cdiv(N2, BLOCK_N)
    # which weight this column block reads: selects, not branches, so every value keeps one type
    if ACT == 0:
        in2 = pid >= nb1
        in3 = pid >= nb1 + nb2
    else:  # gated: every block reads w1 (and w2 beside it)
        in2 = pid < 0
        in3 = pid < 0
    w_ptr = tl.where(in3, w3_ptr, tl.where(in2, w2_ptr, w1_ptr))
    first = tl.where(in3, nb1 + nb2, tl.where(in2, nb1, 0))
    n_end = tl.where(in3, N3, tl.where(in2, N2, N1))
    col0 = tl.where(in3, N1 + N2, tl.where(in2, N1, 0))
    offs_n = (pid - first) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < n_end
    m_ok = offs_m < M
    w_rows = offs_n.to(tl.int64)[:, None] * K
    x_rows = offs_m.to(tl.int64)[:, None] * stride_xm
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_lo = sid * K_SPLIT  # K_SPLIT: a multiple of BLOCK_K, so only the last split's last tile is ragged
    for k0 in range(k_lo, tl.minimum(K, k_lo + K_SPLIT), BLOCK_K):
        kk = k0 + offs_k
        if EVEN_K:
            xm = m_ok[:, None]
            wm = n_ok[:, None]
        else:
            xm = m_ok[:, None] & (kk < K)[None, :]
            wm = n_ok[:, None] & (kk < K)[None, :]
        x = tl.load(x_ptr + x_rows + kk[None, :], mask=xm, other=0.0)
        w = tl.load(w_ptr + w_rows + kk[None, :], mask=wm, other=0.0)
        acc = _dot(x, w, acc, FP32_DOT, UPCAST)
        if ACT != 0:
            w2 = tl.load(w2_ptr + w_rows + kk[None, :], mask=wm, other=0.0)
            acc2 = _dot(x, w2, acc2, FP32_DOT, UPCAST)
    ok = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        if ACT != 0:
            acc = _act(acc, ACT) * acc2
        out = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + (col0 + offs_n)[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)
    else:
        width = N1 + N2 + N3
        prow = (sid * GATES * M + offs_m).to(tl.int64) * width  # partials [SPLIT, GATES, M, width]
        part = part_ptr + prow[:, None] + (col0 + offs_n)[None, :]
        tl.store(part, acc, mask=ok)
        if ACT != 0:
            tl.store(part + M * width, acc2, mask=ok)
    if PF_LINES > 0:
        _prefetch_l2(pf_ptr, PF_N, PF_K, PF_LINES, PF_STEP, PF_ROWS)


@triton.jit
def _split_sum_kernel(
    part_ptr,
    out_ptr,
    M,
    N,
    stride_om,
    SPLIT: tl.constexpr,
    ACT: tl.constexpr,
    GATES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # one row's BLOCK columns: the K splits' partials added in split order, then the gate
    m = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    acc = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    for s in tl.static_range(SPLIT):
        row = part_ptr + ((s * GATES * M + m).to(tl.int64) * N)
        acc += tl.load(row + offs, mask=ok, other=0.0)
        if ACT != 0:
            acc2 += tl.load(row + M * N + offs, mask=ok, other=0.0)
    if ACT != 0:
        acc = _act(acc, ACT) * acc2
    tl.store(out_ptr + m.to(tl.int64) * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=ok)


def launch(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor | None,
    w3: torch.Tensor | None,
    gated: str,
    out: torch.Tensor,
    *,
    config: RowsConfig | None = None,
    prefetch: torch.Tensor | None = None,
    prefetch_bytes: int = 8 << 20,
) -> torch.Tensor:
    """Run the kernel on x [rows, K] (unit stride on K) into out [rows, N] and return out; the op calls
    it with ``config=None`` (:func:`default_config`), tests and benches with the tiles they try.

    ``prefetch``: the weight ``[N', K']`` (contiguous) that the next call will stream. Each program, once
    its own stream is done, asks L2 for its share of the first lines of every row of it, about
    ``prefetch_bytes`` in all, so that DRAM keeps streaming through this call's tail and the launch gap
    and the next call's first tiles are in L2 (CUDA only; the interpreter skips it). Not used by the op
    yet: ``bench/bench_linear_rows.py --prefetch`` measures it."""
    rows, kdim = x.shape
    act = 0 if not gated else ACTS.index(gated) + 1
    ns = [w1.shape[0], 0 if w2 is None else w2.shape[0], 0 if w3 is None else w3.shape[0]]
    if act:
        ns = [ns[0], 0, 0]
    c = config or default_config(gated)
    block_k = min(c.block_k, max(16, triton.next_power_of_2(kdim)))
    blocks = sum(triton.cdiv(n, c.block_n) for n in ns)
    k_tiles = triton.cdiv(kdim, block_k)
    split = c.split_k or plan_split_k(blocks, k_tiles, _num_sms(x.device))
    k_split = triton.cdiv(k_tiles, split) * block_k
    split = triton.cdiv(kdim, k_split)  # no empty splits
    width = sum(ns)
    part = out
    if split > 1:
        part = torch.empty((split, 2 if act else 1, rows, width), dtype=torch.float32, device=x.device)
    m_blocks = (rows + c.block_m - 1) // c.block_m  # rows may be symbolic under export
    pf_lines, pf_step = 0, 128 // x.element_size()
    if prefetch is not None and not INTERPRET:
        pf_n, pf_k = prefetch.shape
        lines = max(1, min(prefetch_bytes // max(1, pf_n * 128), triton.cdiv(pf_k, pf_step)))
        pf_lines = 1 << (lines.bit_length() - 1)  # a power of two (tl.arange), within each row
    launchable(_linear_rows_kernel)[(blocks * m_blocks, split)](
        x,
        w1,
        w1 if w2 is None else w2,
        w1 if w3 is None else w3,
        out,
        part,
        rows,
        kdim,
        k_split,
        ns[0],
        ns[1],
        ns[2],
        x.stride(0),
        out.stride(0),
        w1 if prefetch is None else prefetch,
        0 if prefetch is None else prefetch.shape[0],
        0 if prefetch is None else prefetch.shape[1],
        SPLIT=split,
        GATES=2 if act else 1,
        BLOCK_M=c.block_m,
        BLOCK_N=c.block_n,
        BLOCK_K=block_k,
        ACT=act,
        EVEN_K=kdim % block_k == 0,
        FP32_DOT=x.dtype == torch.float32,
        UPCAST=INTERPRET and x.dtype == torch.bfloat16,
        PF_LINES=pf_lines,
        PF_STEP=pf_step,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    if split > 1:
        grid = (triton.cdiv(width, _REDUCE_BLOCK), rows)
        launchable(_split_sum_kernel)[grid](
            part,
            out,
            rows,
            width,
            out.stride(0),
            SPLIT=split,
            ACT=act,
            GATES=2 if act else 1,
            BLOCK=_REDUCE_BLOCK,
            num_warps=4,
        )
    return out


def _weights(w1, w2, w3) -> list[torch.Tensor]:
    return [w for w in (w1, w2, w3) if w is not None]


def _check(x, w1, w2, w3, gated, op: str, max_rows: int | None) -> int:
    """Validates the call of `op` (at most `max_rows` rows, if given); returns the output width."""
    ws = _weights(w1, w2, w3)
    acts = "'', 'silu' or 'gelu_tanh'"
    torch._check(gated in ("",) + ACTS, lambda: f"{op}: gated must be {acts}, got {gated!r}")
    for w in ws:
        torch._check(w.dim() == 2 and w.shape[1] == x.shape[-1], lambda: f"{op}: weights must be [N, K]")
        torch._check(w.dtype == x.dtype, lambda: f"{op}: x and weight dtypes differ")
    if max_rows is not None:
        rows = x.numel() // x.shape[-1]
        torch._check(rows <= max_rows, lambda: f"{op}: at most {max_rows} rows")
    if gated:
        torch._check(
            w2 is not None and w3 is None and w2.shape[0] == w1.shape[0],
            lambda: f"{op}: gated needs two weights of one shape (gate, up)",
        )
        return w1.shape[0]
    return sum(w.shape[0] for w in ws)


def _run(x, w1, w2, w3, gated, n: int, chunk: bool) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    ws = [None if w is None else w.contiguous() for w in (w1, w2, w3)]
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    launch(x2, ws[0], ws[1], ws[2], gated, out, config=default_config(gated, chunk))
    return out.view(*x.shape[:-1], n)


def linear_rows_reference(x, w1, w2=None, w3=None, gated="", acc_dtype=torch.float32):
    """The op's math in `acc_dtype` (also its CPU implementation)."""
    xa = x.to(acc_dtype)
    if gated:
        g, u = xa @ w1.to(acc_dtype).T, xa @ w2.to(acc_dtype).T
        if gated == "silu":
            g = torch.nn.functional.silu(g)
        else:
            g = torch.nn.functional.gelu(g, approximate="tanh")
        return (g * u).to(x.dtype)
    return torch.cat([xa @ w.to(acc_dtype).T for w in _weights(w1, w2, w3)], dim=-1).to(x.dtype)


def _register(op: str, chunk: bool):
    """Register etspec::`op` (its fake and CPU implementations too); linear_rows and linear_chunk differ
    only in their row limit and tiles."""
    max_rows = None if chunk else MAX_ROWS

    @triton_op(f"etspec::{op}", mutates_args={})
    def run(
        x: torch.Tensor,
        w1: torch.Tensor,
        w2: torch.Tensor | None = None,
        w3: torch.Tensor | None = None,
        gated: str = "",
    ) -> torch.Tensor:
        return _run(x, w1, w2, w3, gated, _check(x, w1, w2, w3, gated, op, max_rows), chunk)

    @run.register_fake
    def _fake(x, w1, w2=None, w3=None, gated=""):
        return x.new_empty((*x.shape[:-1], _check(x, w1, w2, w3, gated, op, max_rows)))

    @run.register_kernel("cpu")
    def _cpu(x, w1, w2=None, w3=None, gated=""):
        _check(x, w1, w2, w3, gated, op, max_rows)
        return linear_rows_reference(x, w1, w2, w3, gated)

    return run


linear_rows = _register("linear_rows", chunk=False)
linear_chunk = _register("linear_chunk", chunk=True)
