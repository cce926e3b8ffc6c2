"""The EAGLE-3 head: standard and speculators checkpoint loading, d2t, and one draft round against the
formulas of docs/design.md §8."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from etspec.fixtures.tiny import (
    draft_state_dict,
    random_draft,
    tiny_draft_config,
    tiny_target_config,
    write_draft_checkpoint,
)
from etspec.models.checkpoint import CheckpointError, load_draft
from etspec.models.config import ConfigError, parse_draft_config

H = 64
STANDARD_KEYS = {
    "fc.weight": (H, 3 * H),
    "midlayer.hidden_norm.weight": (H,),
    "midlayer.input_layernorm.weight": (H,),
    "midlayer.post_attention_layernorm.weight": (H,),
    "midlayer.self_attn.q_proj.weight": (64, 2 * H),
    "midlayer.self_attn.k_proj.weight": (32, 2 * H),
    "midlayer.self_attn.v_proj.weight": (32, 2 * H),
    "midlayer.self_attn.o_proj.weight": (H, 64),
    "midlayer.mlp.gate_proj.weight": (128, H),
    "midlayer.mlp.up_proj.weight": (128, H),
    "midlayer.mlp.down_proj.weight": (H, 128),
    "norm.weight": (H,),
    "lm_head.weight": (128, H),
    "d2t": (128,),
    "t2d": (256,),
}


def _cfg(**kw):
    return tiny_draft_config(tiny_target_config("llama"), **kw)


def test_checkpoint_has_standard_key_names(tmp_path):
    write_draft_checkpoint(tmp_path, _cfg(), random_draft(_cfg(), seed=0))
    sd = load_file(tmp_path / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in sd.items()} == STANDARD_KEYS
    assert sd["d2t"].dtype == torch.int64 and sd["t2d"].dtype == torch.bool


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_roundtrip_and_d2t_offsets(tmp_path, fmt):
    head = random_draft(_cfg(), seed=1)
    assert (head.d2t != 0).any()  # a non-trivial mapping
    if fmt == "safetensors":
        write_draft_checkpoint(tmp_path, _cfg(), head)
    else:
        write_draft_checkpoint(tmp_path, _cfg(), head)
        (tmp_path / "model.safetensors").unlink()
        torch.save(draft_state_dict(head), tmp_path / "pytorch_model.bin")
    loaded = load_draft(tmp_path, max_seq_len=32)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)
    logits = torch.full((1, 1, 128), -1.0)
    logits[0, 0, 17] = 5.0
    assert loaded.to_target_ids(logits).item() == 17 + int(head.d2t[17])


def test_identity_vocab_without_d2t(tmp_path):
    cfg = _cfg(draft_vocab_size=256)
    head = random_draft(cfg, seed=2)
    write_draft_checkpoint(tmp_path, cfg, head)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["d2t"], sd["t2d"]
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "model.safetensors")
    loaded = load_draft(tmp_path, max_seq_len=32)
    assert (loaded.d2t == 0).all()
    logits = torch.randn(1, 3, 256)
    assert torch.equal(loaded.to_target_ids(logits), logits.argmax(-1))


def test_smaller_draft_vocab_without_d2t_is_an_error(tmp_path):
    head = random_draft(_cfg(), seed=3)
    write_draft_checkpoint(tmp_path, _cfg(), head)
    sd = load_file(tmp_path / "model.safetensors")
    del sd["d2t"]
    from safetensors.torch import save_file

    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no d2t"):
        load_draft(tmp_path, max_seq_len=32)


def test_rope_base_defaults_to_10000_not_the_targets():
    assert parse_draft_config(_cfg()).rope.theta == 10000.0
    assert parse_draft_config(_cfg(rope_theta=500000.0)).rope.theta == 500000.0
    v5 = _cfg(rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    assert parse_draft_config(v5).rope.theta == 123.0
    explicit = _cfg(eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 3, 5]})
    assert parse_draft_config(explicit).tap_layers == (1, 3, 5)
    with pytest.raises(ConfigError, match="EAGLE-3"):
        parse_draft_config({**_cfg(), "architectures": ["LlamaForCausalLM"]})


# --- an independent float64 re-computation of docs/design.md §8 -----------------------------------


def _rms(x, w, eps=1e-6):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rot(x, pos, theta=10000.0):
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = pos * inv
    c, s = torch.cos(ang).repeat(2), torch.sin(ang).repeat(2)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * c + torch.cat((-x2, x1), -1) * s


def _reference_draft(
    sd,
    embed,
    tokens,
    feats,
    positions,
    k,
    heads=4,
    kv_heads=2,
    hd=16,
    norm_before_residual=False,
    norm_output=False,
    qk_norm=False,
):
    """Every row through the whole layer, one at a time, with explicit attention sums. Speculators
    variants: norm_before_residual (the residual is the normed feature), norm_output (the normed state
    feeds the next step), qk_norm (per-head q/k RMSNorms before RoPE, a Qwen3 layer)."""
    w = {n: t.double() for n, t in sd.items() if t.is_floating_point()}
    d2t = sd["d2t"]
    keys, values = {}, {}

    def row(tok, h, p):
        e = embed[tok].double()
        hn = _rms(h, w["midlayer.hidden_norm.weight"])
        x = torch.cat((_rms(e, w["midlayer.input_layernorm.weight"]), hn))
        q = (w["midlayer.self_attn.q_proj.weight"] @ x).view(heads, hd)
        kk = (w["midlayer.self_attn.k_proj.weight"] @ x).view(kv_heads, hd)
        if qk_norm:
            q = _rms(q, w["midlayer.self_attn.q_norm.weight"])
            kk = _rms(kk, w["midlayer.self_attn.k_norm.weight"])
        vv = (w["midlayer.self_attn.v_proj.weight"] @ x).view(kv_heads, hd)
        keys[p], values[p] = _rot(kk, p), vv
        q = _rot(q, p)
        out = []
        for hh in range(heads):
            g = hh // (heads // kv_heads)
            scores = torch.stack([q[hh] @ keys[j][g] / math.sqrt(hd) for j in sorted(keys) if j <= p])
            pr = torch.exp(scores - scores.max())
            pr = pr / pr.sum()
            out.append(sum(pr[i] * values[j][g] for i, j in enumerate(j for j in sorted(keys) if j <= p)))
        a = w["midlayer.self_attn.o_proj.weight"] @ torch.cat(out)
        h2 = (hn if norm_before_residual else h) + a
        m = _rms(h2, w["midlayer.post_attention_layernorm.weight"])
        gate = w["midlayer.mlp.gate_proj.weight"] @ m
        mlp = w["midlayer.mlp.down_proj.weight"] @ (
            gate * torch.sigmoid(gate) * (w["midlayer.mlp.up_proj.weight"] @ m)
        )
        h3 = h2 + mlp
        logits = w["lm_head.weight"] @ _rms(h3, w["norm.weight"])
        did = int(logits.argmax())
        return (_rms(h3, w["norm.weight"]) if norm_output else h3), did + int(d2t[did]), logits

    for tok, h, p in zip(tokens, feats, positions):
        h, tid, logits = row(tok, h, p)
    out, steps = [tid], [logits]
    p = positions[-1]
    for _ in range(k - 1):
        p += 1
        h, tid, logits = row(tid, h, p)  # the pre-norm h and the mapped target id feed the next step
        out.append(tid)
        steps.append(logits)
    return out, torch.stack(steps)


def speculators_config(cfg: dict, layer_type: str = "llama", **flags) -> dict:
    """A speculators config.json for the tiny head `cfg` (EAGLE layout): the decoder layer's config
    nested under transformer_layer_config, EAGLE-3 fields and `flags` at the top."""
    layer = {k: v for k, v in cfg.items() if k not in ("architectures", "draft_vocab_size")}
    return {
        "architectures": ["Eagle3DraftModel"],
        "speculators_model_type": "eagle3",
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 3}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": "tiny-llama", "architectures": ["LlamaForCausalLM"]},
        },
        "draft_vocab_size": cfg["draft_vocab_size"],
        "transformer_layer_config": {**layer, "model_type": layer_type},
        **flags,
    }


def write_speculators_checkpoint(directory: Path, top: dict, head) -> Path:
    """`head` in the speculators layout vLLM loads: config `top`, the layer's weights under layers.0."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(top, indent=2))
    sd = {k.replace("midlayer.", "layers.0.", 1): v for k, v in draft_state_dict(head).items()}
    save_file(sd, str(directory / "model.safetensors"))
    return directory


