"""Constants of ExecuTorch 1.2 / 1.4 programs: one dense AOTI weights blob per delegate.

Those layouts (``METHOD_KEYS`` / ``HASHED_KEYS`` of :class:`.aoti_payload.BlobLayout`) store each
delegate's constants back to back, without their shapes. Each constant's bytes are located from the
.so's own constant table (``GetConstantDataSize`` in order); its shape comes from ``constant_meta``
(FQN -> :class:`ConstantMeta`, e.g. from the export manifest) or, when the .so exports
``ExtractConstantsMapEntries`` (torch >= 2.13), from a short-lived probe container that loads the blob
once. Without either, ``allow_private`` lets each container load its own copy (refused when a mutable
buffer is used by two methods). Once located, the constants are shared like ExecuTorch 1.5's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .aoti_container import AotiContainer
from .aoti_payload import AotiPayload
from .byte_tensors import typed_view, upload_bytes
from .errors import ArtifactError, ConstantBindingError
from .named_data import NamedData
from .shared_constants import SharedConstants

__all__ = ["ConstantMeta", "load_dense_constants"]

#: Constant identity -> the (container key, constant kind) of every container that uses it.
Users = Mapping[str, list[tuple[tuple[str, int], str]]]


@dataclass(frozen=True)
class ConstantMeta:
    """Shape/stride description of one constant, for dense blobs whose .so cannot describe it."""

    dtype: torch.dtype
    sizes: tuple[int, ...]
    strides: tuple[int, ...]
    storage_offset: int = 0

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> ConstantMeta:
        return cls(t.dtype, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()))

    def required_nbytes(self) -> int:
        if any(s == 0 for s in self.sizes):
            return 0
        last = self.storage_offset + sum((s - 1) * st for s, st in zip(self.sizes, self.strides))
        return (last + 1) * self.dtype.itemsize


def _dense_blob(named_data: NamedData, c: AotiContainer, payload: AotiPayload) -> Any:
    if payload.weights_key is None:
        if c.blob_nbytes() == 0:
            return b""
        raise ArtifactError(f"[{c.name}] the delegate names no weights blob but the model has constants")
    blob = named_data.get(payload.weights_key)
    need = c.blob_nbytes()
    if len(blob) < need:
        raise ArtifactError(
            f"[{c.name}] weights blob {payload.weights_key!r} has {len(blob)} bytes, the model's "
            f"constants need {need} (truncated .ptd?)"
        )
    return blob


def load_dense_constants(
    c: AotiContainer,
    payload: AotiPayload,
    named_data: NamedData,
    shared: SharedConstants,
    users: Users,
    meta: Mapping[str, ConstantMeta],
    *,
    allow_private: bool,
    tmp_dir: str | None,
) -> dict[str, torch.Tensor] | None:
    """Load one container's constants from its dense blob into ``shared``.

    Returns internal name -> shared tensor, for the caller to bind; None when there is nothing to
    bind (no constants, or the container loaded its own private copy).
    """
    where = f"[{c.name}]"
    consts = [ci for ci in c.constants() if not ci.from_folded]
    if not consts:
        return None
    blob = _dense_blob(named_data, c, payload)
    layout = c.blob_layout()
    idents = {ci.name: shared.identity(payload, ci) for ci in consts}
    todo = [ci for ci in consts if idents[ci.name] not in shared]
    no_meta = [ci for ci in todo if (ci.fqn or ci.name) not in meta]
    if no_meta and not c.has("AOTInductorModelContainerExtractConstantsMapEntries"):
        if not allow_private:
            raise ConstantBindingError(
                f"{where} cannot share constants {[ci.fqn or ci.name for ci in no_meta][:6]} across "
                "methods: the dense weights blob does not describe their shapes and this .so has no "
                "AOTInductorModelContainerExtractConstantsMapEntries (torch < 2.13). Pass constant_meta "
                "(FQN -> shape/stride/dtype, e.g. from the export manifest), or "
                "allow_private_constants=True to give each method its own copy."
            )
        shared_buffers = [
            idents[ci.name]
            for ci in consts
            if len(users.get(idents[ci.name], [])) > 1 and ci.kind in ("buffer", "unknown")
        ]
        if shared_buffers:
            raise ConstantBindingError(
                f"{where} mutable buffers {shared_buffers} are used by several methods and must be "
                "shared, which needs constant_meta or a torch >= 2.13 .so"
            )
        c.load_constants_from_blob(blob)
        return None
    extracted: dict[str, torch.Tensor] = {}
    probe: AotiContainer | None = None
    try:
        if no_meta:
            # Load the blob once into a short-lived container to learn the constants' exact layout.
            probe = AotiContainer(
                named_data.get(payload.so_key),
                device=c.device,
                name=f"{c.name} (probe)",
                tmp_dir=tmp_dir,
            )
            probe.load_constants_from_blob(blob)
            extracted = probe.extract_constants()
        bind: dict[str, torch.Tensor] = {}
        for ci in consts:
            ident = idents[ci.name]
            fqn = ci.fqn or ci.name
            m = meta.get(fqn)
            src = extracted.get(fqn)
            if m is None and src is None and ident not in shared:
                raise ConstantBindingError(
                    f"{where} constant {fqn!r}: no shape known (not extracted, no meta)"
                )
            if m is not None:
                dtype, sizes, strides, offset = m.dtype, m.sizes, m.strides, m.storage_offset
            elif src is not None:
                dtype, sizes, strides = src.dtype, tuple(src.shape), tuple(src.stride())
                offset = src.storage_offset()
            else:
                t = shared[ident]
                dtype, sizes, strides = t.dtype, tuple(t.shape), tuple(t.stride())
                offset = t.storage_offset()
            if ci.dtype is not None and dtype != ci.dtype:
                raise ConstantBindingError(
                    f"{where} constant {fqn!r}: meta dtype {dtype}, .so dtype {ci.dtype}"
                )
            t = shared.existing(where, ident, dtype, sizes, strides)
            if t is None:
                if src is not None:
                    storage = src.untyped_storage()
                    raw = torch.empty(0, dtype=torch.uint8, device=src.device).set_(storage)
                    owned = raw.clone()
                else:
                    off, size = layout[ci.name]
                    cm = ConstantMeta(dtype, tuple(sizes), tuple(strides), int(offset))
                    need = cm.required_nbytes()
                    if need > size:
                        raise ConstantBindingError(
                            f"{where} constant {fqn!r}: meta needs {need} bytes, the blob holds {size}"
                        )
                    owned = upload_bytes(blob[off : off + size], c.device)
                t = typed_view(owned, dtype, sizes, strides, offset)
                shared.add(ident, t)
            bind[ci.name] = t
    finally:
        extracted.clear()
        if probe is not None:
            probe.close()
    return bind
