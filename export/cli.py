"""`etspec-export`: a target + its EAGLE-3 head -> one ExecuTorch program with prefill, target_verify and
draft, plus manifest.json and the tokenizer files.

Nothing at --out changes until the artifact is complete: every input is checked first, the artifact is
built in a hidden directory beside --out, and that directory is renamed into place at the end."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import torch

from etspec.artifact import MANIFEST_NAME, Manifest, dtype_name, file_record
from etspec.errors import UsageError
from etspec.models.checkpoint import DTYPES, CheckpointError, load_speculator
from etspec.models.config import (
    ConfigError,
    check_pair,
    eos_token_ids,
    parse_draft_config,
    parse_target_config,
    read_config_json,
)
from etspec.models.layers import FewRowsKernels, use_delegate_forms

from .constants import manifest_constant_methods
from .lower import lower
from .manifest import checkpoint_hash, constant_table, toolchain_versions
from .methods import method_specs
from .progress import Progress, timed
from .torch_export import export_methods, method_signatures

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
CUDA_KV_BUCKET = 1024  # kv_window rounding the runtime may use for CUDA graphs (one graph per bucket)
DEFAULT_DTYPE = {"xnnpack": "fp32", "cuda": "bf16"}

# Third-party warnings that every export triggers and that say nothing about the user's export, as
# (category, module regex, message regex); a warning must match all three to be hidden.
QUIET_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # torch deprecates its own LeafSpec, which torch.export and ExecuTorch still copy (deepcopy: copyreg).
    (FutureWarning, r"(copyreg|torch|executorch)(\.|$)", r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # The KV caches are meant to start uninitialised: the runner writes every position before reading it.
    (UserWarning, r"executorch\.exir\.emit\._emitter", r"Mutation on a buffer in the model is detected"),
    (DeprecationWarning, r"torch\.jit\.", r"`torch\.jit\.script_method` is deprecated"),
    (DeprecationWarning, r"(executorch|importlib\.resources)\.", r"(open|read)_(text|binary) is deprecated"),
)
# Log records that importing ExecuTorch prints with this toolchain: logger name -> message regex.
QUIET_LOGS = {
    # torchao's optional CUDA kernel libraries, unused by the export, fail to load on this build.
    "torchao": r"Failed to load .*torchao/_C",
    # torchao registers an Enum as a pytree constant, which torch now deprecates.
    "torch.utils._pytree": r".* is an Enum subclass and is now natively supported by torch\.compile",
}

EPILOG = """\
examples:
  # CPU (XNNPACK, fp32 by default):
  etspec-export --target models/Llama-3.2-1B-Instruct --draft models/EAGLE3-LLaMA3.2-1B \\
      --out art/llama1b-cpu --max-seq-len 2048 --draft-len 4
  # NVIDIA GPU (AOTInductor, bf16 by default), run on the GPU machine:
  etspec-export --target models/Llama-3.1-8B-Instruct --draft models/EAGLE3-LLaMA3.1-Instruct-8B \\
      --out art/llama8b-cuda --backend cuda --max-seq-len 8192 --draft-len 5
  # long prompts: prefill's linear layers and attention through fixed-config kernels, nothing autotuned:
  etspec-export --target ... --draft ... --out art/llama8b-cuda --backend cuda --linear-chunk --sdpa-chunk
  # then: etspec-run --model art/llama1b-cpu --prompt "Hello" --max-new-tokens 64
  # with the sampled methods too, for etspec-run --temperature 0.7 --top-p 0.9:
  etspec-export --target ... --draft ... --out art/llama1b-cpu --sampling

