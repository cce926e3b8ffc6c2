"""The head being trained: its standard config.json for a target, a fresh Eagle3Draft, and the checkpoint
writer (the layout `etspec.models.checkpoint.load_draft`, vLLM and SGLang read)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from etspec.models.config import TargetConfig, parse_draft_config
from etspec.models.draft import Eagle3Draft

from .vocab import DraftVocab

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def _rope_scaling(target: TargetConfig) -> dict[str, Any] | None:
    rope = target.rope
    if rope.rope_type == "linear":
        return {"rope_type": "linear", "factor": rope.factor}
    if rope.rope_type == "llama3":
        return {
            "rope_type": "llama3",
            "factor": rope.factor,
            "low_freq_factor": rope.low_freq_factor,
            "high_freq_factor": rope.high_freq_factor,
            "original_max_position_embeddings": rope.original_max_position_embeddings,
        }
    return None


def head_config(target: TargetConfig, draft_vocab_size: int, dtype: torch.dtype) -> dict[str, Any]:
    """LlamaForCausalLMEagle3 as wide as the target, with the target's attention shape and rope.

    The tap layers are left at the default (2, L//2, L-3) that every serving stack agrees on; an
    explicit `eagle_aux_hidden_state_layer_ids` is read with different offsets by different stacks.
    """
    cfg: dict[str, Any] = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": target.hidden_size,
        "intermediate_size": target.intermediate_size,
        "num_hidden_layers": 1,
        "num_attention_heads": target.num_heads,
        "num_key_value_heads": target.num_kv_heads,
        "head_dim": target.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": target.rms_norm_eps,
        "vocab_size": target.vocab_size,
        "draft_vocab_size": draft_vocab_size,
        "max_position_embeddings": target.max_position_embeddings,
        "rope_theta": target.rope.theta,
        "tie_word_embeddings": False,
        "torch_dtype": DTYPE_NAMES[dtype],
    }
    scaling = _rope_scaling(target)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    if target.bos_token_id is not None:
        cfg["bos_token_id"] = target.bos_token_id
    if target.eos_token_ids:
        ids = list(target.eos_token_ids)
        cfg["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    return cfg


def new_head(cfg: dict[str, Any], vocab: DraftVocab, seed: int, device: str | torch.device) -> Eagle3Draft:
    """A freshly initialised fp32 head (PyTorch's default init, norms at 1) using the target's embedding.

    Its KV cache is one position long: training never uses it (the TTT forward builds keys itself)."""
    torch.manual_seed(seed)
    head = Eagle3Draft(parse_draft_config(cfg), max_seq_len=1, own_embedding=False).to(device)
    head.d2t.copy_(vocab.d2t)
    return head


def save_head(directory: Path, cfg: dict[str, Any], head: Eagle3Draft, vocab: DraftVocab) -> None:
    """config.json + model.safetensors: weights in the config's dtype, d2t int64 [Vd], t2d bool [V]."""
    dtype = {v: k for k, v in DTYPE_NAMES.items()}[cfg["torch_dtype"]]
    tensors = {
        name: p.detach().to(dtype=dtype, device="cpu").contiguous() for name, p in head.named_parameters()
    }
    tensors["d2t"] = vocab.d2t.cpu().to(torch.int64)
    tensors["t2d"] = vocab.t2d.cpu()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
