"""The EAGLE-3 draft head (docs/design.md §8): fc over three target taps, one 2H-input decoder layer,
own lm_head."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from etspec.kernels import register_ops

from .config import DraftConfig
from .layers import MLP, PLAIN_OPS, Attention, FewRowsKernels, RMSNorm, greedy_ids, project


class Eagle3Layer(nn.Module):
    """The head's `midlayer`: attention reads cat(input_layernorm(embed), hidden_norm(feature))."""

    def __init__(self, cfg: DraftConfig, max_seq_len: int, kernels: FewRowsKernels = PLAIN_OPS):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_before_residual = cfg.norm_before_residual
        self.hidden_norm = RMSNorm(h, eps)
        self.input_layernorm = RMSNorm(h, eps)
        self.post_attention_layernorm = RMSNorm(h, eps, rows_kernel=kernels.reductions)
        self.self_attn = Attention(
            2 * h,
            h,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.head_dim,
            max_seq_len,
            cfg.rope,
            cfg.head_dim**-0.5,
            qk_norm_eps=eps if cfg.qk_norm else None,
            kernels=kernels,
        )
        self.mlp = MLP(
            h,
            cfg.intermediate_size,
            cfg.hidden_act,
            rows_kernel=kernels.linear_rows,
            chunk_kernel=kernels.linear_chunk,
        )

    def attn_input(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Both norms and the concatenation stay eager ops, which Inductor fuses into one kernel; the norm
        kernel would make them three launches."""
        return torch.cat((self.input_layernorm(emb), self.hidden_norm(h)), dim=-1)

    def residual(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The step's residual: the feature h, or with norm_before_residual its normed half of the
        attention input x (speculators heads)."""
        return x[..., x.shape[-1] // 2 :] if self.norm_before_residual else h

    def branches(
        self, h: torch.Tensor, a: torch.Tensor, rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first residual add and the MLP: (h', delta), whose sum is the step's pre-norm feature (the
        draft method leaves the second add to the norm that follows, `RMSNorm.add_norm`)."""
        h, x = self.post_attention_layernorm.add_norm(h, a, rows)
        return h, self.mlp(x, rows)

    def finish(self, h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Residual adds and the MLP: the step's pre-norm feature (training and tests)."""
        h, delta = self.branches(h, a)
        return h + delta


class Eagle3Draft(nn.Module):
    def __init__(
        self, cfg: DraftConfig, max_seq_len: int, own_embedding: bool, kernels: FewRowsKernels = PLAIN_OPS
    ):
        super().__init__()
        if kernels.any:
            register_ops()  # the draft's query side dispatches to torch.ops.etspec.*
        self.cfg = cfg
        self.fc = nn.Linear(3 * cfg.target_hidden_size, cfg.hidden_size, bias=False)
        # speculators heads: one RMSNorm over the concatenated taps before fc
        taps_width = 3 * cfg.target_hidden_size
        self.input_norm = RMSNorm(taps_width, cfg.rms_norm_eps) if cfg.norm_before_fc else None
        # Every draft query is one row (catch-up rows only write KV), so the few-rows kernels (split-K
        # attention, linear_rows) serve every query-side op of the draft method.
        self.rows_kernel = kernels.linear_rows
        self.chunk_kernel = kernels.linear_chunk
        self.argmax_kernel = kernels.reductions
        self.midlayer = Eagle3Layer(cfg, max_seq_len, kernels)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rows_kernel=kernels.reductions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if own_embedding else None

    def fuse(self, taps: list[torch.Tensor], few_rows: bool = False) -> torch.Tensor:
        """feature = fc(cat(low, mid, high)) (the concatenation normed first with norm_before_fc): H wide,
        computed inside the target methods."""
        x = torch.cat(taps, dim=-1)
        if self.input_norm is not None:
            x = self.input_norm(x)
        return project(x, (self.fc,), few_rows and self.rows_kernel, self.chunk_kernel)[0]

    def to_target_ids(self, logits: torch.Tensor) -> torch.Tensor:
        """Greedy draft id, mapped to the target vocab; no softmax."""
        return self.map_to_target(torch.argmax(logits, dim=-1))

    def map_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocab ids -> target ids (target = draft + d2t[draft])."""
        return draft_ids + self.d2t[draft_ids]

    def step_out(
        self, h: torch.Tensor, delta: torch.Tensor | None, rows: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step's output from `Eagle3Layer.branches`' (h, delta): (its logits, the state the next
        chained step reads: the pre-norm feature h + delta, or its norm with norm_output)."""
        h, normed = self.norm.add_norm(h, delta, rows)
        logits = project(normed, (self.lm_head,), rows and self.rows_kernel, self.chunk_kernel)[0]
        return logits, normed if self.cfg.norm_output else h

    def step_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The logits of pre-norm features h (training and tests)."""
        return self.step_out(h, None)[0]

    def draft(
        self,
        embed: Callable[[torch.Tensor], torch.Tensor],
        tokens: torch.Tensor,
        feature: torch.Tensor,
        input_pos: torch.Tensor,
        kv_len: int,
        k: int,
        pick: Callable[[torch.Tensor, int], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Catch up over R rows, then chain k-1 single-row steps; returns k target ids [1, k].

        `pick(logits [1, 1, Vd], step)` chooses each step's draft-vocab id [1, 1]; the default is the
        argmax (greedy: no softmax). kv_len is the valid KV length after the catch-up writes
        (input_pos[-1] + 1): catch-up reads [:kv_len] and chained step i reads [:kv_len + i], never an
        unwritten position. (Counting the catch-up rather than all k writes keeps every slice length a
        plain symbol or symbol + i under export; `kv_len - (k - 1)` could be 1 and makes export
        specialise.)
        """
        if pick is None:

            def pick(logits: torch.Tensor, step: int) -> torch.Tensor:
                return greedy_ids(logits, self.argmax_kernel)

        layer = self.midlayer
        attn = layer.self_attn
        emb = embed(tokens)
        x = layer.attn_input(emb, feature)  # R catch-up rows: the eager ops
        cos, sin = attn.rotary(input_pos, x.dtype)
        attn.write_kv(x, input_pos, cos, sin)  # all R rows enter the draft KV ...
        a = attn.query(
            x[:, -1:], input_pos[-1:], cos[-1:], sin[-1:], kv_len, few_rows=True
        )  # ... only the last row goes on
        logits, h = self.step_out(*layer.branches(layer.residual(x[:, -1:], feature[:, -1:]), a, True), True)
        ids = self.map_to_target(pick(logits, 0))  # [1, 1]
        out = [ids]
        pos = input_pos[-1:]
        for i in range(1, k):
            pos = pos + 1
            x = layer.attn_input(embed(ids), h)  # the draft's own h is fed back (H wide)
            a = attn(x, pos, kv_len + i, few_rows=True)
            logits, h = self.step_out(*layer.branches(layer.residual(x, h), a, True), True)
            ids = self.map_to_target(pick(logits, i))
            out.append(ids)
        return torch.cat(out, dim=1)
