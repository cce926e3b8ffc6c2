"""Self-distillation data: the target's own responses to the prompts, then one teacher-forced pass over
prompt + response for the three taps and the target's next-token distributions.

Both run on transformers' model of the target, batched (etspec's TargetModel takes one sequence at a
time). Its `hidden_states[i]` is the input to layer i, exactly etspec's tap i, and `hidden_states[-1]`
the final-norm output; tests/train/test_data.py checks both against TargetModel for every family.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm

from etspec.models.config import TargetConfig

from .prompts import prose_opening
from .vocab import DraftVocab


@dataclass
class Sequence:
    tokens: list[int]  # prompt + response
    prompt_len: int

    @property
    def response(self) -> list[int]:
        return self.tokens[self.prompt_len :]


@dataclass
class Sample:
    """One distilled sequence on the training device. Position p's label is the target's distribution at
    p (over x_{p+1}); `label_ok[p]` says whether the loss uses it."""

    tokens: torch.Tensor  # [L] int64
    taps: torch.Tensor  # [L, 3H]: the target's tapped layer inputs, concatenated low, mid, high
    hidden: torch.Tensor  # [L, H]: the target's final-norm output (its logits, via Teacher)
    label_ok: torch.Tensor  # [L] bool


@dataclass
class Batch:
    """Samples right-padded to the longest; padded positions are never labels."""

    tokens: torch.Tensor  # [B, T]
    taps: torch.Tensor  # [B, T, 3H]
    hidden: torch.Tensor  # [B, T, H]
    label_ok: torch.Tensor  # [B, T]


@torch.no_grad()
def generate_responses(
    model: nn.Module,
    prompts: list[list[int]],
    max_new_tokens: int,
    eos: tuple[int, ...],
    pad_id: int,
    batch_size: int,
    temperature: float = 0.0,
    seed: int = 0,
    desc: str = "responses",
) -> list[Sequence]:
    """The target's continuations of `prompts` (greedy when temperature is 0), cut after the first EOS
    (`eos` empty: always max_new_tokens).

    `model` is a transformers causal LM; prompts are left-padded, with the attention mask saying so, and
    batched longest first so each batch pads little.
    """
    from transformers import GenerationConfig

    # Unset fields would be filled from the checkpoint's generation_config: set every one that changes
    # the output. An empty eos list stops nothing.
    fields = dict(
        do_sample=temperature > 0, repetition_penalty=1.0, eos_token_id=list(eos), pad_token_id=pad_id
    )
    if temperature > 0:
        fields |= dict(temperature=temperature, top_k=0, top_p=1.0)
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, **fields)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: dict[int, Sequence] = {}
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt")
    torch.manual_seed(seed)  # sampling draws from the global generator
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = len(prompts[idx[0]])
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        new = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg
        )[:, width:].tolist()
        for row, i in enumerate(idx):
            response = new[row]
            cut = next((n + 1 for n, tok in enumerate(response) if tok in eos), len(response))
            out[i] = Sequence(prompts[i] + response[:cut], len(prompts[i]))
        bar.update(len(idx))
    bar.close()
    return [out[i] for i in range(len(prompts))]


def load_hf_target(
    directory: Path, cfg: TargetConfig, dtype: torch.dtype, device: str | torch.device
) -> nn.Module:
    """transformers' model of the target, for generation and the teacher-forced pass. Eager attention
    where the target caps attention logits (Gemma 2): transformers' SDPA path drops the cap."""
    from transformers import AutoModelForCausalLM

    attn = "eager" if cfg.attn_logit_softcap else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, attn_implementation=attn)
    return model.to(device).eval().requires_grad_(False)


def input_embedding(model: nn.Module) -> nn.Embedding:
    """The target's embedding table as the head reads it: the raw rows, without the scale Gemma's own
    embedding module applies (etspec's draft method embeds with the table alone)."""
    return nn.Embedding.from_pretrained(model.get_input_embeddings().weight, freeze=True)


