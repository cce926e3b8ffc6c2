"""The `--stats-json` report and the one-line explanation of a slower speculative run."""

from __future__ import annotations

import argparse
from importlib import metadata

import torch

from etspec.artifact import Manifest

from .stats import GenerationStats


def runtime_versions() -> dict[str, str]:
    out = {"torch": torch.__version__}
    for pkg in ("executorch", "etspec", "transformers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def run_report(
    args: argparse.Namespace,
    m: Manifest,
    k: int,
    prompt: list[int],
    runs: dict[str, tuple[list[int], GenerationStats]],
    texts: dict[str, str | None],
) -> dict:
    """Everything needed to judge and reproduce a run: what ran, on what, and what came out."""
    report: dict = {
        "artifact": str(args.model.resolve()),
        "backend": m.backend,
        "dtype": m.dtype,
        "draft_len": k,
        "exported_draft_len": m.draft_len,
        "max_seq_len": m.max_seq_len,
        "cuda_graph": bool(args.cuda_graph),
        "prompt_tokens": len(prompt),
        "prompt_ids": prompt,
        "versions": runtime_versions(),
        "export_versions": dict(m.versions),
    }
    for name, (ids, stats) in runs.items():
        report[name] = {**stats.to_dict(), "token_ids": ids, "text": texts[name]}
    if "target-only" in runs and "speculative" in runs:
        spec, base = runs["speculative"], runs["target-only"]
        # sampled runs are two draws: equality is not expected, so it is not reported
        report["identical"] = spec[0] == base[0] if spec[1].sampling is None else None
        report["speedup"] = spec[1].decode_tok_s / max(base[1].decode_tok_s, 1e-9)
    return report


def slower_reason(spec: GenerationStats, base: GenerationStats) -> str | None:
    """When speculation lost, say by how much acceptance fell short of what a round costs."""
    if not spec.rounds or not base.generated or spec.decode_tok_s >= base.decode_tok_s:
        return None
    token_ms = base.decode_s * 1e3 / base.generated
    round_ms = spec.decode_s * 1e3 / spec.rounds
    need = round_ms / token_ms
    return (
        f"speculation is slower here: a round (k={spec.draft_len}) costs {round_ms:.1f} ms = {need:.2f} "
        f"target-only tokens ({token_ms:.1f} ms each) but committed {spec.acceptance_length:.2f}; it pays "
        f"off once the head's acceptance length exceeds {need:.2f}"
    )
