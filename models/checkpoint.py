"""Loading target and EAGLE-3 head checkpoints from local Hugging Face directories.

Modules are built on the meta device and materialised once in the requested dtype, so an 8B model costs
one copy of its weights in host memory, not an fp32 init plus a cast.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .config import (
    ConfigError,
    DraftConfig,
    TargetConfig,
    check_pair,
    parse_draft_config,
    parse_target_config,
    read_config_json,
)
from .draft import Eagle3Draft
from .layers import PLAIN_OPS, FewRowsKernels
from .speculator import Speculator
from .target import TargetModel

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint directory that does not hold what its config promises."""


@contextmanager
def _open_safetensors(file: Path) -> Iterator[Any]:
    """``safe_open``, with a damaged file (a cut-off download, a bad header) reported by name."""
    try:
        handle = safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None
    with handle as f:
        yield f


@dataclass
class TensorSource:
    """Where each tensor of a checkpoint lives, without loading any of it yet."""

    directory: Path
    files: dict[str, Path]  # key -> file
    kind: str  # "safetensors" or "bin"

    def keys(self) -> set[str]:
        return set(self.files)

    def _bin(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_bin_cache"):
            file = next(iter(set(self.files.values())))
            self._bin_cache = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        return self._bin_cache

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        if self.kind == "bin":
            yield from self._bin().items()
            return
        for file in sorted(set(self.files.values())):
            with _open_safetensors(file) as f:
                for k in f.keys():
                    yield k, f.get_tensor(k)

    def fingerprint(self) -> str:
        """sha256 over config.json and the weight files' names and sizes (cheap, stable for a checkout)."""
        h = hashlib.sha256((self.directory / "config.json").read_bytes())
        for file in sorted(set(self.files.values())):
            h.update(f"{file.name}:{file.stat().st_size}".encode())
        return h.hexdigest()


def find_tensors(directory: str | Path, allow_bin: bool) -> TensorSource:
    """Locate sharded safetensors, a single safetensors file, or (draft heads) pytorch_model.bin."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"checkpoint directory {d} does not exist")
    index = d / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{index}: not a safetensors index (a JSON object)") from None
        shards = sorted(set(weight_map.values()))
        missing = [f for f in shards if not (d / f).is_file()]
        if missing:
            raise CheckpointError(f"{d}: shards listed in {index.name} are missing: {', '.join(missing)}")
        for shard in shards:  # headers only: a cut-off shard fails here, before any weight is read
            with _open_safetensors(d / shard):
                pass
        return TensorSource(d, {k: d / f for k, f in weight_map.items()}, "safetensors")
    single = d / "model.safetensors"
    if single.is_file():
        with _open_safetensors(single) as f:
            return TensorSource(d, {k: single for k in f.keys()}, "safetensors")
    binfile = d / "pytorch_model.bin"
    if allow_bin and binfile.is_file():
        src = TensorSource(d, {}, "bin")
        src.files = {
            k: binfile for k in torch.load(binfile, map_location="cpu", weights_only=True, mmap=True)
        }
        return src
    wanted = "model.safetensors(.index.json)" + (" or pytorch_model.bin" if allow_bin else "")
    raise CheckpointError(f"{d}: no weights found (expected {wanted})")


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_empty(factory, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """Construct a module on meta in `dtype`, then allocate its storage (uninitialised) on `device`."""
    with _default_dtype(dtype), torch.device("meta"):
        module = factory()
    module = module.to_empty(device=device)
    reset_buffers(module)
    return module


def reset_buffers(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_buffers"):
            m.reset_buffers()


def load_into(module: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], rename, optional=()) -> None:
    """Copy checkpoint tensors into `module`, reporting every missing, unexpected or mis-shaped key."""
    targets = dict(module.named_parameters(remove_duplicate=False))
    targets.update({n: b for n, b in module.named_buffers() if n.split(".")[-1] in ("d2t",)})
    seen: set[str] = set()
    unexpected, misshaped = [], []
    for key, tensor in tensors:
        name = rename(key)
        if name is None:
            continue
        if name not in targets:
            unexpected.append(key)
            continue
        dst = targets[name]
        if tuple(dst.shape) != tuple(tensor.shape):
            misshaped.append(f"{key}: checkpoint {tuple(tensor.shape)} vs expected {tuple(dst.shape)}")
            continue
        with torch.no_grad():
            dst.copy_(tensor)
        seen.add(name)
    # Tied parameters share storage: one key fills all their names.
    tied = {n for n, p in targets.items() if any(p is targets[s] for s in seen)}
    missing = sorted(n for n in targets if n not in seen | tied and n not in optional)
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append("missing: " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
        if unexpected:
            parts.append(
                "unexpected: " + ", ".join(unexpected[:20]) + (" ..." if len(unexpected) > 20 else "")
            )
        if misshaped:
            parts.append("mis-shaped: " + "; ".join(misshaped[:20]))
        raise CheckpointError("checkpoint does not match the model: " + " | ".join(parts))


def _target_rename(key: str, prefix: str = "model.") -> str | None:
    """The decoder's name for a checkpoint key: `prefix` stripped (a multimodal checkpoint's text model
    sits under model.language_model.; its other towers' weights are skipped)."""
    if key.startswith(prefix):
        return key[len(prefix) :]
    if prefix != "model." and key.startswith("model."):
        return None  # vision / audio towers and their embedders
    return key


def load_target(
    directory: str | Path,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    tap_layers: tuple[int, ...] | None = None,
    kernels: FewRowsKernels = PLAIN_OPS,
    device: str | torch.device = "cpu",
    cfg: TargetConfig | None = None,
    max_rows: int | None = None,
) -> TargetModel:
    """The target of a checkpoint directory; `max_rows` bounds the rows per call (`TargetModel`: sliding
    layers then keep a ring cache)."""
    cfg = cfg or parse_target_config(read_config_json(directory))
    src = find_tensors(directory, allow_bin=False)
    model = build_empty(lambda: TargetModel(cfg, max_seq_len, tap_layers, kernels, max_rows), dtype, device)
    model.tie_weights()
    # Rotary caches of transformers' checkpoints are not weights; skip them if present.
    rename = lambda k: None if k.endswith("rotary_emb.inv_freq") else _target_rename(k, cfg.checkpoint_prefix)
    load_into(model, src.tensors(), rename)
    return model.eval().requires_grad_(False)


def load_draft(
    directory: str | Path,
    max_seq_len: int,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    cfg: DraftConfig | None = None,
    kernels: FewRowsKernels = PLAIN_OPS,
) -> Eagle3Draft:
    """Load an EAGLE-3 head (EAGLE or speculators layout); d2t absent means identity, which needs
    draft_vocab == vocab."""
    cfg = cfg or parse_draft_config(read_config_json(directory))
    src = find_tensors(directory, allow_bin=True)
    keys = src.keys()
    if "d2t" not in keys and cfg.draft_vocab_size != cfg.vocab_size:
        raise CheckpointError(
            f"{directory}: draft_vocab_size {cfg.draft_vocab_size} < vocab_size {cfg.vocab_size} "
            "but the checkpoint has no d2t mapping"
        )
    own_embedding = "embed_tokens.weight" in keys
    model = build_empty(lambda: Eagle3Draft(cfg, max_seq_len, own_embedding, kernels), dtype, device)
    model.d2t.zero_()
    layer = "layers.0." if cfg.checkpoint_format == "speculators" else "midlayer."
    rename = lambda k: None if k == "t2d" else "midlayer." + k[len(layer) :] if k.startswith(layer) else k
    load_into(model, src.tensors(), rename, optional=("d2t",))
    mapped = torch.arange(cfg.draft_vocab_size, device=model.d2t.device) + model.d2t
    if int(mapped.min()) < 0 or int(mapped.max()) >= cfg.vocab_size:
        raise CheckpointError(
            f"{directory}: d2t maps draft ids outside the target vocab [0, {cfg.vocab_size})"
        )
    return model.eval().requires_grad_(False)


def load_speculator(
    target_dir: str | Path,
    draft_dir: str | Path,
    max_seq_len: int,
    draft_len: int,
    dtype: torch.dtype = torch.float32,
    kernels: FewRowsKernels = PLAIN_OPS,
    device: str | torch.device = "cpu",
    max_rows: int | None = None,
) -> Speculator:
    """Load and pair a target with its head, checking they fit (hidden size, vocab, tap layers);
    `max_rows`: see `load_target`."""
    tcfg = parse_target_config(read_config_json(target_dir))
    dcfg = parse_draft_config(read_config_json(draft_dir))
    taps = check_pair(tcfg, dcfg)
    draft = load_draft(draft_dir, max_seq_len, dtype, device, dcfg, kernels)
    if draft.embed_tokens is None and dcfg.hidden_size != tcfg.hidden_size:
        raise ConfigError(
            f"draft head has no embed_tokens and its hidden size {dcfg.hidden_size} "
            f"differs from the target's {tcfg.hidden_size}"
        )
    target = load_target(target_dir, max_seq_len, dtype, taps, kernels, device, tcfg, max_rows)
    return Speculator(target, draft, draft_len)
