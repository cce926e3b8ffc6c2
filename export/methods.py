"""The three program methods as export-ready modules, with example inputs and dynamic shapes.

Each wrapper holds the *same* Speculator, so parameter and buffer names are identical across methods:
that is what lets the lowering share one KV cache (and one copy of the weights where the backend allows).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.export import Dim

from etspec.models.speculator import Speculator

METHOD_NAMES = ("prefill", "target_verify", "draft")
SAMPLED_METHOD_NAMES = ("target_verify_sample", "draft_sample")  # with --sampling


class _Method(nn.Module):
    def __init__(self, spec: Speculator):
        super().__init__()
        self.spec = spec


class Prefill(_Method):
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor):
        return self.spec.prefill(tokens, input_pos, kv_window)


class TargetVerify(_Method):
    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor):
        return self.spec.target_verify(tokens, input_pos, kv_window)


class Draft(_Method):
    def forward(
        self, tokens: torch.Tensor, feature: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor
    ):
        return self.spec.draft(tokens, feature, input_pos, kv_window)


class TargetVerifySample(_Method):
    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor,
        kv_window: torch.Tensor,
        draft_probs: torch.Tensor,
        accept_u: torch.Tensor,
        noise: torch.Tensor,
        params: torch.Tensor,
    ):
        return self.spec.target_verify_sample(
            tokens, input_pos, kv_window, draft_probs, accept_u, noise, params
        )


class DraftSample(_Method):
    def forward(
        self,
        tokens: torch.Tensor,
        feature: torch.Tensor,
        input_pos: torch.Tensor,
        kv_window: torch.Tensor,
        noise: torch.Tensor,
        params: torch.Tensor,
    ):
        return self.spec.draft_sample(tokens, feature, input_pos, kv_window, noise, params)


def method_specs(
    spec: Speculator, max_prefill_chunk: int, sampling: bool = False
) -> dict[str, tuple[nn.Module, tuple, tuple]]:
    """{name: (module, example args, dynamic shapes)} for `export_methods`.

    T (prefill rows), R (draft catch-up rows) and every kv_window length are dynamic. target_verify's M
    is dynamic in [1, k+1]: k+1 rows in a speculative round, 1 row for target-only decoding (--no-spec)
    and fewer drafts (--draft-len below the exported k), all served by one compiled method. `sampling`
    adds the sampled pair with the same dynamic dims (their extra inputs follow M or are static).
    """
    k, max_seq = spec.draft_len, spec.max_seq_len
    hidden = spec.draft_head.cfg.hidden_size
    device = spec.target.embed_tokens.weight.device
    dtype = spec.target.embed_tokens.weight.dtype
    i64 = dict(dtype=torch.long, device=device)

    def window(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.int8, device=device)

    # Example sizes avoid 0/1 and the top of each kv range (export specialises on them: a cache slice
    # whose end equals the cache size pins kv_len). They are also the hints AOTInductor autotunes its
    # GEMM/attention kernels at, so they are the hot path's sizes: a full prefill chunk, a k+1-row verify,
    # a short draft catch-up, a few thousand keys.
    kv = min(max_seq - k, 4096)
    t = min(max_prefill_chunk, kv - 1)
    m = k + 1
    r = min(k + 1, t)
    prefill = (torch.zeros(1, t, **i64), torch.arange(kv - t, kv, **i64), window(kv))
    verify = (torch.zeros(1, m, **i64), torch.arange(kv - m, kv, **i64), window(kv))
    draft = (
        torch.zeros(1, r, **i64),
        torch.zeros(1, r, hidden, dtype=dtype, device=device),
        torch.arange(kv - r, kv, **i64),
        window(kv),
    )
    # one-row chunks are static (a Dim of size 1 would be specialised anyway)
    rows = Dim("T", min=1, max=max_prefill_chunk) if t >= 2 else None
    kv_p = Dim("kv_len", min=1, max=max_seq)
    m_dim = Dim("M", min=1, max=k + 1)
    kv_v = Dim("kv_len", min=1, max=max_seq)
    r_dim = Dim("R", min=1, max=max_prefill_chunk) if r >= 2 else None
    kv_d = Dim("kv_len", min=1, max=max_seq - k + 1)  # chained steps read up to kv_len + k - 1

    def at(dim: int, d: Dim | None) -> dict | None:
        return {dim: d} if d is not None else None

    specs = {
        "prefill": (Prefill(spec), prefill, (at(1, rows), at(0, rows), {0: kv_p})),
        "target_verify": (TargetVerify(spec), verify, ({1: m_dim}, {0: m_dim}, {0: kv_v})),
        "draft": (Draft(spec), draft, (at(1, r_dim), at(1, r_dim), at(0, r_dim), {0: kv_d})),
    }
    if sampling:
        vocab, draft_vocab = spec.target.cfg.vocab_size, spec.draft_head.cfg.draft_vocab_size
        f32 = dict(dtype=torch.float32, device=device)
        params = torch.tensor([0.7, 0.9, 20.0], **f32)
        verify_s = verify + (
            torch.full((1, m, draft_vocab), 1.0 / draft_vocab, **f32),
            torch.rand(1, m, **f32),
            torch.ones(1, 1, vocab, **f32),
            params,
        )
        draft_s = draft + (torch.ones(1, k, draft_vocab, **f32), params)
        m_s, r_s = Dim("M", min=1, max=k + 1), Dim("R", min=1, max=max_prefill_chunk) if r >= 2 else None
        kv_vs, kv_ds = Dim("kv_len", min=1, max=max_seq), Dim("kv_len", min=1, max=max_seq - k + 1)
        specs["target_verify_sample"] = (
            TargetVerifySample(spec),
            verify_s,
            ({1: m_s}, {0: m_s}, {0: kv_vs}, {1: m_s}, {1: m_s}, None, None),
        )
        specs["draft_sample"] = (
            DraftSample(spec),
            draft_s,
            (at(1, r_s), at(1, r_s), at(0, r_s), {0: kv_ds}, None, None),
        )
    return specs
