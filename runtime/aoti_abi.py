"""The C ABI of AOTInductor model containers, as ctypes sees it, and tensor <-> handle conversion.

The ExecuTorch pip runtime has no CUDA backend, so etspec runs each AOTI delegate itself through the
C API that every AOTInductor ``.so`` exports (``torch/csrc/inductor/aoti_runtime/interface.h``):

* ``AOTInductorModelContainerCreateWithDevice(handle*, num_models, device_str, cubin_dir)``
* ``AOTInductorModelContainerRun(handle, AtenTensorHandle* in, n_in, AtenTensorHandle* out, n_out,
  stream, proxy_executor)`` -- input handles are stolen, output handles are handed to the caller
* ``...GetNumInputs/GetNumOutputs``
* ``...GetNumConstants/GetConstantName/GetConstantOriginalFQN/GetConstantFromFolded/GetConstantType/
  GetConstantDtype/GetConstantDataSize``
* ``AOTInductorModelUpdateConstantsFromBlob(handle, const uint8_t*)`` -- dense constants blob
  (a silent no-op unless the .so was built for external weights)
* ``AOTInductorModelContainerUpdateUserManagedConstantBufferPairs(handle,
  const AOTInductorConstantMapEntry{const char* name; AtenTensorHandle handle;}* pairs, n,
  bool use_inactive, bool validate_full_update)`` -- names are the *internal* constant names
* ``AOTInductorModelContainerExtractConstantsMapEntries(handle, const Entry** out, size_t* n,
  bool use_inactive)`` -- keyed by original FQN; torch >= 2.13 .so files only
* ``AOTInductorGetLastError(const char**)`` -- newer .so files only

Shared objects built with ``aot_inductor.link_libtorch=False`` (as ExecuTorch's CUDA backend builds
them) leave the ``aoti_torch_*`` shim symbols undefined: they are resolved from libtorch, which must
therefore be loaded RTLD_GLOBAL first (:func:`promote_torch_libraries`).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import Any

import torch

from .errors import ArtifactError

#: GetConstantType codes.
CONSTANT_KINDS = {0: "unknown", 1: "parameter", 2: "buffer", 3: "tensor_constant", 4: "folded"}


class ConstantMapEntry(ctypes.Structure):
    """AOTInductorConstantMapEntry { const char* name; AtenTensorHandle handle; }"""

    _fields_ = [("name", ctypes.c_char_p), ("handle", ctypes.c_void_p)]


_VP = ctypes.c_void_p
_SZ = ctypes.c_size_t
_P = ctypes.POINTER
#: C function name -> (argtypes, required); every one returns an AOTIRuntimeError code (int32).
C_FUNCTIONS: dict[str, tuple[list[Any], bool]] = {
    "AOTInductorModelContainerCreateWithDevice": ([_P(_VP), _SZ, ctypes.c_char_p, ctypes.c_char_p], True),
    "AOTInductorModelContainerDelete": ([_VP], True),
    "AOTInductorModelContainerRun": ([_VP, _P(_VP), _SZ, _P(_VP), _SZ, _VP, _VP], True),
    "AOTInductorModelContainerGetNumInputs": ([_VP, _P(_SZ)], True),
    "AOTInductorModelContainerGetNumOutputs": ([_VP, _P(_SZ)], True),
    "AOTInductorModelContainerGetNumConstants": ([_VP, _P(_SZ)], False),
    "AOTInductorModelContainerGetConstantName": ([_VP, _SZ, _P(ctypes.c_char_p)], False),
    "AOTInductorModelContainerGetConstantOriginalFQN": ([_VP, _SZ, _P(ctypes.c_char_p)], False),
    "AOTInductorModelContainerGetConstantFromFolded": ([_VP, _SZ, _P(ctypes.c_bool)], False),
    "AOTInductorModelContainerGetConstantType": ([_VP, _SZ, _P(ctypes.c_int32)], False),
    "AOTInductorModelContainerGetConstantDtype": ([_VP, _SZ, _P(ctypes.c_int32)], False),
    "AOTInductorModelContainerGetConstantDataSize": ([_VP, _SZ, _P(_SZ)], False),
    "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs": (
        [_VP, _P(ConstantMapEntry), _SZ, ctypes.c_bool, ctypes.c_bool],
        False,
    ),
    "AOTInductorModelContainerExtractConstantsMapEntries": (
        [_VP, _P(_P(ConstantMapEntry)), _P(_SZ), ctypes.c_bool],
        False,
    ),
    "AOTInductorModelUpdateConstantsFromBlob": ([_VP, _VP], False),
    "AOTInductorGetLastError": ([_P(ctypes.c_char_p)], False),
}


_promote_lock = threading.Lock()
_promoted: dict[str, ctypes.CDLL] = {}


def promote_torch_libraries() -> dict[str, ctypes.CDLL]:
    """dlopen libtorch's libraries RTLD_GLOBAL so a link_libtorch=False .so finds the aoti_torch_* shims."""
    with _promote_lock:
        if _promoted:
            return _promoted
        libdir = os.path.join(os.path.dirname(torch.__file__), "lib")
        for lib in ("libc10.so", "libtorch_cpu.so", "libc10_cuda.so", "libtorch_cuda.so", "libtorch.so"):
            p = os.path.join(libdir, lib)
            if os.path.exists(p):
                _promoted[lib] = ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
        if "libtorch_cpu.so" not in _promoted:
            raise ArtifactError(f"libtorch_cpu.so not found in {libdir}; cannot host AOTI shared objects")
        return _promoted


_pyapi_lock = threading.Lock()
_capsule_fns: tuple[Any, Any] | None = None


def _capsule_api() -> tuple[Any, Any]:
    global _capsule_fns
    with _pyapi_lock:
        if _capsule_fns is None:
            get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
            get_ptr.restype = ctypes.c_void_p
            get_ptr.argtypes = [ctypes.py_object, ctypes.c_char_p]
            new_cap = ctypes.pythonapi.PyCapsule_New
            new_cap.restype = ctypes.py_object
            new_cap.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
            _capsule_fns = (get_ptr, new_cap)
        return _capsule_fns


def tensors_to_handles(tensors: Sequence[torch.Tensor]) -> list[int]:
    """New heap AtenTensorHandles (at::Tensor*) aliasing ``tensors``; the caller owns them."""
    get_ptr, _ = _capsule_api()
    caps = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))
    out = []
    for c in caps:
        p = get_ptr(c, None) if not isinstance(c, int) else c
        if not p:
            raise RuntimeError("unsafe_alloc_void_ptrs_from_tensors returned a null handle")
        out.append(int(p))
    return out


def handles_to_tensors(handles: Sequence[int]) -> list[torch.Tensor]:
    """Take ownership of AtenTensorHandles (deleting the handles) and return the tensors."""
    if not handles:
        return []
    _, new_cap = _capsule_api()
    caps = [new_cap(ctypes.c_void_p(h), None, None) for h in handles]
    return list(torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(caps))


def free_handles(handles: Sequence[int]) -> None:
    """Delete AtenTensorHandles the caller owns."""
    handles_to_tensors(list(handles))  # stolen into tensors that are dropped at once
