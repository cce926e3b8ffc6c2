"""Round-by-round speculative generation over a loaded program (docs/design.md §4, sampling §10).

Hot-loop hygiene: every per-round tensor is a view into a buffer allocated once (positions, kv_window,
prompt and token buffers); next round's catch-up tokens are the verify output itself (accepted drafts
equal the target's argmaxes, so [d1..dj, a_j] == a[:j+1]); and each round makes one device->host read.

Sampling (temperature > 0) runs the same rounds through the sampled methods, whose verify output has the
same shape of meaning: ids[i] = d(i+1) while accepted, then the new token. Its prefill stops one token
short of the prompt, so the first verify's first row is the prompt's last token and the first generated
token is drawn there, from the target's distribution, like every later one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from etspec.runtime.program import Program, check_token_ids

from .errors import ContextLimitError
from .limits import kv_cap, room
from .sampling import Sampling, SamplingInputs
from .stats import GenerationStats

__all__ = ["ContextLimitError", "Round", "SpeculativeGenerator"]


@dataclass(frozen=True)
class Round:
    """What one verify decided (docs/design.md §4 step 3) and what the next round drafts from (step 4).

    With j accepted drafts the round commits t, d1..dj; the bonus a_j becomes the pending token. The
    catch-up rows n..n+j take the next tokens d1..dj, a_j, which equal the target's argmaxes a0..aj,
    so they are views of the verify output (no copy).
    """

    tokens: list[int]  # committed host ids: the pending token t, then d1..dj
    accepted: int  # j
    pending: torch.Tensor  # [1] a_j on the device: the next round's t, not yet in the target KV
    pending_id: int  # a_j on the host
    catch_up_tokens: torch.Tensor  # [1, j+1] d1..dj, a_j
    catch_up_features: torch.Tensor  # [1, j+1, H] the target's features of rows n..n+j


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
    """Generation from an etspec program; `generate` yields lists of newly committed token ids.

    `sampling` (a `Sampling` with temperature > 0; the artifact must carry the sampled methods, export
    `--sampling`) samples losslessly: the output is distributed as target-only sampling with the same
    temperature and filters. Its default, temperature 0, is greedy decoding.

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
        sampling: Sampling | None = None,
    ):
        m = program.manifest
        sampling = sampling or Sampling()
        if not sampling.greedy and not m.sampling:
            raise ValueError(
                "this artifact has no sampled methods: re-export it with etspec-export --sampling to sample "
                "with a temperature > 0"
            )
        if not sampling.greedy and simulate_acceptance is not None:
            raise ValueError(
                "simulate_acceptance is for greedy benchmarks; it cannot be combined with sampling"
            )
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
        self._cuda = self.device.type == "cuda"
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
        # The prompt's catch-up tokens are the prompt shifted by one: copied here, not passed as a view.
        self._catch_up = torch.zeros(1, m.max_prefill_chunk, dtype=torch.long, device=dev)
        self._host = torch.zeros(2 * (m.draft_len + 1), dtype=torch.long, pin_memory=self._cuda)
        # Unchecked: generate() checks the prompt once; every later input is built here to fit.
        self.sampling = sampling
        self._rand = None if sampling.greedy else SamplingInputs(m, sampling, dev)
        self._verify_name = "target_verify" if sampling.greedy else "target_verify_sample"
        self._draft_name = "draft" if sampling.greedy else "draft_sample"
        self._prefill = program.method("prefill", check=False)
        self._verify_method = program.method(self._verify_name, check=False, cuda_graph=cuda_graph)
        self._draft_method = program.method(self._draft_name, check=False, cuda_graph=cuda_graph)
        self._draft_probs: torch.Tensor | None = None  # the last sampled draft's distributions
        # kv_window is rounded up to the program's bucket (CUDA) so one captured graph serves many lengths
        # (the methods take the exact bound from input_pos), capped at each method's exported bound.
        # Eager calls get the same rounding: the kernels then see the same shapes (same split-K plan, same
        # reduction order) with and without graphs, so both give bit-identical tokens.
        self._bucket = m.kv_bucket or 1
        self._caps = {"target_verify": kv_cap(m, self._verify_name), "draft": kv_cap(m, self._draft_name)}
        self.stats = GenerationStats()

    def room(self, prompt_len: int) -> int:
        """Tokens that fit after a prompt (see `etspec.runner.limits.room`)."""
        return room(self.manifest, prompt_len)

    def generate(self, prompt: list[int], max_new_tokens: int) -> Iterator[list[int]]:
        """Yield each round's newly committed token ids until `max_new_tokens`, an EOS id (included)
        or the context limit; `self.stats` then describes the run (`stats.stop_reason` says which).

        Raises ValueError for an empty prompt, MethodInputError for ids outside the vocabulary and
        ContextLimitError when the prompt leaves no room, all before any method runs.
        """
        budget = self._start(prompt, max_new_tokens)
        stats, n = self.stats, len(prompt)
        timer = _Timer(self._cuda)
        t0 = time.perf_counter()
        self._prompt[0, :n].copy_(torch.tensor(prompt, dtype=torch.long))
        if self._rand is None:
            pending, drafts = self._prefill_and_catch_up(n, timer)
            self._host[:1].copy_(pending, non_blocking=self._cuda)
            self._sync()
            committed, pending_id, prompt_pending = n, int(self._host[0]), False
        else:
            committed, pending, pending_id, drafts, prompt_pending = self._sampled_start(prompt, timer)
        stats.prefill_s = time.perf_counter() - t0
        t_decode = time.perf_counter()
        if self.spec:
            rounds = self._speculative(committed, pending, pending_id, drafts, budget, timer, prompt_pending)
        else:
            rounds = self._target_only(committed, pending, pending_id, budget, timer)
        try:
            yield from rounds
        finally:
            stats.decode_s = time.perf_counter() - t_decode
            if self._cuda:
                torch.cuda.synchronize()
            stats.prefill_device_s = sum(timer.ms("prefill")) / 1e3
            stats.draft_ms, stats.verify_ms = timer.ms("draft"), timer.ms("verify")
            stats.draft_s, stats.verify_s = sum(stats.draft_ms) / 1e3, sum(stats.verify_ms) / 1e3

    def _start(self, prompt: list[int], max_new_tokens: int) -> int:
        """Check the request against the artifact, reset `self.stats`; returns the token budget."""
        n = len(prompt)
        if n < 1:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_token_ids(prompt, self.manifest.vocab_size, "prompt token id")
        fits = self.room(n)
        if fits < 1:
            raise ContextLimitError(
                f"prompt of {n} tokens leaves no room to generate: max_seq_len {self.manifest.max_seq_len} "
                f"minus {self.manifest.draft_len} verify rows"
            )
        sampled = None
        if self._rand is not None:
            sp = self.sampling
            sampled = dict(temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, seed=self._rand.seed)
        self.stats = GenerationStats(
            prompt_tokens=n,
            draft_len=self.k if self.spec else 0,
            simulated_acceptance=self.simulate,
            sampling=sampled,
        )
        self.stats.stop_reason = "max_new_tokens" if max_new_tokens <= fits else "context_limit"
        return min(max_new_tokens, fits)

    def _prefill_and_catch_up(self, n: int, timer: _Timer) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chunked prefill; with `spec`, each chunk's draft catch-up right after it (round 0's draft).
        Returns the pending token [1] and round 0's drafts [1, k] (None target-only)."""
        chunk = self.manifest.max_prefill_chunk
        pending = drafts = None
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            with timer.span("prefill"):
                pending, feature = self._prefill(self._prompt[:, s:e], self._positions[s:e], self._window[:e])
            if not self.spec:
                continue
            if e == n and self._rand is None:
                self._prompt[0, n] = pending[0]  # the catch-up row at n-1 pairs with the pending token
            with timer.span("prefill"):  # the prompt's draft catch-up is prefill work, not a round's
                drafts = self._draft(
                    self._catch_up_tokens(s, e), feature, self._positions[s:e], self._window[:e]
                )
        return pending, drafts

    def _sampled_start(
        self, prompt: list[int], timer: _Timer
    ) -> tuple[int, torch.Tensor, int, torch.Tensor | None, bool]:
        """Sampling's prefill: (committed length, pending token [1] and its id, drafts, whether the
        pending token is the prompt's own last one). The prefill stops one token short, so the prompt's
        last token is verified like a pending token and the first new token is drawn from its row. A
        speculative run then starts its rounds there; a target-only run, or a one-token prompt (nothing
        to catch the draft up on), draws that first token in a one-row step, counted as prefill."""
        n = len(prompt)
        last = self._prompt[0, n - 1 : n]
        drafts = self._prefill_and_catch_up(n - 1, timer)[1] if n > 1 else None
        if self.spec and drafts is not None:
            self._sync()
            return n - 1, last, prompt[-1], drafts, True
        with timer.span("prefill"):
            a, feature = self._one_row(n - 1, last)
            if self.spec:  # the draft's catch-up on the one prompt row, paired with the drawn token
                rows = self._draft_pos[:1]
                rows.copy_(self._positions[:1])
                drafts = self._draft(a[:, :1], feature[:, :1], rows, self._win(1, "draft"))
        self._host[:1].copy_(a[0, :1], non_blocking=self._cuda)
        self._sync()
        return n, a[0, :1], int(self._host[0]), drafts, False

    def _catch_up_tokens(self, s: int, e: int) -> torch.Tensor:
        """The prompt's next tokens of rows s..e-1, in an aligned buffer of their own."""
        out = self._catch_up[:, : e - s]
        out.copy_(self._prompt[:, s + 1 : e + 1])
        return out

    def _speculative(
        self,
        n: int,
        pending: torch.Tensor,
        pending_id: int,
        drafts: torch.Tensor,
        budget: int,
        timer: _Timer,
        prompt_pending: bool = False,
    ) -> Iterator[list[int]]:
        """The rounds of docs/design.md §4 from committed length n: verify, accept, draft the next round.
        The next draft is launched before the round's tokens are yielded, so the device drafts while
        the caller consumes them. `prompt_pending`: the pending token is the prompt's last (sampling), so
        the first round does not emit it."""
        while True:
            a, feature = self._verify_drafts(n, pending, drafts, timer)
            rnd = self._accept(pending_id, drafts, a, feature)
            out, finished = self._commit(rnd.tokens, rnd.accepted, budget, prompt_pending)
            prompt_pending = False
            if finished:
                yield out
                return
            drafts = self._draft_next(n, rnd, timer)
            n, pending, pending_id = n + rnd.accepted + 1, rnd.pending, rnd.pending_id
            if out:  # empty only when sampling's first round accepted nothing: its one token is pending
                yield out

    def _target_only(
        self, n: int, pending: torch.Tensor, pending_id: int, budget: int, timer: _Timer
    ) -> Iterator[list[int]]:
        """Target-only rounds: commit the pending token, then run it through target_verify as one row
        (M = 1) for the next, launched before the token is yielded."""
        while True:
            out, finished = self._commit([pending_id], 0, budget)
            if finished:
                yield out
                return
            pending, pending_id = self._decode_step(n, pending, timer)
            n += 1
            yield out

    def _verify_drafts(
        self, n: int, pending: torch.Tensor, drafts: torch.Tensor, timer: _Timer
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """§4 step 2: target_verify of [t, d1..dk] at positions n..n+k; the argmaxes a0..ak [1, k+1]
        (sampling: the ids of `models.sampling.verify_sampled`) and the features [1, k+1, H]."""
        k = self.k
        self._verify_tokens[:, :1].copy_(pending.view(1, 1))
        self._verify_tokens[:, 1 : k + 1].copy_(drafts[:, :k])
        pos = self._verify_pos[: k + 1]
        pos.copy_(self._positions[n : n + k + 1])
        with timer.span("verify"):
            return self._verify(
                self._verify_tokens[:, : k + 1], pos, self._win(n + k + 1, "target_verify"), k
            )

    def _accept(self, pending_id: int, drafts: torch.Tensor, a: torch.Tensor, feature: torch.Tensor) -> Round:
        """§4 step 3: the longest prefix with d_i == a_{i-1}, read in the round's one device->host copy."""
        k, kk, host = self.k, self.manifest.draft_len, self._host
        host[: k + 1].copy_(a[0], non_blocking=self._cuda)
        host[kk + 1 : kk + 1 + k].copy_(drafts[0, :k], non_blocking=self._cuda)
        self._sync()
        a_h, d_h = host[: k + 1].tolist(), host[kk + 1 : kk + 1 + k].tolist()
        j = 0
        while j < k and d_h[j] == a_h[j]:
            j += 1
        if self.simulate is not None:
            j = self._simulated_accepts(len(self.stats.accepted))
        return Round(
            tokens=[pending_id] + d_h[:j],
            accepted=j,
            pending=a[0, j : j + 1],
            pending_id=a_h[j],
            catch_up_tokens=a[:, : j + 1],
            catch_up_features=feature[:, : j + 1],
        )

    def _draft_next(self, n: int, rnd: Round, timer: _Timer) -> torch.Tensor:
        """§4 steps 4 and 1: the draft catches up on rows n..n+j, then chains k-1 steps; the next
        round's drafts [1, k]."""
        rows = self._draft_pos[: rnd.accepted + 1]
        rows.copy_(self._positions[n : n + rnd.accepted + 1])
        window = self._win(n + rnd.accepted + 1, "draft")
        with timer.span("draft"):
            return self._draft(rnd.catch_up_tokens, rnd.catch_up_features, rows, window)

    def _one_row(self, n: int, token: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """target_verify of the one token [1] at position n (M = 1): its next-token ids and feature."""
        self._verify_tokens[:, :1].copy_(token.view(1, 1))
        pos = self._verify_pos[:1]
        pos.copy_(self._positions[n : n + 1])
        return self._verify(self._verify_tokens[:, :1], pos, self._win(n + 1, "target_verify"), 0)

    def _decode_step(self, n: int, pending: torch.Tensor, timer: _Timer) -> tuple[torch.Tensor, int]:
        """Target-only: one row through target_verify (M = 1); the next pending token, device and host."""
        with timer.span("verify"):
            a, _ = self._one_row(n, pending)
        self._host[:1].copy_(a[0, :1], non_blocking=self._cuda)
        self._sync()
        return a[0, :1], int(self._host[0])

    def _commit(
        self, tokens: list[int], accepted: int, budget: int, prompt_pending: bool = False
    ) -> tuple[list[int], bool]:
        """A round's tokens up to the budget and through the first EOS, counted in `self.stats`;
        True when the run ends with them. `prompt_pending`: tokens[0] is the prompt's last token, not
        output (sampling's first round)."""
        stats, out = self.stats, []
        lead = 1 if prompt_pending else 0
        for tok in tokens[lead : lead + budget - stats.generated]:
            out.append(tok)
            if tok in self.eos:
                stats.stop_reason = "eos"
                break
        stats.generated += len(out)
        # drafts cut off by the budget or an EOS were not committed: they do not count
        stats.accepted.append(min(accepted, len(out) - 1 + lead))
        return out, stats.stop_reason == "eos" or stats.generated >= budget

    def _verify(
        self, tokens: torch.Tensor, pos: torch.Tensor, window: torch.Tensor, drafts: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """target_verify, or target_verify_sample with the last draft's distributions and fresh noise."""
        if self._rand is None:
            return self._verify_method(tokens, pos, window)
        rows = drafts + 1
        probs = self._draft_probs[:, :rows] if drafts else self._rand.no_drafts[:, :rows]
        u, noise = self._rand.verify(rows)
        return self._verify_method(tokens, pos, window, probs, u, noise, self._rand.params)

    def _draft(
        self, tokens: torch.Tensor, feature: torch.Tensor, pos: torch.Tensor, window: torch.Tensor
    ) -> torch.Tensor:
        """draft, or draft_sample (keeping its distributions for the next verify); the drafts [1, k]."""
        if self._rand is None:
            (drafts,) = self._draft_method(tokens, feature, pos, window)
            return drafts
        drafts, self._draft_probs = self._draft_method(
            tokens, feature, pos, window, self._rand.draft(), self._rand.params
        )
        return drafts

    def _simulated_accepts(self, r: int) -> int:
        """Round r's forced accept count: the running mean of j + 1 tracks simulate_acceptance exactly."""
        x = self.simulate - 1.0
        return min(self.k, int((r + 1) * x + 1e-9) - int(r * x + 1e-9))

    def _win(self, n: int, method: str) -> torch.Tensor:
        """kv_window for a valid length n: rounded up to the bucket, at most the method's cap."""
        b = self._bucket
        return self._window[: min(-(-n // b) * b, self._caps[method]) if b > 1 else n]

    def _sync(self) -> None:
        if self._cuda:
            torch.cuda.current_stream().synchronize()
