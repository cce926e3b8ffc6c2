"""The artifact manifest: what a runtime must know about a ``model.pte`` before it runs it.

The manifest travels twice: as ``manifest.json`` beside the program and inside the program as the
constant method :data:`MANIFEST_METHOD`, so a ``.pte`` copied on its own still describes itself. The
runtime must not import the model code, so everything it needs to drive the methods (input signatures,
sizes, token ids) lives here, with the parsing and validation both sides share.

Only stdlib + torch are imported at module level; ExecuTorch is imported lazily by
:func:`read_manifest_from_pte`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .files import MANIFEST_NAME

FORMAT_VERSION = 5
#: Formats this etspec reads. Format 1 had one switch for both few-rows kernels (`midm_sdpa`); format 2
#: records `linear_rows` apart, so a format-1 manifest reads with `linear_rows = midm_sdpa`; format 3
#: adds `reduction_kernels`, format 4 `linear_chunk`, format 5 `sdpa_chunk` (earlier programs had none
#: of the later ones: False).
READABLE_FORMATS = (1, 2, 3, 4, 5)

#: Constant method returning the manifest JSON as a string (EValue String in the program).
MANIFEST_METHOD = "get_manifest"

#: The methods every etspec artifact carries (§4 of docs/design.md).
REQUIRED_METHODS = ("prefill", "target_verify", "draft")
#: The sampled pair an export with ``--sampling`` adds (§10 of docs/design.md).
SAMPLED_METHODS = ("target_verify_sample", "draft_sample")

#: The tensor dtypes a manifest names, by the name :func:`dtype_name` writes.
MANIFEST_DTYPES: dict[str, torch.dtype] = {
    n: getattr(torch, n) for n in ("int64", "int32", "int8", "bool", "float32", "bfloat16", "float16")
}

#: A shape entry: a concrete size, or the name of a symbolic dimension ("T", "kv_len", or a
#: sympy expression such as "s0 + 1" when no name is known).
Dim = int | str


class ManifestError(ValueError):
    """A manifest that is missing, does not parse, or does not fit this format version."""


class UnsupportedFormatError(ManifestError):
    """A manifest written in a newer format than this etspec reads."""


def dtype_name(dtype: torch.dtype) -> str:
    """The name a manifest stores for a dtype: torch's, without the ``torch.`` prefix."""
    return str(dtype).removeprefix("torch.")


def check_format_version(version: Any) -> None:
    """Refuse any format but :data:`READABLE_FORMATS`; a newer one with :class:`UnsupportedFormatError`."""
    if isinstance(version, int) and version > FORMAT_VERSION:
        raise UnsupportedFormatError(
            f"artifact format_version {version} is newer than this etspec reads ({FORMAT_VERSION}); "
            "upgrade etspec or re-export with this version"
        )
    if version not in READABLE_FORMATS:
        raise ManifestError(
            f"unsupported manifest format_version {version!r} (this etspec reads {FORMAT_VERSION})"
        )


