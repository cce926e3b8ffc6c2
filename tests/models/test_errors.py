"""Bad input gives a clear error naming the problem, never a traceback from deep inside torch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from etspec.fixtures.tiny import random_draft, tiny_draft_config, tiny_target_config, write_draft_checkpoint
from etspec.models.checkpoint import CheckpointError, load_speculator, load_target
from etspec.models.config import ConfigError, parse_target_config
from tests.conftest import write_hf_target


def test_unsupported_family_lists_supported():
    with pytest.raises(ConfigError, match="unsupported model_type 'gpt2'.*llama.*gemma3_text"):
        parse_target_config({"model_type": "gpt2", "hidden_size": 8})


def test_missing_fields_and_bad_rope():
    cfg = tiny_target_config("llama")
    del cfg["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        parse_target_config(cfg)
    cfg = tiny_target_config("llama")
    cfg["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ConfigError, match="yarn.*not supported"):
        parse_target_config(cfg)
    with pytest.raises(ConfigError, match="multimodal"):
        parse_target_config({"model_type": "gemma3", "text_config": {}})


def test_transformers5_rope_parameters():
    cfg = tiny_target_config("gemma3_text")
    for k in ("rope_theta", "rope_local_base_freq", "rope_scaling"):
        cfg.pop(k)
    cfg["rope_parameters"] = {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    parsed = parse_target_config(cfg)
    assert parsed.rope.theta == 1e6 and parsed.rope.factor == 8.0 and parsed.local_rope.theta == 1e4
    assert parsed.layer_types[:3] == ("sliding_attention", "sliding_attention", "full_attention")


def test_not_a_directory_and_no_weights(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_target(tmp_path / "nope", 16)
    (tmp_path / "config.json").write_text(json.dumps(tiny_target_config("llama")))
    with pytest.raises(CheckpointError, match="no weights found"):
        load_target(tmp_path, 16)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_target(tmp_path, 16)


def test_missing_shard(tmp_path):
    import transformers

    path = write_hf_target(tmp_path / "t", "llama")
    transformers.AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, max_shard_size="60KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[1].unlink()
    with pytest.raises(
        CheckpointError, match=f"shards listed in model.safetensors.index.json are missing: {shards[1].name}"
    ):
        load_target(path, 16)


def test_missing_unexpected_and_misshaped_keys(tmp_path):
    path = write_hf_target(tmp_path / "t", "llama")
    sd = load_file(path / "model.safetensors")
    del sd["model.layers.3.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    sd["model.norm.weight"] = torch.zeros(65)
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load_target(path, 16)
    msg = str(e.value)
    assert "missing: layers.3.mlp.up_proj.weight" in msg
    assert "unexpected: model.layers.0.self_attn.extra.weight" in msg
    assert "model.norm.weight: checkpoint (65,) vs expected (64,)" in msg


def test_mismatched_head(tmp_path):
    target = write_hf_target(tmp_path / "t", "llama")
    cfg = tiny_draft_config(tiny_target_config("llama"), hidden_size=32, target_hidden_size=48)
    write_draft_checkpoint(tmp_path / "d", cfg, random_draft(cfg, seed=0))
    with pytest.raises(ConfigError, match="head expects target hidden size 48, target has 64"):
        load_speculator(target, tmp_path / "d", 32, 3)
    cfg = tiny_draft_config(
        tiny_target_config("llama"), eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 4, 8]}
    )
    write_draft_checkpoint(tmp_path / "d2", cfg, random_draft(cfg, seed=0))
    with pytest.raises(ConfigError, match=r"tap layers \[8\] out of range for a 8-layer target"):
        load_speculator(target, tmp_path / "d2", 32, 3)
    cfg = tiny_draft_config({**tiny_target_config("llama"), "vocab_size": 300})
    write_draft_checkpoint(tmp_path / "d3", cfg, random_draft(cfg, seed=0))
    with pytest.raises(ConfigError, match="head vocab 300 differs from the target's 256"):
        load_speculator(target, tmp_path / "d3", 32, 3)


def test_paired_load_runs(tmp_path):
    target = write_hf_target(tmp_path / "t", "qwen3")
    cfg = tiny_draft_config(tiny_target_config("qwen3"))
    write_draft_checkpoint(tmp_path / "d", cfg, random_draft(cfg, seed=0))
    spec = load_speculator(target, tmp_path / "d", 64, 3, dtype=torch.bfloat16)
    with torch.no_grad():
        nxt, feat = spec.prefill(torch.tensor([[5, 6, 7]]), torch.arange(3), torch.empty(3, dtype=torch.int8))
        ids = spec.draft(
            torch.tensor([[6, 7, int(nxt)]]), feat, torch.arange(3), torch.empty(3, dtype=torch.int8)
        )
    assert feat.shape == (1, 3, 64) and feat.dtype == torch.bfloat16 and ids.shape == (1, 3)
