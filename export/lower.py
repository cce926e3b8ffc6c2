"""Backend lowering: exported methods -> one ExecuTorch program (``model.pte`` [+ ``.ptd``]).

Independent of the model code: callers hand in the programs of :func:`.torch_export.export_methods`
(one per method, all over the *same* model object so parameter/buffer FQNs agree) and get files.

Why the flags are what they are (ExecuTorch 1.5.1 source; 1.2.0 behaves the same unless noted):

* XNNPACK, shared KV cache. ``MemoryPlanningPass(share_mutable_buffers=True)`` leaves mutated
  buffers out of each method's activation plan and, in ``run_multimethod`` (called by
  ``EdgeProgramManager.to_executorch`` once every method is planned), gives every spec with
  the same FQN the same ``mem_id=2`` and offset (``exir/passes/memory_planning_pass.py``
  ``run_multimethod``). The runtime backs mem_id 2 with one allocation for all host-only
  methods (``runtime/__init__.py`` ``Program.load_method`` docstring), so ``prefill`` writes
  the KV that ``target_verify`` reads. Without the flag each method has its own cache and
  ``target_verify`` reads KV nobody wrote (tests/export/test_lower.py fails at the first
  verify). All methods must go through ONE ``to_edge_transform_and_lower`` call, and the
  wrappers must hold the same model object (same FQNs). Seen working on 1.5.1 and 1.2.0.
* ``emit_mutable_buffer_names=True`` stores each mutable buffer's FQN in the program, so a
  runtime can match state across methods by name (and the emitter requires names or a plan).
* Weights are deduplicated across methods for free: XNNPACK stores each constant in the named
  data store under its sha256 (``backends/xnnpack/operators/node_visitor.py``
  ``get_serialized_buffer_index``), ``NamedDataStore`` maps equal bytes to one buffer
  (``exir/_serialize/_named_data_store.py``), and non-delegated constants are hash-deduplicated
  by the emitter (``exir/emit/_emitter.py`` ``cached_spec_hash_values``).
* CUDA: one ``CudaPartitioner`` per method carrying its method name: the AOTI backend (1.2.0)
  writes ``<method>_so_blob`` into the .pte and ``<method>_weights_blob`` (every constant the
  method uses, its mutated buffers too) into ``aoti_cuda_blob.ptd``
  (``backends/aoti/aoti_backend.py`` ``preprocess``). Blobs are deduplicated only when
  byte-identical (e.g. prefill and target_verify over the same weights); otherwise each method
  carries its own copy. The delegate owns its buffers as AOTI constants, so nothing is left at
  the graph level for ``share_mutable_buffers``; the etspec runtime shares them by FQN.
  ``alloc_graph_input=False``: the delegate reads the caller's tensors, no planned host copy.

The other modules of this package hold the rest: ``torch_export`` (the programs), ``constants`` (the
constant methods), ``constant_order`` (one CUDA weights blob per set of weights), ``progress`` (stage
lines), ``aoti_compile`` (which CUDA methods are autotuned), ``inductor_cache``, ``patching``, and the
patches for older versions, ``compat_partition_outputs`` (ExecuTorch < 1.4) and
``compat_kernel_objects`` (torch 2.11).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch.export import ExportedProgram

from etspec.artifact import CUDA_DATA_NAME, PTE_NAME

from .aoti_compile import methods_to_tune, tuned_per_method
from .compat_kernel_objects import one_object_per_kernel
from .compat_partition_outputs import mutation_outputs_first
from .constant_order import warn_unshared_blobs
from .constants import check_constant_methods
from .inductor_cache import private_inductor_cache
from .progress import Progress, lowering_progress, print_progress, timed
from .sparse_file import disk_bytes, write_sparse

Backend = Literal["xnnpack", "cuda"]


def _executorch_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("executorch")
    except metadata.PackageNotFoundError:
        return "not installed"


def _require(backend: str, what: str, exc: Exception) -> RuntimeError:
    return RuntimeError(
        f"backend {backend!r} needs {what}, which this ExecuTorch ({_executorch_version()}) "
        f"does not provide: {type(exc).__name__}: {exc}"
    )


def lower(
    exported: Mapping[str, ExportedProgram],
    backend: Backend,
    constant_methods: Mapping[str, Any] | None,
    out_dir: str | os.PathLike[str],
    progress: Progress | None = print_progress,
    *,
    cuda_triton_kernels: bool = True,
    cuda_autotune_every_method: bool = False,
) -> list[Path]:
    """Lower all methods into one program in ``out_dir``; returns the files written.

    ``constant_methods`` maps method names to values returned by argument-less methods
    (typically :func:`.constants.manifest_constant_methods`). Writes ``model.pte``, and for ``cuda``
    also ``aoti_cuda_blob.ptd`` (weights outside the program).

    ``cuda_triton_kernels=False`` sets the CUDA backend's ``triton_kernel_mode=OFF``: by default
    it replaces every ``aten.scaled_dot_product_attention`` with its own Triton SDPA, which
    requires bf16, a 4-D bool mask ``[B, H|1, L_q, L_kv]`` and ``enable_gqa=False``
    (``backends/cuda/triton/kernels/sdpa.py``); OFF leaves SDPA to AOTInductor.
    ``cuda_autotune_every_method`` autotunes every method, not only those with a matmul of
    AOTInductor's own (:mod:`.aoti_compile`).
    """
    progress = progress or (lambda _msg: None)
    if not exported:
        raise ValueError("no methods to lower")
    consts = dict(constant_methods or {})
    check_constant_methods(consts, exported)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if backend == "xnnpack":
        et = _lower_xnnpack(dict(exported), consts, progress)
    elif backend == "cuda":
        et = _lower_cuda(
            dict(exported),
            consts,
            progress,
            triton_kernels=cuda_triton_kernels,
            tune=methods_to_tune(exported, cuda_autotune_every_method),
        )
    else:
        raise ValueError(f"unknown backend {backend!r} (xnnpack or cuda)")

    written: list[Path] = []
    with timed(progress, f"write {PTE_NAME}"):
        pte = out / PTE_NAME
        with open(pte, "wb") as f:
            et.write_to_file(f)
        written.append(pte)
        if backend == "cuda":
            # Named by the backend's external tag; list what actually appeared.
            before = {p.name for p in out.glob("*.ptd")}
            _write_data_files(et, out)
            after = sorted(out.glob("*.ptd"))
            written += [p for p in after if p.name not in before or p.name == CUDA_DATA_NAME]
            if not (out / CUDA_DATA_NAME).exists():
                raise RuntimeError(f"CUDA lowering wrote no {CUDA_DATA_NAME} (got {[p.name for p in after]})")
    for p in written:
        on_disk = f", {disk_bytes(p) / 2**20:.1f} MiB on disk" if p.suffix == ".ptd" else ""
        progress(f"wrote {p} ({p.stat().st_size / 2**20:.1f} MiB{on_disk})")
    return written


def _write_data_files(et: Any, out: Path) -> None:
    """``write_tensor_data_to_file``, but sparse: the blob's zero KV caches take no disk.

    The serialized files are the manager's ``_tensor_data`` (filename -> Cord; ExecuTorch 1.2.0 to
    1.5.1, filled by ``write_to_file``). If a version lacks it, the public writer runs instead.
    """
    data = getattr(et, "_tensor_data", None)
    if not data:
        et.write_tensor_data_to_file(str(out))
        return
    for name, cord in data.items():
        write_sparse(out / (name if name.endswith(".ptd") else f"{name}.ptd"), cord)


def _lower_xnnpack(exported: dict[str, ExportedProgram], consts: dict[str, Any], progress: Progress):
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.backends.xnnpack.xnnpack_preprocess import XnnpackBackend
        from executorch.exir import (
            EdgeCompileConfig,
            ExecutorchBackendConfig,
            to_edge_transform_and_lower,
        )
        from executorch.exir.passes import MemoryPlanningPass
    except ImportError as e:
        raise _require("xnnpack", "executorch.backends.xnnpack", e) from e

    # One partitioner per method (they hold no state), so each one's calls say which method is at work.
    partitioner = {name: [XnnpackPartitioner()] for name in exported}
    names = ", ".join(exported)
    with (
        timed(progress, f"to_edge_transform_and_lower (XNNPACK) [{names}]"),
        lowering_progress(partitioner, XnnpackBackend, progress),
    ):
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=partitioner,
            # index_copy_ on a buffer and the SymInt slice are fine in edge IR, but we do not
            # want the verifier's dim-order / op-set checks to reject a custom kernel's fallback.
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=consts or None,
        )
    with timed(progress, "to_executorch (shared mutable buffers)"):
        return edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                memory_planning_pass=MemoryPlanningPass(
                    alloc_graph_input=False,
                    share_mutable_buffers=True,
                ),
                emit_mutable_buffer_names=True,
            )
        )


def _lower_cuda(
    exported: dict[str, ExportedProgram],
    consts: dict[str, Any],
    progress: Progress,
    *,
    triton_kernels: bool,
    tune: Mapping[str, bool],
):
    try:
        from executorch.backends.cuda.cuda_backend import CudaBackend
        from executorch.backends.cuda.cuda_partitioner import CudaPartitioner
        from executorch.exir import (
            EdgeCompileConfig,
            ExecutorchBackendConfig,
            to_edge_transform_and_lower,
        )
        from executorch.exir.backend.compile_spec_schema import CompileSpec
        from executorch.exir.passes import MemoryPlanningPass
    except ImportError as e:
        raise _require("cuda", "executorch.backends.cuda (CudaBackend/CudaPartitioner)", e) from e
    if not torch.cuda.is_available():
        # AOTInductor compiles and autotunes for the device it runs on.
        raise RuntimeError("backend 'cuda' lowering needs a CUDA GPU (AOTInductor compiles on it)")

    def specs(name: str) -> list:
        # The method name keys the backend's blobs ("<name>_so_blob"), so one spec per method.
        out = [CudaBackend.generate_method_name_compile_spec(name)]
        if not triton_kernels:
            out.append(CompileSpec("triton_kernel_mode", b"OFF"))
        return out

    warn_unshared_blobs(exported, progress)
    partitioner = {name: [CudaPartitioner(specs(name))] for name in exported}
    names = ", ".join(exported)
    with (
        timed(progress, f"to_edge_transform_and_lower (CUDA/AOTI) [{names}]"),
        lowering_progress(partitioner, CudaBackend, progress),
        tuned_per_method(CudaBackend, tune, progress),
        mutation_outputs_first(),
        private_inductor_cache(),
        one_object_per_kernel(),
    ):
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=partitioner,
            # AOTI consumes the graph as-is: no dim-order ops, no edge op-set check.
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
            constant_methods=consts or None,
        )
    with timed(progress, "to_executorch"):
        return edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                emit_mutable_buffer_names=True,
            )
        )