@dataclass(frozen=True)
class TensorSig:
    """One tensor of a method signature. Symbolic dims are named so the runtime can bind them."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "int64", "bfloat16"
    shape: list[Dim]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorSig:
        return cls(name=str(d["name"]), dtype=str(d["dtype"]), shape=list(d["shape"]))


@dataclass(frozen=True)
class MethodSig:
    """User-visible inputs/outputs of one exported method, in call order.

    ``dims`` gives each symbolic dim's inclusive ``[min, max]`` as the exported program
    guarantees it; calling outside that range is undefined at runtime (memory planning uses
    the max), so the runtime validates against it.
    """

    inputs: list[TensorSig]
    outputs: list[TensorSig]
    dims: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "dims": {k: list(v) for k, v in self.dims.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MethodSig:
        return cls(
            inputs=[TensorSig.from_dict(t) for t in d["inputs"]],
            outputs=[TensorSig.from_dict(t) for t in d.get("outputs", [])],
            dims={k: [int(v[0]), int(v[1])] for k, v in d.get("dims", {}).items()},
        )


@dataclass
class Manifest:
    """Everything a runtime needs besides the program itself.

    Sizes that are baked into the graphs (``max_seq_len``, ``max_prefill_chunk``, ``draft_len``)
    are repeated here because the runtime sizes its persistent buffers from them before the
    first call; ``methods`` carries the exact exported ranges for validation.
    """

    backend: str
    methods: dict[str, MethodSig]
    max_seq_len: int
    max_prefill_chunk: int
    draft_len: int
    vocab_size: int
    hidden_size: int
    dtype: str
    tap_layers: list[int] = field(default_factory=list)
    draft_vocab_size: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    midm_sdpa: bool = False  # target_verify and draft use the split-K attention etspec::sdpa_midm
    linear_rows: bool = False  # ... and the few-rows linear etspec::linear_rows
    reduction_kernels: bool = False  # ... and the norm and argmax kernels (etspec::*_rows)
    linear_chunk: bool = False  # prefill and the draft's catch-up rows use etspec::linear_chunk
    sdpa_chunk: bool = False  # prefill attention uses etspec::sdpa_chunk
    kv_bucket: int | None = None  # kv_window rounding for CUDA graphs; None = exact
    checkpoints: dict[str, str] = field(default_factory=dict)  # role -> "sha256:<hex>"
    versions: dict[str, str] = field(default_factory=dict)  # package -> version
    # FQN -> {"dtype", "shape", "stride"} of every weight and buffer: lets a runtime load a dense AOTI
    # weights blob (ExecuTorch 1.2) once per FQN and share it across methods.
    constants: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # forward-compatible free-form data
    # File name -> {"size": bytes, "sha256": hex} of model.pte and each .ptd. Only manifest.json has it:
    # the copy embedded in model.pte is written before the program exists and cannot hash itself.
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def sampling(self) -> bool:
        """Whether the program carries the sampled methods (exported with ``--sampling``)."""
        return all(m in self.methods for m in SAMPLED_METHODS)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = {k: v.to_dict() for k, v in self.methods.items()}
        return d

    def to_json(self, indent: int | None = None) -> str:
        # sort_keys: byte-stable output, so the same export gives the same .pte.
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        """Parse and validate a decoded manifest; anything malformed raises :class:`ManifestError`."""
        if not isinstance(d, Mapping):
            raise ManifestError(f"a manifest is a JSON object, this file holds a {type(d).__name__}")
        version = d.get("format_version")
        check_format_version(version)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            # Same format version must mean same fields; a silent drop would hide a bug.
            raise ManifestError(f"unknown manifest fields for format_version {version}: {unknown}")
        if version == 1:
            d = {**d, "linear_rows": d.get("midm_sdpa", False)}
        try:
            methods = {k: MethodSig.from_dict(v) for k, v in d["methods"].items()}
            return cls(**{**d, "methods": methods})
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise ManifestError(str(e)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ManifestError(f"not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        """One manifest file; errors name the file."""
        try:
            return cls.from_json(Path(path).read_bytes())
        except UnsupportedFormatError as e:
            raise UnsupportedFormatError(f"{path}: {e}") from None
        except ManifestError as e:
            raise ManifestError(f"{path}: {e}") from None


def read_manifest(directory: str | Path) -> Manifest:
    """The manifest of an artifact directory: parsed, validated, and naming every required method."""
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(f"{directory}: no {MANIFEST_NAME} (not an etspec-export output directory?)")
    manifest = Manifest.read(path)
    missing = [m for m in REQUIRED_METHODS if m not in manifest.methods]
    if missing:
        raise ManifestError(f"{path}: manifest lacks methods {missing}")
    return manifest


def read_manifest_from_pte(pte: str | Path | bytes) -> Manifest:
    """Read the manifest from the program's ``get_manifest`` constant method without running it.

    Parses the flatbuffer rather than using ``executorch.runtime``: that works for CUDA programs
    too, whose delegates the pip runtime cannot load, and needs no kernels.
    """
    from executorch.exir._serialize._program import deserialize_pte_binary

    data = pte if isinstance(pte, bytes) else Path(pte).read_bytes()
    result = deserialize_pte_binary(data)
    program = getattr(result, "program", result)  # 1.5 returns a wrapper, 1.2 the Program
    for plan in program.execution_plan:
        if plan.name == MANIFEST_METHOD:
            val = plan.values[plan.outputs[0]].val
            text = getattr(val, "string_val", None)
            if text is None:
                raise ManifestError(f"{MANIFEST_METHOD} returns {type(val).__name__}, expected a string")
            return Manifest.from_json(text)
    raise ManifestError(f"program has no {MANIFEST_METHOD} method; not an etspec artifact?")
