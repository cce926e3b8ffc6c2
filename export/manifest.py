"""The export side of the manifest: what only the writer computes.

Method signatures from exported programs (with the user's ``Dim`` names), the constant table of a
module, and provenance (checkpoint hashes, toolchain versions). The schema itself, its format version
and its parsing live in :mod:`etspec.artifact`, which the runtime reads without this package.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from etspec.artifact import Dim, MethodSig, TensorSig, dtype_name


def constant_table(module: torch.nn.Module) -> dict[str, dict[str, Any]]:
    """The `constants` entry of the manifest for a module's parameters and buffers (by FQN)."""
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(module.named_buffers(remove_duplicate=False))
    return {
        k: {"dtype": dtype_name(t.dtype), "shape": list(t.shape), "stride": list(t.stride())}
        for k, t in sorted(named.items())
    }


# --------------------------------------------------------------------------------------------
# Signatures from exported programs
# --------------------------------------------------------------------------------------------


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
