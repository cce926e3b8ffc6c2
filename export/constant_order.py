"""The order in which a method first reads its weights, and a warning when two methods' orders differ.

AOTInductor lays out a method's CUDA weights blob in first-use order, and ExecuTorch stores two methods'
blobs once only when they are byte-identical: two methods over the same weights must read them in one
order, or the .ptd holds them twice (tests/export/test_constant_order.py).
"""

from __future__ import annotations

from collections.abc import Mapping

from torch.export import ExportedProgram

from .progress import Progress


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


def warn_unshared_blobs(exported: Mapping[str, ExportedProgram], progress: Progress) -> None:
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
                    "will hold them twice (see export.constant_order.constants_in_first_use_order)"
                )
