"""Round-by-round greedy speculative generation over a loaded program (docs/design.md §4).

Hot-loop hygiene: every per-round tensor is a view into a buffer allocated once (positions, kv_window,
prompt and token buffers); next round's catch-up tokens are the verify output itself (accepted drafts
equal the target's argmaxes, so [d1..dj, a_j] == a[:j+1]); and each round makes one device->host read.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from etspec.runtime.program import Program, check_token_ids

from .errors import ContextLimitError
from .stats import GenerationStats

__all__ = ["ContextLimitError", "SpeculativeGenerator"]


@dataclass
class _Timer:
    """Device-time accounting without syncs: CUDA events on the GPU, perf_counter on the CPU."""

    cuda: bool
    marks: dict[str, list] = field(default_factory=dict)

    def span(self, key: str):
        timer = self

        class _Span:
            def __enter__(self):
                if timer.cuda:
                    self.a = torch.cuda.Event(enable_timing=True)
                    self.a.record()
                else:
                    self.a = time.perf_counter()

            def __exit__(self, *exc):
                if timer.cuda:
                    b = torch.cuda.Event(enable_timing=True)
                    b.record()
                    timer.marks.setdefault(key, []).append((self.a, b))
                else:
                    timer.marks.setdefault(key, []).append(time.perf_counter() - self.a)

        return _Span()

    def ms(self, key: str) -> list[float]:
        """Each span's time in ms (on CUDA, call after a synchronize)."""
        spans = self.marks.get(key, [])
        if self.cuda:
            return [a.elapsed_time(b) for a, b in spans]
        return [s * 1e3 for s in spans]


