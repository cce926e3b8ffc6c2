"""uint8 tensors over artifact bytes: zero-copy host views, device copies, typed views on them.

Weights arrive as memoryviews of the .pte or of a memory-mapped .ptd; these helpers turn them into
tensors without copying on the host, and give a constant its dtype, shape and strides on top of an
owned byte storage.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ArtifactError


def as_uint8_tensor(buf: Any) -> torch.Tensor:
    """A flat uint8 CPU tensor over ``buf`` without copying (bytes/memoryview/tensor)."""
    if isinstance(buf, torch.Tensor):
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise ArtifactError("weights blob tensors must be contiguous CPU tensors")
        return buf.view(torch.uint8).reshape(-1)
    mv = memoryview(buf).cast("B")
    if len(mv) == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only buffers: nothing here writes to them
        return torch.frombuffer(mv, dtype=torch.uint8)


def typed_view(
    storage_bytes: torch.Tensor, dtype: torch.dtype, sizes: Sequence[int], strides: Sequence[int], offset: int
) -> torch.Tensor:
    """A (dtype, sizes, strides, offset) view over the untyped storage of a uint8 tensor."""
    t = torch.empty(0, dtype=dtype, device=storage_bytes.device)
    t.set_(storage_bytes.untyped_storage(), int(offset), list(sizes), list(strides))
    return t


def upload_bytes(raw: Any, device: torch.device) -> torch.Tensor:
    """Copy a host byte buffer to a fresh, owned uint8 tensor on ``device``."""
    src = as_uint8_tensor(raw)
    if device.type == "cpu":
        return src.clone()
    out = torch.empty(src.numel(), dtype=torch.uint8, device=device)
    out.copy_(src)
    return out
