"""write_sparse keeps a file's bytes and leaves exactly its aligned all-zero chunks as holes."""

from __future__ import annotations

import os

import pytest
from executorch.exir._serialize._cord import Cord

from etspec.export.sparse_file import disk_bytes, write_sparse

C = 1 << 16


def _cord(parts: list[tuple[str, int]]) -> tuple[Cord, bytes]:
    """A Cord whose pieces do not line up with the chunks (the writer must split and join them)."""
    pieces = [os.urandom(n) if kind == "r" else bytes(n) for kind, n in parts]
    cord = Cord()
    for p in pieces:
        cord.append(p)
    return cord, b"".join(pieces)


def test_zero_chunks_become_holes_and_bytes_stay(tmp_path):
    # random head; a zero run starting mid-chunk (its partial chunk is written) and spanning 5 whole
    # chunks over two Cord pieces; random; a zero run to the end with a partial tail chunk
    parts = [("r", C + 100), ("z", 3 * C - 100), ("z", 3 * C), ("r", 3 * C + 7), ("z", 3 * C - 7 + 1234)]
    cord, data = _cord(parts)
    path = tmp_path / "blob.ptd"
    write_sparse(path, cord, chunk=C)
    assert path.stat().st_size == len(data)
    assert path.read_bytes() == data
    holes = sum(data[i : i + C] == bytes(C) for i in range(0, len(data) - C + 1, C))
    assert holes == 7
    dense = tmp_path / "dense.ptd"
    dense.write_bytes(data)
    os.sync()
    if disk_bytes(dense) < len(data):
        pytest.skip("this filesystem already stores zeros sparsely")
    assert disk_bytes(path) <= len(data) - 7 * C + C  # one chunk of slack for filesystem metadata


def test_file_ending_in_a_hole_keeps_its_size(tmp_path):
    cord, data = _cord([("r", 5), ("z", 4 * C - 5)])
    path = tmp_path / "tail.ptd"
    write_sparse(path, cord, chunk=C)
    assert path.read_bytes() == data