class SpeculativeGenerator:
    """Greedy generation from an etspec program; `generate` yields lists of newly committed token ids.

    `draft_len` may be below the exported k (the draft still computes k; verify takes k+1 rows).
    `spec=False` decodes target-only through target_verify with one row: the losslessness baseline.

    `simulate_acceptance=L` (benchmarks only; never on by default) overrides the acceptance decision so
    that rounds commit L tokens on average: round r accepts floor((r+1)(L-1)) - floor(r(L-1)) drafts,
    whatever the target says. Every call keeps its real shapes and inputs, so round costs are those of a
    head that really reaches L, but the committed tokens are no longer the model's greedy output; the
    stats carry `simulated_acceptance` and their summary says so.
    """

    def __init__(
        self,
        program: Program,
        draft_len: int | None = None,
        spec: bool = True,
        cuda_graph: bool = False,
        simulate_acceptance: float | None = None,
    ):
        m = program.manifest
        self.program, self.manifest, self.spec = program, m, spec
        self.k = m.draft_len if draft_len is None else draft_len
        if not 1 <= self.k <= m.draft_len:
            raise ValueError(f"draft_len must be between 1 and the exported {m.draft_len}, got {self.k}")
        if simulate_acceptance is not None and not (spec and 1.0 <= simulate_acceptance <= self.k + 1):
            raise ValueError(
                f"simulate_acceptance must be between 1 and draft_len + 1 = {self.k + 1} (speculative "
                f"decoding only), got {simulate_acceptance}"
            )
        self.simulate = simulate_acceptance
        self.device = program.device
        self.eos = set(m.eos_token_ids)
        dev = self.device
        # Persistent buffers: everything a round passes to a method is a view into one of these.
        self._positions = torch.arange(m.max_seq_len + m.draft_len + 1, dtype=torch.long, device=dev)
        self._window = torch.zeros(m.max_seq_len, dtype=torch.int8, device=dev)
        self._prompt = torch.zeros(1, m.max_seq_len + 1, dtype=torch.long, device=dev)
        self._verify_tokens = torch.zeros(1, m.draft_len + 1, dtype=torch.long, device=dev)
        # Decode-round positions get buffers of their own: slices of _positions at odd offsets are not
        # 16-byte aligned, and AOTI copies misaligned inputs (with a warning) on every call.
        self._verify_pos = torch.zeros(m.draft_len + 1, dtype=torch.long, device=dev)
        self._draft_pos = torch.zeros(m.draft_len + 1, dtype=torch.long, device=dev)
        self._host = torch.zeros(2 * (m.draft_len + 1), dtype=torch.long, pin_memory=dev.type == "cuda")
        self._prefill = program.method("prefill", check=False)
        self._verify = program.method("target_verify", check=False, cuda_graph=cuda_graph)
        self._draft = program.method("draft", check=False, cuda_graph=cuda_graph)
        # kv_window is rounded up to the program's bucket (CUDA) so one captured graph serves many lengths
        # (the methods take the exact bound from input_pos); the draft's chained steps read k-1 past it.
        # Eager calls get the same rounding: the kernels then see the same shapes (same split-K plan, same
        # reduction order) with and without graphs, so both give bit-identical tokens.
        self._bucket = m.kv_bucket or 1
        self._caps = {"verify": m.max_seq_len, "draft": m.max_seq_len - m.draft_len + 1}
        self.stats = GenerationStats()

    def _win(self, n: int, method: str) -> torch.Tensor:
        b = self._bucket
        return self._window[: min(-(-n // b) * b, self._caps[method]) if b > 1 else n]

    def room(self, prompt_len: int) -> int:
        """Tokens that fit after a prompt: verify writes k+1 rows past the committed length."""
        return self.manifest.max_seq_len - self.manifest.draft_len - prompt_len

    def _prefill_and_catch_up(self, n: int, timer: _Timer) -> torch.Tensor:
        """Chunked prefill; each chunk's draft catch-up right after it. Returns the pending token [1]."""
        chunk = self.manifest.max_prefill_chunk
        pending = None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with timer.span("prefill"):
                pending, feature = self._prefill(self._prompt[:, s:e], self._positions[s:e], self._window[:e])
            if not self.spec:
                continue
            if e == n:
                self._prompt[0, n] = pending[0]  # the catch-up row at n-1 pairs with the pending token
            with timer.span("prefill"):  # the prompt's draft catch-up is prefill work, not a round's
                (drafts,) = self._draft(
                    self._prompt[:, s + 1 : e + 1], feature, self._positions[s:e], self._window[:e]
                )
        return (pending, drafts) if self.spec else (pending, None)

    def generate(self, prompt: list[int], max_new_tokens: int) -> Iterator[list[int]]:
        """Yield each round's newly committed token ids until `max_new_tokens`, an EOS id (included)
        or the context limit; `self.stats` then describes the run (`stats.stop_reason` says which).

        Raises ValueError for an empty prompt, MethodInputError for ids outside the vocabulary and
        ContextLimitError when the prompt leaves no room, all before any method runs.
        """
        n = len(prompt)
        if n < 1:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_token_ids(prompt, self.manifest.vocab_size, "prompt token id")
        room = self.room(n)
        if room < 1:
            raise ContextLimitError(
                f"prompt of {n} tokens leaves no room to generate: max_seq_len {self.manifest.max_seq_len} "
                f"minus {self.manifest.draft_len} verify rows"
            )
        budget = min(max_new_tokens, room)
        stats = self.stats = GenerationStats(
            prompt_tokens=n, draft_len=self.k if self.spec else 0, simulated_acceptance=self.simulate
        )
        stats.stop_reason = "max_new_tokens" if max_new_tokens <= room else "context_limit"
        cuda = self.device.type == "cuda"
        timer = _Timer(cuda)
        host = self._host
        t0 = time.perf_counter()
        self._prompt[0, :n].copy_(torch.tensor(prompt, dtype=torch.long))
        pending, drafts = self._prefill_and_catch_up(n, timer)
        host[:1].copy_(pending, non_blocking=cuda)
        self._sync(cuda)
        pending_host = int(host[0])
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        emitted = 0
        try:
            while True:
                if self.spec:
                    new, pending, pending_next, a, feature, j = self._verify_round(
                        n, pending, drafts, pending_host, timer
                    )
                else:
                    new, j = [pending_host], 0
                out = self._take(new, budget - emitted)
                emitted += len(out)
                stats.generated = emitted
                # drafts cut off by the budget or an EOS were not committed: they do not count
                stats.accepted.append(min(j, len(out) - 1))
                if out and out[-1] in self.eos:
                    stats.stop_reason = "eos"
                finished = stats.stop_reason == "eos" or emitted >= budget
                if not finished:
                    if self.spec:
                        rows = self._draft_pos[: j + 1]
                        rows.copy_(self._positions[n : n + j + 1])
                        with timer.span("draft"):
                            (drafts,) = self._draft(
                                a[:, : j + 1], feature[:, : j + 1], rows, self._win(n + j + 1, "draft")
                            )
                        pending_host = pending_next
                        n += j + 1
                    else:
                        pending, pending_host = self._decode_step(n, pending, timer)
                        n += 1
                yield out
                if finished:
                    return
        finally:
            stats.decode_s = time.perf_counter() - t_decode
            if cuda:
                torch.cuda.synchronize()
            stats.prefill_device_s = sum(timer.ms("prefill")) / 1e3
            stats.draft_ms, stats.verify_ms = timer.ms("draft"), timer.ms("verify")
            stats.draft_s, stats.verify_s = sum(stats.draft_ms) / 1e3, sum(stats.verify_ms) / 1e3

    def _take(self, new: list[int], left: int) -> list[int]:
        """The round's tokens up to the budget and through the first EOS."""
        out = []
        for tok in new[:left]:
            out.append(tok)
            if tok in self.eos:
                break
        return out

    @staticmethod
    def _sync(cuda: bool) -> None:
        if cuda:
            torch.cuda.current_stream().synchronize()

    def _verify_round(self, n, pending, drafts, pending_host, timer):
        """Verify [pending, d1..dk] at n..n+k; returns the committed tokens and the new pending token."""
        k, kk, cuda, host = self.k, self.manifest.draft_len, self.device.type == "cuda", self._host
        self._verify_tokens[:, :1].copy_(pending.view(1, 1))
        self._verify_tokens[:, 1 : k + 1].copy_(drafts[:, :k])
        pos = self._verify_pos[: k + 1]
        pos.copy_(self._positions[n : n + k + 1])
        with timer.span("verify"):
            a, feature = self._verify(self._verify_tokens[:, : k + 1], pos, self._win(n + k + 1, "verify"))
        host[: k + 1].copy_(a[0], non_blocking=cuda)  # the one device->host read of the round
        host[kk + 1 : kk + 1 + k].copy_(drafts[0, :k], non_blocking=cuda)
        self._sync(cuda)
        a_h, d_h = host[: k + 1].tolist(), host[kk + 1 : kk + 1 + k].tolist()
        j = 0
        while j < k and d_h[j] == a_h[j]:
            j += 1
        if self.simulate is not None:
            j = self._simulated_accepts(len(self.stats.accepted))
        return [pending_host] + d_h[:j], a[0, j : j + 1], a_h[j], a, feature, j

    def _simulated_accepts(self, r: int) -> int:
        """Round r's forced accept count: the running mean of j + 1 tracks simulate_acceptance exactly."""
        x = self.simulate - 1.0
        return min(self.k, int((r + 1) * x + 1e-9) - int(r * x + 1e-9))

    def _decode_step(self, n, pending, timer):
        """Target-only: one row through target_verify (M = 1)."""
        cuda, host = self.device.type == "cuda", self._host
        self._verify_tokens[:, :1].copy_(pending.view(1, 1))
        pos = self._verify_pos[:1]
        pos.copy_(self._positions[n : n + 1])
        with timer.span("verify"):
            a, _ = self._verify(self._verify_tokens[:, :1], pos, self._win(n + 1, "verify"))
        host[:1].copy_(a[0, :1], non_blocking=cuda)
        self._sync(cuda)
        return a[0, :1], int(host[0])
