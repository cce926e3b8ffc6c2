"""torch 2.11: AOTInductor links byte-identical Triton kernel binaries of one graph twice.

torch 2.11 turns a kernel's binary into ``<binary>.o`` and renames its symbols to the kernel's name.
Two kernels of one graph whose binaries are byte-identical (one Triton function launched with
specialisation hints that do not change its code, e.g. etspec::linear_rows on differently divisible
widths) share one binary path, so the second conversion overwrites the first's object, which is then
linked twice: "multiple definition of `___linear_rows_kernel_7_end'". :func:`one_object_per_kernel`
converts a per-kernel copy of the binary, which keeps the objects apart (docs/runtime-notes.md).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def one_object_per_kernel() -> Iterator[None]:
    """Give each embedded Triton kernel its own object file while AOTInductor links a method.

    A torch without ``codecache.convert_cubin_to_obj`` embeds kernels another way; then nothing changes.
    """
    import torch._inductor.codecache as codecache

    orig = getattr(codecache, "convert_cubin_to_obj", None)
    if orig is None:
        yield
        return

    def per_kernel(cubin_file: str, kernel_name: str, *args: Any, **kwargs: Any) -> str:
        base, ext = os.path.splitext(cubin_file)
        own = f"{base}_{kernel_name}{ext}"
        shutil.copyfile(cubin_file, own)
        return orig(own, kernel_name, *args, **kwargs)

    codecache.convert_cubin_to_obj = per_kernel
    try:
        yield
    finally:
        codecache.convert_cubin_to_obj = orig
