"""The speculative sampling math against float64 references and exact distributions (models/sampling.py).

Statistical checks use fixed seeds and chi-square bounds at p = 1e-6 each: a correct implementation fails
one of them with probability below 1e-5 in all; a biased one (e.g. a draw from p instead of the residual
after a rejection) fails them by orders of magnitude."""

from __future__ import annotations

import pytest
import torch

from etspec.models.sampling import (
    SEARCHES,
    draft_probs_in_target_vocab,
    filtered_probs,
    params_tensor,
    race,
    verify_sampled,
)
from tests.sampling_reference import ALPHA, chi_square_p, reference_filtered


def _logits(rows: int, n: int, seed: int, ties: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g) * 3
    if ties:  # bf16 logits on a coarse grid: many exact ties, some at the thresholds
        x = (x * 2).round().div(2).bfloat16()
    return x


@pytest.mark.parametrize("search", SEARCHES)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize(
    "t,top_p,top_k",
    [
        (1.0, 1.0, 0),
        (0.6, 1.0, 0),
        (1.0, 0.9, 0),
        (0.7, 0.5, 0),
        (1.0, 1.0, 5),
        (0.8, 0.95, 20),
        (1.3, 0.3, 3),
        (1.0, 1e-4, 0),
        (1.0, 1.0, 1),
        (0.5, 0.9, 1000),
    ],
)
def test_filtered_probs_matches_definition(search: str, ties: bool, t: float, top_p: float, top_k: int):
    logits = _logits(6, 300, seed=top_k + int(100 * top_p), ties=ties)
    got = filtered_probs(logits, params_tensor(t, top_p, top_k), search)
    want = reference_filtered(logits, t, top_p, top_k)
    assert got.dtype == torch.float32
    assert torch.equal(got > 0, want > 0), "kept sets differ"
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)


def test_searches_agree_on_many_rows():
    logits = _logits(64, 4096, seed=7, ties=True)
    for t, top_p, top_k in [(0.7, 0.9, 0), (1.0, 0.95, 50), (1.0, 1.0, 40)]:
        params = params_tensor(t, top_p, top_k)
        a, b = filtered_probs(logits, params, "sort"), filtered_probs(logits, params, "bisect")
        assert torch.equal(a > 0, b > 0)
        torch.testing.assert_close(a, b)


def test_race_draws_proportionally():
    g = torch.Generator().manual_seed(0)
    w = torch.rand(12, generator=g) * (torch.rand(12, generator=g) > 0.3)
    noise = torch.empty(200_000, 12).exponential_(generator=g)
    idx = race(w.expand(200_000, 12), noise)
    assert (w[idx] > 0).all()
    assert chi_square_p(torch.bincount(idx, minlength=12), w / w.sum()) > ALPHA


def _round(p: torch.Tensor, q: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """n independent rounds of a context-free pair: drafts d_i ~ q_i, then verify_sampled; ids [n, M]."""
    g = torch.Generator().manual_seed(seed)
    m, v = p.shape
    drafts = race(q[:-1].expand(n, m - 1, v), torch.empty(n, m - 1, v).exponential_(generator=g))
    tokens = torch.cat([torch.zeros(n, 1, dtype=torch.long), drafts], dim=1)
    u = torch.rand(n, m, generator=g)
    noise = torch.empty(n, 1, v).exponential_(generator=g)
    return tokens, verify_sampled(tokens, p.expand(n, m, v), q.expand(n, m, v), u, noise)


def _committed(tokens: torch.Tensor, ids: torch.Tensor) -> list[list[int]]:
    """Each round's new tokens: d1..dj and the token at the first mismatch (the runner's rule)."""
    out = []
    for t, a in zip(tokens[:, 1:].tolist(), ids.tolist()):
        j = 0
        while j < len(t) and t[j] == a[j]:
            j += 1
        out.append(a[: j + 1])
    return out


@pytest.mark.parametrize("case", ["random", "same-token head", "head equals target"])
def test_round_is_lossless_for_a_context_free_target(case: str):
    """With a target whose distribution at row i is p_i whatever the prefix, the committed tokens are
    x1 ~ p_0, x2 ~ p_1 given an accepted first draft, ...: check the first two positions exactly."""
    g = torch.Generator().manual_seed(1)
    m, v, n = 4, 10, 200_000
    p = torch.softmax(torch.randn(m, v, generator=g) * 1.5, -1)
    if case == "random":
        q = torch.softmax(torch.randn(m, v, generator=g) * 1.5, -1)
    elif case == "same-token head":
        q = torch.zeros(m, v)
        q[:, 3] = 1.0
    else:
        q = p.clone()
    tokens, ids = _round(p, q, n, seed=2)
    committed = _committed(tokens, ids)
    lengths = torch.tensor([len(c) for c in committed], dtype=torch.float64)
    first = torch.tensor([c[0] for c in committed])
    assert chi_square_p(torch.bincount(first, minlength=v), p[0]) > ALPHA
    second = torch.tensor([c[1] for c in committed if len(c) > 1])
    assert chi_square_p(torch.bincount(second, minlength=v), p[1]) > ALPHA
    if case == "head equals target":
        assert lengths.min() == m  # every draft accepted: k + 1 tokens per round
    if case == "same-token head":  # d = 3 is accepted with probability p_0(3)
        accepted = (first == 3) & (tokens[:, 1] == 3)
        rate = accepted.double().mean().item()
        assert abs(rate - p[0, 3].item()) < 6 * (p[0, 3].item() / n) ** 0.5


def test_draft_probs_move_to_target_ids():
    d2t = torch.tensor([0, 2, 3, 5])  # draft ids 0..3 -> target 0, 3, 5, 8
    q = torch.tensor([[[0.1, 0.2, 0.3, 0.4]]])
    full = draft_probs_in_target_vocab(q, d2t, 10)
    want = torch.zeros(1, 1, 10)
    want[0, 0, [0, 3, 5, 8]] = q[0, 0]
    assert torch.equal(full, want)
