"""Model configs parsed from Hugging Face `config.json` files.

Only what the forward pass needs is kept, normalised across families and across the transformers 4
(`rope_theta`, `rope_scaling`) and transformers 5 (`rope_parameters`) spellings, so the model code has
one shape of config to read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

FAMILIES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gemma4_text": "Gemma4ForCausalLM",
}
MULTIMODAL = {"gemma4": ("Gemma4ForConditionalGeneration", "gemma4_text", "model.language_model.")}
"""model_type: (architecture, its text model's model_type, the text model's weight prefix): a
multimodal checkpoint whose text part etspec runs (the other towers' weights are skipped)."""
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "proportional")
GEMMA = ("gemma2", "gemma3_text", "gemma4_text")
DRAFT_ARCHITECTURES = ("LlamaForCausalLMEagle3",)


class ConfigError(ValueError):
    """A config.json that etspec cannot use; the message says what is wrong and what is supported."""


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    partial_rotary_factor: float = 1.0  # "proportional": the share of frequency pairs rotated


@dataclass(frozen=True)
class TargetConfig:
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    layer_types: tuple[str, ...]
    local_rope: RopeConfig | None = None  # rope for sliding layers where it differs (Gemma 3)
    sliding_window: int | None = None
    hidden_act: str = "silu"
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # Gemma-specific
    norm_style: str = "llama"  # layers.RMSNorm's scaling: "offset" (1 + w) for Gemma 2/3, "fp32" for 4
    sandwich_norm: bool = False  # pre/post feed-forward norms and post-attention norm on the branch
    embed_scale: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    # Gemma 4
    unit_attn_scale: bool = False  # scores are q.k, unscaled (q and k are RMS-normed)
    v_norm: bool = False  # values RMS-normed without a weight
    layer_scalar: bool = False  # each layer's output times a per-layer scalar weight
    k_eq_v: bool = False  # full-attention layers: no v_proj, the key projection serves as the value
    layer_overrides: tuple[tuple[int, int] | None, ...] = ()  # per layer: (head_dim, num_kv_heads) or None
    checkpoint_prefix: str = "model."  # the decoder's weight prefix in the checkpoint

    def _layer_shape(self, i: int) -> tuple[int, int]:
        """(head_dim, num_kv_heads) of layer i: its override, else the config's."""
        o = self.layer_overrides[i] if self.layer_overrides else None
        return o or (self.head_dim, self.num_kv_heads)

    def layer_head_dim(self, i: int) -> int:
        return self._layer_shape(i)[0]

    def layer_kv_heads(self, i: int) -> int:
        return self._layer_shape(i)[1]

    def layer_attn_scale(self, i: int) -> float:
        if self.unit_attn_scale:
            return 1.0
        if self.query_pre_attn_scalar is not None:
            return float(self.query_pre_attn_scalar) ** -0.5
        return self.layer_head_dim(i) ** -0.5

    def default_tap_layers(self) -> tuple[int, int, int]:
        """EAGLE-3's default taps: the inputs of layers 2, L//2 and L-3."""
        n = self.num_layers
        return (2, n // 2, n - 3)


@dataclass(frozen=True)
class DraftConfig:
    hidden_size: int
    target_hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    draft_vocab_size: int
    rms_norm_eps: float
    rope: RopeConfig
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    tap_layers: tuple[int, ...] | None = None  # None: the target's default taps
    norm_before_residual: bool = False  # the residual of a step is hidden_norm(h), not h
    norm_before_fc: bool = False  # one RMSNorm (input_norm) over the concatenated taps before fc
    norm_output: bool = False  # the normed h, not the pre-norm h, is fed to the next step
    qk_norm: bool = False  # q/k RMSNorms per head (a Qwen3 decoder layer)
    checkpoint_format: str = "eagle"  # "eagle" (midlayer.*) or "speculators" (layers.0.*)
    extra: dict[str, Any] = field(default_factory=dict, compare=False)


def read_config_json(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}")
    try:
        cfg = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{file} must hold a JSON object, not a {type(cfg).__name__}")
    return cfg


def _require(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: config.json lacks '{key}'")
    return cfg[key]


def _rope_from(params: dict[str, Any] | None, theta: float, where: str) -> RopeConfig:
    """Build a RopeConfig from a rope_scaling / rope_parameters dict (either spelling)."""
    params = dict(params or {})
    theta = float(params.get("rope_theta", theta))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"{where}: rope type '{rope_type}' is not supported (supported: {SUPPORTED_ROPE_TYPES})"
        )
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if rope_type == "proportional":
        return RopeConfig(
            theta=theta,
            rope_type="proportional",
            factor=float(params.get("factor", 1.0)),
            partial_rotary_factor=float(params.get("partial_rotary_factor", 1.0)),
        )
    factor = float(_require(params, "factor", f"{where} rope_scaling"))
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def _eos_ids(cfg: dict[str, Any], where: str = "config.json") -> tuple[int, ...]:
    """The eos_token_id of one config: an id, a list of them, or absent."""
    eos = cfg.get("eos_token_id")
    try:
        return tuple(int(e) for e in (eos if isinstance(eos, list) else [] if eos is None else [eos]))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: eos_token_id {eos!r} is not a token id or a list of them") from None


def eos_token_ids(directory: str | Path) -> tuple[int, ...]:
    """EOS ids of a checkpoint directory, from config.json then generation_config.json (instruct models
    often list several there), each once, in that order."""
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = Path(directory) / name
        if f.is_file():
            ids += [e for e in _eos_ids(read_config_json(f), str(f)) if e not in ids]
    return tuple(ids)


def parse_target_config(cfg: dict[str, Any]) -> TargetConfig:
    """Normalise a target model's config.json; unsupported families raise ConfigError."""
    model_type = cfg.get("model_type")
    if model_type in MULTIMODAL and isinstance(cfg.get("text_config"), dict):
        return _parse_multimodal(cfg, model_type)
    if model_type == "gemma3" and "text_config" in cfg:
        raise ConfigError(
            "model_type 'gemma3' is the multimodal Gemma 3; export its text-only checkpoint "
            "(model_type 'gemma3_text', Gemma3ForCausalLM)"
        )
    if model_type not in FAMILIES:
        supported = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
        raise ConfigError(f"unsupported model_type '{model_type}'; supported target families: {supported}")
    where = f"{model_type} target"
    archs = cfg.get("architectures") or [FAMILIES[model_type]]
    if FAMILIES[model_type] not in archs:
        raise ConfigError(f"{where}: architectures {archs} not supported; expected {FAMILIES[model_type]}")

    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    n_layers = int(_require(cfg, "num_hidden_layers", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(
            f"{where}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"
        )

    rope_params = cfg.get("rope_parameters")
    theta = float(cfg.get("rope_theta", 10000.0))
    gemma = model_type in GEMMA
    gemma4 = model_type == "gemma4_text"
    if gemma4 and not rope_params:  # transformers' defaults for Gemma 4
        rope_params = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        }
    local_rope = None
    if isinstance(rope_params, dict) and "full_attention" in rope_params:  # transformers 5, per layer type
        rope = _rope_from(rope_params["full_attention"], theta, where)
        local_rope = _rope_from(rope_params.get("sliding_attention"), theta, where)
    else:
        rope = _rope_from(rope_params if rope_params else cfg.get("rope_scaling"), theta, where)
        if model_type == "gemma3_text":
            local_rope = RopeConfig(theta=float(cfg.get("rope_local_base_freq", 10000.0)))

    sliding_window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if layer_types is None:
        if model_type == "gemma2":
            layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
        elif model_type in ("gemma3_text", "gemma4_text"):
            pattern = int(cfg.get("sliding_window_pattern", cfg.get("_sliding_window_pattern", 6)))
            layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n_layers)
            ]
        elif model_type == "mistral":
            layer_types = ["sliding_attention" if sliding_window else "full_attention"] * n_layers
        elif model_type in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            first = int(cfg.get("max_window_layers", n_layers))
            layer_types = ["sliding_attention" if i >= first else "full_attention" for i in range(n_layers)]
        else:
            layer_types = ["full_attention"] * n_layers
    if model_type == "mistral" and sliding_window:
        layer_types = ["sliding_attention"] * n_layers
    if gemma4 and layer_types:  # transformers forces the last Gemma 4 layer to full attention
        layer_types = [*layer_types[:-1], "full_attention"]
    layer_types = tuple(layer_types)
    if len(layer_types) != n_layers or set(layer_types) - {"full_attention", "sliding_attention"}:
        raise ConfigError(f"{where}: layer_types must list full_attention/sliding_attention for each layer")
    if "sliding_attention" in layer_types and not sliding_window:
        raise ConfigError(f"{where}: sliding layers need a sliding_window size")

    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or ("gelu_pytorch_tanh" if gemma else "silu")
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ConfigError(f"{where}: activation '{act}' not supported (silu, gelu_pytorch_tanh)")
    attention_bias = model_type == "qwen2" or (
        model_type != "mistral" and bool(cfg.get("attention_bias", False))
    )
    extra = _gemma4_fields(cfg, layer_types, head_dim, kv_heads, heads, where) if gemma4 else {}
    return TargetConfig(
        family=model_type,
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_require(cfg, "vocab_size", where)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope,
        local_rope=local_rope,
        layer_types=layer_types,
        sliding_window=int(sliding_window) if sliding_window else None,
        hidden_act=act,
        attention_bias=attention_bias,
        o_proj_bias=attention_bias and model_type in ("llama", "qwen3", *GEMMA),
        mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type in ("qwen3", "gemma3_text", "gemma4_text"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 131072)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        norm_style="fp32" if gemma4 else "offset" if gemma else "llama",
        sandwich_norm=gemma,
        embed_scale=gemma,
        query_pre_attn_scalar=float(cfg["query_pre_attn_scalar"])
        if gemma and cfg.get("query_pre_attn_scalar")
        else None,
        attn_logit_softcap=cfg.get("attn_logit_softcapping") if gemma and not gemma4 else None,
        final_logit_softcap=cfg.get("final_logit_softcapping") if gemma else None,
        **extra,
    )


