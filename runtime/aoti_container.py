"""One AOTInductor model container, loaded from shared-object bytes (the C API in :mod:`.aoti_abi`).

Safety rules enforced here, because a mistake past this point ends the process instead of raising:
the .so bytes are checked (:func:`.elf_validation.validate_shared_object`) before they are written to
a private ``mkstemp`` file and dlopen'ed; input/output counts are checked before ``Run`` (the
container's own count check sits outside its exception guard and aborts); a dense constants blob must
cover every constant before it is handed over. Every C return code is checked and raised as
:class:`AotiCallError` naming the method and the C function.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .aoti_abi import (
    C_FUNCTIONS,
    CONSTANT_KINDS,
    ConstantMapEntry,
    free_handles,
    handles_to_tensors,
    promote_torch_libraries,
    tensors_to_handles,
)
from .byte_tensors import as_uint8_tensor
from .elf_validation import validate_shared_object
from .errors import AotiCallError, ArtifactError, ConstantBindingError, MethodInputError
from .scalar_types import dtype_from_scalar_type

__all__ = ["AotiContainer", "ConstantInfo"]


@dataclass(frozen=True)
class ConstantInfo:
    """One constant of an AOTI model, as its .so describes it."""

    index: int
    name: str  # internal name (the key user-managed pairs use)
    fqn: str  # original fully qualified name (module path), "" if unknown
    dtype: torch.dtype | None
    data_size: int  # bytes in the dense blob (may include 64-byte alignment padding)
    from_folded: bool
    kind: str  # parameter / buffer / tensor_constant / folded / unknown


class _State:
    """Everything the finalizer needs (it must not reference the container object)."""

    def __init__(self) -> None:
        self.lib: ctypes.CDLL | None = None
        self.handle: ctypes.c_void_p | None = None
        self.so_path: str | None = None
        self.bound_handles: dict[str, int] = {}
        self.stale_handles: list[int] = []
        self.keepalive: list[Any] = []


def _release(state: _State) -> None:
    """Delete the container, free handles we own, remove the temp .so. Idempotent, never raises."""
    if state.handle is not None and state.lib is not None:
        try:
            state.lib.AOTInductorModelContainerDelete(state.handle)
        except Exception:  # pragma: no cover - best effort in teardown
            pass
    state.handle = None
    handles = list(state.bound_handles.values()) + state.stale_handles
    state.bound_handles.clear()
    state.stale_handles.clear()
    if handles:
        try:
            free_handles(handles)
        except Exception:  # pragma: no cover
            pass
    state.keepalive.clear()
    # The library stays mapped (dlclose is unsafe while tensors it allocated may live on);
    # the file itself is no longer needed once it is mapped.
    state.lib = None
    if state.so_path is not None:
        try:
            os.unlink(state.so_path)
        except FileNotFoundError:
            pass
        except OSError:  # pragma: no cover
            pass
        state.so_path = None


class AotiContainer:
    """One AOTInductorModelContainer created from ``.so`` bytes.

    ``device`` is ``"cpu"`` or ``"cuda"``/``"cuda:N"`` and must match what the .so was compiled
    for. ``name`` (normally the method name) appears in every error message.
    """

    def __init__(
        self,
        so_data: bytes | memoryview,
        *,
        device: str | torch.device = "cuda",
        name: str = "aoti",
        num_models: int = 1,
        tmp_dir: str | None = None,
        cubin_dir: str | None = None,
    ) -> None:
        self.name = name
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"[{name}] unsupported device {dev}")
        self.device = dev
        self._state = _State()
        self._finalizer = weakref.finalize(self, _release, self._state)
        self._constants: list[ConstantInfo] | None = None
        validate_shared_object(so_data, f"[{name}] shared object")
        promote_torch_libraries()
        st = self._state
        try:
            fd, path = tempfile.mkstemp(prefix="etspec_aoti_", suffix=".so", dir=tmp_dir)
            st.so_path = path
            with os.fdopen(fd, "wb") as f:
                f.write(so_data)
            try:
                lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            except OSError as e:
                raise ArtifactError(f"[{name}] cannot load the shared object: {e}") from e
            self._fns: dict[str, Any] = {}
            for fn, (argtypes, required) in C_FUNCTIONS.items():
                try:
                    f_ = getattr(lib, fn)
                except AttributeError:
                    if required:
                        raise ArtifactError(f"[{name}] the shared object does not export {fn}") from None
                    continue
                f_.argtypes = argtypes
                f_.restype = ctypes.c_int32
                self._fns[fn] = f_
            st.lib = lib
            self._create(num_models, cubin_dir)
        except BaseException:
            self.close()
            raise

    def _create(self, num_models: int, cubin_dir: str | None) -> None:
        handle = ctypes.c_void_p()
        dev_str = str(self.device) if self.device.type == "cuda" else "cpu"
        with self._device_guard():
            self._call(
                "AOTInductorModelContainerCreateWithDevice",
                ctypes.byref(handle),
                num_models,
                dev_str.encode(),
                cubin_dir.encode() if cubin_dir else None,
            )
        if not handle.value:
            raise AotiCallError(self.name, "AOTInductorModelContainerCreateWithDevice", 0, "null handle")
        self._state.handle = handle
        self.num_inputs = self._get_size("AOTInductorModelContainerGetNumInputs")
        self.num_outputs = self._get_size("AOTInductorModelContainerGetNumOutputs")

    def sibling(self, name: str | None = None) -> AotiContainer:
        """A new container from the same loaded library (no new file, no constants bound yet).

        Why: an AOTI container whose run was captured in a CUDA graph cannot run again (its next run
        queries a completion event that only exists inside the graph: "The model did not finish
        successfully. Error: invalid argument"), so every capture gets a container of its own.
        """
        twin = object.__new__(AotiContainer)
        twin.name = name or self.name
        twin.device = self.device
        twin._state = _State()
        twin._state.lib = self._state.lib
        twin._state.keepalive.append(self)  # the library file belongs to the original
        twin._finalizer = weakref.finalize(twin, _release, twin._state)
        twin._constants = self._constants
        twin._fns = self._fns
        try:
            twin._create(1, None)
        except BaseException:
            twin.close()
            raise
        return twin

    # -- plumbing --------------------------------------------------------------------------
    def has(self, fn: str) -> bool:
        """Whether the .so exports the C function ``fn``."""
        return fn in self._fns

    def _require(self, fn: str) -> Any:
        try:
            return self._fns[fn]
        except KeyError:
            raise ConstantBindingError(
                f"[{self.name}] the shared object does not export {fn} (built by an older torch?)"
            ) from None

    def _last_error(self) -> str:
        f = self._fns.get("AOTInductorGetLastError")
        if f is None:
            return ""
        msg = ctypes.c_char_p()
        try:
            if f(ctypes.byref(msg)) == 0 and msg.value:
                return msg.value.decode("utf-8", "replace")
        except Exception:  # pragma: no cover
            pass
        return ""

    def _call(self, fn: str, *args: Any) -> None:
        rc = self._require(fn)(*args)
        if rc != 0:
            raise AotiCallError(self.name, fn, int(rc), self._last_error())

    def _handle(self) -> ctypes.c_void_p:
        if self._state.handle is None:
            raise RuntimeError(f"[{self.name}] container is closed")
        return self._state.handle

    def _get_size(self, fn: str, *args: Any) -> int:
        out = ctypes.c_size_t()
        self._call(fn, self._handle(), *args, ctypes.byref(out))
        return int(out.value)

    def _get_str(self, fn: str, idx: int) -> str:
        out = ctypes.c_char_p()
        self._call(fn, self._handle(), idx, ctypes.byref(out))
        return out.value.decode("utf-8", "replace") if out.value else ""

    def _device_guard(self) -> Any:
        if self.device.type == "cuda":
            return torch.cuda.device(self.device.index)
        return contextlib.nullcontext()

    @property
    def closed(self) -> bool:
        return self._state.handle is None

    @property
    def so_path(self) -> str | None:
        """Path of the private temp copy of the .so (removed at close)."""
        return self._state.so_path

    # -- introspection ---------------------------------------------------------------------
    def constants(self) -> list[ConstantInfo]:
        """All constants of the model, in the .so's order (the dense blob's order)."""
        if self._constants is not None:
            return self._constants
        h = self._handle()
        n = self._get_size("AOTInductorModelContainerGetNumConstants")
        out = []
        for i in range(n):
            name = self._get_str("AOTInductorModelContainerGetConstantName", i)
            fqn = (
                self._get_str("AOTInductorModelContainerGetConstantOriginalFQN", i)
                if self.has("AOTInductorModelContainerGetConstantOriginalFQN")
                else ""
            )
            folded = ctypes.c_bool(False)
            if self.has("AOTInductorModelContainerGetConstantFromFolded"):
                self._call("AOTInductorModelContainerGetConstantFromFolded", h, i, ctypes.byref(folded))
            kind = "unknown"
            if self.has("AOTInductorModelContainerGetConstantType"):
                t = ctypes.c_int32()
                self._call("AOTInductorModelContainerGetConstantType", h, i, ctypes.byref(t))
                kind = CONSTANT_KINDS.get(int(t.value), f"type_{t.value}")
            dtype = None
            if self.has("AOTInductorModelContainerGetConstantDtype"):
                d = ctypes.c_int32()
                self._call("AOTInductorModelContainerGetConstantDtype", h, i, ctypes.byref(d))
                try:
                    dtype = dtype_from_scalar_type(int(d.value), f"[{self.name}] constant {name!r}")
                except ArtifactError:
                    dtype = None
            size = -1
            if self.has("AOTInductorModelContainerGetConstantDataSize"):
                s = ctypes.c_size_t()
                self._call("AOTInductorModelContainerGetConstantDataSize", h, i, ctypes.byref(s))
                size = int(s.value)
            out.append(ConstantInfo(i, name, fqn, dtype, size, bool(folded.value), kind))
        self._constants = out
        return out

    def blob_layout(self) -> dict[str, tuple[int, int]]:
        """Internal constant name -> (offset, size) in the dense constants blob.

        Mirrors ``AOTInductorModel::load_constants``: non-folded constants, in index order, each
        taking ``constant_data_size`` bytes (already padded to 64 when the .so has CPU constants).
        """
        out: dict[str, tuple[int, int]] = {}
        off = 0
        for c in self.constants():
            if c.from_folded:
                continue
            if c.data_size < 0:
                raise ConstantBindingError(
                    f"[{self.name}] the .so does not export AOTInductorModelContainerGetConstantDataSize"
                )
            out[c.name] = (off, c.data_size)
            off += c.data_size
        return out

    def blob_nbytes(self) -> int:
        return sum(s for _, s in self.blob_layout().values())

    # -- constants ---------------------------------------------------------------------------
    def load_constants_from_blob(self, blob: Any) -> None:
        """Copy every constant from a dense AOTI constants blob into container-owned memory.

        ``blob`` is any buffer (bytes, memoryview of a mapped .ptd, uint8 CPU tensor). Its size is
        checked against the constants the .so declares before the pointer is handed over.
        """
        t = as_uint8_tensor(blob)
        need = self.blob_nbytes()
        if t.numel() < need:
            raise ArtifactError(
                f"[{self.name}] weights blob has {t.numel()} bytes but the model's constants need {need}"
            )
        self._state.keepalive.append((blob, t))
        with self._device_guard():
            ptr = ctypes.c_void_p(t.data_ptr())
            self._call("AOTInductorModelUpdateConstantsFromBlob", self._handle(), ptr)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def bind_constants(self, tensors: Mapping[str, torch.Tensor], *, validate_full: bool = False) -> None:
        """Point constants (by internal name) at caller-owned tensors, without copying.

        Uses ``UpdateUserManagedConstantBufferPairs``: the container reads and writes the given
        storage directly, so a tensor bound into two containers is shared by both (weights and
        mutable buffers such as KV caches). The tensors are kept alive until :meth:`close`.
        """
        fn = "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs"
        self._require(fn)
        known = {c.name: c for c in self.constants()}
        names = list(tensors)
        for nm in names:
            t = tensors[nm]
            c = known.get(nm)
            if c is None:
                raise ConstantBindingError(f"[{self.name}] the model has no constant named {nm!r}")
            if not isinstance(t, torch.Tensor):
                raise ConstantBindingError(f"[{self.name}] constant {nm!r}: expected a tensor, got {type(t)}")
            if t.device != self.device and t.device.type != "cpu":  # CPU: mixed-device constants
                raise ConstantBindingError(
                    f"[{self.name}] constant {nm!r} ({c.fqn}) is on {t.device}, "
                    f"the model runs on {self.device}"
                )
            if c.dtype is not None and t.dtype != c.dtype:
                raise ConstantBindingError(
                    f"[{self.name}] constant {nm!r} ({c.fqn}): dtype {t.dtype}, the model expects {c.dtype}"
                )
        if validate_full:
            missing = [c.name for c in self.constants() if not c.from_folded and c.name not in tensors]
            if missing:
                raise ConstantBindingError(f"[{self.name}] constants not provided: {missing}")
        if not names:
            return
        handles = tensors_to_handles([tensors[nm] for nm in names])
        encoded = [nm.encode("utf-8") for nm in names]
        arr = (ConstantMapEntry * len(names))(*[ConstantMapEntry(e, h) for e, h in zip(encoded, handles)])
        try:
            with self._device_guard():
                self._call(fn, self._handle(), arr, len(names), False, False)
        except BaseException:
            free_handles(handles)
            raise
        st = self._state
        for nm, h in zip(names, handles):
            old = st.bound_handles.pop(nm, None)
            if old is not None:
                st.stale_handles.append(old)  # the container may still alias it: free at close
            st.bound_handles[nm] = h
        st.keepalive.append([tensors[nm] for nm in names])

    def extract_constants(self) -> dict[str, torch.Tensor]:
        """FQN -> tensor aliasing the container's current constants (needs a torch >= 2.13 .so).

        The tensors alias container-owned memory: use them (e.g. clone them) before :meth:`close`.
        """
        fn = "AOTInductorModelContainerExtractConstantsMapEntries"
        self._require(fn)
        entries = ctypes.POINTER(ConstantMapEntry)()
        n = ctypes.c_size_t()
        self._call(fn, self._handle(), ctypes.byref(entries), ctypes.byref(n), False)
        libs = promote_torch_libraries()
        new_handle = libs["libtorch_cpu.so"].aoti_torch_new_tensor_handle
        new_handle.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        new_handle.restype = ctypes.c_int32
        names, handles = [], []
        try:
            for i in range(n.value):
                e = entries[i]
                if not e.handle:
                    continue
                h = ctypes.c_void_p()
                if new_handle(e.handle, ctypes.byref(h)) != 0 or not h.value:
                    raise AotiCallError(self.name, "aoti_torch_new_tensor_handle", -1)
                names.append(e.name.decode("utf-8", "replace") if e.name else f"constant_{i}")
                handles.append(int(h.value))
        except BaseException:
            free_handles(handles)
            raise
        return dict(zip(names, handles_to_tensors(handles)))

    # -- running ---------------------------------------------------------------------------
    def run(self, inputs: Sequence[torch.Tensor], stream: Any = None) -> list[torch.Tensor]:
        """Run the model on ``inputs`` (the delegate's order); returns new output tensors.

        ``stream``: a ``torch.cuda.Stream``, a raw ``cudaStream_t`` int, or None for the current
        stream of the container's device. Ignored on CPU.
        """
        h = self._handle()
        if len(inputs) != self.num_inputs:
            raise MethodInputError(
                f"[{self.name}] the model takes {self.num_inputs} inputs, got {len(inputs)}"
            )
        for i, t in enumerate(inputs):
            if not isinstance(t, torch.Tensor):
                raise MethodInputError(f"[{self.name}] input {i}: expected a tensor, got {type(t).__name__}")
            if t.device != self.device:
                raise MethodInputError(
                    f"[{self.name}] input {i} is on {t.device}, the model runs on {self.device}"
                )
        if self.device.type == "cuda":
            if stream is None:
                stream_ptr = torch.cuda.current_stream(self.device).cuda_stream
            elif isinstance(stream, int):
                stream_ptr = stream
            else:
                stream_ptr = stream.cuda_stream
        else:
            stream_ptr = None
        in_handles = tensors_to_handles(inputs)
        in_arr = (ctypes.c_void_p * max(1, len(in_handles)))(*in_handles)
        out_arr = (ctypes.c_void_p * max(1, self.num_outputs))()
        # Input handles are stolen by Run (freed by the model even when it fails inside).
        self._call(
            "AOTInductorModelContainerRun",
            h,
            in_arr,
            len(in_handles),
            out_arr,
            self.num_outputs,
            ctypes.c_void_p(stream_ptr) if stream_ptr else None,
            None,
        )
        outs = [out_arr[i] for i in range(self.num_outputs)]
        if any(not p for p in outs):
            got = [p for p in outs if p]
            free_handles(got)
            raise AotiCallError(self.name, "AOTInductorModelContainerRun", 0, "returned a null output handle")
        return handles_to_tensors(outs)

    # -- lifetime --------------------------------------------------------------------------
    def close(self) -> None:
        """Delete the container, release bound tensors and remove the temp .so. Idempotent."""
        self._finalizer()

    def __enter__(self) -> AotiContainer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        n_in, n_out = getattr(self, "num_inputs", "?"), getattr(self, "num_outputs", "?")
        state = "closed" if self.closed else f"{n_in} in/{n_out} out"
        return f"AotiContainer({self.name!r}, {self.device}, {state})"
