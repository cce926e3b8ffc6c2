"""Read an ExecuTorch program (.pte) and its external data (.ptd) for the AOTI executor.

Parsing is done by ExecuTorch's own deserializers (``deserialize_pte_binary`` for the program, the
flat-tensor reader for ``.ptd`` files); :func:`read_program` validates what they return and gives a
:class:`PteProgram`: the methods as plain descriptions (:mod:`.method_info`, :mod:`.execution_plan`),
the named data of every file (:mod:`.named_data`), and, per AOTI delegate, where its shared object and
weights live (:mod:`.aoti_payload`), checked against the named data. All sizes and offsets are checked
before any shared object is written to disk or loaded.
"""

from __future__ import annotations

import glob
import os
import struct
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from etspec.artifact import PTE_NAME

from .aoti_payload import AOTI_BACKEND_IDS, AotiPayload, BlobLayout, parse_aoti_payload
from .errors import ArtifactError, MissingBlobError, UnsupportedLayoutError
from .execution_plan import convert_plan
from .method_info import MethodInfo
from .named_data import NamedData

__all__ = ["PteProgram", "check_pte_header", "read_program"]


def check_pte_header(path: str, data: bytes) -> None:
    """Refuse bytes that are not a whole ExecuTorch program before a deserializer sees them."""
    if len(data) < 16:
        raise ArtifactError(f"{path}: {len(data)} bytes is too short for an ExecuTorch program")
    if data[4:6] != b"ET":
        raise ArtifactError(f"{path}: not an ExecuTorch program (file identifier {data[4:8]!r})")
    if data[8:12] == b"eh00":
        if len(data) < 32:
            raise ArtifactError(f"{path}: truncated inside the extended header ({len(data)} bytes)")
        _hlen, program_size, seg_base = struct.unpack_from("<IQQ", data, 12)
        if program_size > len(data) or seg_base > len(data):
            raise ArtifactError(
                f"{path}: truncated: header says program {program_size} B, segments at {seg_base}, "
                f"file has {len(data)} B"
            )


class PteProgram:
    """A parsed .pte plus its named data. Use :func:`read_program` to build one."""

    def __init__(
        self, path: str, methods: dict[str, MethodInfo], named_data: NamedData, data_paths: Sequence[str]
    ) -> None:
        self.path = path
        self.methods = methods
        self.named_data = named_data
        self.data_paths = tuple(data_paths)

    # -- methods ---------------------------------------------------------------------------
    @property
    def method_names(self) -> list[str]:
        return list(self.methods)

    def method(self, name: str) -> MethodInfo:
        try:
            return self.methods[name]
        except KeyError:
            raise KeyError(f"{self.path}: no method {name!r}; methods: {sorted(self.methods)}") from None

    @property
    def constant_methods(self) -> dict[str, Any]:
        """Values of the constant methods (ints/floats/bools/strings) by name."""
        out = {}
        for name, m in self.methods.items():
            if m.is_constant_method:
                try:
                    out[name] = m.constant_value
                except UnsupportedLayoutError:
                    continue
        return out

    def executable_methods(self) -> list[str]:
        return [n for n, m in self.methods.items() if not m.is_constant_method]

    # -- AOTI payloads ---------------------------------------------------------------------
    def aoti_payload(
        self, method: str, delegate_index: int, backend_ids: Iterable[str] = AOTI_BACKEND_IDS
    ) -> AotiPayload:
        """Resolve and validate where a delegate's .so and constants live (raises if missing)."""
        m = self.method(method)
        if not 0 <= delegate_index < len(m.delegates):
            raise ArtifactError(f"method {method!r} has no delegate {delegate_index}")
        d = m.delegates[delegate_index]
        if d.backend_id not in set(backend_ids):
            raise UnsupportedLayoutError(
                f"method {method!r} delegate {delegate_index} is for backend {d.backend_id!r}; "
                f"this executor runs {sorted(backend_ids)}"
            )
        p = parse_aoti_payload(d, method)
        nd = self.named_data
        where = f"method {method!r} delegate {delegate_index} ({p.layout.value} layout)"
        if p.so_key not in nd:
            raise MissingBlobError(f"{where}: " + nd.missing_message(p.so_key, "shared object"))
        if p.layout is BlobLayout.FQN_MANIFEST:
            for e in p.entries:
                if e.storage_key not in nd:
                    raise MissingBlobError(
                        f"{where}: " + nd.missing_message(e.storage_key, f"weight storage of {e.fqn!r}")
                    )
                have = nd.nbytes(e.storage_key)
                if have != e.storage_nbytes:
                    raise ArtifactError(
                        f"{where}: weight storage {e.storage_key!r} has {have} bytes, the manifest "
                        f"says {e.storage_nbytes}"
                    )
        elif p.weights_key is not None and p.weights_key not in nd:
            raise MissingBlobError(f"{where}: " + nd.missing_message(p.weights_key, "weights blob"))
        return p

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        self.named_data.close()

    def __enter__(self) -> PteProgram:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PteProgram({self.path!r}, methods={self.method_names}, data={list(self.data_paths)})"


def read_program(
    pte_path: str | os.PathLike,
    data_paths: Sequence[str | os.PathLike] | None = None,
) -> PteProgram:
    """Parse ``pte_path`` (a .pte, or an export directory holding model.pte) and its data files.

    ``data_paths=None`` loads every ``*.ptd`` next to the .pte (the export directory layout);
    pass an explicit list (possibly empty) to choose.
    """
    pte_path = os.fspath(pte_path)
    if os.path.isdir(pte_path):
        cands = [os.path.join(pte_path, PTE_NAME)]
        if not os.path.exists(cands[0]):
            cands = sorted(glob.glob(os.path.join(pte_path, "*.pte")))
        if len(cands) != 1:
            raise ArtifactError(f"{pte_path}: expected model.pte or a single .pte, found {cands}")
        pte_path = cands[0]
    if data_paths is None:
        data_paths = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(pte_path)), "*.ptd")))
    data_paths = [os.fspath(p) for p in data_paths]
    try:
        with open(pte_path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ArtifactError(f"cannot read {pte_path}: {e}") from e
    check_pte_header(pte_path, data)
    try:
        from executorch.exir._serialize._program import deserialize_pte_binary
    except ImportError as e:  # pragma: no cover
        raise ArtifactError(f"cannot parse {pte_path}: executorch is not importable ({e})") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pte = deserialize_pte_binary(data)
    except Exception as e:
        raise ArtifactError(
            f"{pte_path}: cannot parse the ExecuTorch program ({type(e).__name__}: {e})"
        ) from e
    del data
    methods: dict[str, MethodInfo] = {}
    try:
        for plan in pte.program.execution_plan:
            mi = convert_plan(pte.program, plan)
            if mi.name in methods:
                raise ArtifactError(f"{pte_path}: method {mi.name!r} appears twice")
            methods[mi.name] = mi
    except (ArtifactError, UnsupportedLayoutError):
        raise
    except Exception as e:
        raise ArtifactError(f"{pte_path}: malformed execution plan ({type(e).__name__}: {e})") from e
    nd = NamedData()
    try:
        nd.add_pte_named_data(pte_path, pte.named_data)
        for p in data_paths:
            nd.add_ptd(p)
    except BaseException:
        nd.close()
        raise
    return PteProgram(pte_path, methods, nd, data_paths)
