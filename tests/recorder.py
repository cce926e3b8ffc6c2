"""A stand-in Speculator that runs every call on an exported program and on the eager model, and
compares them: the eager greedy loops drive it, so whole protocol runs are checked call by call."""

from __future__ import annotations

import torch

from etspec.runtime.program import Program


class Recorder:
    """Runs each call on the exported program and on the eager model and compares the outputs."""

    def __init__(self, program: Program, eager, atol: float = 1e-4):
        self.program, self.eager, self.atol = program, eager, atol
        self.device = program.device
        self.max_seq_len, self.draft_len = program.manifest.max_seq_len, program.manifest.draft_len
        self.calls = 0

    def _both(self, name, *args):
        args = tuple(a.to(self.device) for a in args)
        ours = self.program.method(name)(*args)
        with torch.no_grad():
            ref = getattr(self.eager, name)(*args)
        ref = ref if isinstance(ref, tuple) else (ref,)
        assert len(ours) == len(ref)
        for o, r in zip(ours, ref):
            if r.is_floating_point():
                torch.testing.assert_close(o, r, atol=self.atol, rtol=self.atol)
            else:
                assert torch.equal(o, r), (name, o, r)
        self.calls += 1
        return ours if len(ours) > 1 else ours[0]

    def prefill(self, *a):
        return self._both("prefill", *a)

    def target_verify(self, *a):
        return self._both("target_verify", *a)

    def draft(self, *a):
        return self._both("draft", *a)
