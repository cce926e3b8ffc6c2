"""Text in and out of an artifact: its tokenizer, prompt encoding (plain or chat template), and a
streaming decoder whose printed pieces always add up to the full decode."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer.model")


def has_tokenizer(model_dir: Path) -> bool:
    return any((model_dir / name).is_file() for name in TOKENIZER_MARKERS)


def load_tokenizer(model_dir: Path):
    """The tokenizer files export copied beside the program, through transformers."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("text prompts need the transformers package; or pass --prompt-ids") from None
    if not has_tokenizer(model_dir):
        raise UsageError(f"{model_dir} has no tokenizer files; pass --prompt-ids")
    return AutoTokenizer.from_pretrained(str(model_dir))


def encode_prompt(tok, text: str, chat: bool) -> list[int]:
    """Token ids of `text`, wrapped in the tokenizer's chat template as one user turn when `chat`."""
    if not chat:
        return list(tok(text)["input_ids"])
    if not getattr(tok, "chat_template", None):
        raise UsageError("--chat: the artifact's tokenizer has no chat template")
    turn = [{"role": "user", "content": text}]
    ids = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def decode(tok, ids: list[int]) -> str:
    """The one decode used for streaming and for the final text, so the two agree."""
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


class TextStream:
    """Turns committed token ids into printable text pieces.

    A character split across tokens (byte-level BPE, byte fallback) decodes to U+FFFD until its last
    byte arrives; printing it then would lose the real character. So each push decodes all ids and
    holds back a trailing run of U+FFFD (and anything an earlier piece would contradict) until it
    settles; `flush` prints the rest. Re-decoding everything costs O(n) per push, negligible next to
    a verify pass for the lengths one generation reaches.
    """

    def __init__(self, tok):
        self.tok, self.ids, self.shown = tok, [], ""

    def push(self, ids: list[int]) -> str:
        self.ids += ids
        stable = decode(self.tok, self.ids).rstrip("\ufffd")
        if len(stable) <= len(self.shown) or not stable.startswith(self.shown):
            return ""
        piece, self.shown = stable[len(self.shown) :], stable
        return piece

    def flush(self) -> str:
        text = decode(self.tok, self.ids)
        piece, self.shown = text[len(self.shown) :], text
        return piece
