"""Eager greedy speculative decoding over prefill/target_verify/draft equals target-only greedy."""

from __future__ import annotations

import pytest
import torch

from etspec.fixtures.tiny import tiny_pair
from etspec.models.greedy import speculative_greedy, target_greedy
from etspec.models.layers import MLP, Attention, RMSNorm
from tests.helpers import random_prompt


@pytest.fixture(scope="module", params=["llama", "mistral"])  # mistral: every layer a sliding window of 7
def pair(request):
    return tiny_pair(request.param, max_seq_len=160, draft_len=6, seed=0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_lossless_for_every_draft_len(pair, k):
    pair.draft_len = k
    accepted = []
    for plen, chunk, seed in [
        (1, 8, 0),
        (5, 4, 1),
        (19, 8, 2),
        (33, 16, 3),
    ]:  # single token .. 5-chunk prompts
        prompt = random_prompt(plen, seed)
        ref = target_greedy(pair, prompt, 40, chunk=chunk)
        out = speculative_greedy(pair, prompt, 40, chunk=chunk)
        assert out.tokens == ref.tokens, (plen, chunk)
        assert len(out.tokens) == 40
        assert sum(out.accepted) + out.rounds >= len(out.tokens)  # each round commits j + 1
        accepted += out.accepted
    print(f"k={k}: acceptance length {sum(accepted) / len(accepted) + 1:.2f} over {len(accepted)} rounds")
    assert max(accepted) > 0  # the trained head gets drafts accepted, so the j > 0 paths ran


def test_eos_and_context_limit(pair):
    pair.draft_len = 4
    prompt = random_prompt(9, 7)
    ref = target_greedy(pair, prompt, 30)
    eos = (ref.tokens[11],)
    cut = ref.tokens[: ref.tokens.index(eos[0]) + 1]
    for fn in (target_greedy, speculative_greedy):
        out = fn(pair, prompt, 30, eos=eos)
        assert out.tokens == cut and out.stop_reason == "eos"
    long = random_prompt(150, 8)  # 160 - 4 - 150: room for 6 tokens only
    a = target_greedy(pair, long, 100, chunk=32)
    b = speculative_greedy(pair, long, 100, chunk=32)
    assert a.tokens == b.tokens and len(a.tokens) == 6 and b.stop_reason == "context_limit"
    with pytest.raises(ValueError, match="no room"):
        target_greedy(pair, random_prompt(156, 9), 10)


@pytest.mark.parametrize("family,seed", [("gemma2", 1), ("gemma2", 2), ("gemma4_text", 1)])
def test_lossless_other_seeds_and_sliding_gemma(family, seed):
    pair = tiny_pair(family, max_seq_len=96, draft_len=3, seed=seed, train_steps=30)
    for plen in (3, 14):
        prompt = random_prompt(plen, seed + plen)
        assert (
            speculative_greedy(pair, prompt, 25, chunk=8).tokens
            == target_greedy(pair, prompt, 25, chunk=8).tokens
        )


class _OracleDraft:
    """Wraps a Speculator: draft() proposes the true greedy continuation with the i-th draft corrupted,
    and checks that the catch-up rows it receives are exactly the pairs (feature at p, token at p+1)."""

    def __init__(self, spec, prompt, reference, wrong_at):
        self.spec, self.seq, self.wrong_at = spec, prompt + reference, wrong_at
        self.max_seq_len, self.draft_len = spec.max_seq_len, spec.draft_len
        self.prefill, self.target_verify = spec.prefill, spec.target_verify
        self.rounds = 0

    def draft(self, tokens, feature, input_pos, kv_window):
        pos = input_pos.tolist()
        assert pos == list(range(pos[0], pos[0] + len(pos)))
        assert tokens[0].tolist() == self.seq[pos[0] + 1 : pos[-1] + 2]  # token at p+1 pairs with row p
        assert feature.shape[1] == len(pos) and kv_window.shape[0] == pos[-1] + 1
        n = pos[-1] + 1
        d = self.seq[n + 1 : n + 1 + self.draft_len]
        d = d + [0] * (self.draft_len - len(d))
        w = self.wrong_at[self.rounds % len(self.wrong_at)]
        self.rounds += 1
        if w < self.draft_len:
            d[w] = (d[w] + 1) % 256
        return torch.tensor([d])


def test_round_bookkeeping_for_every_acceptance_count(pair):
    """j = 0..k accepted drafts, in a fixed cycle, against the target-only output."""
    pair.draft_len = 4
    prompt = random_prompt(11, 12)
    ref = target_greedy(pair, prompt, 45, chunk=16).tokens
    oracle = _OracleDraft(pair, prompt, ref, wrong_at=[4, 0, 2, 1, 3, 4, 4])
    out = speculative_greedy(oracle, prompt, 45, chunk=16)  # one catch-up call per round
    assert out.tokens == ref
    assert out.accepted[:7] == [4, 0, 2, 1, 3, 4, 4]


# q/k/v biases; GELU gate + softcaps; K = V layers of two head widths
@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma2", "gemma4_text"])
def test_few_rows_kernel_paths_are_lossless(monkeypatch, family):
    """Verify and draft through etspec::sdpa_midm and etspec::linear_rows (their CPU kernels) give the
    same tokens as SDPA and nn.Linear, while prefill keeps the plain ops."""
    from etspec.kernels import register_ops

    register_ops()  # the counters below wrap the registered ops

    # a trained head (llama) accepts drafts; the others check the other layer kinds quickly
    pair = tiny_pair(
        family, max_seq_len=160, draft_len=4, seed=0, train_steps=300 if family == "llama" else 30
    )
    prompt = random_prompt(21, 4)
    ref = speculative_greedy(pair, prompt, 30, chunk=8)
    rows, caps, shared_rows, linear_rows, norm_rows, argmax_rows = [], [], [], [], [], []
    op, shared_op, lin, norm, add_norm, argmax = (
        torch.ops.etspec.sdpa_midm,
        torch.ops.etspec.sdpa_midm_shared_kv,
        torch.ops.etspec.linear_rows,
        torch.ops.etspec.rms_norm_rows,
        torch.ops.etspec.add_rms_norm_rows,
        torch.ops.etspec.argmax_rows,
    )

    def counting(q, *args):
        rows.append(q.shape[2])
        caps.append(args[7] if len(args) > 7 else 0.0)
        return op(q, *args)

    def counting_shared(q, *args):
        shared_rows.append(q.shape[2])
        return shared_op(q, *args)

    def counting_linear(x, *args, **kw):
        linear_rows.append(x.numel() // x.shape[-1])
        return lin(x, *args, **kw)

    def counting_norm(x, *args):
        norm_rows.append(x.numel() // x.shape[-1])
        return norm(x, *args)

    def counting_add_norm(x, *args):
        norm_rows.append(x.numel() // x.shape[-1])
        return add_norm(x, *args)

    def counting_argmax(x):
        argmax_rows.append(x.numel() // x.shape[-1])
        return argmax(x)

    monkeypatch.setattr(torch.ops.etspec, "argmax_rows", counting_argmax)
    monkeypatch.setattr(torch.ops.etspec, "rms_norm_rows", counting_norm)
    monkeypatch.setattr(torch.ops.etspec, "add_rms_norm_rows", counting_add_norm)
    monkeypatch.setattr(torch.ops.etspec, "sdpa_midm", counting)
    monkeypatch.setattr(torch.ops.etspec, "sdpa_midm_shared_kv", counting_shared)
    monkeypatch.setattr(torch.ops.etspec, "linear_rows", counting_linear)
    # the construction rules of the few-rows kernels on: split-K attention in every layer (Gemma 2's with
    # their logit softcap), linear_rows everywhere but a biased MLP, the norm kernel for every weighted
    # norm (the layers call it for the residual-stream norms only), the argmax kernel for greedy ids
    flags = []
    for m in pair.modules():
        if isinstance(m, Attention):
            flags += [(m, "use_sdpa_midm", True), (m, "rows_kernel", True)]
        elif isinstance(m, MLP):
            flags.append((m, "rows_kernel", m.gate_proj.bias is None))
        elif isinstance(m, RMSNorm):
            flags.append((m, "rows_kernel", m.style != "unit"))
        if hasattr(m, "argmax_kernel"):
            flags.append((m, "argmax_kernel", True))
        elif hasattr(m, "rows_kernel"):
            flags.append((m, "rows_kernel", True))
    saved = [(m, a, getattr(m, a)) for m, a, _ in flags]
    for m, a, v in flags:
        setattr(m, a, v)
    try:
        out = speculative_greedy(pair, prompt, 30, chunk=8)
    finally:
        for m, a, v in saved:
            setattr(m, a, v)
    assert out.tokens == ref.tokens == target_greedy(pair, prompt, 30, chunk=8).tokens
    assert out.accepted == ref.accepted  # same drafts, round by round
    assert set(linear_rows) == {1, 5}  # draft rows and k+1-row verifies; never a prefill chunk
    assert set(norm_rows) == set(argmax_rows) == {1, 5}
    # the split-K attention serves the draft and the target's verify, Gemma 2's with its softcap
    layers = [x.self_attn for x in pair.target.layers]
    assert set(rows) == ({1, 5} if any(not a.shared_kv for a in layers) else {1})
    assert (family == "gemma2") == any(c > 0 for c in caps)
    # K = V layers (Gemma 4's full layers) verify through the one-tensor kernel
    assert set(shared_rows) == ({5} if any(a.shared_kv for a in layers) else set())
    assert (family == "gemma4_text") == bool(shared_rows)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gemma4_text"])
def test_chunk_attention_is_lossless(monkeypatch, family):
    """Prefill chunks through etspec::sdpa_chunk (its CPU kernel) give target-only's tokens (Gemma 2's
    layers with their logit softcap, Gemma 4's K = V full layers with keys rebuilt from the values);
    verify and draft never call it."""
    from etspec.kernels import register_ops

    register_ops()
    pair = tiny_pair(family, max_seq_len=160, draft_len=4, seed=0, train_steps=30)
    prompt = random_prompt(21, 5)
    ref = target_greedy(pair, prompt, 24, chunk=8)
    rows, caps, op = [], [], torch.ops.etspec.sdpa_chunk

    def counting(q, *args):
        rows.append(q.shape[2])
        caps.append(args[7])
        return op(q, *args)

    monkeypatch.setattr(torch.ops.etspec, "sdpa_chunk", counting)
    layers = [x.self_attn for x in pair.target.layers]
    for a in layers:
        monkeypatch.setattr(a, "use_sdpa_chunk", True)
    out = speculative_greedy(pair, prompt, 24, chunk=8)
    assert out.tokens == ref.tokens
    assert len(rows) == 3 * len(layers) and set(rows) == {8, 5}  # the 21-token prompt's chunks: 8, 8, 5
    assert (family == "gemma2") == any(c > 0 for c in caps)
