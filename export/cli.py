"""`etspec-export`: a target + its EAGLE-3 head -> one ExecuTorch program with prefill, target_verify and
draft, plus manifest.json and the tokenizer files."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from etspec.models.checkpoint import DTYPES, CheckpointError, load_speculator
from etspec.models.config import ConfigError, parse_target_config, read_config_json

from .lower import export_methods, lower, manifest_constant_methods, method_signatures
from .manifest import Manifest, checkpoint_hash, constant_table, dtype_name, toolchain_versions
from .methods import method_specs

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


class UsageError(ValueError):
    """A bad combination of flags or paths: reported as one line, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etspec-export",
        description="Export a target LLM and its EAGLE-3 draft head (Hugging Face directories) into one "
        "ExecuTorch program with the methods prefill, target_verify and draft.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--target", required=True, type=Path, help="target model directory (config.json + safetensors)"
    )
    p.add_argument("--draft", required=True, type=Path, help="EAGLE-3 head directory (config.json + weights)")
    p.add_argument(
        "--out", required=True, type=Path, help="output directory for model.pte, manifest and tokenizer"
    )
    p.add_argument(
        "--backend",
        choices=("cuda", "xnnpack"),
        default="xnnpack",
        help="cuda: AOTInductor delegates for NVIDIA GPUs (needs a GPU); xnnpack: CPU",
    )
    p.add_argument("--max-seq-len", type=int, default=2048, help="KV-cache length: prompt + generated tokens")
    p.add_argument("--draft-len", type=int, default=4, help="k: drafts per round (the runner may use fewer)")
    p.add_argument(
        "--max-prefill-chunk",
        type=int,
        default=128,
        help="largest prefill / draft catch-up chunk (rows per call)",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="weights and KV-cache dtype")
    p.add_argument(
        "--no-midm-sdpa",
        action="store_true",
        help="do not use the split-K Triton verify-attention kernel (CUDA only; XNNPACK never uses it)",
    )
    p.add_argument(
        "--cuda-triton-sdpa",
        action="store_true",
        help="CUDA, bf16 only: let ExecuTorch replace the remaining scaled_dot_product_attention calls "
        "(prefill, draft, sliding layers) with its own Triton SDPA instead of AOTInductor's",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty --out directory")
    return p


def _check_args(args: argparse.Namespace) -> None:
    for role in ("target", "draft"):
        d = getattr(args, role)
        if not d.is_dir():
            raise UsageError(f"--{role} {d}: not a directory")
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.force:
        raise UsageError(f"--out {args.out} exists and is not empty (use --force to overwrite)")
    if args.draft_len < 1:
        raise UsageError("--draft-len must be >= 1")
    if not 1 <= args.max_prefill_chunk <= args.max_seq_len:
        raise UsageError("--max-prefill-chunk must be between 1 and --max-seq-len")
    if args.max_seq_len < 2 * args.draft_len + 8:
        raise UsageError(
            f"--max-seq-len must be at least {2 * args.draft_len + 8} (2 x draft_len + 8) to leave room "
            "for a prompt and verify rounds"
        )
    if args.backend == "cuda" and not torch.cuda.is_available():
        raise UsageError("--backend cuda needs an NVIDIA GPU and a CUDA build of torch; none is visible here")
    if args.cuda_triton_sdpa and (args.backend != "cuda" or args.dtype != "bf16"):
        raise UsageError("--cuda-triton-sdpa needs --backend cuda and --dtype bf16")
    if args.backend == "xnnpack" and args.dtype == "bf16":
        print("[etspec-export] note: XNNPACK runs bf16 slowly; --dtype fp32 is the usual CPU choice")
    limit = parse_target_config(read_config_json(args.target)).max_position_embeddings
    if args.max_seq_len > limit:
        raise UsageError(
            f"--max-seq-len {args.max_seq_len} exceeds the target's max_position_embeddings {limit}"
        )


def _eos_ids(target_dir: Path) -> list[int]:
    ids: list[int] = []
    for name in ("config.json", "generation_config.json"):
        f = target_dir / name
        if f.is_file():
            eos = json.loads(f.read_text()).get("eos_token_id")
            for e in eos if isinstance(eos, list) else [eos] if eos is not None else []:
                if int(e) not in ids:
                    ids.append(int(e))
    return ids


def _stage(name: str):
    """Print a stage's start and its wall time."""

    class _S:
        def __enter__(self):
            print(f"[etspec-export] {name} ...", flush=True)
            self.t = time.perf_counter()

        def __exit__(self, *exc):
            if exc[0] is None:
                print(f"[etspec-export] {name}: done in {time.perf_counter() - self.t:.1f}s", flush=True)

    return _S()


def run(args: argparse.Namespace) -> Path:
    _check_args(args)
    out: Path = args.out
    if out.exists() and args.force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = DTYPES[args.dtype]
    use_midm = args.backend == "cuda" and not args.no_midm_sdpa
    device = "cuda" if args.backend == "cuda" else "cpu"
    t0 = time.perf_counter()

    with _stage("load checkpoints"):
        spec = load_speculator(
            args.target, args.draft, args.max_seq_len, args.draft_len, dtype, use_midm=use_midm, device=device
        )
    specs = method_specs(spec, args.max_prefill_chunk)
    exported = export_methods(specs, progress=lambda m: print(f"[etspec-export] {m}", flush=True))
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
        eos_token_ids=_eos_ids(args.target),
        midm_sdpa=use_midm,
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
        out,
        progress=lambda m: print(m, flush=True),
        cuda_triton_kernels=args.cuda_triton_sdpa,
    )
    manifest.write(out / "manifest.json")
    for name in TOKENIZER_FILES:
        if (args.target / name).is_file():
            shutil.copy2(args.target / name, out / name)
    print(f"[etspec-export] artifact in {out} ({time.perf_counter() - t0:.1f}s):")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:28s} {f.stat().st_size / 2**20:10.2f} MiB")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except (UsageError, ConfigError, CheckpointError) as e:
        print(f"etspec-export: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
