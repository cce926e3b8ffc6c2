"""Run the AOTInductor delegates of an ExecuTorch program ourselves (the CUDA executor).

:class:`CudaProgram` reads a parsed program (:mod:`.pte_reader`), creates one AOTI container per
delegate (:mod:`.aoti_container`) and loads every constant **once per FQN** into a tensor on the
device that all containers share through user-managed constant buffers: weights cost 1x however
many methods use them, and mutable buffers (KV caches) written by one method are read by the next.

Each method call maps the method's inputs to the delegate's arguments exactly as the execution
plan says (``DelegateCall.args`` = the delegate's inputs in *its* order, then its outputs), runs
the instruction list, and returns the method's outputs in the method's order.

Constants come from the delegate's ``ETCUDAFQN3`` manifest (ExecuTorch 1.5, ``FQN_MANIFEST``): it gives
each FQN's storage key, dtype, sizes, strides and offset, and each storage is copied to the device
once. Programs of ExecuTorch 1.2 / 1.4 keep one dense blob per delegate instead; those are loaded by
:mod:`.compat_dense_blob`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .aoti_container import AotiContainer
from .aoti_payload import AOTI_BACKEND_IDS, AotiPayload, BlobLayout
from .byte_tensors import typed_view, upload_bytes
from .compat_dense_blob import ConstantMeta, load_dense_constants
from .elf_validation import validate_shared_object
from .errors import ArtifactError, ConstantBindingError, MethodInputError, UnsupportedLayoutError
from .fqn_weight_manifest import FqnWeightEntry
from .method_info import MethodInfo, TensorSpec
from .pte_reader import PteProgram, read_program
from .shared_constants import SharedConstants

__all__ = ["CudaMethod", "CudaProgram"]


@dataclass
class _Step:
    kind: str  # "delegate" | "move" | "free"
    container: AotiContainer | None = None
    in_args: tuple[int, ...] = ()
    out_args: tuple[int, ...] = ()


class CudaMethod:
    """One method of a :class:`CudaProgram`: call it with the method's inputs, in the method's order."""

    def __init__(self, program: CudaProgram, info: MethodInfo, steps: list[_Step]) -> None:
        self._program = program
        self.info = info
        self.name = info.name
        self._steps = steps
        self.input_specs: list[TensorSpec] = list(info.input_specs)
        self.output_specs: list[Any] = list(info.output_specs)

    @property
    def containers(self) -> list[AotiContainer]:
        return [s.container for s in self._steps if s.container is not None]

    def check_inputs(self, inputs: Sequence[Any]) -> None:
        """Raise MethodInputError unless ``inputs`` match the execution plan (count, dtype, shape, device)."""
        specs = self.input_specs
        if len(inputs) != len(specs):
            raise MethodInputError(
                f"method {self.name!r} takes {len(specs)} inputs "
                f"({', '.join(s.describe() for s in specs)}), got {len(inputs)}"
            )
        dev = self._program.device
        for i, (t, spec) in enumerate(zip(inputs, specs)):
            why = spec.mismatch(t)
            if why is None and t.device != dev:
                why = f"is on {t.device}, the program runs on {dev}"
            if why is None and not t.is_contiguous():
                why = "must be contiguous (AOTI compiled for contiguous strides)"
            if why is not None:
                raise MethodInputError(f"method {self.name!r} input {i} ({spec.describe()}): {why}")

    def __call__(
        self, *inputs: torch.Tensor, stream: Any = None, check: bool = True
    ) -> tuple[torch.Tensor, ...]:
        """Run the method. ``check=False`` skips the input validation (only for inputs already checked)."""
        if self._program.closed:
            raise RuntimeError(f"method {self.name!r}: the program is closed")
        if check:
            self.check_inputs(inputs)
        env: dict[int, torch.Tensor] = dict(zip(self.info.inputs, inputs))
        for st in self._steps:
            if st.kind == "delegate":
                assert st.container is not None
                outs = st.container.run([env[a] for a in st.in_args], stream=stream)
                env.update(zip(st.out_args, outs))
            elif st.kind == "move":
                env[st.out_args[0]] = env[st.in_args[0]]
            elif st.kind == "free":
                env.pop(st.in_args[0], None)
        return tuple(env[i] for i in self.info.outputs)

    def __repr__(self) -> str:
        ins = ", ".join(s.describe() for s in self.input_specs)
        return f"CudaMethod({self.name!r}, inputs=[{ins}], delegates={len(self.containers)})"


class CudaProgram:
    """All AOTI methods of an ExecuTorch program, with constants shared across methods.

    Args:
        program: a :class:`PteProgram` or a path to the .pte (then ``data_paths`` as in
            :func:`read_program`; the program is closed with this object).
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"`` (the .so files must be built for it).
        methods: names to load (default: every non-constant method).
        backend_ids: delegate backend ids that are AOTI shared objects.
        constant_meta: FQN -> :class:`ConstantMeta` (or a tensor whose shape/strides/dtype to use)
            for dense-blob layouts.
        allow_private_constants: for dense blobs without metadata on an old .so: load each
            container's own copy (memory x methods) instead of failing; mutable buffers shared by
            several delegates still fail.
        verify_so_hash: check sha256-keyed shared objects (1.4/1.5 layouts) against their key.
        tmp_dir: where the private temp .so copies go (default: the system temp dir).
    """

    def __init__(
        self,
        program: PteProgram | str | os.PathLike,
        *,
        data_paths: Sequence[str] | None = None,
        device: str | torch.device = "cuda",
        methods: Iterable[str] | None = None,
        backend_ids: Iterable[str] = AOTI_BACKEND_IDS,
        constant_meta: Mapping[str, ConstantMeta | torch.Tensor] | None = None,
        allow_private_constants: bool = False,
        verify_so_hash: bool = True,
        tmp_dir: str | None = None,
    ) -> None:
        self._owns_program = not isinstance(program, PteProgram)
        self.program: PteProgram = read_program(program, data_paths) if self._owns_program else program  # type: ignore[arg-type]
        dev = torch.device(device)
        if dev.type == "cuda" and dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.backend_ids = frozenset(backend_ids)
        self._tmp_dir = tmp_dir
        self._meta = {
            k: (ConstantMeta.from_tensor(v) if isinstance(v, torch.Tensor) else v)
            for k, v in (constant_meta or {}).items()
        }
        self._allow_private = allow_private_constants
        self._containers: dict[tuple[str, int], AotiContainer] = {}
        self._payloads: dict[tuple[str, int], AotiPayload] = {}
        self._shared = SharedConstants()
        self._storages: dict[str, torch.Tensor] = {}  # FQN-manifest storage key -> uint8 device tensor
        self._methods: dict[str, CudaMethod] = {}
        self._binds: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # container key -> bound constants
        self._copies: list[AotiContainer] = []  # containers of graph copies (see graph_copy)
        self.closed = False
        try:
            names = list(methods) if methods is not None else self.program.executable_methods()
            # 1. Everything that can be checked without loading code: instructions, payload keys,
            #    shared-object hashes and ELF headers.
            for name in names:
                self._check_instructions(self.program.method(name))
            for key, payload in self._payloads.items():
                self._check_so(key, payload, verify_so_hash)
            # 2. Containers, 3. constants, 4. argument plans.
            for (name, di), payload in self._payloads.items():
                self._containers[(name, di)] = AotiContainer(
                    self.program.named_data.get(payload.so_key),
                    device=self.device,
                    name=f"{name}#{di}" if di else name,
                    tmp_dir=tmp_dir,
                )
            self._load_constants()
            for name in names:
                info = self.program.method(name)
                self._methods[name] = CudaMethod(self, info, self._plan(info))
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------
    # construction helpers
    # ------------------------------------------------------------------------------------------
    def _check_instructions(self, info: MethodInfo) -> None:
        if info.is_constant_method:
            raise UnsupportedLayoutError(
                f"method {info.name!r} is a constant method; read it from PteProgram.constant_methods"
            )
        for i, spec in enumerate(info.input_specs):
            if not isinstance(spec, TensorSpec):
                raise UnsupportedLayoutError(
                    f"method {info.name!r} input {i} is not a tensor ({spec!r}); "
                    "only tensor inputs are supported"
                )
        for ins in info.instructions:
            if ins.kind == "delegate":
                key = (info.name, ins.index)
                if key not in self._payloads:
                    self._payloads[key] = self.program.aoti_payload(info.name, ins.index, self.backend_ids)
            elif ins.kind in ("kernel", "jump_false"):
                what = ins.detail or ins.kind
                raise UnsupportedLayoutError(
                    f"method {info.name!r} runs {ins.kind} instruction {what!r} outside the AOTI delegate; "
                    "this executor only runs fully delegated methods"
                )

    def _check_so(self, key: tuple[str, int], payload: AotiPayload, verify_hash: bool) -> None:
        data = self.program.named_data.get(payload.so_key)
        validate_shared_object(data, f"[{key[0]}] shared object {payload.so_key!r}")
        if verify_hash and payload.layout is not BlobLayout.METHOD_KEYS:
            digest = payload.so_key[: -len("_so_blob")]
            if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
                got = hashlib.sha256(data).hexdigest()
                if got != digest:
                    raise ArtifactError(
                        f"[{key[0]}] shared object {payload.so_key!r} is corrupt: its sha256 is {got}"
                    )

    def _plan(self, info: MethodInfo) -> list[_Step]:
        """Split each DelegateCall's args into (inputs, outputs) and check the data flow."""
        avail = set(info.inputs)
        steps: list[_Step] = []
        for ins in info.instructions:
            if ins.kind == "delegate":
                c = self._containers[(info.name, ins.index)]
                if len(ins.args) != c.num_inputs + c.num_outputs:
                    raise ArtifactError(
                        f"method {info.name!r}: DelegateCall has {len(ins.args)} args but the AOTI model "
                        f"takes {c.num_inputs} inputs and returns {c.num_outputs} outputs"
                    )
                ins_a, outs_a = ins.args[: c.num_inputs], ins.args[c.num_inputs :]
                for a in ins_a:
                    if a not in avail:
                        spec = info.values.get(a)
                        raise UnsupportedLayoutError(
                            f"method {info.name!r}: delegate {ins.index} reads value #{a} ({spec!r}), "
                            "which is "
                            "neither a method input nor produced earlier (program constants outside the "
                            "delegate are not supported)"
                        )
                avail.update(outs_a)
                steps.append(_Step("delegate", c, tuple(ins_a), tuple(outs_a)))
            elif ins.kind == "move":
                src, dst = ins.args
                if src not in avail:
                    raise UnsupportedLayoutError(f"method {info.name!r}: move from unset value #{src}")
                avail.add(dst)
                steps.append(_Step("move", None, (src,), (dst,)))
            elif ins.kind == "free":
                steps.append(_Step("free", None, ins.args, ()))
        missing = [o for o in info.outputs if o not in avail]
        if missing:
            raise UnsupportedLayoutError(
                f"method {info.name!r}: outputs {missing} are not produced by any delegate"
            )
        return steps

    # ------------------------------------------------------------------------------------------
    # constants
    # ------------------------------------------------------------------------------------------
    def _load_constants(self) -> None:
        users: dict[str, list[tuple[tuple[str, int], str]]] = {}
        for key, c in self._containers.items():
            for ci in c.constants():
                if not ci.from_folded:
                    users.setdefault(self._shared.identity(self._payloads[key], ci), []).append(
                        (key, ci.kind)
                    )
        for key, c in self._containers.items():
            payload = self._payloads[key]
            if payload.layout is BlobLayout.FQN_MANIFEST:
                bind = self._fqn_manifest_constants(c, payload)
            else:
                bind = load_dense_constants(
                    c,
                    payload,
                    self.program.named_data,
                    self._shared,
                    users,
                    self._meta,
                    allow_private=self._allow_private,
                    tmp_dir=self._tmp_dir,
                )
                if bind is None:
                    continue
            c.bind_constants(bind)
            self._binds[key] = bind

    def _fqn_manifest_constants(self, c: AotiContainer, payload: AotiPayload) -> dict[str, torch.Tensor]:
        """Internal name -> shared tensor for every constant of ``c``, uploading storages not seen yet."""
        where = f"[{c.name}]"
        by_fqn: dict[str, FqnWeightEntry] = {e.fqn: e for e in payload.entries}
        bind: dict[str, torch.Tensor] = {}
        missing = []
        for ci in c.constants():
            if ci.from_folded:
                continue
            e = by_fqn.get(ci.fqn)
            if e is None:
                missing.append(ci.fqn or ci.name)
                continue
            if ci.dtype is not None and ci.dtype != e.dtype:
                raise ConstantBindingError(
                    f"{where} constant {ci.fqn!r}: manifest dtype {e.dtype}, .so dtype {ci.dtype}"
                )
            ident = self._shared.identity(payload, ci)
            t = self._shared.existing(where, ident, e.dtype, e.sizes, e.strides)
            if t is None:
                storage = self._storages.get(e.storage_key)
                if storage is None:
                    on_host = e.device_type == 0 and self.device.type != "cpu"  # mixed-device constant
                    dev = torch.device("cpu") if on_host else self.device
                    storage = upload_bytes(self.program.named_data.get(e.storage_key), dev)
                    self._storages[e.storage_key] = storage
                t = typed_view(storage, e.dtype, e.sizes, e.strides, e.storage_offset)
                self._shared.add(ident, t)
            bind[ci.name] = t
        if missing:
            raise ConstantBindingError(
                f"{where} constants {missing} have no entry in the delegate's FQN manifest "
                f"({len(by_fqn)} entries)"
            )
        return bind

    # ------------------------------------------------------------------------------------------
    # public API
    # ------------------------------------------------------------------------------------------
    @property
    def method_names(self) -> list[str]:
        return list(self._methods)

    def method(self, name: str) -> CudaMethod:
        if self.closed:
            raise RuntimeError(f"{self!r} is closed")
        try:
            return self._methods[name]
        except KeyError:
            raise KeyError(f"no loaded method {name!r}; loaded: {sorted(self._methods)}") from None

    def run(self, name: str, *inputs: torch.Tensor, stream: Any = None) -> tuple[torch.Tensor, ...]:
        return self.method(name)(*inputs, stream=stream)

    @property
    def constants(self) -> Mapping[str, torch.Tensor]:
        """The shared constants, FQN -> tensor on the device (weights and mutable buffers)."""
        return dict(self._shared.tensors)

    def constant_nbytes(self) -> int:
        """Device bytes held by shared constants (each storage counted once)."""
        return self._shared.nbytes()

    @property
    def constant_methods(self) -> dict[str, Any]:
        return self.program.constant_methods

    def graph_copy(self, name: str) -> CudaMethod:
        """The method on fresh containers bound to the same shared constants, for one CUDA-graph capture
        (a captured AOTI container cannot run again; see AotiContainer.sibling)."""
        info = self.method(name).info
        fresh: dict[int, AotiContainer] = {}  # id(original container) -> its copy
        for key, original in self._containers.items():
            if key[0] != name:
                continue
            if key not in self._binds:
                raise ConstantBindingError(
                    f"[{name}] CUDA graphs need constants shared by FQN; this program loaded private copies"
                )
            c = original.sibling()
            self._copies.append(c)
            c.bind_constants(self._binds[key])
            fresh[id(original)] = c
        steps = [
            _Step(st.kind, fresh[id(st.container)] if st.container else None, st.in_args, st.out_args)
            for st in self._methods[name]._steps
        ]
        return CudaMethod(self, info, steps)

    def close(self) -> None:
        """Delete every container, release the shared constants and remove the temp .so files."""
        for c in list(getattr(self, "_copies", [])) + list(getattr(self, "_containers", {}).values()):
            c.close()
        if hasattr(self, "_containers"):
            self._containers.clear()
            self._shared.clear()
            self._storages.clear()
            self._methods.clear()
        if getattr(self, "_owns_program", False) and hasattr(self, "program"):
            self.program.close()
        self.closed = True

    def __enter__(self) -> CudaProgram:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CudaProgram({self.program.path!r}, {self.device}, methods={self.method_names})"
