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


def test_gemma4_config_forms_and_refusals(tmp_path):
    """A published config (global_head_dim, num_global_key_value_heads) and the per_layer_config that
    transformers writes back parse to the same model; what etspec does not run is refused by name."""
    import transformers

    cfg = tiny_target_config("gemma4_text")
    published = parse_target_config(cfg)
    hf = transformers.AutoConfig.for_model(**cfg)
    hf.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in saved and "global_head_dim" not in saved
    assert parse_target_config(saved) == published
    full = [i for i, t in enumerate(published.layer_types) if t == "full_attention"]
    assert full == [2, 5, 7]
    assert [published.layer_head_dim(i) for i in (0, 2)] == [16, 32]
    assert [published.layer_kv_heads(i) for i in (0, 2)] == [2, 1]
    assert published.layer_attn_scale(0) == 1.0 and published.k_eq_v
    # without K = V the full layers keep the base kv heads, as in transformers
    assert parse_target_config({**cfg, "attention_k_eq_v": False}).layer_kv_heads(2) == 2
    # transformers' defaults: full layers 512 wide; the last layer full whatever layer_types says
    bare = {k: v for k, v in cfg.items() if k not in ("global_head_dim", "layer_types", "rope_parameters")}
    dflt = parse_target_config({**bare, "num_hidden_layers": 7})
    assert dflt.layer_types[5:] == ("full_attention", "full_attention") and dflt.layer_head_dim(5) == 512
    assert dflt.rope.rope_type == "proportional" and dflt.rope.partial_rotary_factor == 0.25
    refused = {
        "hidden_size_per_layer_input": (256, "per-layer embeddings"),
        "num_kv_shared_layers": (2, "KV sharing"),
        "enable_moe_block": (True, "mixture-of-experts"),
        "use_bidirectional_attention": ("all", "not a causal decoder"),
    }
    for key, (value, why) in refused.items():
        with pytest.raises(ConfigError, match=f"{key}.*{why}"):
            parse_target_config({**cfg, key: value})
    with pytest.raises(ConfigError, match="per-layer embeddings"):  # transformers' default is 256
        parse_target_config({k: v for k, v in cfg.items() if k != "hidden_size_per_layer_input"})
    with pytest.raises(ConfigError, match="overrides.*sliding_window"):
        parse_target_config({**saved, "per_layer_config": {"2": {"sliding_window": 3}}})
    with pytest.raises(ConfigError, match="architectures.*Gemma4ForConditionalGeneration"):
        parse_target_config({"model_type": "gemma4", "architectures": ["X"], "text_config": cfg})


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
