"""`Program.load(dir)`: validate an etspec artifact's manifest, then run its methods on the right executor.

CPU (XNNPACK) artifacts run through ExecuTorch's own pybindings; CUDA artifacts through our AOTInductor
container executor (the pip ExecuTorch runtime has no CUDA backend). Either way a method is a callable
taking and returning torch tensors, checked against the manifest's signature before any native call.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from etspec.export.manifest import FORMAT_VERSION, Manifest, MethodSig

from .errors import ArtifactError, MethodInputError, UnsupportedLayoutError

PTE_NAME = "model.pte"
MANIFEST_NAME = "manifest.json"
CUDA_DATA_NAME = "aoti_cuda_blob.ptd"
REQUIRED_METHODS = ("prefill", "target_verify", "draft")
_DTYPES = {n: getattr(torch, n) for n in ("int64", "int32", "int8", "bool", "float32", "bfloat16", "float16")}


def read_manifest(directory: Path) -> Manifest:
    """The manifest beside the program; a newer or malformed one is refused with a clear message."""
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST_NAME} (not an etspec-export output directory?)")
    import json

    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON: {e}") from None
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UnsupportedLayoutError(
            f"{path}: artifact format {version} is newer than this etspec reads ({FORMAT_VERSION}); "
            "upgrade etspec or re-export with this version"
        )
    try:
        manifest = Manifest.from_dict(raw)
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{path}: {e}") from None
    missing = [m for m in REQUIRED_METHODS if m not in manifest.methods]
    if missing:
        raise ArtifactError(f"{path}: manifest lacks methods {missing}")
    return manifest


def check_inputs(name: str, sig: MethodSig, inputs: Sequence[torch.Tensor]) -> None:
    """Refuse a call whose inputs do not fit the exported signature (count, dtype, dims)."""
    if len(inputs) != len(sig.inputs):
        raise MethodInputError(f"[{name}] expects {len(sig.inputs)} inputs, got {len(inputs)}")
    bound: dict[str, int] = {}
    for spec, t in zip(sig.inputs, inputs):
        if not isinstance(t, torch.Tensor):
            raise MethodInputError(
                f"[{name}] input {spec.name!r} must be a torch.Tensor, got {type(t).__name__}"
            )
        want = _DTYPES.get(spec.dtype)
        if want is not None and t.dtype != want:
            raise MethodInputError(f"[{name}] input {spec.name!r} must be {spec.dtype}, got {t.dtype}")
        if t.dim() != len(spec.shape):
            raise MethodInputError(
                f"[{name}] input {spec.name!r} must have shape {spec.shape}, got {list(t.shape)}"
            )
        for size, dim in zip(t.shape, spec.shape):
            if isinstance(dim, int):
                if size != dim:
                    raise MethodInputError(
                        f"[{name}] input {spec.name!r}: shape {list(t.shape)} vs {spec.shape}"
                    )
                continue
            if dim in bound and bound[dim] != size:
                raise MethodInputError(
                    f"[{name}] dim {dim} is {bound[dim]} in one input and {size} in {spec.name!r}"
                )
            bound[dim] = size
            lo, hi = sig.dims.get(dim, (0, 1 << 62))
            if not lo <= size <= hi:
                raise MethodInputError(f"[{name}] input {spec.name!r}: {dim}={size} outside [{lo}, {hi}]")


class _CpuProgram:
    """ExecuTorch's pybindings; the export shared mutable buffers, so all methods see one KV cache."""

    def __init__(self, pte: Path):
        from executorch.runtime import Runtime

        from .pte_reader import _check_pte_header

        data = pte.read_bytes()
        _check_pte_header(str(pte), data)
        try:
            self._program = Runtime.get().load_program(data)
        except Exception as e:  # the pybindings raise RuntimeError/ValueError with their own text
            raise ArtifactError(f"{pte}: ExecuTorch could not load the program: {e}") from None
        self._methods: dict[str, object] = {}

    def method(self, name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        if name not in self._methods:
            self._methods[name] = self._program.load_method(name)
        m = self._methods[name]
        return lambda *inputs: tuple(m.execute(list(inputs)))

    def close(self) -> None:
        self._methods.clear()
        self._program = None


class Program:
    """A loaded etspec artifact. `program.method("draft")(tokens, feature, input_pos, kv_window)`."""

    def __init__(self, directory: Path, manifest: Manifest, executor, device: torch.device):
        self.directory, self.manifest, self._executor, self.device = directory, manifest, executor, device
        self._methods: dict[str, Callable[..., tuple[torch.Tensor, ...]]] = {}

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Program:
        d = Path(directory)
        if not d.is_dir():
            raise ArtifactError(f"{d}: no such artifact directory")
        manifest = read_manifest(d)
        pte = d / PTE_NAME
        if not pte.is_file():
            raise ArtifactError(f"{d}: missing {PTE_NAME}")
        if manifest.backend == "xnnpack":
            return cls(d, manifest, _CpuProgram(pte), torch.device("cpu"))
        if manifest.backend == "cuda":
            ptd = d / CUDA_DATA_NAME
            if not ptd.is_file():
                raise ArtifactError(f"{d}: missing {CUDA_DATA_NAME} (the CUDA weights) beside {PTE_NAME}")
            if not torch.cuda.is_available():
                raise ArtifactError(f"{d}: a CUDA artifact needs an NVIDIA GPU; none is visible")
            from .cuda_executor import ConstantMeta, CudaProgram

            meta = {
                fqn: ConstantMeta(_DTYPES[c["dtype"]], tuple(c["shape"]), tuple(c["stride"]))
                for fqn, c in manifest.constants.items()
            }
            executor = CudaProgram(str(pte), data_paths=[str(ptd)], constant_meta=meta)
            return cls(d, manifest, executor, torch.device("cuda"))
        raise UnsupportedLayoutError(f"{d}: backend {manifest.backend!r} is not supported (cuda, xnnpack)")

    def method(
        self, name: str, check: bool = True, cuda_graph: bool = False
    ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The method as a callable; with `check`, inputs are validated against the manifest first.

        `cuda_graph` (CUDA artifacts): replay one captured graph per input-shape set; outputs are then
        static buffers, valid until the next call of this method with the same shapes.
        """
        if name not in self.manifest.methods:
            raise MethodInputError(f"no method {name!r} (has {sorted(self.manifest.methods)})")
        if cuda_graph and self.device.type != "cuda":
            raise MethodInputError(f"CUDA graphs need a CUDA artifact; this one is {self.manifest.backend}")
        key = f"{name}:{check}:{cuda_graph}"
        if key not in self._methods:
            run = self._executor.method(name)
            if cuda_graph:
                from .cuda_graphs import GraphedMethod

                run = GraphedMethod(run, lambda: self._executor.graph_copy(name), name)
            if check:
                sig = self.manifest.methods[name]

                def checked(*inputs: torch.Tensor, _run=run, _sig=sig) -> tuple[torch.Tensor, ...]:
                    check_inputs(name, _sig, inputs)
                    return _run(*inputs)

                self._methods[key] = checked
            else:
                self._methods[key] = run
        return self._methods[key]

    def close(self) -> None:
        self._methods.clear()
        self._executor.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
