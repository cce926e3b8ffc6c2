"""Tiny deterministic configs for every supported family, for tests and the demo.

Each is a Hugging Face `config.json` dict small enough for CPU tests yet exercising the family's
features (GQA, llama3 rope scaling, qkv bias, qk-norm, sliding windows shorter than the test prompts,
softcaps, local/global rope bases).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .config import parse_draft_config, parse_target_config
from .draft import Eagle3Draft
from .speculator import Speculator
from .target import TargetModel

_BASE: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}

TINY_TARGETS: dict[str, dict[str, Any]] = {
    "llama": {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    },
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1000000.0},
    "qwen3": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "head_dim": 32,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "mistral": {
        "model_type": "mistral",
        "architectures": ["MistralForCausalLM"],
        "sliding_window": 7,
        "rope_theta": 10000.0,
    },
    "gemma2": {
        "model_type": "gemma2",
        "architectures": ["Gemma2ForCausalLM"],
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 24,
        "sliding_window": 6,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": 16,
        "sliding_window": 5,
        "sliding_window_pattern": 3,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": {"rope_type": "linear", "factor": 4.0},
        "tie_word_embeddings": True,
    },
}


def tiny_target_config(family: str) -> dict[str, Any]:
    cfg = copy.deepcopy(_BASE)
    cfg.update(copy.deepcopy(TINY_TARGETS[family]))
    return cfg


def tiny_draft_config(
    target_cfg: dict[str, Any], draft_vocab_size: int = 128, **overrides: Any
) -> dict[str, Any]:
    """An EAGLE-3 head config sized for `target_cfg` (one layer, own rope base 10000 by omission)."""
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": target_cfg["hidden_size"],
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": target_cfg["vocab_size"],
        "draft_vocab_size": draft_vocab_size,
        "max_position_embeddings": 64,  # shorter than test contexts on purpose (docs/design.md §8)
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
    }
    cfg.update(overrides)
    return cfg


def random_draft(
    cfg: dict[str, Any], seed: int, own_embedding: bool = False, max_seq_len: int = 64
) -> Eagle3Draft:
    """A randomly initialised head with a random (valid) d2t when the draft vocab is smaller."""
    torch.manual_seed(seed)
    dcfg = parse_draft_config(cfg)
    head = Eagle3Draft(dcfg, max_seq_len=max_seq_len, own_embedding=own_embedding)
    for p in head.parameters():
        if p.dim() == 1:  # norms: near 1, not exactly, so a wrong norm shows
            p.data = 1.0 + 0.1 * torch.randn_like(p)
    if dcfg.draft_vocab_size < dcfg.vocab_size:
        chosen = torch.randperm(dcfg.vocab_size)[: dcfg.draft_vocab_size].sort().values
        head.d2t.copy_(chosen - torch.arange(dcfg.draft_vocab_size))
    return head


def draft_state_dict(head: Eagle3Draft) -> dict[str, torch.Tensor]:
    """The head's weights under the standard EAGLE-3 checkpoint key names (docs/design.md §8), plus t2d."""
    sd = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items() if "cache" not in k}
    sd.pop("midlayer.self_attn.rotary.inv_freq", None)
    vocab = head.cfg.vocab_size
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[torch.arange(head.cfg.draft_vocab_size) + sd["d2t"]] = True
    sd["t2d"] = t2d
    return sd


def write_draft_checkpoint(directory: str | Path, cfg: dict[str, Any], head: Eagle3Draft) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(draft_state_dict(head), str(d / "model.safetensors"))
    return d


def random_target(family: str, max_seq_len: int, seed: int, use_midm: bool = False) -> TargetModel:
    """A tiny target with seeded random weights (default PyTorch init; norms jittered around 1)."""
    torch.manual_seed(seed)
    cfg = parse_target_config(tiny_target_config(family))
    model = TargetModel(cfg, max_seq_len, use_midm=use_midm)
    for name, p in model.named_parameters():
        if p.dim() == 1 and "norm" in name:
            p.data = p.data + 0.1 * torch.randn_like(p)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _greedy_corpus(target: TargetModel, n_seqs: int, length: int, gen: torch.Generator) -> list[torch.Tensor]:
    """Target-greedy continuations of random prompts: what the head must learn to predict."""
    seqs = []
    for _ in range(n_seqs):
        toks = torch.randint(3, target.cfg.vocab_size, (4,), generator=gen).tolist()
        for _ in range(length - len(toks)):
            n = len(toks)
            logits = target(torch.tensor([toks]), torch.arange(n), torch.empty(n, dtype=torch.int8))
            toks.append(int(logits[0, -1].argmax()))
        seqs.append(torch.tensor(toks))
    return seqs


