"""Check shared-object bytes before they are written to disk and dlopen'ed.

A truncated or foreign .so would otherwise be mapped past its end and fault on first touch, ending
the process instead of raising.
"""

from __future__ import annotations

import platform
import struct

from .errors import ArtifactError

_MACHINES = {"x86_64": 62, "amd64": 62, "aarch64": 183, "arm64": 183}


def validate_shared_object(data: bytes | memoryview, what: str = "shared object") -> None:
    """Reject bytes that are not a complete ELF64 shared object for this machine.

    Checks the ELF identification, type and machine, and that the program headers, every
    loadable segment and the section header table lie inside the data (a truncated .so would
    otherwise be mapped past its end and fault on first touch).
    """
    n = len(data)
    head = bytes(data[:64])
    if n < 64 or head[:4] != b"\x7fELF":
        raise ArtifactError(f"{what}: not an ELF shared object ({n} bytes, starts with {head[:4]!r})")
    if head[4] != 2 or head[5] != 1:
        raise ArtifactError(
            f"{what}: only little-endian ELF64 is supported (class {head[4]}, data {head[5]})"
        )
    e_type, e_machine = struct.unpack_from("<HH", head, 16)
    if e_type != 3:
        raise ArtifactError(f"{what}: ELF type {e_type} is not a shared object (ET_DYN)")
    want = _MACHINES.get(platform.machine().lower())
    if want is not None and e_machine != want:
        raise ArtifactError(f"{what}: built for ELF machine {e_machine}, this host is {platform.machine()}")
    (e_phoff, e_shoff) = struct.unpack_from("<QQ", head, 32)
    (e_phentsize, e_phnum, e_shentsize, e_shnum) = struct.unpack_from("<HHHH", head, 54)
    if e_phnum == 0 or e_phentsize < 56 or e_phoff + e_phnum * e_phentsize > n:
        raise ArtifactError(f"{what}: truncated or corrupt (program headers outside the {n}-byte file)")
    phdrs = bytes(data[e_phoff : e_phoff + e_phnum * e_phentsize])
    has_load = has_dynamic = False
    for i in range(e_phnum):
        p_type, _flags, p_offset = struct.unpack_from("<IIQ", phdrs, i * e_phentsize)
        (p_filesz,) = struct.unpack_from("<Q", phdrs, i * e_phentsize + 32)
        if p_type in (1, 2):  # PT_LOAD, PT_DYNAMIC
            if p_offset + p_filesz > n:
                raise ArtifactError(
                    f"{what}: truncated: segment {i} needs bytes up to {p_offset + p_filesz}, "
                    f"the data has {n}"
                )
            has_load |= p_type == 1
            has_dynamic |= p_type == 2
    if not (has_load and has_dynamic):
        raise ArtifactError(f"{what}: no loadable/dynamic segment; not a usable shared object")
    if e_shoff and e_shoff + e_shnum * e_shentsize > n:
        raise ArtifactError(f"{what}: truncated: section headers end past the {n}-byte data")
