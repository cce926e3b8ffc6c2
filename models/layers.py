"""Building blocks shared by the target decoder and the EAGLE-3 head.

Attention keeps its KV cache as module buffers `[1, n_kv, max_seq_len, head_dim]`, writes the new rows at
`input_pos` and reads back only the slice `[:kv_len]` (kv_len = the length of the kv_window tensor, a
SymInt under export). The mask comes from `input_pos` on the device, so the slice may be an upper bound
of the valid length (CUDA-graph buckets) without any row seeing a key past its own position.
"""

from __future__ import annotations

import math
from dataclasses import astuple, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import RopeConfig


@dataclass(frozen=True)
class FewRowsKernels:
    """Which of etspec's kernels serve the calls of a few rows (target_verify: k + 1 rows; the draft's
    single-row queries). Prefill never uses them. Each is switched on its own: `sdpa_midm`, the split-K
    attention etspec::sdpa_midm (every layer with head_dim up to 256, K = V ones up to 512);
    `linear_rows`, the weight-streaming linear etspec::linear_rows (projections, MLPs, heads);
    `reductions`, fixed-config kernels in place of Inductor's reductions: etspec::(add_)rms_norm_rows
    for the hidden-state norms (with the residual add before them) and etspec::argmax_rows for the
    greedy ids. Two switches are for the calls of many rows instead, fixed-config kernels in place of
    what AOTInductor autotunes (off in an export unless asked for): `linear_chunk`, the linear layers
    that linear_rows does not serve (prefill chunks, the draft's catch-up rows) through
    etspec::linear_chunk; `sdpa_chunk`, prefill's attention (the layers sdpa_midm serves) through
    etspec::sdpa_chunk."""

    sdpa_midm: bool = False
    linear_rows: bool = False
    reductions: bool = False
    linear_chunk: bool = False
    sdpa_chunk: bool = False

    @property
    def any(self) -> bool:
        return any(astuple(self))


ALL_KERNELS = FewRowsKernels(sdpa_midm=True, linear_rows=True, reductions=True)


def greedy_ids(logits: torch.Tensor, kernel: bool) -> torch.Tensor:
    """The argmax over the last dim; with `kernel` (a few-row call) through etspec::argmax_rows."""
    return torch.ops.etspec.argmax_rows(logits) if kernel else torch.argmax(logits, dim=-1)


PLAIN_OPS = FewRowsKernels()


