"""Triton kernels registered as torch.library ops (``torch.ops.etspec.*``), with fake and CPU implementations.

A kernel module registers its op when it is imported (``triton_op`` runs at import time). Importing this
package alone imports no kernel (and no Triton): code that dispatches to ``torch.ops.etspec.*`` calls
:func:`register_ops` where it turns the kernels on, so the dependency is stated where it is made.
"""

from __future__ import annotations


def register_ops() -> None:
    """Register the ``etspec::`` ops (sdpa_midm, sdpa_chunk, linear_rows, rms_norm_rows, argmax_rows);
    calling it again does nothing (Python imports a module once)."""
    from . import argmax_rows, linear_rows, rms_norm_rows, sdpa_chunk, sdpa_midm  # noqa: F401  (registers)
