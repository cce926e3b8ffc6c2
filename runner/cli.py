"""`etspec-run`: speculative generation (greedy or sampled) from an etspec artifact, streamed to stdout.

Everything that needs only the manifest and the tokenizer (flags, prompt, ids, lengths, the stats
file) is checked before the program loads, so a mistake costs no load time and loses no run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from etspec.artifact import Manifest
from etspec.errors import EtspecError
from etspec.runtime.errors import MethodInputError
from etspec.runtime.program import Program, check_token_ids, read_manifest

from .errors import UsageError
from .generator import SpeculativeGenerator
from .limits import room
from .quiet import quiet_third_party
from .report import run_report, slower_reason
from .sampling import Sampling
from .stats import GenerationStats
from .text import TextStream, decode, encode_prompt, has_tokenizer, load_tokenizer

EXAMPLES = """examples:
  etspec-run --model out/demo/smollm2 --prompt "Write a haiku about the sea" --chat
  etspec-run --model ART --prompt-file q.txt --max-new-tokens 256 --compare --stats-json run.json
  etspec-run --model ART --prompt-ids 1,2,3 --no-spec --quiet
  etspec-run --model CUDA_ART --prompt "..." --cuda-graph --verify
  etspec-run --model ART --prompt "Tell me a story" --chat --temperature 0.7 --top-p 0.9 --seed 1
    (sampling needs an artifact exported with --sampling)
