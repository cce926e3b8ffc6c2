"""Read an ExecuTorch program (.pte) and its external data (.ptd) for the AOTI executor.

Parsing is done by ExecuTorch's own deserializers (``deserialize_pte_binary`` for the program,
the flat-tensor header and flatbuffer reader for ``.ptd`` files); this module only validates what
they return and turns it into plain, immutable descriptions:

* per method: the execution plan's user inputs/outputs (EValue indices with dtype/sizes/dynamism),
  the instruction list (``DelegateCall`` argument lists in the delegate's own order), and each
  delegate's backend id, compile specs and processed bytes;
* the named data of the .pte and every .ptd, merged into one key -> bytes view (.ptd payloads are
  memory-mapped, never copied whole);
* for AOTInductor delegates (``CudaBackend``), where the shared object and the weights live, in one
  of three layouts (:class:`BlobLayout`):

  - ``METHOD_KEYS`` (ExecuTorch 1.2.x): processed bytes empty; ``<method>_so_blob`` in the .pte,
    ``<method>_weights_blob`` (one dense AOTI constants blob) in ``aoti_cuda_blob.ptd``; ``<method>``
    is the ``method_name`` compile spec.
  - ``HASHED_KEYS`` (ExecuTorch 1.4.x): processed bytes are ``"<sha256>_so_blob\\n<sha256>_weights_blob"``
    naming the same two entries.
  - ``FQN_MANIFEST`` (ExecuTorch 1.5.x): processed bytes are a binary manifest (magic ``ETCUDAFQN3``)
    with the shared-object key and one entry per constant FQN (storage key, storage bytes, dtype,
    device, storage offset, sizes, strides); each storage is its own named entry in the .ptd.

Anything else raises :class:`UnsupportedLayoutError` naming what was found. All sizes and offsets
are checked here, before any shared object is written to disk or loaded.
"""

from __future__ import annotations

import glob
import mmap
import os
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from .errors import ArtifactError, MissingBlobError, UnsupportedLayoutError

__all__ = [
    "AOTI_BACKEND_IDS",
    "AotiPayload",
    "BlobLayout",
    "DelegateCall",
    "DelegateInfo",
    "FqnWeightEntry",
    "Instruction",
    "MethodInfo",
    "NamedData",
    "PteProgram",
    "TensorSpec",
    "dtype_from_scalar_type",
    "parse_aoti_payload",
    "parse_fqn_manifest",
    "read_program",
]

# Backend ids whose delegates are AOTInductor shared objects (the ExecuTorch CUDA backend).
AOTI_BACKEND_IDS: frozenset[str] = frozenset({"CudaBackend"})

# c10::ScalarType / executorch ScalarType codes (identical numbering; AOTI's aoti_torch_dtype_*()
# return the same values).
_SCALAR_TYPES: dict[int, torch.dtype] = {
    0: torch.uint8,
    1: torch.int8,
    2: torch.int16,
    3: torch.int32,
    4: torch.int64,
    5: torch.float16,
    6: torch.float32,
    7: torch.float64,
    9: torch.complex64,
    10: torch.complex128,
    11: torch.bool,
    15: torch.bfloat16,
    23: torch.float8_e5m2,
    24: torch.float8_e4m3fn,
    25: torch.float8_e5m2fnuz,
    26: torch.float8_e4m3fnuz,
    27: torch.uint16,
    28: torch.uint32,
    29: torch.uint64,
}
_DTYPE_TO_SCALAR_TYPE = {v: k for k, v in _SCALAR_TYPES.items()}

_FQN_MAGIC_PREFIX = b"ETCUDAFQN"
_FQN_MAGIC_V3 = b"ETCUDAFQN3"
_MAX_MANIFEST_ENTRIES = 1 << 20
_MAX_DIMS = 64


def dtype_from_scalar_type(code: int, what: str = "tensor") -> torch.dtype:
    """Map an ExecuTorch/c10 ScalarType code to a torch dtype (raises ArtifactError if unknown)."""
    try:
        return _SCALAR_TYPES[int(code)]
    except KeyError:
        raise ArtifactError(f"{what}: unsupported scalar type code {code}") from None


def scalar_type_from_dtype(dtype: torch.dtype) -> int:
    return _DTYPE_TO_SCALAR_TYPE[dtype]


