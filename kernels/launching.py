"""How a triton_op body launches its Triton kernels: through `wrap_triton` on the GPU (so torch.export
and AOTInductor see the kernel), or called directly under the Triton interpreter (the CPU tests, with
TRITON_INTERPRET set before triton is imported)."""

from __future__ import annotations

import os

from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launchable(kernel):
    """`kernel` ready to index with a grid and call from an op body."""
    return kernel if INTERPRET else wrap_triton(kernel)
