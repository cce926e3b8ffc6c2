"""Sliding-window layers with a ring cache (window + 2 x the rows per call) give the logits of full-length
caches through the calls a speculative run makes: prefill chunks, verify blocks whose rejected tail is
written over by later blocks, a new sequence over the old one's rows; never reading a row not yet
written (NaN here); and a call with more rows than the bound is refused."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from etspec.fixtures.tiny import random_target, tiny_target_config
from etspec.kernels import register_ops
from etspec.models.layers import ALL_KERNELS, PLAIN_OPS, Attention, attention_mask, ring_positions

MAX_SEQ, MAX_ROWS = 96, 6


def _call(model, tokens, start, few_rows=False):
    n = tokens.shape[1]
    with torch.no_grad():
        h, _ = model.hidden(tokens, torch.arange(start, start + n), start + n, few_rows)
        return model.logits(h, few_rows)


SWITCHES = {"plain": PLAIN_OPS, "kernels": ALL_KERNELS, "chunk": replace(ALL_KERNELS, sdpa_chunk=True)}


@pytest.mark.parametrize("switches", list(SWITCHES))
@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "gemma4_text"])
def test_ring_equals_full_caches_through_rejected_drafts(family, switches, monkeypatch):
    """With the kernels on, the verify blocks' sliding layers read the ring through etspec::sdpa_midm
    (its CPU implementation, the reference math; Gemma 2's with its logit softcap); with `chunk`, the
    prefill chunks through etspec::sdpa_chunk too."""
    kernels = switches != "plain"
    full = random_target(family, MAX_SEQ, seed=3)
    ring = random_target(family, MAX_SEQ, seed=3, max_rows=MAX_ROWS, kernels=SWITCHES[switches])
    register_ops()
    rings_seen, chunk_rings = [], []

    def counting(op, seen):
        def call(q, k, v, inv_freq, input_pos, scale, window=0, ring=0, softcap=0.0):
            seen.append(ring)
            return op(q, k, v, inv_freq, input_pos, scale, window, ring, softcap)

        return call

    monkeypatch.setattr(torch.ops.etspec, "sdpa_midm", counting(torch.ops.etspec.sdpa_midm, rings_seen))
    monkeypatch.setattr(torch.ops.etspec, "sdpa_chunk", counting(torch.ops.etspec.sdpa_chunk, chunk_rings))
    window = full.cfg.sliding_window
    for model in (full, ring):  # ExecuTorch leaves caches uninitialised: unwritten rows must never be read
        for buf in model.buffers():
            if buf.dim() == 4:
                buf.fill_(float("nan"))
    assert any(layer.self_attn.v_cache.shape[2] == window + 2 * MAX_ROWS for layer in ring.layers)
    gen = torch.Generator().manual_seed(0)
    for sequence in range(2):  # the second sequence starts at 0 over the first one's ring rows
        pos = 0
        for rows in (6, 6, 5):  # prefill chunks (the second sequence's write over the first one's rows)
            toks = torch.randint(0, 256, (1, rows), generator=gen)
            torch.testing.assert_close(_call(ring, toks, pos), _call(full, toks, pos), atol=2e-5, rtol=1e-4)
            pos += rows
        # (verify rows, rows kept): the rest of a block is written over by later calls, and a short block
        # after a rejected long one leaves stale rows past its own last position
        plan = [(6, 1), (1, 1), (6, 4), (6, 0), (2, 1), (6, 6), (6, 2), (1, 0), (6, 5), (3, 3), (6, 1)]
        for rows, kept in plan[: 11 - 5 * sequence] * 2:
            block = torch.randint(0, 256, (1, rows), generator=gen)
            got = _call(ring, block, pos, few_rows=kernels)
            torch.testing.assert_close(got, _call(full, block, pos), atol=2e-5, rtol=1e-4)
            pos += max(kept, 1)
        assert pos > window + 2 * MAX_ROWS  # the ring has wrapped
    # the ring layers took the kernel, given their ring's rows (full layers: 0)
    ringed = [a for a in (x.self_attn for x in ring.layers) if a.ring]
    assert set(rings_seen) - {0} == ({a.v_cache.shape[2] for a in ringed} if kernels else set())
    assert set(chunk_rings) - {0} == ({a.v_cache.shape[2] for a in ringed} if switches == "chunk" else set())
    assert ringed


def test_more_rows_than_the_bound_are_refused():
    model = random_target("mistral", MAX_SEQ, seed=0, max_rows=MAX_ROWS)
    with pytest.raises(ValueError, match="7 rows in one call; this model takes at most 6"):
        _call(model, torch.zeros(1, 7, dtype=torch.long), 0)


def test_ring_positions_name_the_latest_write_of_each_slot():
    # 10 slots after writing positions 0..23: slot s holds the latest p <= 23 with p % 10 == s
    slots = ring_positions(torch.tensor([21, 22, 23]), 10, 10)
    assert slots.tolist() == [20, 21, 22, 23, 14, 15, 16, 17, 18, 19]
    # a row a rejected draft left at 5 (past the last position, 3) counts as 5 - 6 and is masked
    mask = attention_mask(torch.tensor([2, 3]), 6, window=3, ring=6)[0, 0]
    assert mask.tolist() == [[True, True, True, False, False, False], [False, True, True, True, False, False]]


def test_a_ring_needs_a_window_and_own_keys():
    cfg = tiny_target_config("llama")
    model = random_target("llama", MAX_SEQ, seed=0, config=cfg, max_rows=MAX_ROWS)
    assert all(layer.self_attn.v_cache.shape[2] == MAX_SEQ for layer in model.layers)  # no sliding layers
    with pytest.raises(ValueError, match="needs a sliding window and its own keys"):
        Attention(16, 16, 2, 1, 8, MAX_SEQ, model.cfg.rope, 1.0, cache_rows=20)
