"""ExecuTorch < 1.4: a partition's outputs must list buffer mutations first.

The fused submodule orders its outputs by graph position, but the ExportedProgram verifier finds
mutations by position (the first N outputs). With KV caches written layer by layer and a feature
output whose inputs are ready before the last layers run, the two disagree ("Mutation node
aten_linear_default_57 is neither a buffer nor a user input"). 1.4+ reorders the tuple itself
(``lowered_backend_module.arrange_graph_outputs``); for older versions :func:`mutation_outputs_first`
permutes the tuple and the owning graph's getitem indices the same way before the signature is built
(docs/runtime-notes.md).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def mutation_outputs_first() -> Iterator[None]:
    """While the block runs, reorder each delegated partition's outputs mutations first (only where
    this ExecuTorch does not do it itself)."""
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
