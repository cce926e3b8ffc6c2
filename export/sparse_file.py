"""Write a data file with holes where it holds whole chunks of zeros.

ExecuTorch 1.2.0's CUDA backend stores every mutable buffer in ``aoti_cuda_blob.ptd``, and the KV
caches start as zeros: at max_seq_len 64K that is 8 GiB of zeros in the 8B target's 25 GiB file (16
GiB at 128K). Skipping them with a seek keeps the format (a reader sees the same bytes, and reads
holes without touching the disk) while the file takes only the disk its weights need, also while it
is being written.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, BinaryIO

CHUNK = 1 << 20  # holes cover whole, aligned MiB: a multiple of any filesystem block


class SparseWriter:
    """A ``write``-only sink over a binary file: aligned all-zero chunks are seeked over."""

    def __init__(self, f: BinaryIO, chunk: int = CHUNK):
        self.f, self.chunk, self.pos, self._zero = f, chunk, 0, bytes(chunk)

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        i = 0
        while i < len(mv):
            end = min(len(mv), i + self.chunk - self.pos % self.chunk)
            piece = mv[i:end]
            # the last byte rules out almost every weight chunk before the copy + memcmp (a view
            # compares per byte)
            if len(piece) == self.chunk and piece[-1] == 0 and piece.tobytes() == self._zero:
                self.f.seek(self.chunk, os.SEEK_CUR)
            else:
                self.f.write(piece)
            self.pos += len(piece)
            i = end
        return len(mv)

    def finish(self) -> None:
        """Fix the size (a file that ends in a hole has not been extended by a write)."""
        self.f.truncate(self.pos)


def write_sparse(path: str | os.PathLike[str], cord: Any, chunk: int = CHUNK) -> None:
    """Write an ExecuTorch ``Cord`` (anything with ``write_to_file(sink)``) to ``path``, sparse."""
    with open(path, "wb") as f:
        w = SparseWriter(f, chunk)
        cord.write_to_file(w)
        w.finish()


def disk_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes the file occupies on disk (holes excluded)."""
    return Path(path).stat().st_blocks * 512
