"""Plain, immutable descriptions of one execution plan (method) of a .pte.

What a method takes and returns (EValue indices with dtype, sizes and dynamism), its instruction list,
and each delegate's backend id, compile specs and processed bytes: everything the executor needs,
without the flatbuffer objects they were read from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ArtifactError, UnsupportedLayoutError


@dataclass(frozen=True)
class TensorSpec:
    """A tensor EValue of an execution plan: what a method input/output must look like.

    ``sizes`` are exact for ``dynamism == "static"`` and upper bounds for ``"dynamic_bound"``
    (ExecuTorch stores the export-time maximum); ``"dynamic_unbound"`` only fixes the rank.
    """

    value_index: int
    dtype: torch.dtype
    sizes: tuple[int, ...]
    dynamism: str
    device_type: str = "cpu"

    def describe(self) -> str:
        bound = "" if self.dynamism == "static" else f" ({self.dynamism.replace('_', ' ')})"
        return f"{str(self.dtype).replace('torch.', '')}{list(self.sizes)}{bound}"

    def mismatch(self, t: Any) -> str | None:
        """Why ``t`` cannot be passed for this spec, or None if it can."""
        if not isinstance(t, torch.Tensor):
            return f"expected a tensor {self.describe()}, got {type(t).__name__}"
        if t.dtype != self.dtype:
            return f"expected dtype {self.dtype}, got {t.dtype}"
        if t.dim() != len(self.sizes):
            return f"expected {len(self.sizes)} dims {self.describe()}, got shape {list(t.shape)}"
        shape = tuple(t.shape)
        if self.dynamism == "static":
            if shape != self.sizes:
                return f"expected shape {list(self.sizes)}, got {list(shape)}"
        elif self.dynamism == "dynamic_bound":
            over = [i for i, (s, b) in enumerate(zip(shape, self.sizes)) if s > b]
            if over:
                return (
                    f"shape {list(shape)} exceeds the exported upper bound {list(self.sizes)} "
                    f"in dim(s) {over}"
                )
        return None


@dataclass(frozen=True)
class Instruction:
    """One instruction of a method's chain.

    kind is ``"delegate"`` (args = DelegateCall args, delegate's own order), ``"move"``
    (args = (from, to)), ``"free"`` (args = (value,)), ``"kernel"`` (args = KernelCall args,
    ``detail`` = operator name) or ``"jump_false"``.
    """

    kind: str
    index: int  # delegate index / operator index / destination instruction
    args: tuple[int, ...]
    detail: str = ""


@dataclass(frozen=True)
class DelegateCall:
    delegate_index: int
    args: tuple[int, ...]


@dataclass(frozen=True)
class DelegateInfo:
    """One backend delegate of an execution plan."""

    index: int
    backend_id: str
    compile_specs: tuple[tuple[str, bytes], ...]
    processed: bytes

    def spec(self, key: str) -> bytes | None:
        for k, v in self.compile_specs:
            if k == key:
                return v
        return None


@dataclass(frozen=True)
class MethodInfo:
    """One execution plan (method) of the program."""

    name: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    values: Mapping[int, Any]  # TensorSpec, a python constant, or an UnsupportedValue
    instructions: tuple[Instruction, ...]
    delegates: tuple[DelegateInfo, ...]
    num_values: int

    @property
    def input_specs(self) -> list[Any]:
        return [self.values.get(i) for i in self.inputs]

    @property
    def output_specs(self) -> list[Any]:
        return [self.values.get(i) for i in self.outputs]

    @property
    def delegate_calls(self) -> list[DelegateCall]:
        return [DelegateCall(ins.index, ins.args) for ins in self.instructions if ins.kind == "delegate"]

    @property
    def is_constant_method(self) -> bool:
        """True for a method with no inputs and no instructions (ExecuTorch constant methods)."""
        return not self.inputs and not self.instructions

    @property
    def constant_value(self) -> Any:
        """The value(s) returned by a constant method (single value unwrapped)."""
        if not self.is_constant_method:
            raise ArtifactError(f"method {self.name!r} is not a constant method")
        vals = []
        for i in self.outputs:
            v = self.values.get(i)
            if isinstance(v, (TensorSpec, UnsupportedValue)):
                raise UnsupportedLayoutError(
                    f"constant method {self.name!r} returns value #{i} of a kind this runtime does "
                    f"not read ({v!r})"
                )
            vals.append(v)
        return vals[0] if len(vals) == 1 else tuple(vals)


@dataclass(frozen=True)
class UnsupportedValue:
    kind: str
