"""Backend lowering: exported methods -> one ExecuTorch program (``model.pte`` [+ ``.ptd``]).

Independent of the model code: callers hand in ``nn.Module`` wrappers (one per method, all
holding the *same* model object so parameter/buffer FQNs agree across methods) and get files.

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
* Constant methods: the emitter accepts bool/int/float/str/dtype/tensor and lists of them
  (``exir/emit/_emitter.py`` ``_emit_prim_getters``); the manifest is a ``str`` method, which
  ``executorch.runtime`` returns as a Python ``str`` and the flatbuffer holds as ``String``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.export import ExportedProgram
from tqdm import tqdm

from etspec.artifact import MANIFEST_METHOD, Manifest, MethodSig

from .manifest import method_signature
from .sparse_file import disk_bytes, write_sparse

Backend = Literal["xnnpack", "cuda"]
Progress = Callable[[str], None]
#: One method to export: (wrapper module, example args, torch.export dynamic_shapes or None).
MethodSpec = tuple[nn.Module, tuple, Any]

PTE_NAME = "model.pte"
CUDA_DATA_NAME = "aoti_cuda_blob.ptd"  # the AOTI CUDA backend's external_tag + ".ptd"

_CONST_SCALARS = (bool, int, float, str, torch.dtype)


def _print(msg: str) -> None:
    print(f"[etspec-export] {msg}", flush=True)


@contextmanager
def _timed(progress: Progress, what: str):
    progress(f"{what} ...")
    t0 = time.perf_counter()
    yield
    progress(f"{what} done in {time.perf_counter() - t0:.1f}s")


# --------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------


def _freeze(module: nn.Module) -> None:
    # Lowering deep-copies the graph's constants; parameters that require grad make that fail
    # (probe lesson) and would put autograd ops into the graph.
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def export_methods(
    methods: Mapping[str, MethodSpec],
    strict: bool = True,
    progress: Progress | None = _print,
) -> dict[str, ExportedProgram]:
    """``torch.export`` each method under ``no_grad``; returns {method name: program}.

    Methods are exported one by one but must be *lowered* together (see :func:`lower`) for
    their buffers to be shared. The exported programs keep references to the module's
    parameters (no copies), so exporting three wrappers of one 8B model costs 1x weights.
    """
    progress = progress or (lambda _msg: None)
    out: dict[str, ExportedProgram] = {}
    for name, (module, args, dynamic_shapes) in methods.items():
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} must be an identifier")
        _freeze(module)
        with _timed(progress, f"torch.export {name}"), torch.no_grad():
            out[name] = torch.export.export(module, tuple(args), dynamic_shapes=dynamic_shapes, strict=strict)
    return out


def method_signatures(
    methods: Mapping[str, MethodSpec], exported: Mapping[str, ExportedProgram]
) -> dict[str, MethodSig]:
    """Manifest signatures for each exported method, with the ``Dim`` names of its spec."""
    return {name: method_signature(exported[name], methods[name][2]) for name in exported}


def constants_in_first_use_order(ep: ExportedProgram) -> list[str]:
    """The parameter and buffer FQNs of `ep`, in the order its nodes first read them.

    AOTInductor lays out a method's CUDA weights blob in this order, and ExecuTorch stores two methods'
    blobs once only when they are byte-identical: two methods over the same weights must read them in
    one order, or the .ptd holds them twice."""
    sig = ep.graph_signature
    fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    order: dict[str, None] = {}
    for node in ep.graph.nodes:
        for arg in node.all_input_nodes:
            if arg.name in fqn:
                order.setdefault(fqn[arg.name])
    return list(order)


def _warn_unshared_blobs(exported: Mapping[str, ExportedProgram], progress: Progress) -> None:
    """Say so when methods over the same constants will not share one CUDA weights blob."""
    by_set: dict[frozenset, list[tuple[str, list[str]]]] = {}
    for name, ep in exported.items():
        order = constants_in_first_use_order(ep)
        by_set.setdefault(frozenset(order), []).append((name, order))
    for group in by_set.values():
        (first, order), *rest = group
        for name, other in rest:
            if other != order:
                progress(
                    f"warning: {first} and {name} read the same weights in different orders, so the .ptd "
                    "will hold them twice (see export.lower.constants_in_first_use_order)"
                )


# --------------------------------------------------------------------------------------------
# Constant methods
# --------------------------------------------------------------------------------------------


def manifest_constant_methods(manifest: Manifest) -> dict[str, Any]:
    """The constant methods every etspec program carries: the manifest and the scalars a
    runner wants without parsing JSON (same names as ExecuTorch's LLM runners use where one
    exists, e.g. ``get_max_seq_len``)."""
    consts: dict[str, Any] = {
        MANIFEST_METHOD: manifest.to_json(),
        "get_format_version": manifest.format_version,
        "get_max_seq_len": manifest.max_seq_len,
        "get_max_prefill_chunk": manifest.max_prefill_chunk,
        "get_draft_len": manifest.draft_len,
        "get_vocab_size": manifest.vocab_size,
        "get_hidden_size": manifest.hidden_size,
    }
    if manifest.eos_token_ids:
        consts["get_eos_ids"] = list(manifest.eos_token_ids)
    return consts


def _check_constant_methods(consts: Mapping[str, Any], exported: Mapping[str, Any]) -> None:
    def ok(v: Any) -> bool:
        if isinstance(v, _CONST_SCALARS) or isinstance(v, torch.Tensor):
            return True
        if isinstance(v, (list, tuple)):
            return all(ok(x) for x in v)
        return False

    for name, value in consts.items():
        if name in exported:
            raise ValueError(f"constant method {name!r} clashes with an exported method")
        if not ok(value):
            raise TypeError(
                f"constant method {name!r}: {type(value).__name__} is not emittable "
                "(use bool/int/float/str/dtype/tensor or a list of them)"
            )
        if isinstance(value, (list, tuple)) and len(value) == 0:
            # An empty list flattens to no values; the runtime would return nothing at all.
            raise ValueError(f"constant method {name!r} is an empty list")


# --------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------


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
    progress: Progress | None = _print,
    *,
    cuda_triton_kernels: bool = True,
) -> list[Path]:
    """Lower all methods into one program in ``out_dir``; returns the files written.

    ``constant_methods`` maps method names to values returned by argument-less methods
    (typically :func:`manifest_constant_methods`). Writes ``model.pte``, and for ``cuda``
    also ``aoti_cuda_blob.ptd`` (weights outside the program).

    ``cuda_triton_kernels=False`` sets the CUDA backend's ``triton_kernel_mode=OFF``: by default
    it replaces every ``aten.scaled_dot_product_attention`` with its own Triton SDPA, which
    requires bf16, a 4-D bool mask ``[B, H|1, L_q, L_kv]`` and ``enable_gqa=False``
    (``backends/cuda/triton/kernels/sdpa.py``); OFF leaves SDPA to AOTInductor.
    """
    progress = progress or (lambda _msg: None)
    if not exported:
        raise ValueError("no methods to lower")
    consts = dict(constant_methods or {})
    _check_constant_methods(consts, exported)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    if backend == "xnnpack":
        et = _lower_xnnpack(dict(exported), consts, progress)
    elif backend == "cuda":
        et = _lower_cuda(dict(exported), consts, progress, triton_kernels=cuda_triton_kernels)
    else:
        raise ValueError(f"unknown backend {backend!r} (xnnpack or cuda)")

    written: list[Path] = []
    with _timed(progress, f"write {PTE_NAME}"):
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


class _CompileMeter:
    """A bar per method over its partitions, fed by the backend's per-partition ``preprocess`` calls."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.planned: deque[tuple[str, int]] = deque()  # (method, partitions), in compile order
        self.bar: tqdm | None = None

    def start(self) -> None:
        if self.bar is None:
            self.method, self.total = self.planned.popleft() if self.planned else ("partitions", 0)
            self.n, self.t0 = 0, time.perf_counter()
            # disable=None: no bar when stderr is not a terminal; the per-method line below still comes.
            self.bar = tqdm(
                total=self.total or None,
                desc=f"{self.method}: compile",
                unit="partition",
                leave=False,
                disable=None,
            )

    def done(self) -> None:
        assert self.bar is not None
        self.n += 1
        self.bar.update()
        if self.n == self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            dt = time.perf_counter() - self.t0
            self.progress(f"{self.method}: {self.n} partition{'s' * (self.n != 1)} compiled in {dt:.1f}s")


