"""GGUF file -> Hugging Face checkpoint directory, through transformers' own GGUF reader.

transformers parses the metadata into a config and a tokenizer and dequantises the tensors (undoing
llama.cpp's layout changes such as the q/k row permutation), but the model it returns is flagged as
quantized and `save_pretrained` refuses it. So the files are written here: config.json without the
quantization fields, safetensors in the `model.layers.N...` layout (no `lm_head.weight` when tied),
generation_config.json and the tokenizer files with the chat template.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from etspec.models.config import ConfigError, parse_target_config

from .errors import ConvertError

# torchao, imported by transformers' quantizer registry while a model loads, warns at import about its
# optional CUDA extensions and a deprecated torch registration; neither concerns a conversion.
_IMPORT_NOISE = ("torchao", "torch.utils._pytree")
# GGUF metadata keys of tokens that end a turn besides eos (llama.cpp stops on all of them).
_END_OF_TURN_KEYS = ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


@dataclass
class GgufInfo:
    architecture: str
    tensor_types: Counter  # ggml type name -> number of tensors
    end_of_turn_ids: tuple[int, ...]
    tokenizer_model: str = ""  # tokenizer.ggml.model: "llama" (SentencePiece), "gpt2" (byte-level BPE), ...
    add_bos: bool = False  # tokenizer.ggml.add_bos_token: llama.cpp starts every text with bos

    def types_summary(self) -> str:
        return ", ".join(f"{n} {t}" for t, n in self.tensor_types.most_common())


@dataclass
class Converted:
    source: GgufInfo
    architecture: str  # transformers class, e.g. LlamaForCausalLM
    parameters: int
    dtype: torch.dtype
    files: list[str]  # names of the written files


def read_gguf_info(path: Path) -> GgufInfo:
    """What the summary reports and transformers does not keep: tensor types and end-of-turn ids."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as e:  # what numpy raises on a truncated file
        raise ConvertError(f"{path}: cannot read the GGUF file, truncated or corrupt? ({e})") from None
    arch = reader.get_field("general.architecture")
    eot = [reader.get_field(k) for k in _END_OF_TURN_KEYS]
    tokenizer = reader.get_field("tokenizer.ggml.model")
    add_bos = reader.get_field("tokenizer.ggml.add_bos_token")
    return GgufInfo(
        architecture=arch.contents() if arch is not None else "unknown",
        tensor_types=Counter(t.tensor_type.name for t in reader.tensors),
        end_of_turn_ids=tuple(int(f.contents()) for f in eot if f is not None),
        tokenizer_model=tokenizer.contents() if tokenizer is not None else "",
        add_bos=bool(add_bos.contents()) if add_bos is not None else False,
    )


@contextmanager
def transformers_quiet(progress: bool) -> Iterator[None]:
    """Silence known import noise and show transformers' loading bars only when asked to."""
    import transformers.modeling_gguf_pytorch_utils as gguf_loader
    from transformers.utils import logging as hf_logging

    with ExitStack() as restore:
        for name in _IMPORT_NOISE:
            logger = logging.getLogger(name)
            restore.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        bars = hf_logging.is_progress_bar_enabled()
        restore.callback(hf_logging.enable_progress_bar if bars else hf_logging.disable_progress_bar)
        (hf_logging.enable_progress_bar if progress else hf_logging.disable_progress_bar)()
        # The dequantisation bar is plain tqdm, outside transformers' progress-bar switch.
        if not progress and hasattr(gguf_loader, "tqdm"):
            restore.callback(setattr, gguf_loader, "tqdm", gguf_loader.tqdm)
            gguf_loader.tqdm = partial(gguf_loader.tqdm, disable=True)
        yield


def _f32_decimal(value: Any) -> Any:
    """GGUF stores float metadata as float32 (1e-5 reads back as 9.999999747378752e-06); write the
    shortest decimal of that float32, which casts back to the same float32, as the original config had."""
    if isinstance(value, dict):
        return {k: _f32_decimal(v) for k, v in value.items()}
    if isinstance(value, float) and float(np.float32(value)) == value:
        return float(str(np.float32(value)))
    return value


def _config_dict(config, architecture: str, dtype: torch.dtype) -> dict[str, Any]:
    d = config.to_diff_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        d.pop(key, None)
    d = _f32_decimal(d)
    d["architectures"] = [architecture]
    d["dtype"] = str(dtype).removeprefix("torch.")
    return dict(sorted(d.items()))


