"""GGUF -> Hugging Face conversion of tiny GGUF files written by the tests: the converted directory must
give the GGUF's logits in transformers and in etspec's own TargetModel, and keep its tokenizer."""

from __future__ import annotations

import json

import gguf
import pytest
import torch
import transformers
from safetensors import safe_open

from etspec.convert.gguf_to_hf import convert_gguf
from etspec.models.checkpoint import load_target
from etspec.models.config import parse_target_config, read_config_json
from tests.convert.tiny_gguf import CHAT_TEMPLATE, DIMS, write_tiny_gguf

ATOL = 2e-5  # float32; logits here are O(1)
TEXTS = [
    "Hello, world! How are you?",
    "  spaces\tand\nnewlines ",
    "Ünïcödé 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>",
]
VARIANTS = {
    # name: (GGUF weight type, tied embeddings, chat template, end-of-turn id)
    "f32": (gguf.GGMLQuantizationType.F32, False, CHAT_TEMPLATE, None),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, True, None, 0),
}


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{variant: (TinyGguf, converted dir)}, each written and converted once."""
    root = tmp_path_factory.mktemp("gguf")
    result = {}
    for name, (qtype, tied, template, eot) in VARIANTS.items():
        tiny = write_tiny_gguf(root / f"{name}.gguf", qtype, tied, template, eot, seed=len(result))
        out = root / f"{name}-hf"
        out.mkdir()
        convert_gguf(tiny.path, out)
        result[name] = (tiny, out)
    return result


def _tokens(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _from_gguf(cls, tiny):
    return cls.from_pretrained(str(tiny.path.parent), gguf_file=tiny.path.name)


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("variant", VARIANTS)
def test_directory_layout_and_config(variant, converted):
    tiny, out = converted[variant]
    qtype, tied, template, eot = VARIANTS[variant]
    names = {f.name for f in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    assert "tokenizer_config.json" in names
    cfg = read_config_json(out)
    assert "quantization_config" not in cfg and "_model_name_or_path" not in cfg
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "float32"
    assert cfg["rms_norm_eps"] == 1e-5  # GGUF's float32 9.99999974e-06 written as the original decimal
    assert cfg["tie_word_embeddings"] is tied
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    tcfg = parse_target_config(cfg)
    assert (tcfg.num_layers, tcfg.num_heads, tcfg.num_kv_heads) == (DIMS["layers"], DIMS["heads"], 2)
    with safe_open(out / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.3.self_attn.q_proj.weight" in keys
    assert ("lm_head.weight" in keys) is not tied
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == (2 if eot is None else [2, eot])


def test_f32_round_trip_gives_back_the_original_weights(converted):
    """llama.cpp's q/k permutation is undone: the converted weights are the ones the GGUF was made of."""
    tiny, out = converted["f32"]
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    ref = tiny.reference.state_dict()
    got = model.state_dict()
    assert set(got) == set(ref)
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


@pytest.mark.parametrize("variant", VARIANTS)
def test_logits_match_gguf_and_etspec(variant, converted):
    tiny, out = converted[variant]
    x = _tokens(19, 1, tiny.reference.config.vocab_size)
    hf = _logits(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), x)
    direct = _logits(_from_gguf(transformers.AutoModelForCausalLM, tiny).eval(), x)
    assert hf.abs().max() > 0.5  # logits are not all ~0, so a match means something
    torch.testing.assert_close(hf, direct, atol=1e-6, rtol=1e-6)
    ours = load_target(out, 64)
    with torch.no_grad():
        mine = ours(x, torch.arange(19), torch.empty(19, dtype=torch.int8))
    torch.testing.assert_close(mine, hf, atol=ATOL, rtol=1e-4)
    # Against the model the file was written from: exact for F32, within quantisation error for Q8_0.
    ref = _logits(tiny.reference, x)
    rel = ((hf - ref).norm() / ref.norm()).item()
    assert rel < (1e-6 if variant == "f32" else 3e-2), rel


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_matches_the_gguf_tokenizer(variant, converted):
    tiny, out = converted[variant]
    ref = _from_gguf(transformers.AutoTokenizer, tiny)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == ref(text)["input_ids"], text
        assert tok.decode(ids) == text
    # Special tokens by the GGUF's ids (transformers' GGUF converter alone names eos by the bos string).
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tok.eos_token_id == 2 and tok.model_max_length == DIMS["context"]


def test_chat_template_survives(converted):
    tiny, out = converted["f32"]
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert (out / "chat_template.jinja").is_file() and tok.chat_template == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hello there"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    ref = _from_gguf(transformers.AutoTokenizer, tiny)
    assert ids == ref.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert tok.decode(ids) == "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    _, plain = converted["q8_0"]
    assert not transformers.AutoTokenizer.from_pretrained(plain).chat_template


def test_bf16_sharded_output_loads_in_etspec(converted, tmp_path):
    tiny, f32_dir = converted["f32"]
    out = tmp_path / "bf16"
    out.mkdir()
    convert_gguf(tiny.path, out, torch.bfloat16, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert read_config_json(out)["dtype"] == "bfloat16"
    with safe_open(out / index["weight_map"]["model.embed_tokens.weight"], framework="pt") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
    x = _tokens(11, 2, tiny.reference.config.vocab_size)
    window = torch.empty(11, dtype=torch.int8)
    with torch.no_grad():
        half = load_target(out, 64, dtype=torch.bfloat16)(x, torch.arange(11), window).float()
        full = load_target(f32_dir, 64)(x, torch.arange(11), window)
    assert ((half - full).norm() / full.norm()) < 2e-2
