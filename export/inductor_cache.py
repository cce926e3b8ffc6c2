"""A private Inductor cache per CUDA lowering, so exports running side by side do not share one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def private_inductor_cache() -> Iterator[None]:
    """A fresh Inductor cache for each CUDA lowering; the previous setting is restored afterwards.

    Exports running side by side on one shared cache rewrite each other's kernel objects mid-link
    (objcopy fails on the GPU box); a private cache costs only the reuse. It is taken even when
    TORCHINDUCTOR_CACHE_DIR is set: torch itself sets that variable to its shared default the first time
    anything asks for the cache, so a set value says nothing of the user's wish.
    """
    prev = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    d = tempfile.mkdtemp(prefix="etspec-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = d
    try:
        yield
    finally:
        if prev is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = prev
        shutil.rmtree(d, ignore_errors=True)
