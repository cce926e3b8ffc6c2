"""The target decoder (Llama / Qwen2 / Qwen3 / Mistral / Gemma 2 / Gemma 3 / Gemma 4 text) over static KV
caches."""

from __future__ import annotations

import torch
from torch import nn

from etspec.kernels import register_ops

from .config import TargetConfig
from .layers import MLP, PLAIN_OPS, Attention, FewRowsKernels, RMSNorm, project


class DecoderLayer(nn.Module):
    def __init__(
        self, cfg: TargetConfig, index: int, max_seq_len: int, kernels: FewRowsKernels, max_rows: int | None
    ):
        super().__init__()
        sliding = cfg.layer_types[index] == "sliding_attention"
        # a sliding layer (never K = V) keeps a ring when the rows per call are bounded (Attention)
        ring = sliding and max_rows is not None and cfg.sliding_window is not None
        rope = cfg.local_rope if (sliding and cfg.local_rope is not None) else cfg.rope
        self.self_attn = Attention(
            cfg.hidden_size,
            cfg.hidden_size,
            cfg.num_heads,
            cfg.layer_kv_heads(index),
            cfg.layer_head_dim(index),
            max_seq_len,
            rope,
            cfg.layer_attn_scale(index),
            bias=cfg.attention_bias,
            o_bias=cfg.o_proj_bias,
            qk_norm_eps=cfg.rms_norm_eps if cfg.qk_norm else None,
            norm_style=cfg.norm_style,
            v_norm_eps=cfg.rms_norm_eps if cfg.v_norm else None,
            k_eq_v=cfg.k_eq_v and not sliding,
            softcap=cfg.attn_logit_softcap,
            window=cfg.sliding_window if sliding else None,
            kernels=kernels,
            cache_rows=cfg.sliding_window + 2 * max_rows if ring else None,
        )
        self.mlp = MLP(
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.hidden_act,
            cfg.mlp_bias,
            kernels.linear_rows,
            kernels.linear_chunk,
        )
        eps, style = cfg.rms_norm_eps, cfg.norm_style
        self.sandwich = cfg.sandwich_norm
        # the norm kernel serves the norms that take the residual stream (Gemma's sandwich layers norm
        # their branch outputs too and keep the eager ops)
        norm_kernel = kernels.reductions and not self.sandwich
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, style, norm_kernel)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, style, norm_kernel)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, style)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, style)
        # Gemma 4: a learned scalar on each layer's output (a weight of the checkpoint)
        self.layer_scalar = nn.Parameter(torch.ones(1)) if cfg.layer_scalar else None

    def forward(
        self, h: torch.Tensor, x: torch.Tensor, input_pos: torch.Tensor, kv_len: int, few_rows: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer on its input h and input_layernorm(h) = x. Returns (h', delta): the next layer's
        input is h' + delta, an add left to the next norm (delta None: h' is the input)."""
        a = self.self_attn(x, input_pos, kv_len, few_rows)
        if self.sandwich:  # Gemma: norms on both ends of each branch
            h = h + self.post_attention_layernorm(a)
            h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h), few_rows))
            return (h if self.layer_scalar is None else h * self.layer_scalar), None
        h, x = self.post_attention_layernorm.add_norm(h, a, few_rows)
        return h, self.mlp(x, few_rows)


class TargetModel(nn.Module):
    """Decoder with KV caches; `hidden` returns the last hidden state and the tapped layer inputs.

    `kernels` picks etspec's few-rows kernels (split-K attention, linear_rows) for calls made with
    `few_rows=True` (target_verify: at most k+1 rows); prefill keeps the plain ops.

    `max_rows` bounds the rows of every call (an export's largest prefill chunk and verify); with it,
    sliding-window layers keep a ring of window + 2 x max_rows rows instead of max_seq_len
    (`Attention`), and a call with more rows is refused.
    """

    def __init__(
        self,
        cfg: TargetConfig,
        max_seq_len: int,
        tap_layers: tuple[int, ...] | None = None,
        kernels: FewRowsKernels = PLAIN_OPS,
        max_rows: int | None = None,
    ):
        super().__init__()
        if kernels.any:
            register_ops()  # the layers' verify calls dispatch to torch.ops.etspec.*
        self.cfg = cfg
        self.max_seq_len = max_seq_len
        self.max_rows = max_rows
        self.tap_layers = tuple(tap_layers if tap_layers is not None else cfg.default_tap_layers())
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, max_seq_len, kernels, max_rows) for i in range(cfg.num_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style, kernels.reductions)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rows_kernel = kernels.linear_rows  # etspec::linear_rows for the lm_head of verify calls
        self.chunk_kernel = kernels.linear_chunk  # ... etspec::linear_chunk for the others
        self.argmax_kernel = kernels.reductions  # etspec::argmax_rows for the greedy ids of verify calls
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the embedding when the config ties them (again after `to_empty`)."""
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(tokens)
        if self.cfg.embed_scale:
            h = h * torch.tensor(self.cfg.hidden_size**0.5, dtype=h.dtype)
        return h

    def hidden(
        self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int, few_rows: bool = False
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run all layers on tokens [1,T] at input_pos; returns (final-norm output, taps).

        Each residual add runs with the norm that follows it (`RMSNorm.add_norm`): one kernel per norm
        on few-row calls with the norm kernel on."""
        if self.max_rows is not None:
            if torch.compiler.is_compiling():  # export: a bound the graph keeps (the Dims' maxima prove it)
                torch._check(tokens.shape[1] <= self.max_rows)
            elif tokens.shape[1] > self.max_rows:
                n, most = tokens.shape[1], self.max_rows
                raise ValueError(f"{n} rows in one call; this model takes at most {most}")
        h, delta = self.embed(tokens), None
        taps: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            h, x = layer.input_layernorm.add_norm(h, delta, few_rows)
            if i in self.tap_layers:
                taps[i] = h  # the input to layer i == transformers' hidden_states[i]
            h, delta = layer(h, x, input_pos, kv_len, few_rows)
        return self.norm.add_norm(h, delta, few_rows)[1], [taps[i] for i in self.tap_layers]

    def logits(self, normed: torch.Tensor, few_rows: bool = False) -> torch.Tensor:
        """Logits of final-norm outputs (`hidden`'s first result)."""
        (logits,) = project(normed, (self.lm_head,), few_rows and self.rows_kernel, self.chunk_kernel)
        cap = self.cfg.final_logit_softcap
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def forward(self, tokens: torch.Tensor, input_pos: torch.Tensor, kv_window: torch.Tensor) -> torch.Tensor:
        """Full logits [1,T,V] (for tests against transformers; the exported methods return argmaxes)."""
        h, _ = self.hidden(tokens, input_pos, kv_window.shape[0])
        return self.logits(h)
