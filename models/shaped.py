"""Random-weight target + EAGLE-3 head pairs shaped like real checkpoints, for GPU speed work.

Speed depends on shapes, not on weight values, and no real checkpoint can be downloaded on the GPU box;
these pairs are written in the same Hugging Face layout a user's checkpoint has, so benchmarks and
long-context runs go through the real load -> export -> run path.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from .checkpoint import build_empty
from .config import parse_draft_config, parse_target_config
from .draft import Eagle3Draft
from .target import TargetModel
from .tiny import write_draft_checkpoint, write_target_checkpoint

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0}
_LLAMA3_ROPE["original_max_position_embeddings"] = 8192

SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.2-1b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0},
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "llama-3.1-8b": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0},
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}


def head_config(target_cfg: dict[str, Any], draft_vocab_size: int = 32000) -> dict[str, Any]:
    """The standard EAGLE-3 head for a target: one Llama layer as wide as the target (docs/design.md §8)."""
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": target_cfg["hidden_size"],
        "intermediate_size": target_cfg["intermediate_size"],
        "num_hidden_layers": 1,
        "num_attention_heads": target_cfg["num_attention_heads"],
        "num_key_value_heads": target_cfg["num_key_value_heads"],
        "head_dim": target_cfg["head_dim"],
        "vocab_size": target_cfg["vocab_size"],
        "draft_vocab_size": draft_vocab_size,
        "max_position_embeddings": 2048,
        "rms_norm_eps": target_cfg["rms_norm_eps"],
        "hidden_act": "silu",
    }


@torch.no_grad()
def _randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Matrices ~ N(0, 0.02), norm weights ~ 1: activations stay finite through every layer."""
    for p in module.parameters():
        if p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)


def write_random_pair(
    directory: str | Path,
    shape: str,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cpu",
    seed: int = 0,
    draft_vocab_size: int = 32000,
    **overrides: Any,
) -> tuple[Path, Path]:
    """Write `shape`'s target (config entries replaced by `overrides`) and a matching head as
    directories target/ and draft/ (HF layout)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r} (have {sorted(SHAPES)})")
    tcfg = {**copy.deepcopy(SHAPES[shape]), **overrides}
    dcfg = head_config(tcfg, draft_vocab_size)
    gen = torch.Generator(device=device).manual_seed(seed)
    d = Path(directory)
    target = build_empty(lambda: TargetModel(parse_target_config(tcfg), 8), dtype, device)
    _randomize(target, gen)
    target.tie_weights()
    write_target_checkpoint(d / "target", tcfg, target)
    del target
    head = build_empty(lambda: Eagle3Draft(parse_draft_config(dcfg), 8, own_embedding=False), dtype, device)
    _randomize(head, gen)
    chosen = torch.randperm(tcfg["vocab_size"], generator=torch.Generator().manual_seed(seed))
    chosen = chosen[:draft_vocab_size].sort().values
    head.d2t.copy_(chosen - torch.arange(draft_vocab_size))
    write_draft_checkpoint(d / "draft", dcfg, head)
    return d / "target", d / "draft"
