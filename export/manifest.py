"""The artifact manifest: what a runtime must know about a ``model.pte`` before it runs it.

The manifest travels twice: as ``manifest.json`` beside the program and inside the program as the
constant method :data:`MANIFEST_METHOD` (see :func:`etspec.export.lower.manifest_constant_methods`),
so a ``.pte`` copied on its own still describes itself. The runtime must not import the model code,
so everything it needs to drive the methods (input signatures, sizes, token ids) lives here.

Only stdlib + torch are imported at module level; ExecuTorch is imported lazily by
:func:`read_manifest_from_pte` so the runtime side can use this module without the export stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1

#: Constant method returning the manifest JSON as a string (EValue String in the program).
MANIFEST_METHOD = "get_manifest"

#: A shape entry: a concrete size, or the name of a symbolic dimension ("T", "kv_len", or a
#: sympy expression such as "s0 + 1" when no name is known).
Dim = int | str


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


def constant_table(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The `constants` entry of the manifest for a module's parameters and buffers (by FQN)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return {
        k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "stride": list(t.stride())}
        for k, t in sorted(named.items())
    }


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
    midm_sdpa: bool = False
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

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["methods"] = {k: v.to_dict() for k, v in self.methods.items()}
        return d

    def to_json(self, indent: int | None = None) -> str:
        # sort_keys: byte-stable output, so the same export gives the same .pte.
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Manifest:
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported manifest format_version {version!r} (this etspec reads {FORMAT_VERSION})"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            # Same format version must mean same fields; a silent drop would hide a bug.
            raise ValueError(f"unknown manifest fields for format_version {version}: {unknown}")
        kwargs = dict(d)
        kwargs["methods"] = {k: MethodSig.from_dict(v) for k, v in d["methods"].items()}
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        return cls.from_dict(json.loads(text))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json(indent=2) + "\n")
        return path

    @classmethod
    def read(cls, path: str | Path) -> Manifest:
        return cls.from_json(Path(path).read_text())


# --------------------------------------------------------------------------------------------
# Signatures from exported programs
# --------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dim_names_from_spec(
    user_input_names: list[str], dynamic_shapes: Mapping[str, Any] | tuple | list | None
) -> dict[tuple[int, int], str]:
    """(input index, dim index) -> the user's ``Dim`` name, from a torch.export dynamic_shapes spec.

    The exported graph only knows sympy symbols (``s11``); the names the caller chose (``T``,
    ``kv_len``) exist only in the spec, and they are what a runtime and a human can read.
    """
    if dynamic_shapes is None:
        return {}
    if isinstance(dynamic_shapes, Mapping):
        per_input = [dynamic_shapes.get(n) for n in user_input_names]
    else:
        per_input = list(dynamic_shapes)
    out: dict[tuple[int, int], str] = {}
    for i, spec in enumerate(per_input):
        if spec is None:
            continue
        items = spec.items() if isinstance(spec, Mapping) else enumerate(spec)
        for d, dim in items:
            name = getattr(dim, "__name__", None)
            if name and not name.startswith("_"):
                out[(i, int(d))] = name
    return out


def _shape(val: Any, sym_names: Mapping[str, str]) -> list[Dim]:
    shape: list[Dim] = []
    for s in val.shape:
        if isinstance(s, int):
            shape.append(s)
        else:
            expr = str(s.node.expr)
            shape.append(sym_names.get(expr, expr))
    return shape


def method_signature(ep: torch.export.ExportedProgram, dynamic_shapes: Any = None) -> MethodSig:
    """User inputs/outputs of ``ep`` (not its parameters/buffers), with symbolic dims named.

    Pass the ``dynamic_shapes`` spec used for export to get the ``Dim`` names; otherwise dims
    are the graph's symbol names (``s11``), which are stable within one program only.
    """
    user_inputs = list(ep.graph_signature.user_inputs)
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    spec_names = _dim_names_from_spec(user_inputs, dynamic_shapes)

    sym_names: dict[str, str] = {}
    vals = []
    for i, name in enumerate(user_inputs):
        val = placeholders[name].meta["val"]
        vals.append(val)
        if not isinstance(val, torch.Tensor):
            continue
        for d, s in enumerate(val.shape):
            if (i, d) not in spec_names:
                continue
            expr = s if isinstance(s, int) else s.node.expr
            if isinstance(expr, int) or expr.is_number:
                # e.g. a slice whose end hit the buffer size at the example value: the method would
                # then accept only that size, while the manifest claimed a range
                raise ValueError(
                    f"torch.export specialised the dynamic dim {spec_names[(i, d)]!r} of input {name!r} "
                    f"to {int(expr)}; choose example inputs strictly inside the dim's range"
                )
            sym_names.setdefault(str(expr), spec_names[(i, d)])

    inputs = []
    for name, val in zip(user_inputs, vals, strict=True):
        if not isinstance(val, torch.Tensor):
            raise TypeError(f"input {name!r} is not a tensor ({type(val).__name__}); methods take tensors")
        inputs.append(TensorSig(name, dtype_name(val.dtype), _shape(val, sym_names)))

    outputs = []
    out_node = ep.graph.output_node()
    out_args = out_node.args[0]
    n_user_out = len(ep.graph_signature.user_outputs)
    # User outputs come after buffer mutations in the flat output list.
    for i, node in enumerate(list(out_args)[len(out_args) - n_user_out :]):
        val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
        if isinstance(val, torch.Tensor):
            outputs.append(TensorSig(f"out{i}", dtype_name(val.dtype), _shape(val, sym_names)))

    dims: dict[str, list[int]] = {}
    for sym, vr in ep.range_constraints.items():
        key = sym_names.get(str(sym), str(sym))
        lo, hi = vr.lower, vr.upper
        if lo.is_finite and hi.is_finite:
            dims[key] = [int(lo), int(hi)]
    return MethodSig(inputs=inputs, outputs=outputs, dims=dims)


# --------------------------------------------------------------------------------------------
# Provenance helpers
# --------------------------------------------------------------------------------------------


def sha256_files(paths: Iterable[str | Path], chunk: int = 1 << 22) -> str:
    """One ``sha256:<hex>`` over the files in sorted-name order (checkpoint shards, config)."""
    h = hashlib.sha256()
    for p in sorted(Path(p) for p in paths):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """The hex sha256 of one file's bytes (what `sha256sum` prints)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: str | Path) -> dict[str, Any]:
    """The `files` entry of one artifact file: its size (checked at every load) and its sha256 (checked
    on request: it reads the whole file, about 1 s per GiB)."""
    return {"size": Path(path).stat().st_size, "sha256": sha256_file(path)}


def checkpoint_hash(ckpt_dir: str | Path) -> str:
    """Hash of a HF checkpoint directory: its config and weight files (not tokenizer/readme)."""
    d = Path(ckpt_dir)
    files = [
        p
        for p in d.iterdir()
        if p.is_file() and (p.suffix in {".safetensors", ".bin", ".pt", ".pth"} or p.name == "config.json")
    ]
    if not files:
        raise FileNotFoundError(f"no config/weight files in {d}")
    return sha256_files(files)


def toolchain_versions() -> dict[str, str]:
    """Versions that decide the artifact's format (ExecuTorch changes blob layout between 1.2/1.5)."""
    from importlib import metadata

    out = {"torch": torch.__version__}
    for pkg in ("executorch", "etspec", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------------------------
# Reading back from a program
# --------------------------------------------------------------------------------------------


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
                raise ValueError(f"{MANIFEST_METHOD} returns {type(val).__name__}, expected a string")
            return Manifest.from_json(text)
    raise ValueError(f"program has no {MANIFEST_METHOD} method; not an etspec artifact?")
