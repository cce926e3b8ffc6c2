"""`etspec-run`: greedy speculative generation from an etspec artifact, streamed to stdout."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from etspec.runtime.errors import RuntimeErrorBase
from etspec.runtime.program import Program, read_manifest

from .generator import ContextLimitError, SpeculativeGenerator
from .stats import GenerationStats


class UsageError(ValueError):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etspec-run",
        description="Generate text greedily from an etspec-export artifact with EAGLE-3 speculative decoding "
        "(draft a chain, verify it in one target pass, accept the longest matching prefix). The output is "
        "identical to target-only greedy decoding.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, type=Path, help="artifact directory written by etspec-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="file holding the prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (skips the tokenizer)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many generated tokens")
    p.add_argument(
        "--draft-len", type=int, default=None, help="drafts per round, at most the exported k (default: k)"
    )
    p.add_argument("--no-spec", action="store_true", help="target-only greedy decoding (the baseline)")
    p.add_argument(
        "--compare",
        action="store_true",
        help="run target-only and speculative decoding on the same prompt, check the outputs are identical, "
        "and report the speedup",
    )
    p.add_argument(
        "--cuda-graph",
        "--cuda_graph",
        dest="cuda_graph",
        action="store_true",
        help="replay captured CUDA graphs for the decode methods (CUDA artifacts only)",
    )
    p.add_argument(
        "--simulate-acceptance",
        type=float,
        metavar="L",
        help="BENCHMARK ONLY: force an acceptance length of L tokens per round (1 <= L <= k+1) whatever "
        "the target says, to time rounds of a head that reaches L (e.g. with random weights); the output "
        "is then not the model's",
    )
    p.add_argument("--stats-json", type=Path, help="write the run's statistics to this JSON file")
    p.add_argument(
        "--seed", type=int, default=0, help="seed for anything random (greedy decoding itself is not)"
    )
    p.add_argument("--quiet", action="store_true", help="do not stream the generated text")
    return p


def _tokenizer(model_dir: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise UsageError("text prompts need the transformers package; or pass --prompt-ids") from None
    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer.model").is_file():
        raise UsageError(f"{model_dir} has no tokenizer files; pass --prompt-ids")
    return AutoTokenizer.from_pretrained(str(model_dir))


def _prompt_ids(args: argparse.Namespace) -> tuple[list[int], object | None]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError("--prompt-ids must be comma-separated integers") from None
        return ids, (_tokenizer(args.model) if (args.model / "tokenizer.json").is_file() else None)
    text = args.prompt
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UsageError(f"--prompt-file {args.prompt_file}: no such file")
        text = args.prompt_file.read_text()
    tok = _tokenizer(args.model)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise UsageError("--chat: the artifact's tokenizer has no chat template")
        ids = tok.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        if hasattr(ids, "keys"):  # transformers 5 returns a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
    else:
        ids = tok(text)["input_ids"]
    return list(ids), tok


def _run(
    gen: SpeculativeGenerator, ids: list[int], args, tok, label: str
) -> tuple[list[int], GenerationStats]:
    out: list[int] = []
    shown = ""
    if gen.simulate is not None:
        print(
            f"[{label}] SIMULATED ACCEPTANCE {gen.simulate}: benchmark only, the output is not the model's",
            file=sys.stderr,
        )
    for chunk in gen.generate(ids, args.max_new_tokens):
        out += chunk
        if not args.quiet:
            text = tok.decode(out, skip_special_tokens=False) if tok is not None else " ".join(map(str, out))
            print(text[len(shown) :], end="", flush=True)
            shown = text
    if not args.quiet:
        print()
    print(gen.stats.summary(label), file=sys.stderr)
    if gen.stats.stop_reason == "context_limit":
        print(
            f"[{label}] stopped at the context limit (max_seq_len {gen.manifest.max_seq_len})",
            file=sys.stderr,
        )
    return out, gen.stats


def run(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.no_spec and args.compare:
        raise UsageError("--compare already runs --no-spec; pass one of them")
    if args.simulate_acceptance is not None and (args.no_spec or args.compare):
        raise UsageError("--simulate-acceptance changes the output: it goes with speculative runs only")
    if not args.model.is_dir():
        raise UsageError(f"--model {args.model}: no such artifact directory")
    read_manifest(args.model)  # a clear error for a wrong directory before any tokenizer work
    ids, tok = _prompt_ids(args)
    if not ids:
        raise UsageError("the prompt is empty")
    program = Program.load(args.model)
    m = program.manifest
    if args.cuda_graph and m.backend != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA artifact; {args.model} is {m.backend}")
    if args.draft_len is not None and not 1 <= args.draft_len <= m.draft_len:
        raise UsageError(f"--draft-len must be between 1 and the exported {m.draft_len}")
    k = args.draft_len or m.draft_len
    if args.simulate_acceptance is not None and not 1 <= args.simulate_acceptance <= k + 1:
        raise UsageError(f"--simulate-acceptance must be between 1 and k+1 = {k + 1}")
    room = m.max_seq_len - m.draft_len - len(ids)
    if room < 1:
        raise UsageError(
            f"the prompt has {len(ids)} tokens; this artifact holds {m.max_seq_len} (max_seq_len) including "
            f"{m.draft_len} verify rows: shorten the prompt or re-export with a larger --max-seq-len"
        )
    report: dict = {"prompt_tokens": len(ids), "backend": m.backend}
    modes = [("target-only", False), ("speculative", True)] if args.compare else [(None, not args.no_spec)]
    outputs = {}
    for label, spec in modes:
        label = label or ("speculative" if spec else "target-only")
        gen = SpeculativeGenerator(
            program,
            draft_len=args.draft_len,
            spec=spec,
            cuda_graph=args.cuda_graph,
            simulate_acceptance=args.simulate_acceptance,
        )
        outputs[label], stats = _run(gen, ids, args, tok, label)
        report[label] = stats.to_dict()
    code = 0
    if args.compare:
        same = outputs["target-only"] == outputs["speculative"]
        speedup = report["speculative"]["decode_tok_s"] / max(report["target-only"]["decode_tok_s"], 1e-9)
        report.update(identical=same, speedup=speedup)
        print(f"outputs identical: {same}; speculative decode speedup: {speedup:.2f}x", file=sys.stderr)
        code = 0 if same else 1
    if args.stats_json:
        args.stats_json.write_text(json.dumps(report, indent=2))
    program.close()
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, ContextLimitError, RuntimeErrorBase) as e:
        print(f"etspec-run: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
