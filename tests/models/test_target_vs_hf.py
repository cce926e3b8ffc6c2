"""Our TargetModel against transformers' own *ForCausalLM on the same tiny safetensors checkpoints."""

from __future__ import annotations

import pytest
import torch
import transformers

from etspec.models.checkpoint import load_target
from tests.conftest import FAMILIES, write_hf_target

MAX_SEQ = 64
ATOL = 2e-5  # float32; logits here are O(1)


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
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_and_verify_rows_match_transformers(family, hf_targets):
    """Chunks of 7 then multi-row calls at later positions see exactly the full-sequence logits."""
    ref_model = _hf(hf_targets[family])
    ours = load_target(hf_targets[family], MAX_SEQ)
    x = _tokens(40, 2)
    with torch.no_grad():
        ref = ref_model(x).logits
        pieces = []
        bounds = [0, 7, 14, 21, 26, 31, 32, 40]  # prefill chunks, then verify-sized blocks of 5, 1 and 8 rows
        for s, e in zip(bounds, bounds[1:]):
            pieces.append(ours(x[:, s:e], torch.arange(s, e), _window(e)))
    torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=ATOL, rtol=1e-4)


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