--out changes only when the export succeeds: the artifact is built in a hidden directory beside it
(.NAME.etspec-tmp-*) and renamed into place at the end, so a failed or interrupted export leaves --out
as it was. --force replaces an earlier etspec artifact (a directory holding manifest.json) or an empty
directory, and nothing else: never another directory, a file, the checkpoints, the current directory
or the home directory. Exit status: 0 on success, 2 for a bad flag, path or checkpoint.
"""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, but none for required flags and switches, where "(default: None)" or
    "(default: False)" would only be noise."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _path(text: str) -> Path:
    return Path(text).expanduser()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etspec-export",
        description="Export a target LLM and its EAGLE-3 draft head (Hugging Face directories) into one\n"
        "ExecuTorch program with the methods prefill, target_verify and draft (and, with --sampling,\n"
        "target_verify_sample and draft_sample).",
        epilog=EPILOG,
        formatter_class=_HelpFormatter,
    )
    p.add_argument(
        "--target", required=True, type=_path, help="target model directory (config.json + safetensors)"
    )
    p.add_argument(
        "--draft",
        required=True,
        type=_path,
        help="EAGLE-3 head directory (config.json + weights; EAGLE or speculators layout)",
    )
    p.add_argument(
        "--out",
        required=True,
        type=_path,
        help="artifact directory to create: model.pte [+ .ptd], manifest.json and the tokenizer files",
    )
    p.add_argument(
        "--backend",
        choices=("cuda", "xnnpack"),
        default="xnnpack",
        help="cuda: AOTInductor delegates for NVIDIA GPUs (needs a GPU); xnnpack: CPU",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=2048,
        help="KV-cache rows per sequence, which bound prompt + generated tokens + the k verify rows of the "
        "last round; at most the target's max_position_embeddings (default: %(default)s)",
    )
    p.add_argument(
        "--draft-len",
        type=int,
        default=4,
        help="k: tokens drafted per round; target_verify checks k + 1 rows (the runner may use fewer)",
    )
    p.add_argument(
        "--max-prefill-chunk",
        type=int,
        default=128,
        help="largest prefill / draft catch-up chunk (rows per call); longer prompts go in chunks",
    )
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weights and KV-cache dtype (default: "
        + ", ".join(f"{d} for {b}" for b, d in DEFAULT_DTYPE.items())
        + ")",
    )
    p.add_argument(
        "--no-midm-sdpa",
        action="store_true",
        help="do not use the split-K Triton verify-attention kernel, etspec::sdpa_midm (CUDA only; XNNPACK "
        "never uses it)",
    )
    p.add_argument(
        "--no-linear-rows",
        action="store_true",
        help="do not use the few-rows Triton linear kernel, etspec::linear_rows, in verify and draft calls "
        "(CUDA only; XNNPACK never uses it)",
    )
    p.add_argument(
        "--no-reduction-kernels",
        action="store_true",
        help="do not use etspec's fixed-config Triton kernels for the norms (etspec::(add_)rms_norm_rows) "
        "and the greedy argmax (etspec::argmax_rows) of verify and draft calls (CUDA only; XNNPACK never "
        "uses them)",
    )
    p.add_argument(
        "--linear-chunk",
        action="store_true",
        help="CUDA: run the many-row linear layers (prefill chunks, the draft's catch-up rows) through "
        "etspec::linear_chunk, fixed tiles, instead of AOTInductor's mm templates, which the export "
        "autotunes by timing; a method left without a matmul then compiles untuned (XNNPACK never uses it)",
    )
    p.add_argument(
        "--sdpa-chunk",
        action="store_true",
        help="CUDA: run prefill's attention through etspec::sdpa_chunk, a fixed-config flash-style kernel "
        "that reads each row's keys once and never materialises the scores, instead of AOTInductor's "
        "SDPA (its math path, autotuned); with --linear-chunk, prefill then compiles untuned (XNNPACK "
        "never uses it)",
    )
    p.add_argument(
        "--sampling",
        action="store_true",
        help="also export target_verify_sample and draft_sample, the methods etspec-run --temperature > 0 "
        "needs (lossless speculative sampling with temperature, top-p, top-k); greedy needs neither",
    )
    p.add_argument(
        "--cuda-triton-sdpa",
        action="store_true",
        help="CUDA, bf16 only: let ExecuTorch replace the remaining scaled_dot_product_attention calls "
        "(prefill, draft, sliding layers) with its own Triton SDPA instead of AOTInductor's",
    )
    p.add_argument(
        "--autotune-every-method",
        action="store_true",
        help="CUDA: let AOTInductor autotune every method, not only those with a matmul or SDPA of its own "
        "(prefill); a longer export, for comparison: the others run etspec's fixed-config kernels",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out that holds an earlier etspec artifact (see below)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="also show the third-party warnings and log lines (torch.export, ExecuTorch, torchao) that "
        "are hidden by default",
    )
    return p


# --------------------------------------------------------------------------------------------
# Checks: all of them run before anything is written
# --------------------------------------------------------------------------------------------


def _check_flags(args: argparse.Namespace) -> None:
    # Each check assumes the ones before it passed, so a message blames the flag that is wrong.
    if args.draft_len < 1:
        raise UsageError(f"--draft-len must be >= 1 (got {args.draft_len})")
    if args.max_seq_len < 2 * args.draft_len + 8:
        raise UsageError(
            f"--max-seq-len must be at least {2 * args.draft_len + 8} (2 x draft_len + 8) to leave room "
            f"for a prompt and verify rounds (got {args.max_seq_len})"
        )
    if not 1 <= args.max_prefill_chunk <= args.max_seq_len:
        raise UsageError(
            f"--max-prefill-chunk must be between 1 and --max-seq-len {args.max_seq_len} "
            f"(got {args.max_prefill_chunk})"
        )
    if args.backend == "cuda" and not torch.cuda.is_available():
        raise UsageError("--backend cuda needs an NVIDIA GPU and a CUDA build of torch; none is visible here")
    if args.cuda_triton_sdpa and (args.backend != "cuda" or args.dtype != "bf16"):
        raise UsageError("--cuda-triton-sdpa needs --backend cuda and --dtype bf16")
    if args.linear_chunk and args.backend != "cuda":
        raise UsageError("--linear-chunk needs --backend cuda (XNNPACK runs its own linear layers)")
    if args.sdpa_chunk and args.backend != "cuda":
        raise UsageError("--sdpa-chunk needs --backend cuda (XNNPACK runs its own attention)")
    if args.autotune_every_method and args.backend != "cuda":
        raise UsageError("--autotune-every-method needs --backend cuda (XNNPACK does not autotune)")


def _check_out(out: Path, force: bool, inputs: dict[str, Path]) -> Path:
    """The real directory --out names, once replacing it can destroy nothing but an earlier artifact.

    Run before the export and again just before the swap, since the export takes minutes."""
    if out.is_symlink() and not out.exists():
        raise UsageError(f"--out {out} is a symbolic link to nothing")
    real = out.resolve()
    if real.parent == real:
        raise UsageError(f"--out {out} is a filesystem root")
    for what, d in (("the current directory", Path.cwd()), ("the home directory", Path.home())):
        if d.resolve().is_relative_to(real):
            raise UsageError(f"--out {out} is or contains {what}; name a new directory for the artifact")
    for flag, d in inputs.items():
        src = d.resolve()
        if real.is_relative_to(src) or src.is_relative_to(real):
            raise UsageError(f"--out {out} overlaps {flag} {d}; write the artifact outside the checkpoints")
    try:
        if real.exists():
            if not real.is_dir():
                raise UsageError(f"--out {out} exists and is not a directory")
            if any(real.iterdir()):
                if not force:
                    raise UsageError(
                        f"--out {out} exists and is not empty (use --force to replace an earlier artifact)"
                    )
                if not (real / MANIFEST_NAME).is_file():
                    raise UsageError(
                        f"--out {out} is not empty and holds no etspec artifact (no {MANIFEST_NAME}); "
                        "--force replaces only an earlier artifact or an empty directory"
                    )
        elif real.parent.exists() and not real.parent.is_dir():
            raise UsageError(f"--out {out}: {real.parent} is not a directory")
    except OSError as e:
        raise UsageError(f"--out {out}: {e.strerror or e}") from None
    return real


def _check_args(args: argparse.Namespace) -> Path:
    """Check flags, paths, configs and the target/head pairing, and fill in the backend's default
    --dtype; returns the real --out directory.

    The weights themselves are read (and checked) by the export's first step, still before --out is
    touched."""
    args.dtype = args.dtype or DEFAULT_DTYPE[args.backend]
    _check_flags(args)
    inputs = {"--target": args.target, "--draft": args.draft}
    for flag, d in inputs.items():
        if not d.is_dir():
            raise UsageError(f"{flag} {d}: not a directory")
    out = _check_out(args.out, args.force, inputs)
    tcfg = parse_target_config(read_config_json(args.target))
    check_pair(tcfg, parse_draft_config(read_config_json(args.draft)))
    if args.max_seq_len > tcfg.max_position_embeddings:
        raise UsageError(
            f"--max-seq-len {args.max_seq_len} exceeds the target's max_position_embeddings "
            f"{tcfg.max_position_embeddings}"
        )
    if args.backend == "xnnpack" and args.dtype == "bf16":
        print(
            "etspec-export: warning: XNNPACK runs bf16 slowly; --dtype fp32 (the default) is the usual CPU "
            "choice",
            file=sys.stderr,
        )
    return out


# --------------------------------------------------------------------------------------------
# Writing: a staging directory beside --out, swapped in when complete
# --------------------------------------------------------------------------------------------


@contextmanager
def _staging_dir(out: Path) -> Iterator[Path]:
    """A new directory beside `out` (same filesystem, so the final rename is atomic).

    If the block fails in any way (an error, Ctrl-C) it is deleted with everything in it, and so are the
    parents of `out` that it had to create: the filesystem is left as it was."""
    created = [d for d in (out.parent, *out.parent.parents) if not d.exists()]  # deepest first
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.etspec-tmp-", dir=out.parent))
    except OSError as e:
        _remove_empty(created)
        raise UsageError(f"cannot create a directory beside --out {out}: {e.strerror or e}") from None
    umask = os.umask(0)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # what mkdir would give, not mkdtemp's owner-only mode
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        _remove_empty(created)
        raise


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:
        with suppress(OSError):
            d.rmdir()


def _move_into_place(stage: Path, args: argparse.Namespace) -> Path:
    """Rename the finished `stage` to --out. An earlier artifact there is renamed aside first and deleted
    only once the new one is in place, so at every moment one complete artifact is on disk."""
    out = _check_out(args.out, args.force, {"--target": args.target, "--draft": args.draft})
    aside = None
    try:
        if out.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.etspec-old-", dir=out.parent))
            os.replace(out, aside)  # onto the empty placeholder: atomic, and the name stays unique
        os.replace(stage, out)
    except BaseException as e:
        if aside is not None and out.exists():  # the earlier artifact never left: drop the placeholder
            aside.rmdir()
        elif aside is not None:  # put the earlier artifact back
            os.replace(aside, out)
        if isinstance(e, OSError):
            raise UsageError(f"could not move the finished artifact to --out {args.out}: {e}") from None
        raise
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as e:
            print(
                f"etspec-export: warning: could not delete the previous artifact {aside}: {e}",
                file=sys.stderr,
            )
    return out


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


def _reporter() -> Progress:
    """Progress lines on stdout, each with the time since the export started."""
    t0 = time.perf_counter()
    return lambda msg: print(f"[etspec-export {time.perf_counter() - t0:7.1f}s] {msg}", flush=True)


def _write_artifact(args: argparse.Namespace, stage: Path, say: Progress) -> Manifest:
    """Write the program files and the tokenizer files into `stage`; returns the manifest to write last."""
    dtype = DTYPES[args.dtype]
    cuda = args.backend == "cuda"
    kernels = FewRowsKernels(
        sdpa_midm=cuda and not args.no_midm_sdpa,
        linear_rows=cuda and not args.no_linear_rows,
        reductions=cuda and not args.no_reduction_kernels,
        linear_chunk=cuda and args.linear_chunk,
        sdpa_chunk=cuda and args.sdpa_chunk,
    )
    device = "cuda" if cuda else "cpu"
    eos_ids = list(eos_token_ids(args.target))
    with timed(say, "load checkpoints"):
        # every call of the program writes at most a prefill chunk or k + 1 verify rows: sliding layers
        # keep a ring of window + 2 x that many rows (models.layers.Attention)
        max_rows = max(args.max_prefill_chunk, args.draft_len + 1)
        spec = load_speculator(
            args.target,
            args.draft,
            args.max_seq_len,
            args.draft_len,
            dtype,
            kernels=kernels,
            device=device,
            max_rows=max_rows,
        )
    spec.sampling_search = "bisect" if cuda else "sort"  # the ExecuTorch CUDA backend has no sort kernel
    if not cuda:
        use_delegate_forms(spec)  # one XNNPACK delegate per layer instead of about eleven
    specs = method_specs(spec, args.max_prefill_chunk, sampling=args.sampling)
    exported = export_methods(specs, progress=say)
    tcfg, dcfg = spec.target.cfg, spec.draft_head.cfg
    manifest = Manifest(
        backend=args.backend,
        methods=method_signatures(specs, exported),
        max_seq_len=args.max_seq_len,
        max_prefill_chunk=args.max_prefill_chunk,
        draft_len=args.draft_len,
        vocab_size=tcfg.vocab_size,
        hidden_size=dcfg.hidden_size,
        dtype=dtype_name(dtype),
        tap_layers=list(spec.target.tap_layers),
        draft_vocab_size=dcfg.draft_vocab_size,
        eos_token_ids=eos_ids,
        midm_sdpa=kernels.sdpa_midm,
        linear_rows=kernels.linear_rows,
        reduction_kernels=kernels.reductions,
        linear_chunk=kernels.linear_chunk,
        sdpa_chunk=kernels.sdpa_chunk,
        kv_bucket=CUDA_KV_BUCKET if args.backend == "cuda" else None,
        checkpoints={"target": checkpoint_hash(args.target), "draft": checkpoint_hash(args.draft)},
        versions=toolchain_versions(),
        constants=constant_table(specs["prefill"][0]),
        extra={"target_family": tcfg.family, "num_layers": tcfg.num_layers},
    )
    lower(
        exported,
        args.backend,
        manifest_constant_methods(manifest),
        stage,
        progress=say,
        cuda_triton_kernels=args.cuda_triton_sdpa,
        cuda_autotune_every_method=args.autotune_every_method,
    )
    for name in TOKENIZER_FILES:
        if (args.target / name).is_file():
            shutil.copy2(args.target / name, stage / name)
    return manifest


def run(args: argparse.Namespace) -> Path:
    """Export as `args` say; returns the artifact directory (the real path of --out)."""
    out = _check_args(args)
    say = _reporter()
    with _staging_dir(out) as stage:
        say(f"building in {stage}, which becomes --out {args.out} once complete")
        manifest = _write_artifact(args, stage, say)
        programs = sorted(f for f in stage.iterdir() if f.suffix in (".pte", ".ptd"))
        with timed(say, "hashing " + ", ".join(f.name for f in programs)):
            manifest.files = {f.name: file_record(f) for f in programs}
        manifest.write(stage / MANIFEST_NAME)
        # `stage` now holds the complete artifact (model.pte [+ .ptd], manifest.json, tokenizer files):
        # this is the one place to read or add to it before it becomes --out.
        out = _move_into_place(stage, args)
    say(f"artifact in {args.out}:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size / 2**20:10.2f} MiB")
    return out


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


class _DropMatching(logging.Filter):
    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


@contextmanager
def _quiet_third_party(verbose: bool) -> Iterator[None]:
    """Hide `QUIET_WARNINGS` and `QUIET_LOGS` while the export runs, and nothing else.

    -v shows everything, and so does a warnings policy of the user's own (-W, PYTHONWARNINGS), which
    these filters would otherwise override for the warnings they match."""
    if verbose:
        yield
        return
    drops = [(logging.getLogger(name), _DropMatching(rx)) for name, rx in QUIET_LOGS.items()]
    with warnings.catch_warnings():
        if not sys.warnoptions:
            for category, module, message in QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category, module=module)
        for logger, drop in drops:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger, drop in drops:
                logger.removeFilter(drop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with _quiet_third_party(args.verbose):
        try:
            run(args)
        except (UsageError, ConfigError, CheckpointError) as e:
            print(f"etspec-export: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("etspec-export: interrupted; --out is as it was", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
