"""The named data of a .pte and its .ptd files, merged into one key -> bytes view.

.pte entries come from the deserialized program; .ptd (FlatTensor) files are indexed with ExecuTorch's
own header and flatbuffer reader and memory-mapped, never copied whole. Every offset and size is
checked against the file before a view is handed out.
"""

from __future__ import annotations

import mmap
import os
from typing import Any

from .errors import ArtifactError, MissingBlobError, UnsupportedLayoutError


class _MappedFile:
    def __init__(self, path: str) -> None:
        self.path = path
        self._f = open(path, "rb")
        size = os.fstat(self._f.fileno()).st_size
        self.size = size
        # ACCESS_COPY gives a writable (private, copy-on-write) view: torch.frombuffer and ctypes
        # can then take pointers without copying; nothing ever writes to it.
        self._mm = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        self._view = memoryview(self._mm) if self._mm is not None else memoryview(b"")

    def slice(self, offset: int, size: int) -> memoryview:
        return self._view[offset : offset + size]

    def close(self) -> None:
        try:
            self._view.release()
        except BufferError:
            pass
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # Views handed out are still alive; the mapping goes when they do.
                pass
        self._f.close()


class NamedData:
    """Merged named data of a .pte and its .ptd files: key -> read-only bytes view."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[str, Any, int, int]] = {}  # key -> (source, buf, off, size)
        self._files: list[_MappedFile] = []
        self.sources: list[str] = []

    # -- building --------------------------------------------------------------------------
    def _add(self, key: str, source: str, buf: Any, off: int, size: int) -> None:
        if key in self._entries:
            prev = self._entries[key]
            if prev[3] != size or bytes(self._view(prev)) != bytes(self._view((source, buf, off, size))):
                raise ArtifactError(
                    f"named data key {key!r} appears in both {prev[0]} and {source} with different contents"
                )
            return
        self._entries[key] = (source, buf, off, size)

    def add_pte_named_data(self, source: str, named_data: Any) -> None:
        """Add the NamedDataStoreOutput restored by deserialize_pte_binary."""
        self.sources.append(source)
        if named_data is None:
            return
        buffers = list(named_data.buffers)
        for key, entry in dict(named_data.pte_data).items():
            idx = int(entry.buffer_index)
            if not 0 <= idx < len(buffers):
                raise ArtifactError(f"{source}: named data {key!r} refers to missing buffer {idx}")
            data = bytes(buffers[idx])
            self._add(key, source, data, 0, len(data))
        for tag, entries in dict(getattr(named_data, "external_data", {}) or {}).items():
            for key, entry in dict(entries).items():
                idx = int(entry.buffer_index)
                if not 0 <= idx < len(buffers):
                    raise ArtifactError(f"{source}: named data {key!r} ({tag}) refers to missing buffer")
                data = bytes(buffers[idx])
                self._add(key, source, data, 0, len(data))

    def add_ptd(self, path: str) -> None:
        """Add every named entry of a .ptd (FlatTensor) file, memory-mapped."""
        keys = _read_ptd_index(path)
        mf = _MappedFile(path)
        self._files.append(mf)
        self.sources.append(path)
        for key, (off, size) in keys.items():
            if off + size > mf.size:
                raise ArtifactError(f"{path}: entry {key!r} [{off}, {off + size}) is past the end of file")
            self._add(key, path, mf, off, size)

    # -- access ----------------------------------------------------------------------------
    @staticmethod
    def _view(entry: tuple[str, Any, int, int]) -> memoryview:
        _, buf, off, size = entry
        if isinstance(buf, _MappedFile):
            return buf.slice(off, size)
        return memoryview(buf)[off : off + size]

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def nbytes(self, key: str) -> int:
        return self._entry(key)[3]

    def source(self, key: str) -> str:
        return self._entry(key)[0]

    def get(self, key: str) -> memoryview:
        """A zero-copy view of the entry (backed by the .pte bytes or the .ptd mapping)."""
        return self._view(self._entry(key))

    def _entry(self, key: str) -> tuple[str, Any, int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise MissingBlobError(self.missing_message(key)) from None

    def missing_message(self, key: str, what: str = "named data entry") -> str:
        keys = sorted(self._entries)
        shown = ", ".join(repr(k) for k in keys[:8])
        if len(keys) > 8:
            shown += f", ... ({len(keys)} in all)"
        return (
            f"{what} {key!r} not found in {self.sources or ['(no files)']}; present: [{shown}]. "
            "If the weights live in an external aoti_cuda_blob.ptd, pass it (data_paths=...)."
        )

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files.clear()
        self._entries.clear()


def _read_ptd_index(path: str) -> dict[str, tuple[int, int]]:
    """Key -> (absolute offset, size) of a FlatTensor (.ptd) file, via ExecuTorch's reader."""
    try:
        from executorch.extension.flat_tensor.serialize import serialize as ft
    except ImportError as e:  # pragma: no cover - executorch is a dependency
        raise ArtifactError(f"cannot read {path}: executorch flat_tensor serializer missing ({e})") from e
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(min(size, 4096))
    try:
        header = ft.FlatTensorHeader.from_bytes(head[8:])
    except ValueError as e:
        raise ArtifactError(f"{path}: not a FlatTensor (.ptd) file: {e}") from e
    if not header.is_valid():
        raise ArtifactError(f"{path}: not a FlatTensor (.ptd) file (bad header magic {head[8:12]!r})")
    fb_end = header.flatbuffer_offset + header.flatbuffer_size
    if header.flatbuffer_size <= 0 or fb_end > size:
        raise ArtifactError(
            f"{path}: truncated or corrupt: flatbuffer [{header.flatbuffer_offset}, {fb_end}) "
            f"but the file has {size} bytes"
        )
    if header.segment_base_offset and header.segment_base_offset + header.segment_data_size > size:
        raise ArtifactError(
            f"{path}: truncated: segment data ends at "
            f"{header.segment_base_offset + header.segment_data_size} but the file has {size} bytes"
        )
    with open(path, "rb") as f:
        fb = f.read(fb_end)
    try:
        flat = ft._deserialize_to_flat_tensor(fb)
    except Exception as e:
        raise ArtifactError(f"{path}: cannot parse the FlatTensor flatbuffer: {e}") from e
    max_version = getattr(ft, "_FLAT_TENSOR_VERSION", 0)
    if int(flat.version) > max_version:
        raise UnsupportedLayoutError(
            f"{path}: FlatTensor version {flat.version} is newer than this reader ({max_version})"
        )
    segments = list(flat.segments)
    out: dict[str, tuple[int, int]] = {}
    for nd in flat.named_data:
        si = int(nd.segment_index)
        if not 0 <= si < len(segments):
            raise ArtifactError(f"{path}: entry {nd.key!r} refers to segment {si} of {len(segments)}")
        seg = segments[si]
        off = header.segment_base_offset + int(seg.offset)
        n = int(seg.size)
        if int(seg.offset) < 0 or n < 0 or off + n > size:
            raise ArtifactError(
                f"{path}: truncated or corrupt: entry {nd.key!r} [{off}, {off + n}) past {size} bytes"
            )
        out[nd.key] = (off, n)
    return out