def train_draft(
    target: TargetModel,
    draft_cfg: dict[str, Any],
    seed: int,
    steps: int = 300,
    n_seqs: int = 24,
    length: int = 48,
) -> Eagle3Draft:
    """Fit a head to the target's greedy behaviour (one-step teacher forcing), so demos and tests see
    real acceptance (j > 0) instead of the ~0 of a random head. Its draft vocab is the corpus' most
    frequent tokens, so d2t is a real, non-identity mapping."""
    gen = torch.Generator().manual_seed(seed)
    seqs = _greedy_corpus(target, n_seqs, length, gen)
    dcfg = parse_draft_config(draft_cfg)
    counts = torch.bincount(torch.cat(seqs), minlength=dcfg.vocab_size).float()
    counts += torch.rand(dcfg.vocab_size, generator=gen) * 1e-3  # deterministic tie-break
    vocab = counts.topk(dcfg.draft_vocab_size).indices.sort().values
    t2d = torch.full((dcfg.vocab_size,), -100, dtype=torch.long)  # -100: not in the draft vocab
    t2d[vocab] = torch.arange(dcfg.draft_vocab_size)

    head = random_draft(draft_cfg, seed)
    head.d2t.copy_(vocab - torch.arange(dcfg.draft_vocab_size))
    head.midlayer.self_attn.reset_buffers()
    batches = []
    with torch.no_grad():
        for s in seqs:
            n = len(s) - 2
            _, taps = target.hidden(s[None, :n], torch.arange(n), n)
            batches.append((torch.cat(taps, -1), s[None, 1 : n + 1], t2d[s[None, 2 : n + 2]]))
    head.requires_grad_(True).train()
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    layer, attn = head.midlayer, head.midlayer.self_attn
    embed = target.embed_tokens
    for step in range(steps):
        taps, tokens, labels = batches[step % len(batches)]
        attn.k_cache, attn.v_cache = attn.k_cache.detach(), attn.v_cache.detach()
        n = tokens.shape[1]
        feature = head.fc(taps)
        a = attn(layer.attn_input(embed(tokens), feature), torch.arange(n), n)
        logits = head.step_logits(layer.finish(feature, a))
        loss = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.midlayer.self_attn.reset_buffers()
    return head.eval().requires_grad_(False)


def tiny_pair(
    family: str = "llama", max_seq_len: int = 256, draft_len: int = 4, seed: int = 0, train_steps: int = 300
) -> Speculator:
    """The deterministic tiny target + trained EAGLE-3 head used by the demo and the tests."""
    target = random_target(family, max_seq_len, seed)
    dcfg = tiny_draft_config(tiny_target_config(family))
    head = train_draft(target, dcfg, seed, steps=train_steps)
    # Re-home the head at the requested max_seq_len (its KV cache was sized for training).
    draft = Eagle3Draft(parse_draft_config(dcfg), max_seq_len, own_embedding=False)
    draft.load_state_dict(head.state_dict(), strict=False)
    draft.midlayer.self_attn.reset_buffers()
    return Speculator(target, draft.eval().requires_grad_(False), draft_len)


def write_target_checkpoint(directory: str | Path, config: dict[str, Any], model: TargetModel) -> Path:
    """Save a target in the Hugging Face layout (config.json + model.safetensors, `model.` prefixes)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config, indent=2))
    sd = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            if not model.cfg.tie_word_embeddings:
                sd[k] = v.detach().contiguous().cpu()
        else:
            sd["model." + k] = v.detach().contiguous().cpu()
    save_file(sd, str(d / "model.safetensors"))
    return d


def write_tiny_pair(directory: str | Path, family: str = "llama", seed: int = 0) -> tuple[Path, Path]:
    """Write the tiny pair of `tiny_pair` as two checkpoint directories (target/, draft/)."""
    spec = tiny_pair(family, max_seq_len=64, seed=seed)  # training needs a cache of the corpus length
    d = Path(directory)
    target = write_target_checkpoint(d / "target", tiny_target_config(family), spec.target)
    cfg = spec.target.cfg
    write_byte_tokenizer(target, eos_token_id=int(cfg.eos_token_ids[0]) if cfg.eos_token_ids else 2)
    draft = write_draft_checkpoint(
        d / "draft", tiny_draft_config(tiny_target_config(family)), spec.draft_head
    )
    return target, draft


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE (GPT-2's mapping)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def write_byte_tokenizer(directory: str | Path, eos_token_id: int = 2) -> None:
    """A 256-token byte-level tokenizer (token id = byte) with a minimal chat template, so the tiny
    pair takes and prints text through the same transformers path as a real checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    symbols = _byte_symbols()
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    d = Path(directory)
    tok.save(str(d / "tokenizer.json"))
    template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": symbols[eos_token_id],
        "chat_template": template,
    }
    (d / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m etspec.models.tiny",
        description="Write the deterministic tiny target + trained EAGLE-3 head as Hugging Face checkpoint "
        "directories OUT/target and OUT/draft (with a byte-level tokenizer), e.g. to export them.",
    )
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--family", default="llama", choices=sorted(TINY_TARGETS), help="tiny target family")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the head's training")
    args = p.parse_args(argv)
    target, draft = write_tiny_pair(args.out, args.family, args.seed)
    print(f"wrote {target} and {draft}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
