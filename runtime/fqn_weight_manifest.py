"""ExecuTorch 1.5's ``ETCUDAFQN3`` weight manifest: the processed bytes of a CUDA delegate.

It names the delegate's shared object and, per constant FQN, the storage entry in the .ptd that holds
it and the view (dtype, device, storage offset, sizes, strides) on that storage. Every count, length
and view is checked against the bytes and the storage size here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from .errors import ArtifactError, UnsupportedLayoutError
from .scalar_types import dtype_from_scalar_type

FQN_MAGIC_PREFIX = b"ETCUDAFQN"
FQN_MAGIC_V3 = b"ETCUDAFQN3"
_MAX_MANIFEST_ENTRIES = 1 << 20
_MAX_DIMS = 64


@dataclass(frozen=True)
class FqnWeightEntry:
    """One constant of an ExecuTorch 1.5 FQN manifest (``ETCUDAFQN3``)."""

    fqn: str
    storage_key: str
    storage_nbytes: int
    dtype: torch.dtype
    device_type: int  # 0 = CPU, 1 = CUDA
    storage_offset: int  # in elements
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    def required_nbytes(self) -> int:
        """Bytes of storage the view (offset, sizes, strides) reaches."""
        if any(s == 0 for s in self.sizes):
            return 0
        last = self.storage_offset + sum((s - 1) * st for s, st in zip(self.sizes, self.strides))
        return (last + 1) * self.dtype.itemsize


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ArtifactError(
                f"FQN manifest truncated: need {n} bytes at offset {self.pos} of {len(self.data)}"
            )
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))

    def string(self) -> str:
        (n,) = self.unpack("<I")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ArtifactError(f"FQN manifest: string at offset {self.pos - n} is not UTF-8") from e


def parse_fqn_manifest(data: bytes) -> tuple[str, tuple[FqnWeightEntry, ...]]:
    """Parse ExecuTorch 1.5's ``ETCUDAFQN3`` manifest -> (shared-object key, entries).

    Layout (little endian; see executorch/backends/cuda/cuda_weight_collector.py,
    ``encode_cuda_weight_metadata``): magic, string so_key, u32 count, then per entry: string fqn,
    string storage_key, u64 storage_nbytes, i32 dtype, i32 device_type, i64 storage_offset,
    u32 ndim, ndim x i64 sizes, ndim x i64 strides. Strings are u32 length + UTF-8.
    """
    if not data.startswith(FQN_MAGIC_V3):
        raise UnsupportedLayoutError(f"not an ETCUDAFQN3 manifest (starts with {data[:12]!r})")
    r = _Reader(data)
    r.take(len(FQN_MAGIC_V3))
    so_key = r.string()
    if not so_key:
        raise ArtifactError("FQN manifest has an empty shared-object key")
    (count,) = r.unpack("<I")
    if count > _MAX_MANIFEST_ENTRIES:
        raise ArtifactError(f"FQN manifest claims {count} entries")
    entries = []
    for _ in range(count):
        fqn = r.string()
        storage_key = r.string()
        nbytes, dtype_code, device_type, offset, ndim = r.unpack("<QiiqI")
        if not fqn or not storage_key:
            raise ArtifactError("FQN manifest entry with an empty FQN or storage key")
        if ndim > _MAX_DIMS:
            raise ArtifactError(f"FQN manifest entry {fqn!r} has {ndim} dims")
        sizes = r.unpack(f"<{ndim}q") if ndim else ()
        strides = r.unpack(f"<{ndim}q") if ndim else ()
        if device_type not in (0, 1):
            raise UnsupportedLayoutError(f"FQN manifest entry {fqn!r}: device type {device_type}")
        if offset < 0 or any(s < 0 for s in sizes) or any(s < 0 for s in strides):
            raise ArtifactError(f"FQN manifest entry {fqn!r} has negative offset/sizes/strides")
        e = FqnWeightEntry(
            fqn=fqn,
            storage_key=storage_key,
            storage_nbytes=int(nbytes),
            dtype=dtype_from_scalar_type(dtype_code, f"FQN manifest entry {fqn!r}"),
            device_type=int(device_type),
            storage_offset=int(offset),
            sizes=tuple(int(s) for s in sizes),
            strides=tuple(int(s) for s in strides),
        )
        if e.required_nbytes() > e.storage_nbytes:
            raise ArtifactError(
                f"FQN manifest entry {fqn!r}: view needs {e.required_nbytes()} bytes of a "
                f"{e.storage_nbytes}-byte storage"
            )
        entries.append(e)
    if r.pos != len(data):
        raise ArtifactError(f"FQN manifest has {len(data) - r.pos} trailing bytes")
    return so_key, tuple(entries)