def rope_inv_freq(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """Inverse frequencies, fp32, with the checkpoint's scaling applied (same math as transformers).

    "proportional" (Gemma 4's full layers) rotates the first `partial_rotary_factor` of the frequency
    pairs, with exponents over the whole head_dim, and leaves the others unrotated (frequency 0)."""
    if rope.rope_type == "proportional":
        angles = rotated_pairs(rope, head_dim)
        inv = 1.0 / (rope.theta ** (torch.arange(0, 2 * angles, 2, dtype=torch.int64).float() / head_dim))
        return torch.cat((inv, torch.zeros(head_dim // 2 - angles))) / rope.factor
    inv = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv / rope.factor
    if rope.rope_type == "llama3":
        low_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / rope.factor, inv)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def rotated_pairs(rope: RopeConfig, head_dim: int) -> int:
    """How many leading frequency pairs rope_inv_freq gives a nonzero frequency (all but a proportional
    RoPE's unrotated tail): the K = V verify kernel rebuilds only those dims of each key."""
    if rope.rope_type == "proportional":
        return int(rope.partial_rotary_factor * head_dim // 2)
    return head_dim // 2


class Rotary(nn.Module):
    """RoPE computed from positions on the fly: no table, so any max_seq_len is covered."""

    def __init__(self, rope: RopeConfig, head_dim: int):
        super().__init__()
        self.rope, self.head_dim = rope, head_dim
        self.rotated_pairs = rotated_pairs(rope, head_dim)
        # each frequency twice (both halves of a head rotate by it), so the angles need no concatenation
        self.register_buffer("inv_freq", torch.empty(head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        inv = rope_inv_freq(self.rope, self.head_dim)
        self.inv_freq = torch.cat((inv, inv)).to(self.inv_freq.device)

    def rotated_freqs(self) -> torch.Tensor:
        """The frequencies [R] of pairs 0..R-1 (dims i and i + D/2), past which no pair rotates."""
        return self.inv_freq[: self.rotated_pairs]

    def forward(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = input_pos.float()[:, None] * self.inv_freq[None, :]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Non-interleaved (rotate_half) rotation of x [1, H, M, D] by per-row cos/sin [M, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotate_half_matrix(head_dim: int) -> torch.Tensor:
    """R [D, D] with x @ R == cat(-x[half:], x[:half]): the rotation's swap as a product, exact in any
    float dtype (each output is one input times +-1)."""
    half = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(half) + half, torch.arange(half)] = -1.0
    r[torch.arange(half), torch.arange(half) + half] = 1.0
    return r


NORM_STYLES = ("llama", "offset", "fp32", "unit")


class RMSNorm(nn.Module):
    """RMSNorm in fp32, then one of four scalings (`style`): "llama" casts, then scales by w; "offset"
    (Gemma 2/3) scales by (1 + w) in fp32; "fp32" (Gemma 4) scales by w in fp32; "unit" has no weight
    (Gemma 4's value norm)."""

    def __init__(self, dim: int, eps: float, style: str = "llama", rows_kernel: bool = False):
        super().__init__()
        if style not in NORM_STYLES:
            raise ValueError(f"RMSNorm style must be one of {NORM_STYLES}, got {style!r}")
        if style != "unit":
            self.weight = nn.Parameter(torch.zeros(dim) if style == "offset" else torch.ones(dim))
        self.dim, self.eps, self.style = dim, eps, style
        self.delegate_forms = False  # see use_delegate_forms
        if rows_kernel:
            from etspec.kernels.rms_norm_rows import MAX_WIDTH, STYLES

            rows_kernel = style in STYLES and dim <= MAX_WIDTH
        self.rows_kernel = rows_kernel  # few-row calls (`rows`) use etspec::(add_)rms_norm_rows

    def forward(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        if rows and self.rows_kernel:
            return torch.ops.etspec.rms_norm_rows(x, self.weight, self.eps, self.style)
        h = x.float()
        if self.delegate_forms:  # the mean over the last dim as a 4-D [1, rows, dim, 1] average pool
            flat = h.reshape(1, -1, h.shape[-1], 1)
            flat = flat * torch.rsqrt(flat.pow(2).mean((-2, -1), keepdim=True) + self.eps)
            h = flat.view((1, -1, *h.shape[2:]))
        else:
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.rescale(h, x.dtype)

    def add_norm(
        self, x: torch.Tensor, delta: torch.Tensor | None, rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(s, norm(s)) for s = x + delta (x when delta is None). A residual add followed by a norm, in
        one kernel on few-row calls, as Inductor fuses them elsewhere."""
        if delta is None:
            return x, self(x, rows)
        if rows and self.rows_kernel:
            return torch.ops.etspec.add_rms_norm_rows(x, delta, self.weight, self.eps, self.style)
        x = x + delta
        return x, self(x)

    def rescale(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The style's scaling of rows h that are already normalized, in `dtype`."""
        if self.style == "offset":
            return (h.float() * (1.0 + self.weight.float())).to(dtype)
        if self.style == "fp32":
            return (h.float() * self.weight.float()).to(dtype)
        if self.style == "unit":
            return h.to(dtype)
        return self.weight * h.to(dtype)

    def multiplier(self) -> torch.Tensor:
        """The per-dim factor of the scaling, fp32 (what a kernel applies to normalized rows)."""
        if self.style == "unit":
            return torch.ones(self.dim)
        return (1.0 + self.weight.float()) if self.style == "offset" else self.weight.float()


def linear_kernel(rows: bool, chunk: bool):
    """The etspec op a linear call takes: linear_rows for a few-rows call (`rows`), else linear_chunk
    with `chunk`, else None (nn.Linear's own matmul)."""
    if rows:
        return torch.ops.etspec.linear_rows
    return torch.ops.etspec.linear_chunk if chunk else None


def project(
    x: torch.Tensor, mods: tuple[nn.Linear, ...], rows: bool, chunk: bool = False
) -> list[torch.Tensor]:
    """x through each Linear; with `rows` (a verify/draft call of at most a few rows) one
    etspec::linear_rows launch streams all their weights; else with `chunk` one etspec::linear_chunk.

    Both paths read every weight before any bias. AOTInductor lays out a method's weights blob in the
    order the method first uses each constant, and ExecuTorch stores prefill's and target_verify's
    blobs once only when they are byte-identical: with q/k/v biases read in another order on one path,
    the CUDA .ptd would hold the target twice (tests/export/test_constant_order.py)."""
    op = linear_kernel(rows, chunk)
    if op is not None:
        y = op(x, *(m.weight for m in mods))
        outs = y.split([m.out_features for m in mods], dim=-1) if len(mods) > 1 else (y,)
    else:
        outs = [F.linear(x, m.weight) for m in mods]
    return [o if m.bias is None else o + m.bias for o, m in zip(outs, mods)]


class MLP(nn.Module):
    """Gated MLP; `rows_kernel` lets small-row calls use etspec::linear_rows (gate, up and the
    activation in one launch), `chunk_kernel` the other calls etspec::linear_chunk, when there are no
    biases to add before the activation."""

    def __init__(
        self,
        hidden: int,
        inter: int,
        act: str = "silu",
        bias: bool = False,
        rows_kernel: bool = False,
        chunk_kernel: bool = False,
    ):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = act
        self.rows_kernel = rows_kernel and not bias
        self.chunk_kernel = chunk_kernel and not bias

    def forward(self, x: torch.Tensor, rows: bool = False) -> torch.Tensor:
        op = linear_kernel(rows and self.rows_kernel, self.chunk_kernel)
        if op is not None:
            gated = "silu" if self.act == "silu" else "gelu_tanh"
            h = op(x, self.gate_proj.weight, self.up_proj.weight, gated=gated)
            return op(h, self.down_proj.weight)
        g = self.gate_proj(x)
        g = F.silu(g) if self.act == "silu" else F.gelu(g, approximate="tanh")
        return self.down_proj(g * self.up_proj(x))


def ring_positions(input_pos: torch.Tensor, rows: int, slots: int) -> torch.Tensor:
    """The positions slots [0, slots) of a ring cache of `rows` slots hold once a call has written
    input_pos: position p lives in slot p % rows, and slot s holds the latest p <= input_pos[-1] that
    maps to it (negative: not written in this sequence). A row a rejected draft left at p >
    input_pos[-1] (less than the most rows of a call past it) is counted as p - rows, outside every
    window of this call when rows >= window + the most rows of a call (`Attention`'s ring)."""
    last = input_pos[-1]
    return last - torch.remainder(last - torch.arange(slots, device=input_pos.device), rows)


def attention_mask(
    input_pos: torch.Tensor, kv_len: int, window: int | None, ring: int | None = None
) -> torch.Tensor:
    """Boolean [1, 1, M, kv_len]: row i sees key j iff j <= input_pos[i] (and j > input_pos[i] - window).
    With `ring` (its rows), key j is the one slot j of a ring cache holds (`ring_positions`).

    4-D because ExecuTorch's CUDA backend swaps SDPA for its own Triton kernel, which takes only a
    [B, H|1, Lq, Lkv] boolean mask.
    """
    if ring:
        keys = ring_positions(input_pos, ring, kv_len)[None, None, None, :]
    else:
        keys = torch.arange(kv_len, device=input_pos.device)[None, None, None, :]
    pos = input_pos[None, None, :, None]
    mask = keys <= pos
    if window:
        mask = mask & (keys > pos - window)
    if ring:
        mask = mask & (keys >= 0)
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Masked attention of q [1,Hq,M,D] over k/v [1,Hkv,L,D] (GQA by repeating kv heads)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype)) @ v


def attend_grouped(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """`attend` as batched matmuls over the kv-head groups (the query heads of a group stacked as rows, so
    k/v are never repeated) with an additive mask: the forms the XNNPACK delegate takes whole, where the
    decomposed SDPA, the GQA repeat and shapes computed from a dynamic size each split a delegated run."""
    hkv, d = k.shape[1], k.shape[-1]
    rep = q.shape[1] // hkv
    # Views of dynamic shapes with one inferred size, on contiguous tensors (a reshape would record the
    # computed size, which the partitioner refuses). Row r*M + m of group g: query head g*rep + r, row m.
    grouped = q.contiguous().view(hkv, -1, d)
    scores = torch.bmm(grouped * scale, k[0].transpose(1, 2))
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = torch.where(mask[0, 0], 0.0, float("-inf")).to(scores.dtype).repeat(rep, 1)
    probs = torch.softmax(scores + bias, dim=-1)
    return torch.bmm(probs, v[0]).view(1, q.shape[1], -1, d)


MIDM_MAX_HEAD_DIM = 256
"""Largest head_dim the verify layers hand to etspec::sdpa_midm (docs/kernels.md); wider heads take the
plain path, except in K = V layers (below)."""
MIDM_MAX_SHARED_HEAD_DIM = 512
"""Largest head_dim of a K = V layer handed to etspec::sdpa_midm_shared_kv (Gemma 4's full layers), which
reads one cached tensor per key tile where other layers read two."""


class Attention(nn.Module):
    """Multi-head attention with a static KV cache, GQA, optional qk-norm, value norm, shared key/value
    projection (Gemma 4's K = V layers: no v_proj, the raw key projection is the value), softcap and
    sliding window.

    A K = V layer caches one tensor, the values: its keys are the same rows normalized the same way and
    then scaled by the key norm's weight and rotated, so each key is rebuilt from its value row when it
    is read (`_keys`; in the verify kernel, per tile). That halves the layer's cache and the bytes a
    verify reads.

    A sliding-window layer given `cache_rows` < max_seq_len keeps a ring of that many rows: position p
    in slot p % cache_rows, every call attending over the slots written so far with each one's position
    (`ring_positions`). Positions are written upward from 0, each call starting past the previous
    call's start (a speculative run's prefill chunks and verify blocks). cache_rows >= window + the
    most rows any call writes then keeps every key a window needs, and the rows a rejected draft left
    behind fall outside every window; `TargetModel` gives window + 2 x that bound and refuses longer
    calls. Gemma-4-31B's 1024-wide sliding layers then hold ~1.5K rows each instead of 128K."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        max_seq_len: int,
        rope: RopeConfig,
        scale: float,
        *,
        bias: bool = False,
        o_bias: bool = False,
        qk_norm_eps: float | None = None,
        norm_style: str = "llama",
        v_norm_eps: float | None = None,
        k_eq_v: bool = False,
        softcap: float | None = None,
        window: int | None = None,
        kernels: FewRowsKernels = PLAIN_OPS,
        cache_rows: int | None = None,
    ):
        super().__init__()
        if cache_rows is not None and cache_rows < max_seq_len and (not window or k_eq_v):
            raise ValueError(
                "a ring cache (cache_rows < max_seq_len) needs a sliding window and its own keys"
            )
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = nn.Linear(in_dim, num_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(in_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = None if k_eq_v else nn.Linear(in_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(num_heads * head_dim, out_dim, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, norm_style)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, norm_style)
        else:
            self.q_norm = self.k_norm = None
        self.v_norm = RMSNorm(head_dim, v_norm_eps, "unit") if v_norm_eps is not None else None
        if k_eq_v and (qk_norm_eps != v_norm_eps):
            raise ValueError("a K = V layer needs its key and value norms together, with one eps, or neither")
        self.rotary = Rotary(rope, head_dim)
        self.scale, self.softcap, self.window = scale, softcap, window
        # The split-K kernel covers causal attention, full or over a sliding window (its own cache or a
        # ring, docs/design.md §5), with or without a logit softcap (but for K = V layers' one-tensor
        # kernel, which has none); the few-rows linear kernel serves every projection of a verify/draft call.
        widest = MIDM_MAX_SHARED_HEAD_DIM if k_eq_v else MIDM_MAX_HEAD_DIM
        self.ring = cache_rows is not None and cache_rows < max_seq_len
        served = head_dim <= widest and not (k_eq_v and softcap)
        self.use_sdpa_midm = kernels.sdpa_midm and served
        self.use_sdpa_chunk = kernels.sdpa_chunk and served
        self.rows_kernel = kernels.linear_rows
        self.chunk_kernel = kernels.linear_chunk
        self.delegate_forms = False  # see use_delegate_forms
        # a K = V layer's cache has one spare row: its keys are computed from a slice [:kv_len], and an
        # elementwise op on a slice asks whether it is contiguous, i.e. kv_len == the cache's rows, a guard
        # torch.export refuses over kv_len <= max_seq_len; with max_seq_len + 1 rows it is never true
        rows = cache_rows if self.ring else max_seq_len + int(k_eq_v)
        cache_shape = (1, num_kv_heads, rows, head_dim)
        self.register_buffer("k_cache", None if k_eq_v else torch.empty(cache_shape), persistent=False)
        self.register_buffer("v_cache", torch.empty(cache_shape), persistent=False)
        self.reset_buffers()

    @property
    def shared_kv(self) -> bool:
        """A K = V layer: its one cache holds the values, and keys are rebuilt from them."""
        return self.k_cache is None

    def reset_buffers(self) -> None:
        """Zero the caches (after to_empty from meta): eager reads of stale rows stay finite."""
        if self.v_cache.device.type != "meta":
            self.v_cache.zero_()
            if not self.shared_kv:
                self.k_cache.zero_()

    def _heads(self, x: torch.Tensor, n: int, norm: RMSNorm | None) -> torch.Tensor:
        x = x.view(1, -1, n, self.head_dim)  # -1, not the dynamic row count: a shape XNNPACK takes
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.delegate_forms:  # the half swap as a product: slices of a dynamic shape split a delegate
            return x * cos + F.linear(x, self.rotate_half_t) * sin
        return apply_rope(x, cos, sin)

    def _store(
        self, k: torch.Tensor, v: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """Rotate the projected k [1,R,Hkv*D] and store k/v rows at input_pos (a K = V layer: v only)."""
        slots = torch.remainder(input_pos, self.v_cache.shape[2]) if self.ring else input_pos
        if not self.shared_kv:
            k = self._rope(self._heads(k, self.num_kv_heads, self.k_norm), cos, sin)
            self.k_cache.index_copy_(2, slots, k)
        self.v_cache.index_copy_(2, slots, self._heads(v, self.num_kv_heads, self.v_norm))

    def _slots(self, kv_len: int) -> int:
        """How many cache rows a call reads: kv_len, or in a ring min(its rows, kv_len). Until a ring has
        wrapped, the slots past kv_len were never written, and ExecuTorch leaves caches uninitialised:
        a masked score times an unwritten value could still be 0 x NaN."""
        return torch.sym_min(self.v_cache.shape[2], kv_len) if self.ring else kv_len

    def _keys(self, kv_len: int) -> torch.Tensor:
        """The cached keys [:kv_len] (a ring: its first `_slots`); in a K = V layer rebuilt from the
        values (key j at position j)."""
        if not self.shared_kv:
            return self.k_cache[:, :, : self._slots(kv_len)]
        v = self.v_cache[:, :, :kv_len]
        k = v if self.k_norm is None else self.k_norm.rescale(v, v.dtype)
        cos, sin = self.rotary(torch.arange(kv_len, device=v.device), v.dtype)
        return self._rope(k, cos, sin)

    def _key_multiplier(self, like: torch.Tensor) -> torch.Tensor:
        """The key norm's per-dim factor (ones without a key norm), for the K = V verify kernel."""
        w = torch.ones(self.head_dim) if self.k_norm is None else self.k_norm.multiplier()
        return w.to(like.device)

    def _attend(
        self,
        q: torch.Tensor,
        input_pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_len: int,
        few_rows: bool,
    ) -> torch.Tensor:
        """Projected queries q [1,M,Hq*D] over the cache slice [:kv_len] (a ring: its first `_slots`),
        then o_proj: [1,M,out]."""
        q = self._heads(q, self.num_heads, self.q_norm)
        v = self.v_cache[:, :, : self._slots(kv_len)]
        # the split-K kernels rotate the queries themselves (no launch of its own for q's RoPE)
        freq, window = self.rotary.rotated_freqs(), self.window or 0
        if few_rows and self.use_sdpa_midm and self.shared_kv:
            w = self._key_multiplier(v)
            o = torch.ops.etspec.sdpa_midm_shared_kv(q, v, w, freq, input_pos, self.scale, window)
        elif self.use_sdpa_midm if few_rows else self.use_sdpa_chunk:
            # (a K = V layer's prefill gets its keys rebuilt from the values: `_keys`)
            ring = self.v_cache.shape[2] if self.ring else 0
            op = torch.ops.etspec.sdpa_midm if few_rows else torch.ops.etspec.sdpa_chunk
            o = op(q, self._keys(kv_len), v, freq, input_pos, self.scale, window, ring, self.softcap or 0.0)
        else:
            q = self._rope(q, cos, sin)
            ring = self.v_cache.shape[2] if self.ring else None
            mask = attention_mask(input_pos, self._slots(kv_len), self.window, ring)
            plain = attend_grouped if self.delegate_forms else attend
            o = plain(q, self._keys(kv_len), v, mask, self.scale, self.softcap)
        o = o.transpose(1, 2).contiguous().view(1, -1, self.num_heads * self.head_dim)
        return project(o, (self.o_proj,), few_rows and self.rows_kernel, self.chunk_kernel)[0]

    def write_kv(
        self, x: torch.Tensor, input_pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> None:
        """Project x [1,R,in] to k/v, rotate k, and store the R rows at input_pos (R may be large)."""
        k, v = self._kv(project(x, self._kv_projs(), False, self.chunk_kernel))
        self._store(k, v, input_pos, cos, sin)

    def _kv_projs(self) -> tuple[nn.Linear, ...]:
        return (self.k_proj,) if self.v_proj is None else (self.k_proj, self.v_proj)

    def _kv(self, outs: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) from the key/value projections' outputs: with K = V the key output serves as both."""
        return (outs[0], outs[0]) if self.v_proj is None else (outs[0], outs[1])

    def query(
        self,
        x: torch.Tensor,
        input_pos: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_len: int,
        few_rows: bool = False,
    ) -> torch.Tensor:
        """Attend rows x [1,M,in] at input_pos over the cache slice [:kv_len]; returns [1,M,out].

        `few_rows` is set by target_verify, whose row count the Speculator bounds by the kernels' row limits
        at construction, and by the draft, whose queries are single rows; so no test on the (possibly
        dynamic) M is needed here.
        """
        (q,) = project(x, (self.q_proj,), few_rows and self.rows_kernel, self.chunk_kernel)
        return self._attend(q, input_pos, cos, sin, kv_len, few_rows)

    def forward(
        self, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int, few_rows: bool = False
    ) -> torch.Tensor:
        cos, sin = self.rotary(input_pos, x.dtype)
        projs = (self.q_proj, *self._kv_projs())
        q, *kv = project(x, projs, few_rows and self.rows_kernel, self.chunk_kernel)
        k, v = self._kv(kv)
        self._store(k, v, input_pos, cos, sin)
        return self._attend(q, input_pos, cos, sin, kv_len, few_rows)


def use_delegate_forms(model: nn.Module) -> None:
    """Switch every RMSNorm and Attention of `model` to the forms the XNNPACK partitioner delegates
    whole: the norm's mean as a 4-D average pool, RoPE's half swap as a product, attention as grouped
    batched matmuls with an additive mask. The same function in other ops: a layer becomes one
    delegated run between its KV-cache writes instead of about eleven (docs/export-notes.md). For CPU
    exports; the CUDA backend keeps SDPA, which it swaps for its own kernel."""
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.delegate_forms = True
        elif isinstance(module, Attention):
            module.delegate_forms = True
            weight = rotate_half_matrix(module.head_dim).T.contiguous()
            module.register_buffer("rotate_half_t", weight.to(module.v_cache), persistent=False)
