"""Build real ExecuTorch programs whose AOTI delegates run on CPU, in each blob layout.

The programs go through ExecuTorch's own lowering and serializer (``to_edge_transform_and_lower``
-> ``to_executorch`` -> ``write_to_file`` / ``write_tensor_data_to_file``) with a test backend that
compiles its partition with AOTInductor for CPU, with ExecuTorch's CUDA options where CPU allows
(``link_libtorch=False``, ``package_constants_in_so=False``, dense ``binary_blob`` weights), and
packages the .so and weights exactly as ExecuTorch's CUDA backend does in

* ``method_keys``  (ExecuTorch 1.2.0 ``AotiBackend.preprocess``: ``<method>_so_blob`` in the .pte,
  ``<method>_weights_blob`` under external tag ``aoti_cuda_blob``, empty processed bytes);
* ``hashed_keys``  (1.4: sha256-keyed entries, keys in the processed bytes);
* ``fqn_manifest`` (1.5.1 ``CudaWeightCollector``: one ``cuda_fqn_weight:<device>:<fqn>`` storage per
  constant under ``aoti_cuda_blob``, ``ETCUDAFQN3`` manifest from ExecuTorch's own encoder).

The program has two methods over one shared module: ``write`` (writes rows of a cache buffer with
``index_copy_``; dynamic row count and window) and ``read`` (reads the cache window back through the
same weight). The lowering puts the delegate's inputs in an order different from the method's
(``write``: method (x, pos, win), delegate (win, x, pos)).
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import torch
from torch import nn

BACKEND_ID = "AotiCpuTestBackend"
LAYOUTS = ("method_keys", "hashed_keys", "fqn_manifest")
ROWS, H, XMAX = 32, 16, 8

AOTI_OPTIONS = {
    # ExecuTorch 1.2.0's CUDA options that apply on CPU (cuda_backend.get_aoti_compile_options)
    "aot_inductor.link_libtorch": False,
    "aot_inductor.package": True,
    "aot_inductor.package_constants_in_so": False,
    "aot_inductor.package_constants_on_disk_format": "binary_blob",
    "aot_inductor.embed_kernel_binary": True,
}

_COMPILED: dict[str, tuple[bytes, bytes, float]] = {}


class Core(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(H, H, generator=g), requires_grad=False)
        # a buffer with non-zero initial values (must come from the weights, not be zeros)
        self.register_buffer("offset", torch.arange(4 * H, dtype=torch.float32).reshape(4, H) / 64)
        self.register_buffer("cache", torch.zeros(ROWS, H))


class Write(nn.Module):
    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core

    def forward(self, x, pos, win):
        self.core.cache.index_copy_(0, pos, x @ self.core.w + self.core.offset[1])
        # ExecuTorch 1.2.0 (create_exported_program_from_submodule, no arrange_graph_outputs yet)
        # takes the partition's outputs in (torch 2.11: unstable) topological order and expects
        # every buffer mutation before any user output; an output that does not depend on the
        # write can come first and lowering fails with "Mutation node ... is neither a buffer nor
        # a user input". So both outputs are read back from the written cache.
        y = self.core.cache[pos] - self.core.offset[1]
        return y, self.core.cache[: win.shape[0]].sum(0)


class Read(nn.Module):
    def __init__(self, core: Core) -> None:
        super().__init__()
        self.core = core

    def forward(self, scale, win):
        return (self.core.cache[: win.shape[0]] @ self.core.w) * scale


def example_inputs(device: str = "cpu"):
    kw = {"device": device}
    return {
        "write": (torch.randn(3, H, **kw), torch.arange(3, **kw), torch.empty(3, dtype=torch.int8, **kw)),
        "read": (torch.ones(1, **kw), torch.empty(3, dtype=torch.int8, **kw)),
    }


def export_methods(core: Core, device: str = "cpu") -> dict:
    T = torch.export.Dim("T", min=1, max=XMAX)
    W = torch.export.Dim("W", min=1, max=ROWS)
    ex = example_inputs(device)
    with torch.no_grad():
        return {
            "write": torch.export.export(
                Write(core), ex["write"], dynamic_shapes=({0: T}, {0: T}, {0: W}), strict=True
            ),
            "read": torch.export.export(Read(core), ex["read"], dynamic_shapes=(None, {0: W}), strict=True),
        }


def _compile(method: str, edge_program) -> tuple[bytes, bytes]:
    if method in _COMPILED:
        so, blob, _ = _COMPILED[method]
        return so, blob
    names = edge_program.graph_signature.user_inputs
    args = tuple(n.meta["val"] for n in edge_program.graph.nodes if n.op == "placeholder" and n.name in names)
    t0 = time.time()
    with torch.no_grad():
        paths = torch._inductor.aot_compile(edge_program.module(), args, options=AOTI_OPTIONS)
    so_path = next(p for p in paths if isinstance(p, str) and p.endswith(".wrapper.so"))
    blob_path = next(p for p in paths if isinstance(p, str) and p.endswith("_weights.blob"))
    so, blob = Path(so_path).read_bytes(), Path(blob_path).read_bytes()
    _COMPILED[method] = (so, blob, time.time() - t0)
    return so, blob


def _fqn_constants(edge_program) -> dict[str, torch.Tensor]:
    sig = edge_program.graph_signature
    out = {}
    for fqn in list(sig.inputs_to_parameters.values()) + list(sig.inputs_to_buffers.values()):
        t = edge_program.state_dict.get(fqn)
        if t is None:
            t = edge_program.constants[fqn]
        out[fqn] = t.detach()
    return out


def _fqn_encoder():
    """ExecuTorch 1.5's manifest encoder; a local equivalent where ExecuTorch is older (1.2)."""
    try:
        from executorch.backends.cuda.cuda_weight_collector import (
            CudaWeightEntry,
            encode_cuda_weight_metadata,
        )

        return CudaWeightEntry, encode_cuda_weight_metadata
    except ImportError:
        pass
    import struct
    from collections import namedtuple

    Entry = namedtuple(
        "Entry", "fqn storage_key storage_nbytes dtype device_type storage_offset sizes strides"
    )

    def encode(so_key, entries):
        def s(v):
            b = v.encode()
            return struct.pack("<I", len(b)) + b

        out = b"ETCUDAFQN3" + s(so_key) + struct.pack("<I", len(entries))
        for e in entries:
            out += s(e.fqn) + s(e.storage_key)
            out += struct.pack(
                "<QiiqI", e.storage_nbytes, e.dtype, e.device_type, e.storage_offset, len(e.sizes)
            )
            out += struct.pack(f"<{len(e.sizes)}q", *e.sizes) + struct.pack(f"<{len(e.strides)}q", *e.strides)
        return out

    return Entry, encode


