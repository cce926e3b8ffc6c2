"""In-memory demo: a deterministic tiny target + trained EAGLE-3 head, eager greedy speculative decoding
against target-only decoding, printing both outputs, whether they are identical, and acceptance stats."""

from __future__ import annotations

import argparse
import time

import torch

from .greedy import speculative_greedy, target_greedy
from .tiny import TINY_TARGETS, tiny_pair


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m etspec.models.demo", description=__doc__)
    p.add_argument("--family", default="llama", choices=sorted(TINY_TARGETS), help="tiny target family")
    p.add_argument("--draft-len", type=int, default=4, help="drafts per round (k)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate")
    p.add_argument("--prompt-len", type=int, default=12, help="length of the (seeded random) prompt")
    p.add_argument("--seed", type=int, default=0, help="seed for the weights and the prompt")
    args = p.parse_args(argv)

    torch.set_num_threads(min(4, torch.get_num_threads()))
    t0 = time.perf_counter()
    spec = tiny_pair(args.family, max_seq_len=256, draft_len=args.draft_len, seed=args.seed)
    print(
        f"built tiny {args.family} target + EAGLE-3 head (trained on its greedy outputs) "
        f"in {time.perf_counter() - t0:.1f}s"
    )
    prompt = torch.randint(
        3, 256, (args.prompt_len,), generator=torch.Generator().manual_seed(args.seed)
    ).tolist()
    print(f"prompt ({len(prompt)} tokens): {prompt}")

    t0 = time.perf_counter()
    ref = target_greedy(spec, prompt, args.max_new_tokens)
    t_ref = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = speculative_greedy(spec, prompt, args.max_new_tokens)
    t_spec = time.perf_counter() - t0

    print(f"target-only ({len(ref.tokens)} tokens, {t_ref:.2f}s): {ref.tokens}")
    print(f"speculative ({len(out.tokens)} tokens, {t_spec:.2f}s): {out.tokens}")
    same = out.tokens == ref.tokens
    print(f"identical: {same}")
    hist = [out.accepted.count(j) for j in range(args.draft_len + 1)]
    print(
        f"rounds: {out.rounds}  acceptance length: {out.acceptance_length:.2f} tokens/round  "
        f"accepted-drafts histogram (j=0..{args.draft_len}): {hist}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
