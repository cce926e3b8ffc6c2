"""Speculative sampling math for the sampled methods (docs/design.md §10), written in ops both backends lower.

Filters. Tempered logits z = logits / T keep token i when z_i >= tau, tau = max(tau_k, tau_p):
tau_k is the K-th largest z (top-k; K = 0 keeps all), tau_p the largest z value whose mass
sum(p[z >= v]) reaches P in the top-k-renormalised distribution (top-p; P = 1 keeps all). Equivalently,
token i survives top-p when the mass strictly above it is < P. Tied values are kept or dropped
together, so the filter depends on values only, never on an index order. Two searches give the same
thresholds: `"sort"` (a descending `topk` over the whole row: ExecuTorch's portable kernels have it, for
the CPU program) and `"bisect"` (a 16-way interval search of reductions only: no sort, for AOTInductor,
whose ExecuTorch CUDA backend refuses a sort fallback).

Sampling. With E_i ~ Exp(1) independent, argmax_i w_i / E_i is an exact draw from w / sum(w) (the
exponential race), so a sample needs only an argmax, no cumulative sum and no normalisation. The noise
comes in as an input tensor: the graphs hold no random state, and a replayed CUDA graph draws what the
runner fed it.
"""

from __future__ import annotations

import torch

SEARCHES = ("sort", "bisect")
BISECT_PASSES = 12  # 16-way: 48 bits of interval shrink, below float32 spacing at the thresholds' scale
_STEPS = 15  # interior grid points per pass


def params_tensor(temperature: float, top_p: float = 1.0, top_k: int = 0, device=None) -> torch.Tensor:
    """The [3] float32 `params` input of the sampled methods: temperature, top_p, top_k (0 = off)."""
    return torch.tensor([temperature, top_p, float(top_k)], dtype=torch.float32, device=device)


