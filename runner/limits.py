"""What an artifact can hold: the tokens that fit after a prompt, and each method's kv_window cap.

Both are read from the manifest, which is the artifact's contract: the runner CLI checks a prompt with
`room` before the program loads, and the generator sizes its windows and budgets by the same numbers.

The eager reference loops (`etspec.models.greedy`) apply the same room rule to an in-memory model; they
keep their own one-line copy: they run an in-memory model, which has no manifest, and `models/`
imports nothing of `runner/`.
"""

from __future__ import annotations

from etspec.artifact import Manifest


def room(manifest: Manifest, prompt_len: int) -> int:
    """New tokens that fit after a prompt of `prompt_len` (below 1: none). Every verify writes k+1 rows
    past the committed length, the exported k whatever draft length a run uses, so the committed length
    stays within max_seq_len - k."""
    return manifest.max_seq_len - manifest.draft_len - prompt_len


def kv_cap(manifest: Manifest, method: str) -> int:
    """The longest kv_window `method` accepts: the upper bound of its kv_window dim in the manifest
    (max_seq_len for prefill and target_verify; k-1 less for the draft, whose k-1 chained steps go
    past the window)."""
    sig = manifest.methods[method]
    (dim,) = next(t.shape for t in sig.inputs if t.name == "kv_window")
    return dim if isinstance(dim, int) else sig.dims[dim][1]