def _parse_multimodal(cfg: dict[str, Any], model_type: str) -> TargetConfig:
    """The text model of a multimodal checkpoint: its text_config, with the top level's token ids and
    embedding tie (what generation and the checkpoint's lm_head follow)."""
    arch, text_type, prefix = MULTIMODAL[model_type]
    archs = cfg.get("architectures") or [arch]
    if arch not in archs:
        raise ConfigError(f"{model_type} target: architectures {archs} not supported; expected {arch}")
    text = {**cfg["text_config"], "model_type": text_type, "architectures": [FAMILIES[text_type]]}
    for key in ("eos_token_id", "bos_token_id", "tie_word_embeddings"):
        if cfg.get(key) is not None:
            text[key] = cfg[key]
    return replace(parse_target_config(text), checkpoint_prefix=prefix)


def _gemma4_fields(
    cfg: dict[str, Any], layer_types: tuple[str, ...], head_dim: int, kv_heads: int, heads: int, where: str
) -> dict[str, Any]:
    """Gemma 4 (dense): K = V full layers, per-layer head_dim / kv-head overrides, unit attention scale,
    value norm, layer scalars. Per-layer embeddings, KV sharing, MoE and bidirectional attention are
    refused by name."""
    refuse = {  # field: (transformers' default, why)
        "hidden_size_per_layer_input": (256, "per-layer embeddings (PLE) are not supported yet"),
        "num_kv_shared_layers": (0, "KV sharing across layers is not supported yet"),
        "enable_moe_block": (False, "mixture-of-experts Gemma 4 models are not supported"),
    }
    for key, (default, why) in refuse.items():
        value = cfg.get(key, default)
        if value:
            raise ConfigError(f"{where}: {key} = {value!r}: {why}")
    if cfg.get("use_bidirectional_attention") == "all":
        raise ConfigError(f"{where}: use_bidirectional_attention = 'all' is not a causal decoder")
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    per_layer = cfg.get("per_layer_config")
    if per_layer is None:  # transformers' expansion: full layers take global_head_dim (and kv heads)
        full: dict[str, Any] = {"head_dim": int(cfg.get("global_head_dim", 512))}
        if k_eq_v and cfg.get("num_global_key_value_heads") is not None:
            full["num_key_value_heads"] = int(cfg["num_global_key_value_heads"])
        per_layer = {i: full for i, t in enumerate(layer_types) if t == "full_attention"}
    if not isinstance(per_layer, dict):
        raise ConfigError(f"{where}: per_layer_config must map layer indices to overrides")
    overrides: list[tuple[int, int] | None] = [None] * len(layer_types)
    for key, o in per_layer.items():
        try:
            i = int(key)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: per_layer_config key {key!r} is not a layer index") from None
        if not 0 <= i < len(layer_types) or not isinstance(o, dict):
            raise ConfigError(f"{where}: per_layer_config[{key!r}] is not an override of a layer")
        unknown = set(o) - {"head_dim", "num_key_value_heads"}
        if unknown:
            raise ConfigError(f"{where}: per_layer_config overrides {sorted(unknown)}: not supported")
        d, kv = int(o.get("head_dim", head_dim)), int(o.get("num_key_value_heads", kv_heads))
        if heads % kv:
            raise ConfigError(f"{where}: layer {i}: {heads} query heads are not a multiple of {kv} kv heads")
        overrides[i] = (d, kv)
    return dict(
        unit_attn_scale=True,
        v_norm=True,
        layer_scalar=True,
        k_eq_v=k_eq_v,
        layer_overrides=tuple(overrides),
    )


