"""Tiny GGUF files written the way llama.cpp's converter writes them, from a random transformers Llama.

The tokenizer is a byte-level BPE of about 300 tokens trained here on a few sentences (GGUF tokenizer
model "gpt2", as Llama 3 and SmolLM2 files use), so no download is needed and the reference model is
known exactly: a round trip GGUF -> Hugging Face must give back its weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. ",
    "Speculative decoding drafts tokens and the target verifies them in one pass. ",
    "Hello, world! How are you today? I am fine, thank you. ",
    "def main():\n    return 0\n",
]
DIMS = dict(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, context=256)


@dataclass
class TinyGguf:
    path: Path
    reference: transformers.PreTrainedModel  # the model the file was written from
    chat_template: str | None


def train_tokenizer(vocab_size: int = 300) -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary (tokens in id order) and its merges ("a b")."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    vocab = tok.get_vocab()
    merges = json.loads(tok.to_str())["model"]["merges"]
    return sorted(vocab, key=vocab.get), [m if isinstance(m, str) else " ".join(m) for m in merges]


def reference_model(vocab_size: int, tied: bool, seed: int) -> transformers.PreTrainedModel:
    cfg = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=DIMS["hidden"],
        intermediate_size=DIMS["intermediate"],
        num_hidden_layers=DIMS["layers"],
        num_attention_heads=DIMS["heads"],
        num_key_value_heads=DIMS["kv_heads"],
        max_position_embeddings=DIMS["context"],
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.1,  # larger than the default 0.02, so logits separate clearly
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a lost or offset norm weight shows
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's q/k row order (rotary halves interleaved), which transformers undoes."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(
    path: Path,
    qtype: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32,
    tied: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
    eot_token_id: int | None = None,
    seed: int = 0,
) -> TinyGguf:
    """Write a GGUF of a random tiny Llama; 2-D weights in `qtype` (F32 or a gguf.quants type), norms F32."""
    tokens, merges = train_tokenizer()
    model = reference_model(len(tokens), tied, seed)
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny test llama")
    w.add_block_count(DIMS["layers"])
    w.add_context_length(DIMS["context"])
    w.add_embedding_length(DIMS["hidden"])
    w.add_feed_forward_length(DIMS["intermediate"])
    w.add_head_count(DIMS["heads"])
    w.add_head_count_kv(DIMS["kv_heads"])
    w.add_rope_dimension_count(DIMS["hidden"] // DIMS["heads"])
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(False)
    w.add_add_space_prefix(False)
    if eot_token_id is not None:
        w.add_eot_token_id(eot_token_id)
    if chat_template is not None:
        w.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, DIMS["layers"])
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        base, suffix = hf_name.rsplit(".", 1)
        data = tensor.numpy().astype(np.float32)
        if base.endswith("q_proj"):
            data = _llama_cpp_permute(data, DIMS["heads"])
        elif base.endswith("k_proj"):
            data = _llama_cpp_permute(data, DIMS["kv_heads"])
        name = f"{names.get_name(base)}.{suffix}"
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return TinyGguf(path, model, chat_template)


def write_metadata_only_gguf(path: Path, architecture: str) -> Path:
    """A GGUF with an architecture name and a tokenizer but no tensors, for the refusal paths."""
    tokens, merges = train_tokenizer()
    w = gguf.GGUFWriter(path, architecture)
    w.add_block_count(1)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
