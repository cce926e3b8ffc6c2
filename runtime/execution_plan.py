"""Turn the execution plans ExecuTorch's deserializer returns into :class:`.method_info.MethodInfo`.

Every EValue index an input, output or instruction refers to is checked against the plan here, so
the executor can index values without further checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import ArtifactError, UnsupportedLayoutError
from .method_info import DelegateInfo, Instruction, MethodInfo, TensorSpec, UnsupportedValue
from .scalar_types import dtype_from_scalar_type


def _dynamism(v: Any) -> str:
    code = int(getattr(v, "value", v))
    return {0: "static", 1: "dynamic_bound", 2: "dynamic_unbound"}.get(code, f"dynamism_{code}")


def _convert_value(idx: int, ev: Any) -> Any:
    val = ev.val
    kind = type(val).__name__
    if kind == "Tensor":
        device = "cpu"
        eti = getattr(val, "extra_tensor_info", None)
        if eti is not None and int(getattr(getattr(eti, "device_type", 0), "value", 0) or 0) == 1:
            device = "cuda"
        return TensorSpec(
            value_index=idx,
            dtype=dtype_from_scalar_type(int(val.scalar_type), f"value #{idx}"),
            sizes=tuple(int(s) for s in val.sizes),
            dynamism=_dynamism(val.shape_dynamism),
            device_type=device,
        )
    if kind == "Int":
        return int(val.int_val)
    if kind == "Double":
        return float(val.double_val)
    if kind == "Bool":
        return bool(val.bool_val)
    if kind == "String":
        return str(val.string_val)
    if kind == "Null":
        return None
    if kind == "IntList":
        return UnsupportedValue("IntList")  # items are EValue indices; not needed here
    if kind in ("DoubleList", "BoolList"):
        items = getattr(val, "items", None)
        return tuple(items) if items is not None else UnsupportedValue(kind)
    return UnsupportedValue(kind)


def _convert_instruction(plan_name: str, ins: Any, operators: Sequence[Any]) -> Instruction:
    a = ins.instr_args
    kind = type(a).__name__
    if kind == "DelegateCall":
        return Instruction("delegate", int(a.delegate_index), tuple(int(x) for x in a.args))
    if kind == "MoveCall":
        return Instruction("move", 0, (int(a.move_from), int(a.move_to)))
    if kind == "FreeCall":
        return Instruction("free", 0, (int(a.value_index),))
    if kind == "KernelCall":
        op = operators[a.op_index] if 0 <= a.op_index < len(operators) else None
        name = f"{op.name}.{op.overload}" if op is not None else f"operator #{a.op_index}"
        return Instruction("kernel", int(a.op_index), tuple(int(x) for x in a.args), name)
    if kind == "JumpFalseCall":
        return Instruction("jump_false", int(a.destination_instruction), (int(a.cond_value_index),))
    raise UnsupportedLayoutError(f"method {plan_name!r}: unknown instruction type {kind}")


def convert_plan(program: Any, plan: Any) -> MethodInfo:
    """One execution plan of a deserialized program, validated, as a :class:`MethodInfo`."""
    name = str(plan.name)
    values = {i: _convert_value(i, ev) for i, ev in enumerate(plan.values)}
    n = len(plan.values)
    for what, idxs in (("input", plan.inputs), ("output", plan.outputs)):
        for i in idxs:
            if not 0 <= int(i) < n:
                raise ArtifactError(f"method {name!r}: {what} refers to value #{i} of {n}")
    chains = list(plan.chains)
    if len(chains) > 1:
        raise UnsupportedLayoutError(f"method {name!r} has {len(chains)} chains; only one is supported")
    instructions = tuple(
        _convert_instruction(name, ins, plan.operators) for ch in chains for ins in ch.instructions
    )
    delegates = []
    inline = program.backend_delegate_data
    for di, d in enumerate(plan.delegates):
        loc = int(getattr(d.processed.location, "value", d.processed.location))
        if loc != 0:  # DataLocation.INLINE after deserialize_pte_binary restored the segments
            raise ArtifactError(f"method {name!r}: delegate {di} data was not restored (location {loc})")
        pi = int(d.processed.index)
        if not 0 <= pi < len(inline):
            raise ArtifactError(f"method {name!r}: delegate {di} refers to missing data #{pi}")
        specs = tuple((str(c.key), bytes(c.value)) for c in d.compile_specs)
        delegates.append(DelegateInfo(di, str(d.id), specs, bytes(inline[pi].data)))
    for ins in instructions:
        bad = [a for a in ins.args if not 0 <= a < n] if ins.kind != "jump_false" else []
        if bad:
            raise ArtifactError(f"method {name!r}: instruction refers to values {bad} of {n}")
        if ins.kind == "delegate" and not 0 <= ins.index < len(delegates):
            raise ArtifactError(f"method {name!r}: DelegateCall to delegate {ins.index} of {len(delegates)}")
    return MethodInfo(
        name=name,
        inputs=tuple(int(i) for i in plan.inputs),
        outputs=tuple(int(i) for i in plan.outputs),
        values=values,
        instructions=instructions,
        delegates=tuple(delegates),
        num_values=n,
    )