"""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows a flag's default where it has a real one (not for required flags or None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etspec-run",
        description="Generate text from an etspec-export artifact with EAGLE-3 speculative decoding (draft a "
        "chain, verify it in one target pass, accept, repeat). Greedy by default: the output is identical "
        "to target-only greedy decoding. With --temperature > 0 it samples losslessly: the output is "
        "distributed exactly as target-only sampling with the same temperature, top-p and top-k.",
        epilog=EXAMPLES,
        formatter_class=_Formatter,
    )
    p.add_argument("--model", required=True, type=Path, help="artifact directory written by etspec-export")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompt-file", type=Path, help="UTF-8 file holding the prompt text")
    src.add_argument("--prompt-ids", help="comma-separated token ids (skips the tokenizer and --chat)")
    p.add_argument(
        "--chat", action="store_true", help="wrap the prompt text in the tokenizer's chat template"
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many generated tokens")
    p.add_argument(
        "--draft-len",
        type=int,
        default=None,
        help="drafts per round, 1 .. the exported k (default: k); speculative runs only",
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
        "--verify",
        action="store_true",
        help="also check the .ptd weight files against the sha256 hashes the export recorded (reads "
        "every byte: about 1 s per GiB). Every load checks file sizes and model.pte's hash (small on "
        "CUDA; on the CPU it is read whole anyway)",
    )
    p.add_argument(
        "--simulate-acceptance",
        type=float,
        metavar="L",
        help="BENCHMARK ONLY: force an acceptance length of L tokens per round (1 <= L <= k+1) whatever "
        "the target says, to time rounds of a head that reaches L (e.g. with random weights); the output "
        "is then not the model's",
    )
    p.add_argument(
        "--stats-json",
        type=Path,
        help="write the run's statistics (ids, text, per-round accepts and timings, versions) as JSON",
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 is greedy decoding (argmax, nothing random). > 0 needs an artifact "
        "exported with --sampling",
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus filter for sampling: 1 keeps every token"
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="keep the k most likely tokens when sampling: 0 keeps every token",
    )
    p.add_argument(
        "--seed",
        type=int,
        help="seed of a sampled run (default: a fresh one, printed with the stats): the same seed, "
        "artifact and flags repeat a run on the same backend. Greedy runs use no randomness",
    )
    p.add_argument("--quiet", action="store_true", help="do not stream the generated text")
    p.add_argument(
        "-v", "--verbose", action="store_true", help="show third-party warnings and logs (hidden by default)"
    )
    return p


def _check_flags(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if args.no_spec and args.compare:
        raise UsageError("--compare already runs --no-spec; pass one of them")
    if args.simulate_acceptance is not None and (args.no_spec or args.compare):
        raise UsageError("--simulate-acceptance changes the output: it goes with speculative runs only")
    if args.draft_len is not None and args.no_spec:
        raise UsageError("--draft-len sets drafts per speculative round; --no-spec drafts nothing")
    if args.chat and args.prompt_ids is not None:
        raise UsageError("--chat wraps prompt text in the chat template; --prompt-ids are already tokens")
    if args.temperature == 0 and args.seed is not None:
        raise UsageError(
            "--seed: decoding is greedy (--temperature 0) and uses no randomness; a seed would change nothing"
        )
    try:
        args.sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed)
    except ValueError as e:
        flags = {"temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}
        msg = str(e)
        for name, flag in flags.items():
            msg = msg.replace(name, flag)
        raise UsageError(msg) from None
    if not args.sampling.greedy and args.simulate_acceptance is not None:
        raise UsageError(
            "--simulate-acceptance forces greedy accept decisions; it does not combine with sampling"
        )
    if not args.model.is_dir():
        raise UsageError(f"--model {args.model}: no such artifact directory")
    if args.stats_json is not None:
        _check_writable(args.stats_json)


def _check_writable(path: Path) -> None:
    """Refuse a stats file that could not be written, before the run it would describe (by opening it
    for appending, which changes nothing: permission bits do not tell root the truth)."""
    if path.is_dir():
        raise UsageError(f"--stats-json {path}: is a directory")
    if not path.parent.is_dir():
        raise UsageError(f"--stats-json {path}: directory {path.parent} does not exist")
    existed = path.exists()
    try:
        with open(path, "a"):
            pass
    except OSError as e:
        raise UsageError(f"--stats-json {path}: not writable ({e.strerror})") from None
    if not existed:
        path.unlink()


def _check_manifest_limits(args: argparse.Namespace, m: Manifest) -> int:
    """Checks that need only the manifest; returns the draft length the run uses."""
    if args.cuda_graph and m.backend != "cuda":
        raise UsageError(f"--cuda-graph needs a CUDA artifact; {args.model} is {m.backend}")
    if not args.sampling.greedy and not m.sampling:
        raise UsageError(
            f"--temperature {args.temperature}: {args.model} has no sampled methods; re-export it with "
            "etspec-export --sampling (or use --temperature 0)"
        )
    if args.draft_len is not None and not 1 <= args.draft_len <= m.draft_len:
        raise UsageError(f"--draft-len must be between 1 and the exported {m.draft_len}")
    k = args.draft_len or m.draft_len
    if args.simulate_acceptance is not None and not 1 <= args.simulate_acceptance <= k + 1:
        raise UsageError(f"--simulate-acceptance must be between 1 and k+1 = {k + 1}")
    return k


def _read_prompt_file(path: Path) -> str:
    if path.is_dir():
        raise UsageError(f"--prompt-file {path}: is a directory")
    if not path.is_file():
        raise UsageError(f"--prompt-file {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompt-file {path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise UsageError(f"--prompt-file {path}: {e.strerror}") from None


def _prompt_ids(args: argparse.Namespace, m: Manifest) -> tuple[list[int], object | None]:
    if args.prompt_ids is not None:
        try:
            ids = [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise UsageError("--prompt-ids must be comma-separated integers") from None
        tok = load_tokenizer(args.model) if has_tokenizer(args.model) else None
    else:
        text = args.prompt if args.prompt_file is None else _read_prompt_file(args.prompt_file)
        tok = load_tokenizer(args.model)
        ids = encode_prompt(tok, text, args.chat)
    if not ids:
        raise UsageError("the prompt is empty")
    try:
        check_token_ids(ids, m.vocab_size, "--prompt-ids: token id" if args.prompt_ids else "token id")
    except MethodInputError as e:
        raise UsageError(str(e)) from None
    if room(m, len(ids)) < 1:
        raise UsageError(
            f"the prompt has {len(ids)} tokens; this artifact holds {m.max_seq_len} (max_seq_len) including "
            f"{m.draft_len} verify rows: shorten the prompt or re-export with a larger --max-seq-len"
        )
    return ids, tok


def _run(gen: SpeculativeGenerator, ids: list[int], args, tok, label: str | None) -> list[int]:
    out: list[int] = []
    stream = TextStream(tok) if tok is not None else None
    if gen.simulate is not None:
        print(
            f"[{label}] SIMULATED ACCEPTANCE {gen.simulate}: benchmark only, the output is not the model's",
            file=sys.stderr,
        )
    if label and not args.quiet:
        print(f"--- {label} ---", flush=True)
    for chunk in gen.generate(ids, args.max_new_tokens):
        out += chunk
        if not args.quiet:
            piece = stream.push(chunk) if stream else "".join(f" {t}" for t in chunk)
            print(piece, end="", flush=True)
    if not args.quiet:
        print((stream.flush() if stream else ""), flush=True)
    print(gen.stats.summary(label or ("speculative" if gen.spec else "target-only")), file=sys.stderr)
    if gen.stats.stop_reason == "context_limit":
        print(
            f"[{label}] stopped at the context limit (max_seq_len {gen.manifest.max_seq_len})",
            file=sys.stderr,
        )
    return out


def _write_stats(path: Path, report: dict) -> None:
    text = json.dumps(report, indent=2)
    try:
        path.write_text(text + "\n")
    except OSError as e:  # checked before the run; if it still fails, the stats go to stderr
        print(f"etspec-run: could not write --stats-json {path} ({e.strerror}); the stats:", file=sys.stderr)
        print(text, file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    _check_flags(args)
    manifest = read_manifest(args.model)  # a clear error for a wrong directory before any other work
    k = _check_manifest_limits(args, manifest)
    ids, tok = _prompt_ids(args, manifest)
    program = Program.load(args.model, verify=args.verify, quiet_native=not args.verbose)
    modes = [("target-only", False), ("speculative", True)] if args.compare else [(None, not args.no_spec)]
    runs: dict[str, tuple[list[int], GenerationStats]] = {}
    try:
        for label, spec in modes:
            gen = SpeculativeGenerator(
                program,
                draft_len=args.draft_len,
                spec=spec,
                cuda_graph=args.cuda_graph,
                simulate_acceptance=args.simulate_acceptance,
                sampling=args.sampling,
            )
            out = _run(gen, ids, args, tok, label)
            runs[label or ("speculative" if spec else "target-only")] = (out, gen.stats)
    finally:
        program.close()
    texts = {name: decode(tok, out) if tok is not None else None for name, (out, _) in runs.items()}
    report = run_report(args, manifest, k, ids, runs, texts)
    code = 0
    if args.compare and not args.sampling.greedy:
        print(
            f"speculative decode speedup: {report['speedup']:.2f}x (sampled: both outputs are draws from the "
            "target's distribution, not expected to be equal)",
            file=sys.stderr,
        )
    elif args.compare:
        same, speedup = report["identical"], report["speedup"]
        print(f"outputs identical: {same}; speculative decode speedup: {speedup:.2f}x", file=sys.stderr)
        why = slower_reason(runs["speculative"][1], runs["target-only"][1])
        if why:
            print(why, file=sys.stderr)
        code = 0 if same else 1
    if args.stats_json:
        _write_stats(args.stats_json, report)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with quiet_third_party(args.verbose):
            return run(args)
    except EtspecError as e:  # a user mistake or a runtime failure: one line
        print(f"etspec-run: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `etspec-run ... | head`: the reader left; stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print("etspec-run: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
