"""Training-time test (EAGLE-3): the head's k-step chain unrolled at every position of a batch at once,
as `Eagle3Draft.draft` runs it at inference, and the distillation loss over its steps.

Step i (0-based) at index t is the chain anchored at t, i steps deep. It
- reads embed(x_{t+1+i}) (the target's own token where inference feeds back its draft) and, at step 0,
  the target feature f_t = fc(taps at t), at later steps the head's own pre-norm hidden state of step
  i-1 at index t;
- sits at RoPE position t + i;
- attends to the step-0 keys at indices <= t (the catch-up KV of positions 0..t) and to the keys of
  steps 1..i at index t (the chain's own KV at positions t+1..t+i), nothing else;
- predicts x_{t+2+i}: its label is the target's distribution at position t+1+i.
tests/train/test_ttt.py checks this against `Eagle3Draft.draft` step by step.

EAGLE's and SpecForge's trainers also hide the step-0 keys at indices t-i+1..t from step i; etspec's
draft method does not (a chain reads the whole catch-up KV), so neither does this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from etspec.models.draft import Eagle3Draft
from etspec.models.layers import apply_rope, attend

from .data import Batch, Teacher


def _heads(x: torch.Tensor, n: int, head_dim: int) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, n, head_dim).transpose(1, 2)


def _shift(tokens: torch.Tensor, n: int) -> torch.Tensor:
    """tokens[:, t + n] at index t (zeros past the end)."""
    return F.pad(tokens[:, n:], (0, n))


def ttt_mask(length: int, step: int, device: torch.device | str) -> torch.Tensor:
    """Boolean [T, (step+1)T] over [step-0 keys | keys of steps 1..step]: causal, then diagonals."""
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [eye] * step, dim=1)


def ttt_hidden(
    head: Eagle3Draft,
    embed: Callable[[torch.Tensor], torch.Tensor],
    taps: torch.Tensor,
    tokens: torch.Tensor,
    steps: int,
) -> list[torch.Tensor]:
    """The head's pre-norm hidden state [B, T, H] at each of `steps` chain steps.

    taps [B, T, 3Ht] and tokens [B, T] are right-padded sequences: with causal and same-index keys only,
    no real position ever reads a padded one.
    """
    layer, attn = head.midlayer, head.midlayer.self_attn
    b, t = tokens.shape
    h = head.fc(taps)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    out = []
    for i in range(steps):
        x = layer.attn_input(embed(_shift(tokens, 1 + i)), h)
        cos, sin = attn.rotary(torch.arange(i, t + i, device=tokens.device), x.dtype)
        q = apply_rope(_heads(attn.q_proj(x), attn.num_heads, attn.head_dim), cos, sin)
        keys.append(apply_rope(_heads(attn.k_proj(x), attn.num_kv_heads, attn.head_dim), cos, sin))
        values.append(_heads(attn.v_proj(x), attn.num_kv_heads, attn.head_dim))
        mask = ttt_mask(t, i, tokens.device)
        o = attend(q, torch.cat(keys, dim=2), torch.cat(values, dim=2), mask, attn.scale)
        h = layer.finish(layer.residual(x, h), attn.o_proj(o.transpose(1, 2).reshape(b, t, -1)))
        out.append(h)
    return out


def ttt_loss(
    head: Eagle3Draft, teacher: Teacher, hidden: list[torch.Tensor], batch: Batch, decay: float = 0.8
) -> tuple[torch.Tensor, list[tuple[float, float, int]]]:
    """sum_i decay^i * CE(head logits at step i, the target's softmax over the draft vocabulary).

    Only labelled positions enter (Batch.label_ok at t + 1 + i). Returns the loss and, per step, (mean
    CE, top-1 agreement with the target, label count).
    """
    total = torch.zeros((), device=batch.tokens.device)
    stats = []
    length = batch.tokens.shape[1]
    for i, h in enumerate(hidden):
        ok = batch.label_ok[:, 1 + i :]
        count = int(ok.sum())
        if count == 0:
            stats.append((float("nan"), float("nan"), 0))
            continue
        student = head.step_logits(h[:, : length - 1 - i][ok]).float()
        with torch.no_grad():
            target = teacher(batch.hidden[:, 1 + i :][ok]).float()
        loss = F.cross_entropy(student, target.softmax(-1))
        total = total + decay**i * loss
        agree = (student.argmax(-1) == target.argmax(-1)).float().mean()
        stats.append((loss.item(), agree.item(), count))
    return total, stats
