"""Target + EAGLE-3 head with the three entry points of docs/design.md §4 as plain methods.

Every method takes `kv_window`, an int8 tensor whose *length* is the valid KV length after the call's
writes (a SymInt under export); its values are never read. Greedy ids are argmaxes inside the method, so
vocab-wide logits never leave it and no softmax runs on the greedy path. The sampled pair
(`target_verify_sample`, `draft_sample`) does speculative sampling inside the methods too
(`models/sampling.py`): distributions stay on the device and the runner reads ids only.
"""

from __future__ import annotations

import torch
from torch import nn

from .draft import Eagle3Draft
from .layers import greedy_ids
from .sampling import SEARCHES, draft_probs_in_target_vocab, filtered_probs, race, verify_sampled
from .target import TargetModel


class Speculator(nn.Module):
    """`sampling_search` picks how the sampled methods find top-k / top-p thresholds ("sort" for CPU
    programs, "bisect" for CUDA ones: see `models/sampling.py`); greedy methods never read it."""

    def __init__(
        self, target: TargetModel, draft: Eagle3Draft, draft_len: int, sampling_search: str = "sort"
    ):
        super().__init__()
        if draft_len < 1:
            raise ValueError(f"draft_len must be >= 1, got {draft_len}")
        if sampling_search not in SEARCHES:
            raise ValueError(f"sampling_search must be one of {SEARCHES}, got {sampling_search!r}")
        self.sampling_search = sampling_search
        limits = {}
        if any(layer.self_attn.use_sdpa_midm for layer in target.layers):
            from etspec.kernels.sdpa_midm import MAX_M

            limits["split-K verify attention"] = MAX_M
        if target.rows_kernel:
            from etspec.kernels.linear_rows import MAX_ROWS

            limits["few-rows linear"] = MAX_ROWS
        for name, limit in limits.items():
            if draft_len + 1 > limit:
                raise ValueError(
                    f"draft_len {draft_len} verifies {draft_len + 1} rows; the {name} kernel handles at "
                    f"most {limit}: use a smaller draft_len or turn the kernels off"
                )
        self.target = target
        self.draft_head = draft
        self.draft_len = draft_len

    @property
    def max_seq_len(self) -> int:
        return self.target.max_seq_len

    def _draft_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """The head's own embedding when the checkpoint has one, else the target's (unscaled) table."""
        own = self.draft_head.embed_tokens
        table = own if own is not None else self.target.embed_tokens
        return table(tokens)

    def prefill(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [1,T] at input_pos [T] -> (greedy next token [1], feature [1,T,H])."""
        h, taps = self.target.hidden(tokens, input_pos, kv_window.shape[0])
        next_token = torch.argmax(self.target.logits(h[:, -1]), dim=-1)  # lm_head on the last row only
        return next_token, self.draft_head.fuse(taps)

    def target_verify(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [1,M] = [pending, d1..dk] -> (greedy ids [1,M], feature [1,M,H])."""
        h, taps = self.target.hidden(tokens, input_pos, kv_window.shape[0], few_rows=True)
        ids = greedy_ids(self.target.logits(h, few_rows=True), self.target.argmax_kernel)
        return ids, self.draft_head.fuse(taps, few_rows=True)

    def draft(
        self, tokens: torch.Tensor, feature: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor
    ) -> torch.Tensor:
        """kv_window's length is the valid draft-KV length after the catch-up writes (input_pos[-1] + 1).

        Catch-up rows (tokens [1,R], feature [1,R,H], input_pos [R]) -> k target-vocab draft ids [1,k]."""
        return self.draft_head.draft(
            self._draft_embed, tokens, feature, input_pos, kv_window.shape[0], self.draft_len
        )

    def target_verify_sample(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        kv_window: torch.Tensor,
        draft_probs: torch.Tensor,
        accept_u: torch.Tensor,
        noise: torch.Tensor,
        params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """target_verify with speculative sampling: tokens [1,M] = [pending, d1..dk], draft_probs [1,M,Vd]
        (the draft's distributions for d1..dk; row M-1 unread), accept_u [1,M] uniforms, noise [1,1,V]
        Exp(1), params [3] -> (ids [1,M], feature [1,M,H]). ids[i] = d(i+1) while accepted; the first
        other entry is the new token (`models.sampling.verify_sampled`). M = 1 samples one token."""
        h, taps = self.target.hidden(tokens, input_pos, kv_window.shape[0], few_rows=True)
        p = filtered_probs(self.target.logits(h, few_rows=True), params, self.sampling_search)
        q = draft_probs_in_target_vocab(draft_probs, self.draft_head.d2t, p.shape[-1])
        ids = verify_sampled(tokens, p, q, accept_u, noise)
        return ids, self.draft_head.fuse(taps, few_rows=True)

    def draft_sample(
        self,
        tokens: torch.Tensor,
        feature: torch.Tensor,
        input_pos: torch.Tensor,
        kv_window: torch.Tensor,
        noise: torch.Tensor,
        params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """draft with each step sampled from the head's filtered distribution: noise [1,k,Vd] Exp(1),
        params [3] -> (k target ids [1,k], the k distributions over the draft vocab and a zero row
        [1,k+1,Vd]: what target_verify_sample takes as draft_probs)."""
        probs = []

        def pick(logits: torch.Tensor, step: int) -> torch.Tensor:
            q = filtered_probs(logits, params, self.sampling_search)  # [1, 1, Vd]
            probs.append(q)
            return race(q, noise[:, step : step + 1])

        ids = self.draft_head.draft(
            self._draft_embed, tokens, feature, input_pos, kv_window.shape[0], self.draft_len, pick
        )
        probs.append(torch.zeros_like(probs[0]))
        return ids, torch.cat(probs, dim=1)