def test_speculators_config_fields():
    base = speculators_config(_cfg())
    parsed = parse_draft_config(base)
    assert parsed.norm_before_residual and parsed.checkpoint_format == "speculators"  # vLLM's default
    assert not (parsed.norm_before_fc or parsed.norm_output or parsed.qk_norm)
    layer = base["transformer_layer_config"]
    legacy = {**base, "transformer_config": layer, "transformer_layer_config": None}
    assert parsed == parse_draft_config(legacy)
    assert parsed.draft_vocab_size == 128 and parsed.tap_layers is None
    assert not parse_draft_config({**base, "norm_before_residual": False}).norm_before_residual
    aux = {**base, "eagle_aux_hidden_state_layer_ids": [1, 3, 5], "target_hidden_size": 96}
    aux = parse_draft_config(aux)
    assert aux.tap_layers == (1, 3, 5) and aux.target_hidden_size == 96
    assert parse_draft_config(speculators_config(_cfg(), "qwen3")).qk_norm
    for bad, match in [
        ({"speculators_model_type": "mtp"}, "'mtp' is not supported"),
        ({"transformer_layer_config": None}, "lacks the transformer_layer_config"),
        ({"fc_norm": True}, "fc_norm"),
        ({"transformer_layer_config": {**layer, "model_type": "gemma3"}}, "model_type 'gemma3'"),
        ({"transformer_layer_config": {**layer, "num_hidden_layers": 2}}, "exactly one layer"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_draft_config({**base, **bad})


LAYOUTS = {  # name: (own embedding, speculators layer type and flags, or None for the EAGLE layout)
    "eagle": (False, None),
    "eagle-own-embedding": (True, None),
    "speculators": (True, ("llama", {})),  # no norm_before_residual field: on, as vLLM reads it
    "speculators-plain-residual": (False, ("llama", {"norm_before_residual": False})),
    "speculators-qwen3-norm-output": (True, ("qwen3", {"norm_output": True, "norm_before_fc": True})),
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_draft_round_matches_formulas(tmp_path, layout):
    own_embedding, spec = LAYOUTS[layout]
    cfg = _cfg() if spec is None else speculators_config(_cfg(), spec[0], **spec[1])
    head = random_draft(cfg, seed=4, own_embedding=own_embedding)
    if spec is None:
        write_draft_checkpoint(tmp_path, cfg, head)
    else:
        write_speculators_checkpoint(tmp_path, cfg, head)
    loaded = load_draft(tmp_path, max_seq_len=128).double()
    dcfg = loaded.cfg
    assert (loaded.embed_tokens is not None) == own_embedding
    assert dcfg.norm_before_residual == (spec is not None and spec[1].get("norm_before_residual", True))
    target_embed = torch.nn.Embedding(256, H).double()
    embed = loaded.embed_tokens if own_embedding else target_embed
    sd = draft_state_dict(head)
    gen = torch.Generator().manual_seed(9)
    k = 5
    r = 6
    tokens = torch.randint(0, 256, (1, r), generator=gen)
    feats = torch.randn(1, r, H, generator=gen, dtype=torch.float64) * 3
    n0 = 70  # past the head's max_position_embeddings (64): rope must still cover these positions
    positions = list(range(n0, n0 + r))
    # Earlier positions must exist in the reference too: fill them through a first call.
    pre_tokens = torch.randint(0, 256, (1, n0), generator=gen)
    pre_feats = torch.randn(1, n0, H, generator=gen, dtype=torch.float64) * 3
    seen = []

    def pick(logits, step):  # the draft's own argmax, with each step's logits kept
        seen.append(logits.reshape(-1))
        return torch.argmax(logits, dim=-1)

    with torch.no_grad():
        loaded.draft(embed, pre_tokens, pre_feats, torch.arange(n0), n0, k)
        ours = loaded.draft(embed, tokens, feats, torch.tensor(positions), positions[-1] + 1, k, pick)
    args = (
        sd,
        embed.weight.detach(),
        pre_tokens[0].tolist() + tokens[0].tolist(),
        list(pre_feats[0]) + list(feats[0]),
        list(range(n0)) + positions,
        k,
    )
    flags = dict(norm_before_residual=dcfg.norm_before_residual, norm_output=dcfg.norm_output)
    ref, ref_logits = _reference_draft(*args, qk_norm=dcfg.qk_norm, **flags)
    assert ours[0].tolist() == ref
    # 1e-5: the rope angles are fp32 in the model (as in transformers), float64 in the reference
    torch.testing.assert_close(torch.stack(seen[-k:]), ref_logits, atol=1e-5, rtol=0)
    for flag in flags:  # each residual / feedback rule changes the logits: the check tells them apart
        _, other = _reference_draft(*args, qk_norm=dcfg.qk_norm, **{**flags, flag: not flags[flag]})
        assert (other - ref_logits).abs().max() > 1e-3, flag


@pytest.mark.parametrize("norm_before_fc", [False, True])
def test_fuse_is_fc_of_low_mid_high(norm_before_fc):
    cfg = speculators_config(_cfg(), norm_before_fc=True) if norm_before_fc else _cfg()
    head = random_draft(cfg, seed=5).double()
    taps = [torch.randn(1, 3, H, dtype=torch.float64) for _ in range(3)]
    x = torch.cat(taps, -1)
    if norm_before_fc:  # one RMSNorm over all 3H, with its own weight
        x = _rms(x, head.input_norm.weight)
    torch.testing.assert_close(head.fuse(taps), x @ head.fc.weight.T)