def _first(ids: int | list[int] | None) -> int | None:
    return ids[0] if isinstance(ids, list) else ids


def _fix_tokenizer(tok, config) -> None:
    """Name the special tokens by the GGUF's ids (transformers' GGUF Llama converter sets eos to the bos
    string), bound the length by the model's context, and drop a decode cleanup that transformers
    ignores for BPE anyway but warns about on every decode."""
    for name in ("bos", "eos", "pad", "unk"):
        token_id = _first(getattr(config, f"{name}_token_id", None))
        if token_id is not None:
            setattr(tok, f"{name}_token", tok.convert_ids_to_tokens(int(token_id)))
    tok.model_max_length = config.max_position_embeddings
    if type(tok.backend_tokenizer.model).__name__ == "BPE":
        tok.clean_up_tokenization_spaces = False


def _sentencepiece_as_bpe(tok, info: GgufInfo) -> None:
    """llama.cpp reads a SentencePiece ("llama") GGUF vocabulary as BPE: adjacent pieces merge in the
    order of the merged piece's score. transformers builds a Unigram model from some of them (Gemma 3's),
    whose scores are such merge ranks, not log-probabilities; saved and reloaded through the model's BPE
    tokenizer class it splits text into single characters. Rebuild the model as BPE with the merges the
    scores imply (transformers' own `generate_merges`), keeping the normalizer, pre-tokenizer, decoder
    and special tokens."""
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import generate_merges

    backend = tok.backend_tokenizer
    spec = json.loads(backend.to_str())["model"]
    if info.tokenizer_model != "llama" or spec["type"] != "Unigram":
        return
    pieces = [(piece, score) for piece, score in spec["vocab"]]
    vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
    special = {t.content for t in backend.get_added_tokens_decoder().values() if t.special}
    unk = pieces[spec["unk_id"]][0] if spec.get("unk_id") is not None else None
    backend.model = BPE(
        vocab=vocab,
        merges=generate_merges(vocab, pieces, skip_tokens=special),
        unk_token=unk,
        byte_fallback=bool(spec.get("byte_fallback")),
        fuse_unk=True,
    )


def _eos_ids(config, info: GgufInfo) -> int | list[int] | None:
    eos = config.eos_token_id
    ids = list(eos) if isinstance(eos, list) else [eos] if eos is not None else []
    ids += [i for i in info.end_of_turn_ids if i not in ids]
    return ids[0] if len(ids) == 1 else ids or None


def _write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_size: str | int) -> None:
    """One model.safetensors, or shards plus model.safetensors.index.json past `max_shard_size`."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_size)
    mask = os.umask(0)
    os.umask(mask)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k].contiguous() for k in keys}, out / filename, metadata={"format": "pt"})
        (out / filename).chmod(0o666 & ~mask)  # safetensors writes 0600; give the umask's modes
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def convert_gguf(
    gguf: Path,
    out: Path,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    max_shard_size: str | int = "5GB",
) -> Converted:
    """Write the Hugging Face checkpoint of `gguf` into the (empty) directory `out`."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, GgufConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    info = read_gguf_info(gguf)
    where = dict(pretrained_model_name_or_path=str(gguf.parent), gguf_file=gguf.name)
    with transformers_quiet(progress):
        try:
            config = AutoConfig.from_pretrained(**where)
        except ValueError as e:
            raise ConvertError(
                f"{gguf.name}: transformers {transformers.__version__} cannot load GGUF architecture "
                f"'{info.architecture}' ({e})"
            ) from None
        architecture = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")
        config_json = _config_dict(config, architecture, dtype)
        try:
            parse_target_config(config_json)
        except ConfigError as e:
            raise ConvertError(f"{gguf.name}: etspec cannot export this model: {e}") from None

        tok = AutoTokenizer.from_pretrained(**where)
        _sentencepiece_as_bpe(tok, info)
        _fix_tokenizer(tok, config)
        if info.add_bos:  # as llama.cpp does; transformers' GGUF tokenizers leave it out
            tok.add_bos_token = True
        model = AutoModelForCausalLM.from_pretrained(
            **where, config=config, dtype=dtype, quantization_config=GgufConfig(dequantize=True)
        )

    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    _write_weights(state, out, max_shard_size)

    (out / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
    eos = _eos_ids(config, info)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
    tok.save_pretrained(out)
    return Converted(
        source=info,
        architecture=architecture,
        parameters=sum(t.numel() for t in state.values()),
        dtype=dtype,
        files=sorted(f.name for f in out.iterdir()),
    )