def _make_backend():
    from executorch.exir._serialize._named_data_store import NamedDataStore
    from executorch.exir.backend.backend_details import BackendDetails, PreprocessResult

    class AotiCpuTestBackend(BackendDetails):
        @staticmethod
        def preprocess(edge_program, compile_specs):
            from executorch.backends.aoti.passes.replace_view_copy_with_view import (
                ReplaceViewCopyWithViewPass,
            )

            specs = {s.key: s.value.decode() for s in compile_specs}
            method, layout = specs["method_name"], specs["etspec_test_layout"]
            ReplaceViewCopyWithViewPass()(edge_program.graph_module)  # as AotiBackend.preprocess does
            so, blob = _compile(method, edge_program)
            store = NamedDataStore()
            tag = "aoti_cuda_blob"
            if layout == "method_keys":
                store.add_named_data(f"{method}_so_blob", so, 1, None)
                store.add_named_data(f"{method}_weights_blob", blob, 1, tag)
                processed = b""
            elif layout == "hashed_keys":
                so_key = hashlib.sha256(so).hexdigest() + "_so_blob"
                w_key = hashlib.sha256(blob).hexdigest() + "_weights_blob"
                store.add_named_data(so_key, so, 1, None)
                store.add_named_data(w_key, blob, 1, tag)
                processed = f"{so_key}\n{w_key}".encode()
            elif layout == "fqn_manifest":
                CudaWeightEntry, encode_cuda_weight_metadata = _fqn_encoder()
                from etspec.runtime.scalar_types import scalar_type_from_dtype as scalar_type_enum

                so_key = hashlib.sha256(so).hexdigest() + "_so_blob"
                store.add_named_data(so_key, so, 1, None)
                entries = []
                for fqn, t in _fqn_constants(edge_program).items():
                    t = t.contiguous()
                    key = f"cuda_fqn_weight:cpu:{fqn}"
                    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
                    store.add_named_data(key, data, 1, tag)
                    entries.append(
                        CudaWeightEntry(
                            fqn=fqn,
                            storage_key=key,
                            storage_nbytes=len(data),
                            dtype=int(scalar_type_enum(t.dtype)),
                            device_type=0,
                            storage_offset=0,
                            sizes=tuple(t.shape),
                            strides=tuple(t.stride()),
                        )
                    )
                processed = encode_cuda_weight_metadata(so_key, entries)
            else:
                raise ValueError(layout)
            return PreprocessResult(
                processed_bytes=processed,
                debug_handle_map={},
                data_store_output=store.get_named_data_store_output(),
            )

    return AotiCpuTestBackend


_BACKEND = None


def build_program(out_dir: Path, layout: str, core: Core) -> Path:
    """Lower ``core``'s two methods and write model.pte + aoti_cuda_blob.ptd into ``out_dir``."""
    global _BACKEND
    from executorch.backends.aoti.aoti_partitioner import AotiPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.backend.compile_spec_schema import CompileSpec
    from executorch.exir.passes import MemoryPlanningPass

    if _BACKEND is None:
        _BACKEND = _make_backend()
    eps = export_methods(core)
    parts = {
        m: [
            AotiPartitioner(
                BACKEND_ID,
                [CompileSpec("method_name", m.encode()), CompileSpec("etspec_test_layout", layout.encode())],
            )
        ]
        for m in eps
    }
    prog = to_edge_transform_and_lower(
        eps,
        partitioner=parts,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods={"get_max_rows": ROWS, "get_layout": layout},
    )
    et = prog.to_executorch(
        config=ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            emit_mutable_buffer_names=True,
        )
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "model.pte", "wb") as f:
        et.write_to_file(f)
    et.write_tensor_data_to_file(str(out_dir))
    return out_dir


def compile_seconds() -> dict[str, float]:
    return {m: v[2] for m, v in _COMPILED.items()}


def so_and_blob(method: str) -> tuple[bytes, bytes]:
    so, blob, _ = _COMPILED[method]
    return so, blob


def list_tmp(d: str | os.PathLike) -> list[str]:
    return sorted(os.listdir(d))
