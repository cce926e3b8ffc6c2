"""The constants (weights and mutable buffers) of a program, one device tensor per identity.

Every AOTI container binds its constants to these tensors through user-managed constant buffers, so
a weight costs 1x however many methods use it, and a KV cache written by one method is read by the
next. The identity is the constant's FQN, except for library-local names that restart in every
shared object.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from .aoti_container import ConstantInfo
from .aoti_payload import AotiPayload
from .errors import ConstantBindingError


def same_layout(t: torch.Tensor, dtype: torch.dtype, sizes: Sequence[int], strides: Sequence[int]) -> bool:
    return t.dtype == dtype and tuple(t.shape) == tuple(sizes) and tuple(t.stride()) == tuple(strides)


class SharedConstants:
    """Identity -> the one device tensor every container that uses the constant is bound to."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    @staticmethod
    def identity(payload: AotiPayload, c: ConstantInfo) -> str:
        fqn = c.fqn or c.name
        if not c.fqn or fqn.startswith("_tensor_constant"):
            # Library-local names restart in every AOTI library: never share them across .so files.
            return f"{payload.library_key}:{fqn}"
        return fqn

    def existing(
        self, where: str, ident: str, dtype: torch.dtype, sizes: Sequence[int], strides: Sequence[int]
    ) -> torch.Tensor | None:
        """The tensor already loaded for ``ident``, or None; refuses one of another layout."""
        t = self.tensors.get(ident)
        if t is not None and not same_layout(t, dtype, sizes, strides):
            raise ConstantBindingError(
                f"{where}: constant {ident!r} is {t.dtype}{list(t.shape)} stride {list(t.stride())} in an "
                f"earlier method but {dtype}{list(sizes)} stride {list(strides)} here; refusing to share"
            )
        return t

    def add(self, ident: str, t: torch.Tensor) -> None:
        self.tensors[ident] = t

    def __contains__(self, ident: object) -> bool:
        return ident in self.tensors

    def __getitem__(self, ident: str) -> torch.Tensor:
        return self.tensors[ident]

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def nbytes(self) -> int:
        """Device bytes held (each storage counted once)."""
        seen: dict[int, int] = {}
        for t in self.tensors.values():
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    def clear(self) -> None:
        self.tensors.clear()