# ----------------------------------------------------------------------------------------------
# Plain descriptions
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """A tensor EValue of an execution plan: what a method input/output must look like.

    ``sizes`` are exact for ``dynamism == "static"`` and upper bounds for ``"dynamic_bound"``
    (ExecuTorch stores the export-time maximum); ``"dynamic_unbound"`` only fixes the rank.
    """

    value_index: int
    dtype: torch.dtype
    sizes: tuple[int, ...]
    dynamism: str
    device_type: str = "cpu"

    def describe(self) -> str:
        bound = "" if self.dynamism == "static" else f" ({self.dynamism.replace('_', ' ')})"
        return f"{str(self.dtype).replace('torch.', '')}{list(self.sizes)}{bound}"

    def mismatch(self, t: Any) -> str | None:
        """Why ``t`` cannot be passed for this spec, or None if it can."""
        if not isinstance(t, torch.Tensor):
            return f"expected a tensor {self.describe()}, got {type(t).__name__}"
        if t.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {t.dtype}"
        if t.dim() != len(self.sizes):
            return f"expected {len(self.sizes)} dims {self.describe()}, got shape {list(t.shape)}"
        shape = tuple(t.shape)
        if self.dynamism == "static":
            if shape != self.sizes:
                return f"expected shape {list(self.sizes)}, got {list(shape)}"
        elif self.dynamism == "dynamic_bound":
            over = [i for i, (s, b) in enumerate(zip(shape, self.sizes)) if s > b]
            if over:
                return (
                    f"shape {list(shape)} exceeds the exported upper bound {list(self.sizes)} "
                    f"in dim(s) {over}"
                )
        return None


@dataclass(frozen=True)
class Instruction:
    """One instruction of a method's chain.

    kind is ``"delegate"`` (args = DelegateCall args, delegate's own order), ``"move"``
    (args = (from, to)), ``"free"`` (args = (value,)), ``"kernel"`` (args = KernelCall args,
    ``detail`` = operator name) or ``"jump_false"``.
    """

    kind: str
    index: int  # delegate index / operator index / destination instruction
    args: tuple[int, ...]
    detail: str = ""


@dataclass(frozen=True)
class DelegateCall:
    delegate_index: int
    args: tuple[int, ...]


