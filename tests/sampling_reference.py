"""Float64 references for the sampling tests: the filter's definition and a chi-square p-value."""

from __future__ import annotations

import torch

ALPHA = 1e-6  # each statistical check's false-failure rate


def reference_filtered(logits: torch.Tensor, t: float, top_p: float, top_k: int) -> torch.Tensor:
    """The filter's definition in float64, row by row: keep the top-k values (ties together), then the
    tokens whose renormalised mass strictly above them is < top_p."""
    out = []
    for row in logits.double().reshape(-1, logits.shape[-1]):
        z = row / t
        keep = torch.ones_like(z, dtype=torch.bool)
        if top_k > 0:
            kth = z.sort(descending=True).values[min(top_k, z.numel()) - 1]
            keep &= z >= kth
        if top_p < 1.0:
            p = torch.softmax(torch.where(keep, z, -torch.inf), -1)
            above = torch.stack([p[z > zi].sum() for zi in z])
            keep &= above < top_p
        out.append(torch.softmax(torch.where(keep, z, -torch.inf), -1))
    return torch.stack(out).reshape(logits.shape)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of observed counts against probabilities; cells expected below 5 are pooled."""
    n = counts.sum().item()
    exp = probs.double() * n
    big = exp >= 5
    obs = torch.cat([counts[big].double(), counts[~big].sum().double().view(1)])
    ex = torch.cat([exp[big], exp[~big].sum().view(1)])
    if ex[-1] < 5:  # too little pooled mass to form a cell: fold it into the largest
        obs, ex = obs[:-1].clone(), ex[:-1].clone()
        obs[ex.argmax()] += counts[~big].sum()
        ex[ex.argmax()] += exp[~big].sum()
    assert abs(ex.sum().item() - n) < 1e-6 * n, "probabilities do not sum to 1"
    x2 = ((obs - ex) ** 2 / ex).sum()
    df = torch.tensor(obs.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, x2 / 2))  # the chi-square survival function


def exact_first_two(
    model, prompt: list[int], t: float, top_p: float, top_k: int, eos: set[int]
) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first two sampled tokens after `prompt` under target-only sampling,
    enumerated from a transformers model's float64 logits; an EOS first token ends the sequence."""
    model = model.double()

    @torch.no_grad()
    def next_dist(ids: list[int]) -> torch.Tensor:
        logits = model(torch.tensor([ids])).logits[0, -1]
        return reference_filtered(logits, t, top_p, top_k)

    cells: dict[tuple[int, ...], float] = {}
    first = next_dist(prompt)
    for x1 in first.nonzero().flatten().tolist():
        if x1 in eos:
            cells[(x1,)] = first[x1].item()
            continue
        second = next_dist(prompt + [x1])
        for x2 in second.nonzero().flatten().tolist():
            cells[(x1, x2)] = first[x1].item() * second[x2].item()
    return cells


def sample_first_two(program, prompt: list[int], runs: int, seed: int, **kw) -> tuple[dict, int]:
    """Empirical counts of the first two generated tokens over `runs` generations, one generator seeded
    once (so the runs are independent draws); also the drafts accepted over all runs."""
    from collections import Counter

    from etspec.runner.generator import SpeculativeGenerator
    from etspec.runner.sampling import Sampling

    sampling = Sampling(kw.pop("temperature"), kw.pop("top_p", 1.0), kw.pop("top_k", 0), seed)
    gen = SpeculativeGenerator(program, sampling=sampling, **kw)
    counts: Counter = Counter()
    accepted = 0
    for _ in range(runs):
        counts[tuple(t for chunk in gen.generate(prompt, 2) for t in chunk)] += 1
        accepted += sum(gen.stats.accepted)
    return counts, accepted


def distribution_p_value(exact: dict[tuple[int, ...], float], counts: dict) -> float:
    """Chi-square p-value of sampled sequences against the exact cells; a sequence outside them fails."""
    stray = set(counts) - set(exact)
    assert not stray, f"sampled sequences with probability 0: {sorted(stray)[:5]}"
    keys = sorted(exact)
    probs = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    obs = torch.tensor([counts.get(k, 0) for k in keys], dtype=torch.float64)
    return chi_square_p(obs, probs / probs.sum())
