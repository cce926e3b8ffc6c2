"""ExecuTorch / c10 ScalarType codes and torch dtypes.

The .pte execution plan, the ETCUDAFQN3 weight manifest and AOTI's ``aoti_torch_dtype_*()`` all number
dtypes the same way; this is the one table that maps them.
"""

from __future__ import annotations

import torch

from .errors import ArtifactError

# c10::ScalarType / executorch ScalarType codes (identical numbering; AOTI's aoti_torch_dtype_*()
# return the same values).
_SCALAR_TYPES: dict[int, torch.dtype] = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    9: torch.complex64,
    10: torch.complex128,
    11: torch.bool,
    15: torch.bfloat16,
    23: torch.float8_e5m2,
    24: torch.float8_e4m3fn,
    25: torch.float8_e5m2fnuz,
    26: torch.float8_e4m3fnuz,
    27: torch.uint16,
    28: torch.uint32,
    29: torch.uint64,
}
_DTYPE_TO_SCALAR_TYPE = {v: k for k, v in _SCALAR_TYPES.items()}


def dtype_from_scalar_type(code: int, what: str = "tensor") -> torch.dtype:
    """Map an ExecuTorch/c10 ScalarType code to a torch dtype (raises ArtifactError if unknown)."""
    try:
        return _SCALAR_TYPES[int(code)]
    except KeyError:
        raise ArtifactError(f"{what}: unsupported scalar type code {code}") from None


def scalar_type_from_dtype(dtype: torch.dtype) -> int:
    return _DTYPE_TO_SCALAR_TYPE[dtype]