def _thresholds_sort(z: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    n = z.shape[-1]
    s = torch.topk(z, n, dim=-1).values  # descending
    kth = torch.where(top_k >= 1, torch.clamp(top_k, max=float(n)), float(n)) - 1
    tau_k = s.gather(-1, kth.to(torch.long).expand(*s.shape[:-1], 1))
    w = torch.exp(s - s[..., :1]) * (s >= tau_k)
    mass = torch.cumsum(w, dim=-1) / w.sum(-1, keepdim=True)
    r = torch.clamp((mass < top_p).sum(-1, keepdim=True), max=n - 1)
    tau_p = torch.where(top_p >= 1.0, float("-inf"), s.gather(-1, r))
    return torch.maximum(tau_k, tau_p)


def _largest_reaching(z: torch.Tensor, w: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The largest value v of z (per row) with sum(w[z >= v]) >= target, by interval search.

    Invariant: F(lo) >= target > F(hi), F(v) = sum(w[z >= v]) non-increasing (float sums of non-negative
    terms are monotone too), so the answer lies in [lo, hi); once at most one distinct value of z is
    left there, it is the largest z below hi."""
    lo = z.amin(-1, keepdim=True)
    hi = z.amax(-1, keepdim=True) + 1.0
    frac = torch.arange(1, _STEPS + 1, dtype=z.dtype, device=z.device) / (_STEPS + 1)
    for _ in range(BISECT_PASSES):
        grid = lo + (hi - lo) * frac  # [..., 15], increasing
        f = (w.unsqueeze(-1) * (z.unsqueeze(-1) >= grid.unsqueeze(-2))).sum(-2)
        ok = (f >= target).sum(-1, keepdim=True)  # F decreasing along the grid: a prefix holds
        new_lo = torch.where(ok > 0, grid.gather(-1, torch.clamp(ok - 1, min=0)), lo)
        hi = torch.where(ok < _STEPS, grid.gather(-1, torch.clamp(ok, max=_STEPS - 1)), hi)
        lo = new_lo
    return torch.where(z < hi, z, float("-inf")).amax(-1, keepdim=True)


def _thresholds_bisect(z: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    ones = torch.ones_like(z)
    tau_k = torch.where(top_k >= 1, _largest_reaching(z, ones, top_k), float("-inf"))
    w = torch.exp(z - z.amax(-1, keepdim=True)) * (z >= tau_k)
    tau_p = _largest_reaching(z, w, top_p * w.sum(-1, keepdim=True))
    tau_p = torch.where(top_p >= 1.0, float("-inf"), tau_p)
    return torch.maximum(tau_k, tau_p)


def filtered_probs(logits: torch.Tensor, params: torch.Tensor, search: str = "sort") -> torch.Tensor:
    """softmax(logits / T) restricted to the top-k / top-p set, float32, over the last dim.

    `params` is `params_tensor(...)`; T > 0 (greedy decoding never comes here)."""
    if search not in SEARCHES:
        raise ValueError(f"search must be one of {SEARCHES}, got {search!r}")
    temperature, top_p, top_k = params[0], params[1], params[2]
    z = logits.float() / temperature
    z = z - z.amax(-1, keepdim=True)
    find = _thresholds_sort if search == "sort" else _thresholds_bisect
    tau = find(z, top_p, top_k)
    return torch.softmax(torch.where(z >= tau, z, float("-inf")), dim=-1)


def race(weights: torch.Tensor, exp_noise: torch.Tensor) -> torch.Tensor:
    """An index drawn with probability proportional to `weights` (>= 0) given Exp(1) noise: the exponential
    race argmax(w / E). Zero weights never win."""
    return torch.argmax(torch.where(weights > 0, weights / exp_noise, -1.0), dim=-1)


def draft_probs_in_target_vocab(q: torch.Tensor, d2t: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """q over the draft vocabulary [..., Vd] -> the same distribution over the target vocabulary [..., V]
    (target id = draft id + d2t[draft id]; d2t is injective; other target ids get 0)."""
    index = (torch.arange(d2t.shape[0], device=d2t.device) + d2t).expand(*q.shape[:-1], -1)
    return torch.zeros(*q.shape[:-1], vocab_size, dtype=q.dtype, device=q.device).scatter(-1, index, q)


def verify_sampled(
    tokens: torch.Tensor, p: torch.Tensor, q: torch.Tensor, accept_u: torch.Tensor, exp_noise: torch.Tensor
) -> torch.Tensor:
    """Chain speculative sampling over one verify (M rows): the ids the runner reads like greedy argmaxes.

    tokens [1, M] = [t, d1..d(M-1)]; p [1, M, V] the target's filtered distributions at those rows;
    q [1, M, V] the draft's distributions that produced d1..d(M-1) (row M-1 is not read); accept_u
    [1, M] uniforms on [0, 1); exp_noise [1, 1, V] Exp(1) noise.

    Row i < M-1 accepts d(i+1) when u_i * q_i(d) < p_i(d), i.e. with probability min(1, p/q), and
    otherwise holds a draw from max(0, p_i - q_i); the last row holds a draw from p. The result
    ids[i] = d(i+1) where accepted, else that draw, so the first i with ids[i] != d(i+1) is the first
    rejection (a rejected d has p < q, hence zero residual weight, and is never drawn) and ids[j] is the
    new token. Only that one row's draw is ever used, so every row may share one noise row.
    """
    m = tokens.shape[1]
    drafts = torch.cat((tokens[:, 1:], tokens[:, :1]), dim=1)  # row M-1 gets a placeholder
    last = torch.arange(m, device=tokens.device) == m - 1
    p_d = p.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    q_d = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)
    accept = (accept_u * q_d < p_d) & ~last
    residual = torch.clamp(p - q, min=0.0)
    # float rounding could leave a residual row with no weight: fall back to p there
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    weights = torch.where(last.view(1, m, 1), p, residual)
    return torch.where(accept, drafts, race(weights, exp_noise))
