"""Split-K "mid-M" attention (flash-decoding style) for the target's verify and the draft's queries.

``torch.ops.etspec.sdpa_midm(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0) -> Tensor``

- ``q`` ``[1, Hq, M, D]``: the M query rows (1 <= M <= MAX_M) of one verify call, before RoPE (any
  strides with a unit stride on D: the projection's output viewed as heads). The kernel rotates each
  row by its position, ``inv_freq`` [R] being the frequencies of the rotated pairs (pair i: dims i and
  i + D/2; R < D/2 for a partial RoPE), in fp32: the query rotation is no launch of its own.
- ``k``/``v`` ``[1, Hkv, Lb, D]``: views into the KV cache (``cache[:, :, :Lb]``; any strides with a
  unit stride on D). ``Lb`` is an *upper bound* of the valid length (a CUDA-graph bucket).
- ``input_pos`` int64 ``[M]``: the consecutive positions of the M rows. The exact valid length
  ``L = input_pos[M-1] + 1 <= Lb`` is read on the device by the kernels (never with ``.item()``), so a
  captured graph stays correct while L grows inside its bucket. Keys at positions >= L are never read
  (they may hold NaN).
- Row i sees keys ``j <= input_pos[i]``, and with ``window > 0`` only keys ``j > input_pos[i] - window``.
  With ``ring > 0`` k/v are a sliding layer's ring cache of that many rows: key j sits in row j % ring.
- ``softcap > 0``: each score s (scale included) becomes softcap * tanh(s / softcap), Gemma 2's logit
  softcap, inside the kernel.
- GQA: ``Hq = G * Hkv``; the G query heads of one KV head are processed together (G*M rows), so each KV
  tile is read once per KV head.
- Output ``[1, Hq, M, D]`` in q's dtype (fp32 accumulation), laid out as ``[1, M, Hq, D]``: its
  transpose is the contiguous input of o_proj, so no copy runs between them.

CUDA: two Triton kernels. The split kernel runs on a grid (row blocks, Hkv, num_splits) whose size
depends only on Lb, M (and the SM count): each program covers its rows (all G*M unless the config caps
them) over a contiguous run of ``S`` keys (a multiple of the key tile) of the device-read range
``[lo, L)`` and writes an unnormalised partial (acc, running max, running sum);
programs whose run starts past L exit at once. The reduce kernel combines the valid splits (their number
is again computed on the device from L) by log-sum-exp. CPU: the reference math in fp32 (eager CPU runs).
etspec::sdpa_chunk (kernels/sdpa_chunk.py) runs the same kernels on prefill chunks, with ``ROW_BOUNDS``:
each row block then reads only the keys its own rows can see.

``launch(q, k, v, inv_freq, input_pos, scale, window, out, config=...)`` is the plain launcher used by
the op on CUDA (with :func:`default_config`); the CPU tests call it directly under
``TRITON_INTERPRET=1`` and the benchmark passes the configs it sweeps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.library import triton_op

from .launching import INTERPRET, launchable

__all__ = [
    "MAX_M",
    "MidmConfig",
    "SplitPlan",
    "check_args",
    "default_config",
    "key_span",
    "launch",
    "num_sms",
    "output_like",
    "plan_splits",
    "rotate",
    "run_split_reduce",
    "sdpa_midm",
    "sdpa_midm_reference",
    "sdpa_midm_shared_kv",
    "shared_kv_keys",
    "split_span",
]

MAX_M = 8
"""Largest number of query rows the op accepts (verify block k+1 <= MAX_M)."""

_LOG2E = 1.4426950408889634

_REDUCE_BLOCK_S = 32  # splits combined per step by the reduce kernel


@dataclass(frozen=True)
class MidmConfig:
    """Tuning of the split kernel: ``block_n`` key tile, Triton ``num_warps``/``num_stages``, ``ppsm``
    programs per SM that the split count aims for, ``min_tiles`` fewest key tiles per split (bounds the
    partial-buffer traffic), ``rows`` most query rows per program (0: all G*M rows of a KV head in one;
    fewer keep a wide head's fp32 accumulator in registers, the row blocks of a split sharing its key
    tiles through L2)."""

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    ppsm: int = 1
    min_tiles: int = 2
    rows: int = 0


# Per head dim. Chosen by the H100 sweep (bench --sweep, 2026-11-25; docs/kernels.md): the variants were
# within a few % of each other; one program per SM (ppsm=1) was best at 4K-16K.
DEFAULT_CONFIGS: dict[int, MidmConfig] = {
    64: MidmConfig(),
    128: MidmConfig(),
    256: MidmConfig(num_stages=2, min_tiles=4),
    # Gemma 4's K = V full layers (H100 sweep, 2026-12-07): 16-key tiles, 8 warps, every row in one program
    512: MidmConfig(block_n=16, num_warps=8, num_stages=3, min_tiles=4),
}


def default_config(d: int) -> MidmConfig:
    """The config the op uses for head dim `d` (the nearest tuned one for other head dims)."""
    if d in DEFAULT_CONFIGS:
        return DEFAULT_CONFIGS[d]
    return DEFAULT_CONFIGS[512 if d > 256 else 256 if d > 128 else 64 if d < 128 else 128]


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


# --------------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------------


@triton.jit
def _scores(a, b, FP32_DOT: tl.constexpr, UPCAST: tl.constexpr):
    """a [BR, X] @ b [BN, X]^T in fp32."""
    if UPCAST:
        # interpreter only: its bf16 tl.dot is wrong (triton 3.9); same rounding of p kept below
        return tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
    elif FP32_DOT:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    else:
        return tl.dot(a, tl.trans(b))


@triton.jit
def _tile_update(
    qk,
    v,
    offs_key,
    pos_r,
    m_i,
    l_i,
    acc,
    QK_SCALE: tl.constexpr,
    WINDOW: tl.constexpr,
    FP32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    CAP_IN: tl.constexpr,
    CAP_OUT: tl.constexpr,
):
    # qk [BR, BN] unscaled scores, v [BN, D]; offs_key [BN] absolute key positions; pos_r [BR] row positions.
    if CAP_IN > 0:
        # logit softcap (Gemma 2): cap * tanh(scale * qk / cap), with CAP_IN = scale / cap and CAP_OUT =
        # cap * log2(e); tanh(x) = 1 - 2 / (e^2x + 1) saturates to +-1 where e^2x over- or underflows
        qk = (1.0 - 2.0 / (tl.exp(2.0 * CAP_IN * qk) + 1.0)) * CAP_OUT
    else:
        qk = qk * QK_SCALE  # log2 domain: scale * log2(e)
    valid = offs_key[None, :] <= pos_r[:, None]
    if WINDOW > 0:
        valid = valid & (offs_key[None, :] > pos_r[:, None] - WINDOW)
    # select (never multiply): masked scores become -inf whatever the loaded values were
    qk = tl.where(valid, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row with no valid key so far keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if UPCAST:
        pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    elif FP32_DOT:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


# 2π in three fp32 parts (Cody-Waite): the first two have 8 and 9 significant bits, so k times each is exact
# in fp32 for k < 2^16 turns (angles up to ~4e5 rad, past 128K positions at frequency 1)
_TWO_PI_1 = tl.constexpr(6.28125)
_TWO_PI_2 = tl.constexpr(0.001934051513671875)
_TWO_PI_3 = tl.constexpr(1.2556658930407139e-06)
_INV_TWO_PI = tl.constexpr(0.15915493667125702)


@triton.jit
def _cos_sin(angle):
    """cos and sin of fp32 angles, reduced by whole turns first: CUDA's accurate cosf/sinf take a slow
    path above 105615 rad, which the fastest RoPE pair passes at position 105616."""
    k = tl.floor(angle * _INV_TWO_PI + 0.5)
    r = angle - k * _TWO_PI_1
    r = r - k * _TWO_PI_2
    r = r - k * _TWO_PI_3
    return tl.cos(r), tl.sin(r)


@triton.jit
def _rotate_pairs(a, b, angle):
    """The rotated pairs (a, b) [X, PAIRS_W] (dims c and D/2 + c: two contiguous runs, each the other's
    rotate_half partner) turned by `angle` in fp32, one cosine and one sine per pair."""
    cos, sin = _cos_sin(angle)
    a = a.to(tl.float32)
    b = b.to(tl.float32)
    return a * cos - b * sin, b * cos + a * sin


@triton.jit
def _tile_scores(
    q,
    q_a,
    q_b,
    k_base,
    v_base,
    v,
    offs_key,
    slot,
    kmask,
    offs_d,
    offs_c,
    cmask,
    w_a,
    w_b,
    freq,
    sk_n,
    sv_n,
    D: tl.constexpr,
    FP32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    SHARED_KV: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Scores [BR, BN] of one key tile (`MASKED`: only the keys of `kmask` are loaded). K = V
    (`SHARED_KV`): the dims that do not rotate score as the value row against q * k_weight (q is that,
    zero on the rotated dims); the rotated pairs (dims c and D/2 + c, c < PAIRS: two contiguous runs,
    each the other's rotate_half partner) are rebuilt, rope(k_weight * v) at the key's own position in
    fp32 with one cosine and one sine per pair, rounded to v's dtype as a stored key would be, and
    scored against the rotated query's dims there (q_a, q_b). Otherwise the tile's stored keys,
    at cache rows `slot` (the positions, or in a ring cache the positions modulo its rows)."""
    if SHARED_KV:
        if MASKED:
            rmask2 = kmask[:, None] & cmask[None, :]
        else:
            rmask2 = (offs_key[:, None] >= 0) & cmask[None, :]
        pa = v_base + slot[:, None] * sv_n + offs_c[None, :]
        xa = tl.load(pa, mask=rmask2, other=0.0).to(tl.float32) * w_a[None, :]
        xb = tl.load(pa + D // 2, mask=rmask2, other=0.0).to(tl.float32) * w_b[None, :]
        k_a, k_b = _rotate_pairs(xa, xb, offs_key[:, None].to(tl.float32) * freq[None, :])
        qk = _scores(q, v, FP32_DOT, UPCAST) + _scores(q_a, k_a.to(v.dtype), FP32_DOT, UPCAST)
        return qk + _scores(q_b, k_b.to(v.dtype), FP32_DOT, UPCAST)
    elif MASKED:
        k = tl.load(k_base + slot[:, None] * sk_n + offs_d[None, :], mask=kmask[:, None], other=0.0)
        return _scores(q, k, FP32_DOT, UPCAST)
    else:
        k = tl.load(k_base + slot[:, None] * sk_n + offs_d[None, :])
        return _scores(q, k, FP32_DOT, UPCAST)


@triton.jit
def _midm_split_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    po_ptr,
    pm_ptr,
    pl_ptr,
    M,
    R,
    G,
    S,
    MAX_SPLITS,
    sq_h,
    sq_m,
    sk_h,
    sk_n,
    sv_h,
    sv_n,
    w_ptr,
    f_ptr,
    D: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    QK_SCALE: tl.constexpr,
    CAP_IN: tl.constexpr,
    CAP_OUT: tl.constexpr,
    WINDOW: tl.constexpr,
    RING: tl.constexpr,
    FP32_DOT: tl.constexpr,
    UPCAST: tl.constexpr,
    SHARED_KV: tl.constexpr,
    PAIRS: tl.constexpr,
    PAIRS_W: tl.constexpr,
    ROW_BOUNDS: tl.constexpr,
):
    rb = tl.program_id(0)  # block of BLOCK_R rows; the fastest grid axis, so the row blocks of one split
    kvh = tl.program_id(1)  # run side by side and share its KV tiles through L2
    sid = tl.program_id(2)
    # exact valid length, read on the device
    L = (tl.load(pos_ptr + M - 1) + 1).to(tl.int32)
    if WINDOW > 0:
        lo = tl.maximum(tl.load(pos_ptr).to(tl.int32) - WINDOW + 1, 0)
    else:
        lo = 0
    s0 = lo + sid * S
    n = tl.maximum(tl.minimum(s0 + S, L) - s0, 0)  # keys of this split; 0: past L, nothing to do
    offs_r = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    rmask = offs_r < R
    g = offs_r // M
    mm = offs_r % M
    pos_r = tl.load(pos_ptr + mm, mask=rmask, other=0).to(tl.int32)
    first = s0  # the block's keys: [first, first + n_blk), whole tiles from the split's start
    n_blk = n
    if ROW_BOUNDS:
        # many rows (a prefill chunk): a block reads only the keys its own rows can see, none past its
        # last row's position (nor, with a window, before its first row's window)
        hi_b = tl.max(tl.where(rmask, pos_r, -1), 0) + 1
        if WINDOW > 0:
            lo_b = tl.min(tl.where(rmask, pos_r, L), 0) - WINDOW + 1
            first = s0 + tl.maximum(lo_b - s0, 0) // BLOCK_N * BLOCK_N
        n_blk = tl.maximum(tl.minimum(s0 + n, hi_b) - first, 0)
    qh = (kvh * G + g).to(tl.int64)
    q_rows = q_ptr + qh[:, None] * sq_h + mm[:, None] * sq_m
    q = tl.load(q_rows + offs_d[None, :], mask=rmask[:, None], other=0.0)
    angle_r = pos_r.to(tl.float32)[:, None]  # the rows' positions: q is rotated here, not by the caller
    k_base = k_ptr + kvh.to(tl.int64) * sk_h
    v_base = v_ptr + kvh.to(tl.int64) * sv_h
    # pair c < PAIRS (dims c and D/2 + c) rotates by frequency c; PAIRS_W >= PAIRS, a power of two >= 16
    # (tl.dot's least K)
    offs_c = tl.arange(0, PAIRS_W)
    cmask = offs_c < PAIRS
    freq = tl.load(f_ptr + offs_c, mask=cmask, other=0.0)
    if SHARED_KV:
        w = tl.load(w_ptr + offs_d)
        rotated = (offs_d % (D // 2)) < PAIRS
        # the dims that do not rotate need no turning: q times k_weight there, zero on the rotated dims
        q = tl.where(rotated[None, :], 0.0, q.to(tl.float32) * w[None, :]).to(q_ptr.dtype.element_ty)
        qmask = rmask[:, None] & cmask[None, :]
        q_a = tl.load(q_rows + offs_c[None, :], mask=qmask, other=0.0)
        q_b = tl.load(q_rows + D // 2 + offs_c[None, :], mask=qmask, other=0.0)
        q_a, q_b = _rotate_pairs(q_a, q_b, angle_r * freq[None, :])
        q_a = q_a.to(q_ptr.dtype.element_ty)
        q_b = q_b.to(q_ptr.dtype.element_ty)
        w_a = tl.load(w_ptr + offs_c, mask=cmask, other=0.0)
        w_b = tl.load(w_ptr + D // 2 + offs_c, mask=cmask, other=0.0)
    else:
        # the whole row at once (its dot is against stored keys of D dims): each dim with its partner
        half_d = offs_d % (D // 2)
        partner = tl.load(q_rows + ((offs_d + D // 2) % D)[None, :], mask=rmask[:, None], other=0.0)
        f_d = tl.load(f_ptr + half_d, mask=half_d < PAIRS, other=0.0)  # 0: the dim does not turn
        angle = angle_r * f_d[None, :]
        sign = tl.where(offs_d < D // 2, -1.0, 1.0)
        cos, sin = _cos_sin(angle)
        q = q.to(tl.float32) * cos + sign[None, :] * partner.to(tl.float32) * sin
        q = q.to(q_ptr.dtype.element_ty)
        q_a = q
        q_b = q
        w_a = tl.zeros([PAIRS_W], tl.float32)
        w_b = w_a
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    n_full = n_blk // BLOCK_N
    # full tiles: every key inside [first, first + n_blk), a subset of [0, L): unmasked (vectorised) loads
    for t in range(0, n_full):
        offs_key = first + t * BLOCK_N + offs_n
        slot = offs_key % RING if RING > 0 else offs_key
        v = tl.load(v_base + slot[:, None] * sv_n + offs_d[None, :])
        qk = _tile_scores(
            q, q_a, q_b, k_base, v_base, v, offs_key, slot, offs_n, offs_d, offs_c, cmask, w_a, w_b,
            freq, sk_n, sv_n, D, FP32_DOT, UPCAST, SHARED_KV, False,
        )  # fmt: skip
        m_i, l_i, acc = _tile_update(
            qk, v, offs_key, pos_r, m_i, l_i, acc, QK_SCALE, WINDOW, FP32_DOT, UPCAST, CAP_IN, CAP_OUT
        )
    if n_full * BLOCK_N < n_blk:
        # ragged last tile: keys past the split end (and so past L) are never loaded
        offs_key = first + n_full * BLOCK_N + offs_n
        kmask = offs_key < first + n_blk
        slot = offs_key % RING if RING > 0 else offs_key
        v = tl.load(v_base + slot[:, None] * sv_n + offs_d[None, :], mask=kmask[:, None], other=0.0)
        qk = _tile_scores(
            q, q_a, q_b, k_base, v_base, v, offs_key, slot, kmask, offs_d, offs_c, cmask, w_a, w_b,
            freq, sk_n, sv_n, D, FP32_DOT, UPCAST, SHARED_KV, True,
        )  # fmt: skip
        m_i, l_i, acc = _tile_update(
            qk, v, offs_key, pos_r, m_i, l_i, acc, QK_SCALE, WINDOW, FP32_DOT, UPCAST, CAP_IN, CAP_OUT
        )
    # partials of rows (kvh*R + r) for split sid; empty splits store nothing (the reduce skips them). A
    # block that saw none of a split's keys stores m = -inf, l = 0, acc = 0: weight 0 in the reduce
    smask = offs_r < tl.where(n > 0, R, 0)
    prow = (kvh * R + offs_r).to(tl.int64) * MAX_SPLITS + sid
    tl.store(po_ptr + prow[:, None] * D + offs_d[None, :], acc, mask=smask[:, None])
    tl.store(pm_ptr + prow, m_i, mask=smask)
    tl.store(pl_ptr + prow, l_i, mask=smask)


@triton.jit
def _midm_reduce_kernel(
    po_ptr,
    pm_ptr,
    pl_ptr,
    pos_ptr,
    o_ptr,
    so_h,
    so_m,
    M,
    S,
    MAX_SPLITS,
    D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    WINDOW: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # kvh*R + r  == flat (q head, m) row of the output
    base = row * MAX_SPLITS
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    # first chunk: loads issued before L is known (no dependent latency), then filtered by validity
    in_buf = offs_s < MAX_SPLITS
    m_c = tl.load(pm_ptr + base + offs_s, mask=in_buf, other=float("-inf"))
    l_c = tl.load(pl_ptr + base + offs_s, mask=in_buf, other=0.0)
    o_c = tl.load(po_ptr + (base + offs_s)[:, None] * D + offs_d[None, :], mask=in_buf[:, None], other=0.0)
    L = (tl.load(pos_ptr + M - 1) + 1).to(tl.int32)
    if WINDOW > 0:
        lo = tl.maximum(tl.load(pos_ptr).to(tl.int32) - WINDOW + 1, 0)
    else:
        lo = 0
    nvalid = tl.minimum(
        (L - lo + S - 1) // S, MAX_SPLITS
    )  # splits that hold keys (the others stored nothing)
    valid = offs_s < nvalid
    m_c = tl.where(valid, m_c, float("-inf"))
    m_run = tl.max(m_c, 0)  # -inf only when none of these splits holds a key of the row (row blocks)
    w = tl.where(valid, tl.math.exp2(m_c - tl.where(m_run == float("-inf"), 0.0, m_run)), 0.0)
    l_run = tl.sum(tl.where(valid, w * l_c, 0.0), 0)
    acc = tl.sum(tl.where(valid[:, None], w[:, None] * o_c, 0.0), 0)
    # further chunks (only when the grid has more than BLOCK_S splits per KV head)
    for c in range(BLOCK_S, nvalid, BLOCK_S):
        sidx = c + offs_s
        valid = sidx < nvalid
        m_c = tl.load(pm_ptr + base + sidx, mask=valid, other=float("-inf"))
        l_c = tl.load(pl_ptr + base + sidx, mask=valid, other=0.0)
        o_c = tl.load(po_ptr + (base + sidx)[:, None] * D + offs_d[None, :], mask=valid[:, None], other=0.0)
        m_new = tl.maximum(m_run, tl.max(m_c, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.where(valid, tl.math.exp2(m_c - m_safe), 0.0)
        alpha = tl.math.exp2(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(tl.where(valid, w * l_c, 0.0), 0)
        acc = acc * alpha + tl.sum(tl.where(valid[:, None], w[:, None] * o_c, 0.0), 0)
        m_run = m_new
    # every row sees at least its own key, so l_run > 0
    out = acc / l_run
    tl.store(o_ptr + (row // M) * so_h + (row % M) * so_m + offs_d, out.to(o_ptr.dtype.element_ty))


# --------------------------------------------------------------------------------------------------
# Launcher (CUDA and interpreter)
# --------------------------------------------------------------------------------------------------


def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few splits so the tests cover the cross-split reduce


def plan_splits(span, hkv: int, n_sm: int, block_n: int, ppsm: int, min_tiles: int):
    """(num_splits, split_len, max_splits) for a key span (an int or a SymInt: uses only SymInt-safe ops).

    The split count aims at ``ppsm`` programs per SM over ``hkv`` KV heads; each split covers a multiple
    of ``block_n`` keys and at least ``min_tiles`` tiles. Depends only on the span bound, never on L.
    """
    want = max(1, (ppsm * n_sm + hkv - 1) // hkv)
    return (*split_span(span, want, block_n, min_tiles), want)  # want: a static upper bound of nsplit


def split_span(span, want, block_n: int, min_tiles: int):
    """(num_splits, split_len): the key span in about `want` splits of whole `block_n` tiles, at least
    `min_tiles` each (ints or SymInts: SymInt-safe ops only)."""
    nblk = (span + block_n - 1) // block_n
    tiles = torch.sym_max((nblk + want - 1) // want, min_tiles)
    split_len = tiles * block_n
    return (span + split_len - 1) // split_len, split_len


def key_span(lb, window: int, m):
    """How many keys a call of `m` rows can see in a cache slice of `lb` rows: all of them, or with a
    window the window and the rows after the first one."""
    return lb if window <= 0 else torch.sym_min(lb, window + m - 1)


def launch(
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
    k_weight: torch.Tensor | None = None,
    ring: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Run the split + reduce kernels; writes ``out`` ([1, Hq, M, D], any strides with a unit stride on
    D) and returns it. ``q`` is not yet rotated: the kernel turns each row by its position with
    ``inv_freq`` [R], the frequencies of the rotated pairs (pair i: dims i and i + D/2; pairs past R do
    not rotate).

    ``config`` defaults to :func:`default_config` of the head dim; ``n_sm`` overrides the SM count that
    the split plan aims at (tests). ``k_weight`` [D]: a K = V layer, whose cache holds the values only
    (``v``; ``k`` is ignored): each key is rebuilt from its value row as ``rope(k_weight * v)`` at the
    key's position (:func:`shared_kv_keys`), so the kernel reads one tensor. ``ring`` > 0: k and v are
    a sliding layer's ring cache of that many rows, position p in row p % ring (needs a window, and
    ring >= window + M - 1 so that every key a row sees is still there: the models keep window + twice
    the most rows of any call). ``softcap`` > 0: the scores pass through softcap * tanh(s / softcap).
    """
    _, hq, m, d = q.shape
    hkv, lb = k.shape[1], k.shape[2]
    g = hq // hkv
    c = config or default_config(d)
    if config is None and d >= 512 and q.element_size() == 4:
        # fp32 tiles of 512 are twice the bf16 ones: on an H100 the 32-key tile needed 320 KiB of shared
        # memory with two stages and 256 KiB with one, more than Hopper's 227 KiB; 16 keys, one stage
        c = replace(c, block_n=16, num_stages=1)
    # rows per program: G*M (at most c.rows) padded to a power of two >= 16 (tl.dot needs >= 16); M may
    # be symbolic under export/AOTInductor, then size for MAX_M
    m_static = m if isinstance(m, int) else MAX_M
    block_r = max(16, _next_pow2(g * m_static))
    if c.rows:
        block_r = min(block_r, max(16, _next_pow2(c.rows)))
    span = key_span(lb, window, m)
    nsplit, split_len, max_splits = plan_splits(
        span, hkv, n_sm or num_sms(q.device), c.block_n, c.ppsm, c.min_tiles
    )
    # Partials are flat, with room for the static bound `max_splits` per row (the kernels index rows with
    # stride max_splits). A [rows, nsplit, D] buffer with a symbolic nsplit gets a Max(1, nsplit) stride
    # under AOTInductor, whose mutation bookkeeping then copies the buffer onto itself and its scheduler
    # fails (torch 2.11: "KeyError: 'op14'" in compute_ancestors, pytorch#189271) on 1B-sized shapes.
    plan = SplitPlan(block_r, nsplit, split_len, max_splits, max_splits, row_bounds=False)
    return run_split_reduce(
        q, k, v, inv_freq, input_pos, scale, window, out, c, plan, k_weight, ring, softcap
    )


@dataclass(frozen=True)
class SplitPlan:
    """How one call runs: ``block_r`` rows per program, ``nsplit`` splits of ``split_len`` keys (ints or
    SymInts), partials indexed with ``stride`` splits per row, ``bound`` a static upper bound of nsplit
    (sizes the reduce kernel's step), ``row_bounds`` each row block reading only its own rows' keys."""

    block_r: int
    nsplit: int | torch.SymInt
    split_len: int | torch.SymInt
    stride: int | torch.SymInt
    bound: int
    row_bounds: bool


def run_split_reduce(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inv_freq: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    window: int,
    out: torch.Tensor,
    c: MidmConfig,
    plan: SplitPlan,
    k_weight: torch.Tensor | None = None,
    ring: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Launch the split kernel on `plan`'s grid and the reduce kernel over its partials; writes `out`.
    ``softcap`` > 0: each score s becomes softcap * tanh(s / softcap) (Gemma 2's attention logits)."""
    _, hq, m, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    inv_freq = inv_freq.float().contiguous()
    if k_weight is not None:
        k = v
        k_weight = k_weight.float().contiguous()
    elif k.stride(-1) != 1:
        k = k.contiguous()
    r = g * m
    pairs = inv_freq.shape[0]
    block_r = plan.block_r
    rows = hkv * r * plan.stride
    po = torch.empty((rows * d,), dtype=torch.float32, device=q.device)
    pm = torch.empty((rows,), dtype=torch.float32, device=q.device)
    pl = torch.empty((rows,), dtype=torch.float32, device=q.device)
    fp32_dot = q.dtype == torch.float32
    qk_scale = float(scale) * _LOG2E
    split_k = launchable(_midm_split_kernel)
    reduce_k = launchable(_midm_reduce_kernel)
    split_k[((r + block_r - 1) // block_r, hkv, plan.nsplit)](
        q,
        k,
        v,
        input_pos,
        po,
        pm,
        pl,
        m,
        r,
        g,
        plan.split_len,
        plan.stride,
        q.stride(1),
        q.stride(2),
        k.stride(1),
        k.stride(2),
        v.stride(1),
        v.stride(2),
        k_weight if k_weight is not None else pm,  # unread unless SHARED_KV
        inv_freq,
        D=d,
        BLOCK_R=block_r,
        BLOCK_N=c.block_n,
        QK_SCALE=qk_scale,
        CAP_IN=float(scale) / softcap if softcap else 0.0,
        CAP_OUT=softcap * _LOG2E,
        WINDOW=int(window),
        RING=int(ring),
        FP32_DOT=fp32_dot,
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        SHARED_KV=k_weight is not None,
        PAIRS=pairs,
        PAIRS_W=max(16, _next_pow2(pairs)),
        ROW_BOUNDS=plan.row_bounds,
        num_warps=c.num_warps,
        num_stages=c.num_stages,
    )
    reduce_k[(hkv * r, 1, 1)](
        po,
        pm,
        pl,
        input_pos,
        out,
        out.stride(1),
        out.stride(2),
        m,
        plan.split_len,
        plan.stride,
        D=d,
        BLOCK_S=max(2, min(_REDUCE_BLOCK_S, _next_pow2(plan.bound))),
        WINDOW=int(window),
        num_warps=4 if d >= 128 else 2,
        num_stages=2,
    )
    return out


def check_args(q, k, v, inv_freq, input_pos, window=0, ring=0, softcap=0.0):
    """The op's argument checks (shared by etspec::sdpa_chunk)."""
    torch._check(softcap >= 0, lambda: "sdpa_midm: softcap must be >= 0 (0: none)")
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4, lambda: "sdpa_midm: 4-d q/k/v expected")
    torch._check(q.shape[0] == 1, lambda: "sdpa_midm: batch 1 only")
    torch._check(
        k.shape[1] == v.shape[1] and q.shape[1] % k.shape[1] == 0,
        lambda: "sdpa_midm: Hq must be a multiple of Hkv",
    )
    torch._check(q.shape[3] == k.shape[3] and k.shape[3] == v.shape[3], lambda: "sdpa_midm: head dims")
    torch._check(q.dtype == k.dtype and k.dtype == v.dtype, lambda: "sdpa_midm: q/k/v dtypes differ")
    torch._check(input_pos.dtype == torch.int64, lambda: "sdpa_midm: input_pos must be int64")
    torch._check(q.shape[3] % 2 == 0, lambda: "sdpa_midm: head dim must be even")
    torch._check(
        inv_freq.dim() == 1 and inv_freq.shape[0] <= q.shape[3] // 2,
        lambda: "sdpa_midm: inv_freq must be [R], R <= D/2 rotated pairs",
    )
    torch._check(
        ring == 0 or (window > 0 and ring > window),
        lambda: "sdpa_midm: a ring cache needs a window narrower than the ring",
    )


def output_like(q: torch.Tensor) -> torch.Tensor:
    """The output [1, Hq, M, D] laid out as [1, M, Hq, D]: its transpose is the contiguous [1, M, Hq*D]
    that o_proj reads, so no copy runs between the two."""
    _, hq, m, d = q.shape
    return torch.empty((1, m, hq, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def rotate(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Non-interleaved RoPE of x [..., N, D] at `positions` [N] in fp32, rounded to x's dtype.
    ``inv_freq`` [R] (R <= D/2): the frequencies of the rotated pairs, pair i being dims i and i + D/2;
    the other dims do not rotate (a partial RoPE)."""
    xf = x.float()
    half = x.shape[-1] // 2
    freq = F.pad(inv_freq.float(), (0, half - inv_freq.shape[0])).repeat(2)
    angle = positions.to(x.device, torch.float32)[:, None] * freq
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * angle.cos() + rotated * angle.sin()).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The ops
# --------------------------------------------------------------------------------------------------


@triton_op("etspec::sdpa_midm", mutates_args={})
def sdpa_midm(
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
    check_args(q, k, v, inv_freq, input_pos, window, ring, softcap)
    out = output_like(q)
    launch(q, k, v, inv_freq, input_pos, scale, window, out, ring=ring, softcap=softcap)
    return out


@sdpa_midm.register_fake
def _sdpa_midm_fake(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0):
    check_args(q, k, v, inv_freq, input_pos, window, ring, softcap)
    return output_like(q)


def sdpa_midm_reference(
    q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0, acc_dtype=torch.float32
):
    """Reference math (also the CPU implementation): q rotated at input_pos (:func:`rotate`), then
    attention over keys [0, L) only, L = input_pos[-1] + 1 (a ring: the last `ring` of them, key j in
    row j % ring), the scores through softcap * tanh(s / softcap) when softcap > 0."""
    hq, hkv = q.shape[1], k.shape[1]
    L = int(input_pos[-1].item()) + 1
    q = rotate(q, input_pos, inv_freq)
    j = torch.arange(L, device=q.device)
    rows = j % ring if ring else j
    kk = k[:, :, rows].to(acc_dtype).repeat_interleave(hq // hkv, dim=1)
    vv = v[:, :, rows].to(acc_dtype).repeat_interleave(hq // hkv, dim=1)
    s = (q.to(acc_dtype) @ kk.transpose(-1, -2)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    pos = input_pos.to(q.device)[:, None]
    valid = j[None, :] <= pos
    if window > 0:
        valid = valid & (j[None, :] > pos - window)
    if ring:
        valid = valid & (j[None, :] >= L - ring)
    s = s.masked_fill(~valid, float("-inf"))
    return (torch.softmax(s, dim=-1) @ vv).to(q.dtype)


@sdpa_midm.register_kernel("cpu")
def _sdpa_midm_cpu(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0):
    check_args(q, k, v, inv_freq, input_pos, window, ring, softcap)
    ref = sdpa_midm_reference(q, k, v, inv_freq, input_pos, scale, window, ring, softcap)
    return output_like(q).copy_(ref)


def shared_kv_keys(kv: torch.Tensor, k_weight: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """The keys of a K = V layer from its cached values kv [1, Hkv, Lb, D]: ``rope(k_weight * kv)`` with
    key j at position j, in fp32, rounded to kv's dtype (:func:`rotate`)."""
    positions = torch.arange(kv.shape[2], device=kv.device)
    return rotate(kv.float() * k_weight.float(), positions, inv_freq).to(kv.dtype)


def _check_shared(q, kv, k_weight, inv_freq, input_pos):
    check_args(q, kv, kv, inv_freq, input_pos)
    torch._check(k_weight.shape == (kv.shape[3],), lambda: "sdpa_midm_shared_kv: k_weight must be [D]")


@triton_op("etspec::sdpa_midm_shared_kv", mutates_args={})
def sdpa_midm_shared_kv(
    q: torch.Tensor,
    kv: torch.Tensor,
    k_weight: torch.Tensor,
    inv_freq: torch.Tensor,
    input_pos: torch.Tensor,
    scale: float,
    window: int = 0,
) -> torch.Tensor:
    """sdpa_midm for a K = V layer: one cached tensor, keys rebuilt in the kernel (launch's ``k_weight``,
    :func:`shared_kv_keys`)."""
    _check_shared(q, kv, k_weight, inv_freq, input_pos)
    out = output_like(q)
    launch(q, kv, kv, inv_freq, input_pos, scale, window, out, k_weight=k_weight)
    return out


@sdpa_midm_shared_kv.register_fake
def _sdpa_midm_shared_kv_fake(q, kv, k_weight, inv_freq, input_pos, scale, window=0):
    _check_shared(q, kv, k_weight, inv_freq, input_pos)
    return output_like(q)


@sdpa_midm_shared_kv.register_kernel("cpu")
def _sdpa_midm_shared_kv_cpu(q, kv, k_weight, inv_freq, input_pos, scale, window=0):
    _check_shared(q, kv, k_weight, inv_freq, input_pos)
    keys = shared_kv_keys(kv, k_weight, inv_freq)
    return output_like(q).copy_(sdpa_midm_reference(q, keys, kv, inv_freq, input_pos, scale, window))
