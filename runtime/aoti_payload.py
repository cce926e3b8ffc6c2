"""Where an AOTInductor delegate's shared object and constants live, by ExecuTorch version.

Three layouts (:class:`BlobLayout`), told apart by the delegate's processed bytes:

- ``METHOD_KEYS`` (ExecuTorch 1.2.x): processed bytes empty; ``<method>_so_blob`` in the .pte,
  ``<method>_weights_blob`` (one dense AOTI constants blob) in ``aoti_cuda_blob.ptd``; ``<method>``
  is the ``method_name`` compile spec.
- ``HASHED_KEYS`` (ExecuTorch 1.4.x): processed bytes are ``"<sha256>_so_blob\\n<sha256>_weights_blob"``
  naming the same two entries.
- ``FQN_MANIFEST`` (ExecuTorch 1.5.x): processed bytes are a binary manifest (magic ``ETCUDAFQN3``,
  :mod:`.fqn_weight_manifest`) with the shared-object key and one entry per constant FQN; each
  storage is its own named entry in the .ptd.

Anything else raises :class:`UnsupportedLayoutError` naming what was found. Only the keys are worked
out here; :meth:`.pte_reader.PteProgram.aoti_payload` checks that the named data holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from .errors import ArtifactError, UnsupportedLayoutError
from .fqn_weight_manifest import FQN_MAGIC_PREFIX, FQN_MAGIC_V3, FqnWeightEntry, parse_fqn_manifest
from .method_info import DelegateInfo

# Backend ids whose delegates are AOTInductor shared objects (the ExecuTorch CUDA backend).
AOTI_BACKEND_IDS: frozenset[str] = frozenset({"CudaBackend"})


class BlobLayout(str, Enum):
    METHOD_KEYS = "method_keys"  # ExecuTorch 1.2.x: <method>_so_blob / <method>_weights_blob
    HASHED_KEYS = "hashed_keys"  # ExecuTorch 1.4.x: sha256-keyed, keys in processed bytes
    FQN_MANIFEST = "fqn_manifest"  # ExecuTorch 1.5.x: ETCUDAFQN3 manifest, one entry per FQN


@dataclass(frozen=True)
class AotiPayload:
    """Where one AOTI delegate's shared object and constants live."""

    layout: BlobLayout
    so_key: str
    weights_key: str | None = None  # dense AOTI constants blob (METHOD_KEYS / HASHED_KEYS)
    entries: tuple[FqnWeightEntry, ...] = field(default_factory=tuple)  # FQN_MANIFEST

    @property
    def library_key(self) -> str:
        """A key unique to this shared object (for library-local constants such as _tensor_constant0)."""
        return self.so_key


def parse_aoti_payload(delegate: DelegateInfo, method_name: str) -> AotiPayload:
    """Work out which named-data keys one AOTI delegate uses (no lookup of the keys yet)."""
    processed = delegate.processed
    where = f"method {method_name!r} delegate {delegate.index} ({delegate.backend_id})"
    if processed.startswith(FQN_MAGIC_PREFIX):
        if not processed.startswith(FQN_MAGIC_V3):
            raise UnsupportedLayoutError(
                f"{where}: FQN weight manifest version {processed[: len(FQN_MAGIC_V3)]!r} is not "
                f"supported (this runtime reads {FQN_MAGIC_V3!r}, ExecuTorch 1.5)"
            )
        try:
            so_key, entries = parse_fqn_manifest(processed)
        except ArtifactError as e:
            raise type(e)(f"{where}: {e}") from e
        return AotiPayload(BlobLayout.FQN_MANIFEST, so_key, None, entries)
    if not processed:
        spec = delegate.spec("method_name")
        m = spec.decode("utf-8", "replace") if spec else ""
        prefix = f"{m}_" if m else ""
        return AotiPayload(BlobLayout.METHOD_KEYS, f"{prefix}so_blob", f"{prefix}weights_blob")
    try:
        text = processed.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if (
            1 <= len(lines) <= 2
            and lines[0].endswith("_so_blob")
            and (len(lines) == 1 or lines[1].endswith("_weights_blob"))
        ):
            return AotiPayload(BlobLayout.HASHED_KEYS, lines[0], lines[1] if len(lines) == 2 else None)
    raise UnsupportedLayoutError(
        f"{where}: unrecognised AOTI delegate payload ({len(processed)} bytes, starts with "
        f"{processed[:24]!r}); known layouts: empty (ExecuTorch 1.2 <method>_so_blob keys), "
        "'<sha>_so_blob\\n<sha>_weights_blob' (1.4), ETCUDAFQN3 manifest (1.5)"
    )
