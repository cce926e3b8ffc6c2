"""Where an AOTInductor delegate's shared object and constants live, by ExecuTorch version.

Three layouts (:class:`BlobLayout`), told apart by the delegate's processed bytes:

- ``METHOD_KEYS`` (ExecuTorch 1.2.x): processed bytes empty; ``<method>_so_blob`` in the .pte,
  ``<method>_weights_blob`` (one dense AOTI constants blob) in ``aoti_cuda_blob.ptd``; ``<method>``
  is the ``method_name`` compile spec.
- ``HASHED_KEYS`` (ExecuTorch 1.4.x): processed bytes are ``"<sha256>_so_blob\\n<sha256>_weights_blob"``
  naming the same two entries.
- ``FQN_MANIFEST`` (ExecuTorch 1.5.x): processed bytes are a binary manifest (magic ``ETCUDAFQN3``)
  with the shared-object key and one entry per constant FQN (storage key, storage bytes, dtype,
  device, storage offset, sizes, strides); each storage is its own named entry in the .ptd.

Anything else raises :class:`UnsupportedLayoutError` naming what was found. Only the keys are worked
out here; :meth:`.pte_reader.PteProgram.aoti_payload` checks that the named data holds them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import Enum

import torch

from .errors import ArtifactError, UnsupportedLayoutError
from .method_info import DelegateInfo
from .scalar_types import dtype_from_scalar_type

# Backend ids whose delegates are AOTInductor shared objects (the ExecuTorch CUDA backend).
AOTI_BACKEND_IDS: frozenset[str] = frozenset({"CudaBackend"})

_FQN_MAGIC_PREFIX = b"ETCUDAFQN"
_FQN_MAGIC_V3 = b"ETCUDAFQN3"
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


class BlobLayout(str, Enum):
    METHOD_KEYS = "method_keys"  # ExecuTorch 1.2.x: <method>_so_blob / <method>_weights_blob
    HASHED_KEYS = "hashed_keys"  # ExecuTorch 1.4.x: sha256-keyed, keys in processed bytes
    FQN_MANIFEST = "fqn_manifest"  # ExecuTorch 1.5.x: ETCUDAFQN3 manifest, one entry per FQN


@dataclass(frozen=True)
class AotiPayload:
    """Where one AOTI delegate's shared object and constants live."""

    layout: BlobLayout
    so_key: str
    weights_key: str | None = None  # dense AOTI constants blob (METHOD_KEYS / HASHED_KEYS)
    entries: tuple[FqnWeightEntry, ...] = field(default_factory=tuple)  # FQN_MANIFEST

    @property
    def library_key(self) -> str:
        """A key unique to this shared object (for library-local constants such as _tensor_constant0)."""
        return self.so_key


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
    if not data.startswith(_FQN_MAGIC_V3):
        raise UnsupportedLayoutError(f"not an ETCUDAFQN3 manifest (starts with {data[:12]!r})")
    r = _Reader(data)
    r.take(len(_FQN_MAGIC_V3))
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


def parse_aoti_payload(delegate: DelegateInfo, method_name: str) -> AotiPayload:
    """Work out which named-data keys one AOTI delegate uses (no lookup of the keys yet)."""
    processed = delegate.processed
    where = f"method {method_name!r} delegate {delegate.index} ({delegate.backend_id})"
    if processed.startswith(_FQN_MAGIC_PREFIX):
        if not processed.startswith(_FQN_MAGIC_V3):
            raise UnsupportedLayoutError(
                f"{where}: FQN weight manifest version {processed[: len(_FQN_MAGIC_V3)]!r} is not "
                f"supported (this runtime reads {_FQN_MAGIC_V3!r}, ExecuTorch 1.5)"
            )
        try:
            so_key, entries = parse_fqn_manifest(processed)
        except ArtifactError as e:
            raise type(e)(f"{where}: {e}") from e
        return AotiPayload(BlobLayout.FQN_MANIFEST, so_key, None, entries)
    if not processed:
        spec = delegate.spec("method_name")
        m = spec.decode("utf-8", "replace") if spec else ""
        prefix = f"{m}_" if m else ""
        return AotiPayload(BlobLayout.METHOD_KEYS, f"{prefix}so_blob", f"{prefix}weights_blob")
    try:
        text = processed.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if (
            1 <= len(lines) <= 2
            and lines[0].endswith("_so_blob")
            and (len(lines) == 1 or lines[1].endswith("_weights_blob"))
        ):
            return AotiPayload(BlobLayout.HASHED_KEYS, lines[0], lines[1] if len(lines) == 2 else None)
    raise UnsupportedLayoutError(
        f"{where}: unrecognised AOTI delegate payload ({len(processed)} bytes, starts with "
        f"{processed[:24]!r}); known layouts: empty (ExecuTorch 1.2 <method>_so_blob keys), "
        "'<sha>_so_blob\\n<sha>_weights_blob' (1.4), ETCUDAFQN3 manifest (1.5)"
    )