def parse_draft_config(cfg: dict[str, Any], target: TargetConfig | None = None) -> DraftConfig:
    """Normalise an EAGLE-3 head's config.json (docs/design.md §8), in the EAGLE / SGLang layout or in
    the `speculators` one that vLLM loads."""
    if "speculators_model_type" in cfg:
        return _parse_speculators(cfg)
    where = "EAGLE-3 draft head"
    archs = cfg.get("architectures") or []
    if not any(a in DRAFT_ARCHITECTURES for a in archs):
        raise ConfigError(
            f"{where}: architectures {archs} is not an EAGLE-3 head (expected {DRAFT_ARCHITECTURES})"
        )
    n_layers = int(cfg.get("num_hidden_layers", 1))
    if n_layers != 1:
        raise ConfigError(f"{where}: num_hidden_layers is {n_layers}; EAGLE-3 heads have exactly one layer")
    hidden = int(_require(cfg, "hidden_size", where))
    heads = int(_require(cfg, "num_attention_heads", where))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    vocab = int(_require(cfg, "vocab_size", where))
    rope_params = cfg.get("rope_parameters")
    # The head's own rope base: absent means 10000, not the target's base (docs/design.md §8).
    rope = _rope_from(
        rope_params if rope_params else cfg.get("rope_scaling"), float(cfg.get("rope_theta", 10000.0)), where
    )
    eagle = cfg.get("eagle_config") or {}
    taps = eagle.get("eagle_aux_hidden_state_layer_ids")
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{where}: activation '{act}' not supported (silu)")
    return DraftConfig(
        hidden_size=hidden,
        target_hidden_size=int(cfg.get("target_hidden_size") or hidden),
        intermediate_size=int(_require(cfg, "intermediate_size", where)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=vocab,
        draft_vocab_size=int(cfg.get("draft_vocab_size") or vocab),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope=rope,
        hidden_act=act,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tap_layers=tuple(int(i) for i in taps) if taps else None,
    )


def _parse_speculators(cfg: dict[str, Any]) -> DraftConfig:
    """A `speculators` EAGLE-3 head: the decoder layer's Llama or Qwen3 config nested under
    transformer_layer_config, the EAGLE-3 fields at the top level; norm_before_residual on unless the
    config says otherwise, norm_before_fc and norm_output off (as vLLM reads them)."""
    where = "speculators draft head"
    kind = cfg.get("speculators_model_type")
    if kind != "eagle3":
        raise ConfigError(f"{where}: speculators_model_type {kind!r} is not supported (eagle3)")
    layer = cfg.get("transformer_layer_config") or cfg.get("transformer_config")
    if not isinstance(layer, dict):
        raise ConfigError(f"{where}: config.json lacks the transformer_layer_config object")
    if layer.get("model_type") not in ("llama", "qwen3"):
        raise ConfigError(f"{where}: decoder layer model_type {layer.get('model_type')!r} (llama, qwen3)")
    if cfg.get("fc_norm"):
        raise ConfigError(f"{where}: fc_norm = true (a norm per tapped state) is not supported")
    flat = {**layer, "architectures": list(DRAFT_ARCHITECTURES)}
    if "hidden_act" not in flat and "hidden_activation" in flat:
        flat["hidden_act"] = flat["hidden_activation"]
    for key in ("draft_vocab_size", "target_hidden_size"):
        if cfg.get(key) is not None:
            flat[key] = cfg[key]
    if cfg.get("eagle_aux_hidden_state_layer_ids"):
        flat["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": cfg["eagle_aux_hidden_state_layer_ids"]}
    return replace(
        parse_draft_config(flat),
        norm_before_residual=bool(cfg.get("norm_before_residual", True)),
        norm_before_fc=bool(cfg.get("norm_before_fc", False)),
        norm_output=bool(cfg.get("norm_output", False)),
        qk_norm=layer["model_type"] == "qwen3",
        checkpoint_format="speculators",
    )


def check_pair(target: TargetConfig, draft: DraftConfig) -> tuple[int, ...]:
    """Check the head fits the target and return the tap layers it uses."""
    problems = []
    if draft.target_hidden_size != target.hidden_size:
        problems.append(
            f"head expects target hidden size {draft.target_hidden_size}, target has {target.hidden_size}"
        )
    if draft.vocab_size != target.vocab_size:
        problems.append(f"head vocab {draft.vocab_size} differs from the target's {target.vocab_size}")
    if draft.draft_vocab_size > draft.vocab_size:
        problems.append(f"draft_vocab_size {draft.draft_vocab_size} exceeds vocab_size {draft.vocab_size}")
    taps = draft.tap_layers or target.default_tap_layers()
    if len(taps) != 3:
        problems.append(f"EAGLE-3 fuses 3 tapped hidden states; got tap layers {taps}")
    bad = [i for i in taps if not 0 <= i < target.num_layers]
    if bad:
        problems.append(f"tap layers {bad} out of range for a {target.num_layers}-layer target")
    if problems:
        raise ConfigError("draft head does not match the target: " + "; ".join(problems))
    return tuple(taps)