class Teacher(nn.Module):
    """The target's logits restricted to the draft vocabulary, from its final-norm output: the lm_head
    rows of the draft tokens (and the final softcap), so full-vocabulary logits are never built in
    training."""

    def __init__(self, model: nn.Module, vocab: DraftVocab, softcap: float | None):
        super().__init__()
        weight = model.get_output_embeddings().weight
        self.register_buffer("weight", weight[vocab.ids.to(weight.device)].clone())
        self.softcap = softcap

    def forward(self, normed: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(normed, self.weight)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@torch.no_grad()
def distill(
    model: nn.Module,
    sequences: list[Sequence],
    vocab: DraftVocab,
    tap_layers: tuple[int, ...],
    batch_tokens: int,
) -> list[Sample]:
    """Teacher-forced pass over right-padded batches of `sequences` (causal: padding never reaches a
    real position).

    Labels: positions p with prompt_len <= p < L - 1, i.e. the target's distribution over a response
    token after the first (the first draft after prefill predicts x_{prompt_len + 1}); positions where
    the target's argmax over its full vocabulary is outside the draft vocabulary are left out, as
    SpecForge does, since the head cannot propose that token.
    """
    device = model.get_input_embeddings().weight.device
    t2d = vocab.t2d.to(device)
    samples: dict[int, Sample] = {}
    bar = tqdm(total=len(sequences), desc="teacher-forced pass", unit="seq")
    for idx in length_batches([len(s.tokens) for s in sequences], batch_tokens):
        width = max(len(sequences[i].tokens) for i in idx)
        ids = torch.zeros((len(idx), width), dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, : len(sequences[i].tokens)] = torch.tensor(sequences[i].tokens)
            mask[row, : len(sequences[i].tokens)] = 1
        ids, mask = ids.to(device), mask.to(device)
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False)
        taps = torch.cat([out.hidden_states[i] for i in tap_layers], dim=-1)
        in_vocab = t2d[out.logits.argmax(-1)]
        for row, i in enumerate(idx):
            n = len(sequences[i].tokens)
            pos = torch.arange(n, device=device)
            label_ok = (pos >= sequences[i].prompt_len) & (pos < n - 1) & in_vocab[row, :n]
            # Copies, so the batch's padded tensors are freed.
            samples[i] = Sample(
                ids[row, :n].clone(), taps[row, :n].clone(), out.hidden_states[-1][row, :n].clone(), label_ok
            )
        bar.update(len(idx))
    bar.close()
    return [samples[i] for i in range(len(sequences))]


def length_batches(lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Sample indices grouped by length so that batch size x longest length <= batch_tokens (a longer
    sequence goes alone); padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(samples: list[Sample]) -> Batch:
    return Batch(
        pad_sequence([s.tokens for s in samples], batch_first=True),
        pad_sequence([s.taps for s in samples], batch_first=True),
        pad_sequence([s.hidden for s in samples], batch_first=True),
        pad_sequence([s.label_ok for s in samples], batch_first=True),
    )


SELF_MARK = "\x00ETSPEC_USER_TURN\x00"


def chat_ids(tokenizer, text: str) -> list[int]:
    """`text` as one user turn in the tokenizer's chat template, ready for the assistant's answer."""
    wrapped = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer(wrapped, add_special_tokens=False).input_ids


def user_turn_prefix(tokenizer) -> list[int]:
    """The chat template's ids up to where a user's message begins (system turn included), so the target
    can be asked to write that message itself."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": SELF_MARK}], tokenize=False)
    return tokenizer(text[: text.index(SELF_MARK)], add_special_tokens=False).input_ids


def target_written_prompts(
    model: nn.Module,
    tokenizer,
    n: int,
    eos: tuple[int, ...],
    pad_id: int,
    batch_size: int,
    seed: int,
    max_tokens: int = 96,
    temperature: float = 1.0,
) -> list[str]:
    """Up to `n` distinct user messages sampled from the target itself at the start of a user turn: chat
    prompts in the target's own distribution, from nothing but its weights. Messages cut off by
    `max_tokens` (no end-of-turn), shorter than 4 words or repeated are dropped."""
    prefix = user_turn_prefix(tokenizer)
    seqs = generate_responses(
        model,
        [prefix] * n,
        max_tokens,
        eos,
        pad_id,
        batch_size,
        temperature,
        seed,
        desc="target-written prompts",
    )
    out: dict[str, None] = {}
    for s in seqs:
        if not s.response or s.response[-1] not in eos:
            continue
        text = tokenizer.decode(s.response[:-1], skip_special_tokens=True).strip()
        if len(text.split()) >= 4:
            out[text] = None
    return list(out)


def target_written_openings(
    model: nn.Module,
    tokenizer,
    n: int,
    eos: tuple[int, ...],
    pad_id: int,
    batch_size: int,
    seed: int,
    words: tuple[int, int] = (5, 16),
) -> list[str]:
    """Up to `n` distinct openings of prose in the target's own words, to be continued as plain text (no
    chat template): the first 5-16 words of a sentence from its answers to user messages it wrote itself.

    A chat model's free text from an empty context is mostly code fragments; its answers are the prose
    it writes. `prompts.prose_opening` picks the sentence."""
    # about half of the sampled messages end up giving an opening
    messages = target_written_prompts(model, tokenizer, 2 * n, eos, pad_id, batch_size, seed)
    answers = generate_responses(
        model, [chat_ids(tokenizer, m) for m in messages], 64, eos, pad_id, batch_size, desc="answers"
    )
    rng = random.Random(seed)
    out: dict[str, None] = {}
    for s in answers:
        opening = prose_opening(tokenizer.decode(s.response, skip_special_tokens=True), rng, words)
        if opening is not None:
            out[opening] = None
    return list(out)[:n]
