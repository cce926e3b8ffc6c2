"""`Program.load(dir)`: validate an etspec artifact's manifest, then run its methods on the right executor.

CPU (XNNPACK) artifacts run through ExecuTorch's own pybindings; CUDA artifacts through our AOTInductor
container executor (the pip ExecuTorch runtime has no CUDA backend). Either way a method is a callable
taking and returning torch tensors, checked against the manifest's signature before any native call.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import torch

from etspec.artifact import (
    CUDA_DATA_NAME,
    MANIFEST_DTYPES,
    PTE_NAME,
    Manifest,
    ManifestError,
    MethodSig,
    UnsupportedFormatError,
    sha256_file,
)
from etspec.artifact import read_manifest as read_artifact_manifest

from .errors import ArtifactError, MethodInputError, UnsupportedLayoutError


def read_manifest(directory: Path) -> Manifest:
    """The manifest beside the program, validated; a newer format raises UnsupportedLayoutError, a
    missing or malformed one ArtifactError (the runtime's error types, with the format's message)."""
    try:
        return read_artifact_manifest(directory)
    except UnsupportedFormatError as e:
        raise UnsupportedLayoutError(str(e)) from None
    except ManifestError as e:
        raise ArtifactError(str(e)) from None


def check_token_ids(ids: Sequence[int], vocab_size: int, what: str = "token id") -> None:
    """Refuse ids outside [0, vocab_size): the embedding gather does not check them (on CUDA an
    out-of-range id reads out of bounds)."""
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise MethodInputError(
            f"{what} {bad[0]} is outside the vocabulary [0, {vocab_size})"
            + (f" ({len(bad)} such ids)" if len(bad) > 1 else "")
        )


def check_files(directory: Path, manifest: Manifest, verify: bool) -> None:
    """Compare the artifact's files with the sizes and sha256 hashes the export recorded, before any
    native loader reads them (a corrupt delegate can abort the process inside ExecuTorch).

    Sizes always; model.pte's hash always (it is small on CUDA and read whole on the CPU anyway); the
    .ptd weights' hashes only with `verify` (they are most of the bytes: about 1 s per GiB).
    """
    if verify and not manifest.files:
        raise ArtifactError(f"{directory}: the manifest records no file hashes; re-export to verify")
    for name, rec in sorted(manifest.files.items()):
        path = directory / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing (the manifest lists it)")
        size = path.stat().st_size
        if size != rec["size"]:
            raise ArtifactError(
                f"{path}: {size} bytes, the export wrote {rec['size']}: truncated or replaced; re-export"
            )
        if (verify or name == PTE_NAME) and sha256_file(path) != rec["sha256"]:
            raise ArtifactError(f"{path}: sha256 differs from the export's: the file is corrupt; re-export")


def check_inputs(
    name: str,
    sig: MethodSig,
    inputs: Sequence[torch.Tensor],
    vocab_size: int | None = None,
    device: torch.device | None = None,
) -> None:
    """Refuse a call whose inputs do not fit the exported signature (count, dtype, dims), or whose
    `tokens` hold ids outside the vocabulary (a device->host read on CUDA). With `device` (CUDA: the
    AOTI containers take raw pointers), every input must also be a contiguous tensor on it."""
    if len(inputs) != len(sig.inputs):
        raise MethodInputError(f"[{name}] expects {len(sig.inputs)} inputs, got {len(inputs)}")
    bound: dict[str, int] = {}
    for spec, t in zip(sig.inputs, inputs):
        if not isinstance(t, torch.Tensor):
            raise MethodInputError(
                f"[{name}] input {spec.name!r} must be a torch.Tensor, got {type(t).__name__}"
            )
        if device is not None and t.device != device:
            raise MethodInputError(
                f"[{name}] input {spec.name!r} is on {t.device}, the program runs on {device}"
            )
        if device is not None and not t.is_contiguous():
            raise MethodInputError(
                f"[{name}] input {spec.name!r} must be contiguous (compiled for contiguous strides)"
            )
        want = MANIFEST_DTYPES.get(spec.dtype)
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
    if vocab_size is not None:
        for spec, t in zip(sig.inputs, inputs):
            if spec.name == "tokens" and t.numel():
                lo, hi = int(t.min()), int(t.max())
                check_token_ids([lo, hi], vocab_size, f"[{name}] token id")


@contextmanager
def _native_stderr(capture: bool) -> Iterator[list[str]]:
    """With `capture`, what native code writes to fd 2 (ExecuTorch's C++ logs, e.g. the cpuinfo lines
    XNNPACK prints at its first method load) goes to a temporary file; its text is then in the
    yielded list, for an error message, instead of on the terminal."""
    lines: list[str] = []
    if not capture:
        yield lines
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as f:
        os.dup2(f.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            f.seek(0)
            lines += f.read().decode(errors="replace").splitlines()


class _CpuProgram:
    """ExecuTorch's pybindings; the export shared mutable buffers, so all methods see one KV cache."""

    def __init__(self, pte: Path, quiet_native: bool = False):
        self._quiet = quiet_native
        from executorch.runtime import Runtime

        from .pte_reader import check_pte_header

        self._pte = pte
        data = pte.read_bytes()
        check_pte_header(str(pte), data)
        try:
            self._program = Runtime.get().load_program(data)
        except Exception as e:  # the pybindings raise RuntimeError/ValueError with their own text
            raise ArtifactError(f"{pte}: ExecuTorch could not load the program: {e}") from None
        self._methods: dict[str, object] = {}

    def method(self, name: str) -> Callable[..., tuple[torch.Tensor, ...]]:
        if name not in self._methods:
            with _native_stderr(self._quiet) as logs:
                try:
                    self._methods[name] = self._program.load_method(name)
                except Exception as e:  # e.g. "Failed to load method prefill, error: 0x30"
                    error = e
                else:
                    error = None
            if error is not None:
                detail = f"; the runtime said: {logs[-1].strip()}" if logs else ""
                raise ArtifactError(
                    f"{self._pte}: method {name!r} could not be loaded ({error}): the program is corrupt "
                    f"or was written by another ExecuTorch version; re-export it{detail}"
                )
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
    def load(
        cls, directory: str | os.PathLike[str], verify: bool = False, quiet_native: bool = False
    ) -> Program:
        """Load an artifact directory, checked against the manifest first: file sizes and model.pte's
        sha256 always, the .ptd weights' sha256 with `verify` (reads every byte: about 1 s per GiB).
        `quiet_native` keeps the CPU runtime's C++ log lines off the terminal (errors quote them)."""
        d = Path(directory)
        if not d.is_dir():
            raise ArtifactError(f"{d}: no such artifact directory")
        manifest = read_manifest(d)
        pte = d / PTE_NAME
        if not pte.is_file():
            raise ArtifactError(f"{d}: missing {PTE_NAME}")
        check_files(d, manifest, verify)
        if manifest.backend == "xnnpack":
            return cls(d, manifest, _CpuProgram(pte, quiet_native), torch.device("cpu"))
        if manifest.backend == "cuda":
            ptd = d / CUDA_DATA_NAME
            if not ptd.is_file():
                raise ArtifactError(f"{d}: missing {CUDA_DATA_NAME} (the CUDA weights) beside {PTE_NAME}")
            if not torch.cuda.is_available():
                raise ArtifactError(f"{d}: a CUDA artifact needs an NVIDIA GPU; none is visible")
            from .compat_dense_blob import ConstantMeta
            from .cuda_executor import CudaProgram

            meta = {
                fqn: ConstantMeta(MANIFEST_DTYPES[c["dtype"]], tuple(c["shape"]), tuple(c["stride"]))
                for fqn, c in manifest.constants.items()
            }
            executor = CudaProgram(str(pte), data_paths=[str(ptd)], constant_meta=meta)
            return cls(d, manifest, executor, torch.device("cuda"))
        raise UnsupportedLayoutError(f"{d}: backend {manifest.backend!r} is not supported (cuda, xnnpack)")

    def method(
        self, name: str, check: bool = True, cuda_graph: bool = False
    ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """The method as a callable; with `check`, inputs are validated against the manifest first
        (signature, and token ids against the vocabulary); without, nothing checks them.

        `cuda_graph` (CUDA artifacts): replay one captured graph per input-shape set; outputs are then
        static buffers, valid until the next call of this method with the same shapes.
        """
        if name not in self.manifest.methods:
            raise MethodInputError(f"no method {name!r} (has {sorted(self.manifest.methods)})")
        if cuda_graph and self.device.type != "cuda":
            raise MethodInputError(f"CUDA graphs need a CUDA artifact; this one is {self.manifest.backend}")
        key = f"{name}:{check}:{cuda_graph}"
        if key not in self._methods:
            run = self._unchecked(self._executor.method(name))
            if cuda_graph:
                from .cuda_graphs import GraphedMethod

                run = GraphedMethod(run, lambda: self._unchecked(self._executor.graph_copy(name)), name)
            if check:
                sig, vocab = self.manifest.methods[name], self.manifest.vocab_size
                device = self._executor.device if self.device.type == "cuda" else None

                def checked(*inputs: torch.Tensor, _run=run, _sig=sig) -> tuple[torch.Tensor, ...]:
                    check_inputs(name, _sig, inputs, vocab, device)
                    return _run(*inputs)

                self._methods[key] = checked
            else:
                self._methods[key] = run
        return self._methods[key]

    def _unchecked(
        self, run: Callable[..., tuple[torch.Tensor, ...]]
    ) -> Callable[..., tuple[torch.Tensor, ...]]:
        """A CUDA method without its own check against the execution plan: the one check of a call is
        the manifest's, in `method`, or none with check=False."""
        return partial(run, check=False) if self.device.type == "cuda" else run

    def close(self) -> None:
        self._methods.clear()
        self._executor.close()

    def __enter__(self) -> Program:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
