"""Generation statistics: what a user needs to judge a run, printable and JSON-serialisable."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated: int = 0
    draft_len: int = 0  # 0: target-only decoding
    accepted: list[int] = field(default_factory=list)  # drafts accepted per round (j)
    stop_reason: str = ""
    prefill_s: float = 0.0  # wall time of the prefill (incl. the draft's prompt catch-up)
    decode_s: float = 0.0  # wall time from the first round to the last token
    prefill_device_s: float = 0.0
    draft_s: float = 0.0  # time inside draft calls (device time on CUDA)
    verify_s: float = 0.0  # time inside target_verify calls
    simulated_acceptance: float | None = None  # benchmark-only: forced acceptance, output not the model's
    sampling: dict | None = None  # temperature, top_p, top_k, seed of a sampled run; None = greedy
    verify_ms: list[float] = field(default_factory=list)  # per round
    draft_ms: list[float] = field(default_factory=list)  # per round that drafted the next one

    @property
    def rounds(self) -> int:
        return len(self.accepted)

    @property
    def acceptance_length(self) -> float:
        """Tokens committed per verify pass (mean accepted drafts + 1)."""
        return sum(self.accepted) / self.rounds + 1 if self.rounds else 0.0

    def histogram(self) -> list[int]:
        return [self.accepted.count(j) for j in range(self.draft_len + 1)]

    @property
    def decode_tok_s(self) -> float:
        return self.generated / self.decode_s if self.decode_s else 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def host_s(self) -> float:
        """Decode wall time not spent inside draft/verify calls: Python, syncs, launch gaps."""
        return max(0.0, self.decode_s - self.draft_s - (self.verify_s))

    def per_round(self) -> list[dict]:
        """(accepted drafts, draft ms, verify ms) of each round. A speculative round verifies its drafts
        and then drafts the next round (the last one drafts nothing); target-only round r emits the
        token that the verify of round r-1 (the prefill, for r = 0) computed; so does a sampled one,
        whose first token comes from a one-row step counted as prefill."""
        verify = self.verify_ms if self.draft_len else [0.0] + self.verify_ms
        pad = lambda xs: xs + [0.0] * (self.rounds - len(xs))
        return [
            {"accepted": j, "draft_ms": d, "verify_ms": v}
            for j, d, v in zip(self.accepted, pad(self.draft_ms), pad(verify))
        ]

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("verify_ms")
        d.pop("draft_ms")
        d.update(
            per_round=self.per_round(),
            rounds=self.rounds,
            acceptance_length=self.acceptance_length,
            acceptance_histogram=self.histogram(),
            decode_tok_s=self.decode_tok_s,
            prefill_tok_s=self.prefill_tok_s,
            host_s=self.host_s,
        )
        return d

    def summary(self, label: str) -> str:
        lines = [
            f"[{label}] prompt {self.prompt_tokens} tok, generated {self.generated} tok "
            f"in {self.rounds} rounds (stop: {self.stop_reason})",
            f"[{label}] prefill {self.prefill_s * 1e3:.1f} ms ({self.prefill_tok_s:.0f} tok/s); "
            f"decode {self.decode_s * 1e3:.1f} ms ({self.decode_tok_s:.1f} tok/s): "
            f"draft {self.draft_s * 1e3:.1f} ms, verify {self.verify_s * 1e3:.1f} ms, "
            f"host {self.host_s * 1e3:.1f} ms",
        ]
        if self.draft_len:
            lines.append(
                f"[{label}] acceptance length {self.acceptance_length:.2f} (k={self.draft_len}); "
                f"accepted drafts j=0..{self.draft_len}: {self.histogram()}"
            )
        if self.sampling is not None:
            sp = self.sampling
            filters = [f"top-p {sp['top_p']}"] if sp["top_p"] < 1 else []
            filters += [f"top-k {sp['top_k']}"] if sp["top_k"] else []
            lines.append(
                f"[{label}] sampled at temperature {sp['temperature']}"
                + "".join(f", {f}" for f in filters)
                + f"; seed {sp['seed']} (pass --seed {sp['seed']} to repeat this run)"
            )
        if self.simulated_acceptance is not None:
            lines.append(
                f"[{label}] SIMULATED ACCEPTANCE {self.simulated_acceptance}: "
                "benchmark only, output is not the model's"
            )
        return "\n".join(lines)
