"""What an exported artifact holds, read from its flatbuffers: the tests' view of a lowered program.

Parses the files only (ExecuTorch's own deserializers), so it works on CUDA programs without a CUDA
runtime. The runtime has its own reader (``runtime/pte_reader.py``); this one stays independent of it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def describe_program(
    pte: str | os.PathLike[str] | bytes, ptd: list[str | os.PathLike[str]] | tuple = ()
) -> dict[str, Any]:
    """What an artifact holds: per method its inputs/outputs, delegates, planned arena sizes and
    mutable buffers as FQN -> (mem_id, offset, numel); plus every named-data key with its size
    (in the .pte and in the given ``.ptd`` files).

    Two methods share a mutable buffer iff its FQN maps to the same (mem_id, offset) in both.
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
