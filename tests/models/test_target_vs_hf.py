"""Our TargetModel against transformers' own *ForCausalLM on the same tiny safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from etspec.fixtures.shaped import SHAPES, write_random_pair
from etspec.fixtures.tiny import tiny_target_config
from etspec.models.checkpoint import load_target
from tests.conftest import FAMILIES, write_hf_target

MAX_SEQ = 64
ATOL = 2e-5  # float32; logits here are O(1)
# Gemma 4 scores are q.k unscaled (q and k RMS-normed): transformers' eager attention rounds its softmax
# to fp32, which such sharp scores amplify to ~3e-5 here. test_gemma4_float64_is_exact pins the math.
FAMILY_ATOL = {"gemma4_text": 1e-4}


def _hf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(seed))


def _window(n: int) -> torch.Tensor:
    return torch.empty(n, dtype=torch.int8)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(family, hf_targets):
    ref_model = _hf(hf_targets[family])
    ours = load_target(hf_targets[family], MAX_SEQ)
    x = _tokens(23, 1)  # longer than every tiny sliding window
    with torch.no_grad():
        ref = ref_model(x).logits
        out = ours(x, torch.arange(23), _window(23))
    assert ref.abs().max() > 0.5  # logits are not all ~0, so a match means something
    torch.testing.assert_close(out, ref, atol=FAMILY_ATOL.get(family, ATOL), rtol=1e-4)


CHUNKS = [0, 7, 14, 21, 26, 31, 32, 40]  # prefill chunks, then verify-sized blocks of 5, 1 and 8 rows


def _chunked_logits(model, x: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    spans = zip(bounds, bounds[1:])
    return torch.cat([model(x[:, s:e], torch.arange(s, e), _window(e)) for s, e in spans], dim=1)


@pytest.mark.parametrize("max_rows", [None, 8], ids=["full-caches", "ring-caches"])
@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_verify_rows_match_transformers(family, max_rows, hf_targets):
    """Chunks of 7 then multi-row calls at later positions see exactly the full-sequence logits; with
    rows per call bounded by 8, sliding layers keep rings of window + 16 slots, which 40 positions wrap."""
    ref_model = _hf(hf_targets[family])
    ours = load_target(hf_targets[family], MAX_SEQ, max_rows=max_rows)
    rings = {layer.self_attn.v_cache.shape[2] for layer in ours.layers if layer.self_attn.ring}
    window = ours.cfg.sliding_window
    assert rings == ({window + 16} if max_rows and window else set())
    x = _tokens(40, 2)
    with torch.no_grad():
        ref = ref_model(x).logits
        pieces = _chunked_logits(ours, x, CHUNKS)
    torch.testing.assert_close(pieces, ref, atol=FAMILY_ATOL.get(family, ATOL), rtol=1e-4)


@pytest.mark.parametrize("k_eq_v", [True, False])
def test_gemma4_float64_is_exact(tmp_path, k_eq_v):
    """In float64 against transformers' SDPA attention (its eager path rounds the softmax to fp32), for
    K = V full layers and for separate v_proj ones: prefill, chunked prefill and multi-row calls."""
    path = write_hf_target(tmp_path / "g4", "gemma4_text", seed=3, attention_k_eq_v=k_eq_v)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa")
    ref_model = ref_model.eval().double()
    ours = load_target(path, MAX_SEQ, dtype=torch.float64)
    assert (ours.layers[2].self_attn.v_proj is None) == k_eq_v
    assert (ours.layers[2].self_attn.k_cache is None) == k_eq_v  # K = V: the values are the one cache
    assert ours.layers[2].self_attn.head_dim == 32 and ours.layers[0].self_attn.head_dim == 16
    x = _tokens(40, 9)
    with torch.no_grad():
        ref = ref_model(x).logits
        whole = ours(x, torch.arange(40), _window(40))
        pieces = _chunked_logits(ours, x, CHUNKS)
    assert ref.abs().max() > 0.5
    torch.testing.assert_close(whole, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(pieces, ref, atol=1e-10, rtol=0)


def test_gemma4_multimodal_checkpoint_runs_its_text_model(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint (text part under model.language_model.): the same
    logits as transformers' own multimodal class on text input."""
    text = tiny_target_config("gemma4_text")
    text.pop("architectures")
    text["initializer_range"] = 0.1
    torch.manual_seed(4)
    cfg = transformers.Gemma4Config(text_config=text, vision_config=None, audio_config=None)
    model = transformers.Gemma4ForConditionalGeneration(cfg).eval().double()
    model.save_pretrained(tmp_path / "mm")
    ours = load_target(tmp_path / "mm", MAX_SEQ, dtype=torch.float64)
    x = _tokens(20, 5)
    with torch.no_grad():
        ref = model(input_ids=x).logits
        out = ours(x, torch.arange(20), _window(20))
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_bf16_close_to_transformers(family, hf_targets):
    ref_model = _hf(hf_targets[family]).to(torch.bfloat16)
    ours = load_target(hf_targets[family], MAX_SEQ, dtype=torch.bfloat16)
    assert ours.layers[0].self_attn.k_cache.dtype == torch.bfloat16
    x = _tokens(17, 3)
    with torch.no_grad():
        ref = ref_model(x).logits.float()
        out = ours(x, torch.arange(17), _window(17)).float()
    rel = (out - ref).norm() / ref.norm()
    assert rel < 2e-2, rel


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_default_taps_are_transformers_hidden_states(family, hf_targets):
    ref_model = _hf(hf_targets[family])
    ours = load_target(hf_targets[family], MAX_SEQ)
    assert ours.tap_layers == (2, 4, 5)  # 8 layers: (2, L//2, L-3)
    x = _tokens(12, 4)
    with torch.no_grad():
        hs = ref_model(x, output_hidden_states=True).hidden_states
        _, taps = ours.hidden(x, torch.arange(12), 12)
    for i, tap in zip(ours.tap_layers, taps):
        torch.testing.assert_close(tap, hs[i], atol=1e-5, rtol=1e-5)
    # A neighbour index differs: the comparison would catch an off-by-one.
    assert (taps[0] - hs[3]).abs().max() > 1e-2


