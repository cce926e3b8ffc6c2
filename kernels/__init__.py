"""Triton kernels registered as torch.library ops (etspec::*), with fake and CPU implementations."""

from . import linear_rows, sdpa_midm  # noqa: F401  (registers torch.ops.etspec.*)
from .sdpa_midm import MAX_M as SDPA_MIDM_MAX_M  # noqa: F401
