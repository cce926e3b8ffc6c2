"""The files of an artifact directory and the records that let a reader check them before loading.

``etspec-export`` writes these names and a :func:`file_record` of each program file into the
manifest; the runtime compares the files against those records before any native loader sees them.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

#: The ExecuTorch program (every method, and the AOTI shared objects on CUDA).
PTE_NAME = "model.pte"
#: The manifest beside the program (a copy is also embedded in it, see ``MANIFEST_METHOD``).
MANIFEST_NAME = "manifest.json"
#: The CUDA weights: the AOTI CUDA backend's external tag + ".ptd".
CUDA_DATA_NAME = "aoti_cuda_blob.ptd"


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of one file's bytes (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """The `files` entry of one artifact file: its size (checked at every load) and its sha256 (checked
    on request: it reads the whole file, about 1 s per GiB)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}