def test_explicit_tap_layers(tmp_path):
    path = write_hf_target(tmp_path / "t", "llama", seed=5)
    ref_model = _hf(path)
    ours = load_target(path, MAX_SEQ, tap_layers=(0, 3, 7))
    x = _tokens(9, 6)
    with torch.no_grad():
        hs = ref_model(x, output_hidden_states=True).hidden_states
        _, taps = ours.hidden(x, torch.arange(9), 9)
    for i, tap in zip((0, 3, 7), taps):
        torch.testing.assert_close(tap, hs[i], atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    path = tmp_path / "sharded"
    write_hf_target(path, "qwen2", seed=7)
    model = _hf(path)
    model.save_pretrained(path, max_shard_size="60KB")
    assert (path / "model.safetensors.index.json").is_file()
    ours = load_target(path, MAX_SEQ)
    x = _tokens(10, 8)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(x, torch.arange(10), _window(10)), model(x).logits, atol=ATOL, rtol=1e-4
        )


# each benchmark shape at toy widths: the same layer kinds, rope types and config fields
SMALL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 256,
}
SMALL_EXTRA = {
    "gemma-4-31b-12l": {"global_head_dim": 32, "num_global_key_value_heads": 1, "sliding_window": 6},
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_benchmark_shapes_are_checkpoints_transformers_reads(tmp_path, shape):
    """The random pairs the GPU benchmarks export (fixtures.shaped) are checkpoints transformers loads
    and computes as etspec does (float64, at toy widths)."""
    target, draft = write_random_pair(
        tmp_path, shape, dtype=torch.float32, draft_vocab_size=64, **SMALL, **SMALL_EXTRA.get(shape, {})
    )
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(target, attn_implementation="sdpa")
    ref_model = ref_model.eval().double()
    ours = load_target(target, MAX_SEQ, dtype=torch.float64)
    x = _tokens(20, 6)
    with torch.no_grad():
        ref = ref_model(x).logits
        out = _chunked_logits(ours, x, [0, 9, 14, 20])
    assert ref.std() > 1e-3
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-8)
    assert (draft / "model.safetensors").is_file()