@contextmanager
def _patched(
    cls: type, name: str, make: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> Iterator[None]:
    """Replace ``cls.name`` by ``make(original)`` (bound as the class sees it) until the block ends."""
    own = cls.__dict__.get(name)
    setattr(cls, name, staticmethod(make(getattr(cls, name))))
    try:
        yield
    finally:
        if own is None:
            delattr(cls, name)
        else:
            setattr(cls, name, own)


@contextmanager
def _lowering_progress(
    partitioners: Mapping[str, list[Any]], backend: type, progress: Progress
) -> Iterator[None]:
    """Stage lines per method, and a bar over each method's partitions, while ExecuTorch lowers.

    ExecuTorch has no progress callback, so the hooks are calls it makes anyway: a method's partitioner is
    asked ``transform_for_pre_decomposition`` / ``ops_to_not_decompose`` when that method's edge conversion
    starts and ``partition`` once it is in edge dialect; the backend's ``preprocess_multimethod`` then
    compiles every partition, by default one ``preprocess`` call each, method by method in partition order
    (``exir/backend/backend_details.py``). CUDA's own ``preprocess_multimethod`` makes no per-partition
    calls: it gets the stage lines and one timed compile line.
    """
    meter = _CompileMeter(progress)
    announced: set[str] = set()

    def announce(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if name not in announced:
                announced.add(name)
                progress(f"{name}: to edge dialect ...")
            return fn(*args, **kwargs)

        return wrapped

    def count(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            n = len(result.partition_tags)
            if n:
                meter.planned.append((name, n))
            progress(f"{name}: {n} {backend.__name__} partition{'s' * (n != 1)}")
            return result

        return wrapped

    def per_partition(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            meter.start()
            result = fn(*args, **kwargs)
            meter.done()
            return result

        return wrapped

    def all_partitions(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            total = sum(n for _, n in meter.planned)
            with _timed(progress, f"{backend.__name__}: compile {total} partitions"):
                try:
                    return fn(*args, **kwargs)
                finally:
                    meter.close()

        return wrapped

    hooks = {
        "transform_for_pre_decomposition": announce,
        "ops_to_not_decompose": announce,
        "partition": count,
    }
    for name, plist in partitioners.items():
        for part in plist:
            for attr, make in hooks.items():
                if hasattr(part, attr):  # transform_for_pre_decomposition is newer than ExecuTorch 1.2
                    setattr(part, attr, make(name, getattr(part, attr)))
    try:
        with (
            _patched(backend, "preprocess", per_partition),
            _patched(backend, "preprocess_multimethod", all_partitions),
        ):
            yield
    finally:
        meter.close()
        for plist in partitioners.values():
            for part in plist:
                for attr in hooks:
                    vars(part).pop(attr, None)


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
        _timed(progress, f"to_edge_transform_and_lower (XNNPACK) [{names}]"),
        _lowering_progress(partitioner, XnnpackBackend, progress),
    ):
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=partitioner,
            # index_copy_ on a buffer and the SymInt slice are fine in edge IR, but we do not
            # want the verifier's dim-order / op-set checks to reject a custom kernel's fallback.
            compile_config=EdgeCompileConfig(_check_ir_validity=False),
            constant_methods=consts or None,
        )
    with _timed(progress, "to_executorch (shared mutable buffers)"):
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

    _warn_unshared_blobs(exported, progress)
    partitioner = {name: [CudaPartitioner(specs(name))] for name in exported}
    names = ", ".join(exported)
    with (
        _timed(progress, f"to_edge_transform_and_lower (CUDA/AOTI) [{names}]"),
        _lowering_progress(partitioner, CudaBackend, progress),
        _mutation_outputs_first_in_partitions(),
        _private_inductor_cache(),
        _one_object_per_kernel(),
    ):
        edge = to_edge_transform_and_lower(
            exported,
            partitioner=partitioner,
            # AOTI consumes the graph as-is: no dim-order ops, no edge op-set check.
            compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
            constant_methods=consts or None,
        )
    with _timed(progress, "to_executorch"):
        return edge.to_executorch(
            ExecutorchBackendConfig(
                extract_delegate_segments=True,
                memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
                emit_mutable_buffer_names=True,
            )
        )


@contextmanager
def _one_object_per_kernel():
    """Give each embedded Triton kernel its own object file while AOTInductor links a method.

    torch 2.11 turns a kernel's binary into ``<binary>.o`` and renames its symbols to the kernel's name.
    Two kernels of one graph whose binaries are byte-identical (one Triton function launched with
    specialisation hints that do not change its code, e.g. etspec::linear_rows on differently divisible
    widths) share one binary path, so the second conversion overwrites the first's object, which is then
    linked twice: "multiple definition of `___linear_rows_kernel_7_end'". Converting a per-kernel copy of
    the binary keeps the objects apart.
    """
    import torch._inductor.codecache as codecache

    orig = getattr(codecache, "convert_cubin_to_obj", None)
    if orig is None:  # a torch whose AOTInductor embeds kernels another way
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


@contextmanager
def _private_inductor_cache():
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


@contextmanager
def _mutation_outputs_first_in_partitions():
    """ExecuTorch < 1.4: make each partition's output tuple list buffer mutations first.

    The fused submodule orders its outputs by graph position, but the ExportedProgram verifier finds
    mutations by position (the first N outputs). With KV caches written layer by layer and a feature
    output whose inputs are ready before the last layers run, the two disagree ("Mutation node
    aten_linear_default_57 is neither a buffer nor a user input"). 1.4+ reorders the tuple itself
    (``lowered_backend_module.arrange_graph_outputs``); for older versions we permute the tuple and
    the owning graph's getitem indices the same way before the signature is built.
    """
    import operator

    from executorch.exir import lowered_backend_module as lbm
    from executorch.exir.backend import backend_api
    from torch.export.graph_signature import OutputKind

    if hasattr(lbm, "arrange_graph_outputs"):
        yield
        return
    original = backend_api.create_exported_program_from_submodule

    def patched(submodule, owning_program, tag, call_module_node, *args, **kwargs):
        mutated = {
            s.arg.name
            for s in owning_program.graph_signature.output_specs
            if s.kind == OutputKind.BUFFER_MUTATION
        }
        out = next(n for n in reversed(submodule.graph.nodes) if n.op == "output")
        values = list(out.args[0])
        getitems = {u.args[1]: u for u in call_module_node.users if u.target is operator.getitem}
        first = [i for i in range(len(values)) if i in getitems and getitems[i].name in mutated]
        order = first + [i for i in range(len(values)) if i not in set(first)]
        if order != list(range(len(values))):
            out.args = (tuple(values[i] for i in order),)
            new_index = {old: new for new, old in enumerate(order)}
            for old, g in getitems.items():
                g.args = (g.args[0], new_index[old])
            val = call_module_node.meta.get("val")
            if isinstance(val, (tuple, list)) and len(val) == len(values):
                call_module_node.meta["val"] = type(val)(val[i] for i in order)
            submodule.recompile()
        return original(submodule, owning_program, tag, call_module_node, *args, **kwargs)

    backend_api.create_exported_program_from_submodule = patched
    try:
        yield
    finally:
        backend_api.create_exported_program_from_submodule = original


# --------------------------------------------------------------------------------------------
# Inspection (tests, reports, debugging artifacts)
# --------------------------------------------------------------------------------------------


def describe_program(
    pte: str | os.PathLike[str] | bytes, ptd: list[str | os.PathLike[str]] | tuple = ()
) -> dict[str, Any]:
    """What an artifact holds: per method its inputs/outputs, delegates, planned arena sizes and
    mutable buffers as FQN -> (mem_id, offset, numel); plus every named-data key with its size
    (in the .pte and in the given ``.ptd`` files).

    Two methods share a mutable buffer iff its FQN maps to the same (mem_id, offset) in both.
    Parses the flatbuffer only, so it works on CUDA programs without a CUDA runtime.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = pte if isinstance(pte, bytes) else Path(pte).read_bytes()
    result = deserialize_pte_binary(data)
    program = result.program
    info: dict[str, Any] = {
        "pte_bytes": len(data),
        "methods": {},
        "named_data": {},
        "constant_buffer_bytes": sum(len(b.storage) for b in program.constant_buffer),
    }
    for plan in program.execution_plan:
        mutable = {}
        for v in plan.values:
            t = v.val
            extra = getattr(t, "extra_tensor_info", None)
            alloc = getattr(t, "allocation_info", None)
            if extra is not None and extra.fully_qualified_name and alloc is not None:
                numel = 1
                for s in t.sizes:
                    numel *= s
                mutable[extra.fully_qualified_name] = {
                    "mem_id": alloc.memory_id,
                    "offset": alloc.memory_offset_low | (alloc.memory_offset_high << 32),
                    "numel": numel,
                }
        info["methods"][plan.name] = {
            "inputs": len(plan.inputs),
            "outputs": len(plan.outputs),
            "delegates": [d.id for d in plan.delegates],
            "non_const_buffer_sizes": list(plan.non_const_buffer_sizes),
            "mutable_buffers": mutable,
        }
    stores = [("pte", result.named_data)]
    for path in ptd:
        stores.append((Path(path).name, _read_ptd(Path(path))))
    for where, store in stores:
        if store is None:
            continue
        entries = dict(store.pte_data)
        for tagged in (getattr(store, "external_data", None) or {}).values():
            entries.update(tagged)
        for key, entry in entries.items():
            info["named_data"][key] = {"where": where, "bytes": len(store.buffers[entry.buffer_index])}
    return info


def _read_ptd(path: Path):
    """A .ptd's named data (FlatTensor); same call in ExecuTorch 1.2.0 and 1.5.1."""
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    return FlatTensorSerializer().deserialize_to_named_data_store_output(path.read_bytes(), path.stem)