@dataclass(frozen=True)
class DelegateInfo:
    """One backend delegate of an execution plan."""

    index: int
    backend_id: str
    compile_specs: tuple[tuple[str, bytes], ...]
    processed: bytes

    def spec(self, key: str) -> bytes | None:
        for k, v in self.compile_specs:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class MethodInfo:
    """One execution plan (method) of the program."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    values: Mapping[int, Any]  # TensorSpec, a python constant, or an UnsupportedValue
    instructions: tuple[Instruction, ...]
    delegates: tuple[DelegateInfo, ...]
    num_values: int

    @property
    def input_specs(self) -> list[Any]:
        return [self.values.get(i) for i in self.inputs]

    @property
    def output_specs(self) -> list[Any]:
        return [self.values.get(i) for i in self.outputs]

    @property
    def delegate_calls(self) -> list[DelegateCall]:
        return [DelegateCall(ins.index, ins.args) for ins in self.instructions if ins.kind == "delegate"]

    @property
    def is_constant_method(self) -> bool:
        """True for a method with no inputs and no instructions (ExecuTorch constant methods)."""
        return not self.inputs and not self.instructions

    @property
    def constant_value(self) -> Any:
        """The value(s) returned by a constant method (single value unwrapped)."""
        if not self.is_constant_method:
            raise ArtifactError(f"method {self.name!r} is not a constant method")
        vals = []
        for i in self.outputs:
            v = self.values.get(i)
            if isinstance(v, (TensorSpec, UnsupportedValue)):
                raise UnsupportedLayoutError(
                    f"constant method {self.name!r} returns value #{i} of a kind this runtime does "
                    f"not read ({v!r})"
                )
            vals.append(v)
        return vals[0] if len(vals) == 1 else tuple(vals)


@dataclass(frozen=True)
class UnsupportedValue:
    kind: str


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


# ----------------------------------------------------------------------------------------------
# Named data (.pte segments + memory-mapped .ptd files)
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# .pte parsing
# ----------------------------------------------------------------------------------------------


def _check_pte_header(path: str, data: bytes) -> None:
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


def _dynamism(v: Any) -> str:
    code = int(getattr(v, "value", v))
    return {0: "static", 1: "dynamic_bound", 2: "dynamic_unbound"}.get(code, f"dynamism_{code}")


def _convert_value(idx: int, ev: Any) -> Any:
    val = ev.val
    kind = type(val).__name__
    if kind == "Tensor":
        device = "cpu"
        eti = getattr(val, "extra_tensor_info", None)
        if eti is not None and int(getattr(getattr(eti, "device_type", 0), "value", 0) or 0) == 1:
            device = "cuda"
        return TensorSpec(
            value_index=idx,
            dtype=dtype_from_scalar_type(int(val.scalar_type), f"value #{idx}"),
            sizes=tuple(int(s) for s in val.sizes),
            dynamism=_dynamism(val.shape_dynamism),
            device_type=device,
        )
    if kind == "Int":
        return int(val.int_val)
    if kind == "Double":
        return float(val.double_val)
    if kind == "Bool":
        return bool(val.bool_val)
    if kind == "String":
        return str(val.string_val)
    if kind == "Null":
        return None
    if kind == "IntList":
        return UnsupportedValue("IntList")  # items are EValue indices; not needed here
    if kind in ("DoubleList", "BoolList"):
        items = getattr(val, "items", None)
        return tuple(items) if items is not None else UnsupportedValue(kind)
    return UnsupportedValue(kind)


def _convert_instruction(plan_name: str, ins: Any, operators: Sequence[Any]) -> Instruction:
    a = ins.instr_args
    kind = type(a).__name__
    if kind == "DelegateCall":
        return Instruction("delegate", int(a.delegate_index), tuple(int(x) for x in a.args))
    if kind == "MoveCall":
        return Instruction("move", 0, (int(a.move_from), int(a.move_to)))
    if kind == "FreeCall":
        return Instruction("free", 0, (int(a.value_index),))
    if kind == "KernelCall":
        op = operators[a.op_index] if 0 <= a.op_index < len(operators) else None
        name = f"{op.name}.{op.overload}" if op is not None else f"operator #{a.op_index}"
        return Instruction("kernel", int(a.op_index), tuple(int(x) for x in a.args), name)
    if kind == "JumpFalseCall":
        return Instruction("jump_false", int(a.destination_instruction), (int(a.cond_value_index),))
    raise UnsupportedLayoutError(f"method {plan_name!r}: unknown instruction type {kind}")


def _convert_plan(program: Any, plan: Any) -> MethodInfo:
    name = str(plan.name)
    values = {i: _convert_value(i, ev) for i, ev in enumerate(plan.values)}
    n = len(plan.values)
    for what, idxs in (("input", plan.inputs), ("output", plan.outputs)):
        for i in idxs:
            if not 0 <= int(i) < n:
                raise ArtifactError(f"method {name!r}: {what} refers to value #{i} of {n}")
    chains = list(plan.chains)
    if len(chains) > 1:
        raise UnsupportedLayoutError(f"method {name!r} has {len(chains)} chains; only one is supported")
    instructions = tuple(
        _convert_instruction(name, ins, plan.operators) for ch in chains for ins in ch.instructions
    )
    delegates = []
    inline = program.backend_delegate_data
    for di, d in enumerate(plan.delegates):
        loc = int(getattr(d.processed.location, "value", d.processed.location))
        if loc != 0:  # DataLocation.INLINE after deserialize_pte_binary restored the segments
            raise ArtifactError(f"method {name!r}: delegate {di} data was not restored (location {loc})")
        pi = int(d.processed.index)
        if not 0 <= pi < len(inline):
            raise ArtifactError(f"method {name!r}: delegate {di} refers to missing data #{pi}")
        specs = tuple((str(c.key), bytes(c.value)) for c in d.compile_specs)
        delegates.append(DelegateInfo(di, str(d.id), specs, bytes(inline[pi].data)))
    for ins in instructions:
        bad = [a for a in ins.args if not 0 <= a < n] if ins.kind != "jump_false" else []
        if bad:
            raise ArtifactError(f"method {name!r}: instruction refers to values {bad} of {n}")
        if ins.kind == "delegate" and not 0 <= ins.index < len(delegates):
            raise ArtifactError(f"method {name!r}: DelegateCall to delegate {ins.index} of {len(delegates)}")
    return MethodInfo(
        name=name,
        inputs=tuple(int(i) for i in plan.inputs),
        outputs=tuple(int(i) for i in plan.outputs),
        values=values,
        instructions=instructions,
        delegates=tuple(delegates),
        num_values=n,
    )


# ----------------------------------------------------------------------------------------------
# AOTI delegate payloads
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The program
# ----------------------------------------------------------------------------------------------


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
        cands = [os.path.join(pte_path, "model.pte")]
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
    _check_pte_header(pte_path, data)
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
            mi = _convert_plan(pte.program, plan)
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
