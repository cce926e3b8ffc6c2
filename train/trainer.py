"""The optimisation loop: length-bucketed batches, AdamW with linear warmup then cosine decay, gradient
clipping, bf16 autocast on CUDA (fp32 master weights)."""

from __future__ import annotations

import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from etspec.models.draft import Eagle3Draft

from .data import Sample, Teacher, collate, length_batches
from .ttt import ttt_hidden, ttt_loss


@dataclass
class TrainSettings:
    ttt_steps: int = 7
    epochs: int = 6
    steps: int | None = None  # optimizer steps; overrides epochs
    lr: float = 3e-4
    warmup: float = 0.05  # share of the steps
    batch_tokens: int = 16384  # batch size x padded length
    clip: float = 0.5
    decay: float = 0.8  # weight of step i is decay^i
    seed: int = 0


@dataclass
class TrainResult:
    steps: int
    batches_per_epoch: int
    seconds: float
    # Per TTT step, averaged over the last tenth of the optimizer steps: CE, top-1 agreement with the target.
    loss: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)
    history: list[float] = field(default_factory=list)  # weighted loss of every optimizer step


def _schedule(opt: torch.optim.Optimizer, total: int, warmup: float) -> torch.optim.lr_scheduler.LRScheduler:
    w = max(1, round(total * warmup))
    return torch.optim.lr_scheduler.SequentialLR(
        opt,
        [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0 / w, total_iters=w),
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total - w)),
        ],
        milestones=[w],
    )


def train(
    head: Eagle3Draft,
    embed: Callable[[torch.Tensor], torch.Tensor],
    teacher: Teacher,
    samples: list[Sample],
    settings: TrainSettings,
) -> TrainResult:
    device = head.fc.weight.device
    batches = length_batches([len(s.tokens) for s in samples], settings.batch_tokens)
    total = settings.steps or settings.epochs * len(batches)
    head.train().requires_grad_(True)
    opt = torch.optim.AdamW(
        head.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=device.type == "cuda"
    )
    sched = _schedule(opt, total, settings.warmup)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    gen = torch.Generator().manual_seed(settings.seed)
    window: deque[list[tuple[float, float, int]]] = deque(maxlen=max(1, total // 10))
    result = TrainResult(steps=total, batches_per_epoch=len(batches), seconds=0.0)
    t0 = time.perf_counter()
    bar = tqdm(total=total, desc="training", unit="step")
    order: list[int] = []
    for _ in range(total):
        if not order:  # a new epoch: batches in a fresh random order
            order = torch.randperm(len(batches), generator=gen).tolist()
        batch = collate([samples[i] for i in batches[order.pop()]])
        with autocast:
            hidden = ttt_hidden(head, embed, batch.taps, batch.tokens, settings.ttt_steps)
            loss, stats = ttt_loss(head, teacher, hidden, batch, settings.decay)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), settings.clip)
        opt.step()
        sched.step()
        window.append(stats)
        result.history.append(loss.item())
        bar.set_postfix(loss=f"{result.history[-1]:.3f}", acc0=f"{stats[0][1]:.2f}")
        bar.update()
    bar.close()
    result.seconds = time.perf_counter() - t0
    for i in range(settings.ttt_steps):
        rows = [s[i] for s in window if s[i][2] > 0]
        n = sum(c for _, _, c in rows)
        result.loss.append(sum(loss * c for loss, _, c in rows) / n if n else math.nan)
        result.agreement.append(sum(acc * c for _, acc, c in rows) / n if n else math.nan)
    head.eval().requires_grad_(False)
    return result
