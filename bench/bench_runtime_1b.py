"""GPU box: a Llama-3.2-1B-shaped random pair through export -> CUDA runtime -> runner, at long context.

Records, in one JSON (default bench/results/runtime_1b_<gpu>.json):
- export wall time and artifact sizes (`etspec-export --backend cuda`, bf16, midm on);
- GPU memory after `Program.load` against 1x weights + KV caches (constants shared across methods);
- per-call latency of target_verify (M = 1 and M = k+1) eager vs CUDA-graph replay, with the
  bandwidth floor (weight + valid-KV bytes / measured read bandwidth) for reference;
- a long-context generation (prompt >= 32K tokens, max_seq_len 64K) target-only and speculative, with
  and without CUDA graphs, and whether their outputs are identical.

    python bench/bench_runtime_1b.py [--work DIR] [--prompt-len 32768] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from _common import Floors, copy_bandwidth_gbs, export_shaped, log, read_bandwidth_gbs, time_call

from etspec.runner.generator import SpeculativeGenerator
from etspec.runtime.program import Program

SHAPE, MAX_SEQ, K = "llama-3.2-1b", 65536, 4
CHUNK = 256
UNTIED = False


def export(work: Path) -> tuple[Path, dict]:
    overrides = {"tie_word_embeddings": False} if UNTIED else {}
    return export_shaped(work, SHAPE, max_seq=MAX_SEQ, chunk=CHUNK, draft_len=K, **overrides)


def verify_latency(program: Program, ctx: int, floors: Floors):
    """target_verify at context ctx (prefilled), M=1 and M=k+1, eager vs graph replay."""
    prefill = program.method("prefill", check=False)
    eager = program.method("target_verify", check=False)
    graphed = program.method("target_verify", check=False, cuda_graph=True)
    pos = torch.arange(MAX_SEQ, device="cuda")
    win = torch.zeros(MAX_SEQ, dtype=torch.int8, device="cuda")
    toks = torch.randint(0, 128000, (1, ctx + K + 1), device="cuda")
    for s in range(0, ctx, CHUNK):
        e = min(s + CHUNK, ctx)
        prefill(toks[:, s:e], pos[s:e], win[:e])
    bucket = program.manifest.kv_bucket or 1
    rows = []
    for m in (1, K + 1):
        args = (toks[:, ctx : ctx + m], pos[ctx : ctx + m], win[: -(-(ctx + m) // bucket) * bucket])
        exact = (toks[:, ctx : ctx + m], pos[ctx : ctx + m], win[: ctx + m])
        floor_us = floors.verify_ms(ctx + m) * 1e3
        row = {"ctx": ctx, "M": m, "floor_us": floor_us}
        row["eager_us"] = time_call(lambda a=exact: eager(*a))
        row["graph_us"] = time_call(lambda a=args: graphed(*a))
        row["graph_vs_floor"] = row["graph_us"] / floor_us
        rows.append(row)
        log(json.dumps(row))
    return rows


def generate(program: Program, prompt: list[int], n: int, **kw) -> tuple[list[int], dict]:
    gen = SpeculativeGenerator(program, **kw)
    gen.eos = set()  # random weights: run the full budget
    out = [t for c in gen.generate(prompt, n) for t in c]
    return out, gen.stats.to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("out/bench_1b"), help="checkpoint + artifact cache")
    ap.add_argument("--prompt-len", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--chunk", type=int, default=CHUNK, help="--max-prefill-chunk of the export")
    ap.add_argument("--untied", action="store_true", help="separate lm_head (not tied to the embedding)")
    ap.add_argument("--export-only", action="store_true", help="stop after the (cached) export")
    args = ap.parse_args()
    globals()["CHUNK"] = args.chunk
    globals()["UNTIED"] = args.untied
    gpu = torch.cuda.get_device_name()
    res: dict = {"device": gpu, "torch": torch.__version__, "python": platform.python_version()}
    res["command"] = " ".join(["python", *sys.argv])
    read_gbs, copy_gbs = read_bandwidth_gbs(), copy_bandwidth_gbs()
    res["read_gbs"], res["copy_gbs"] = read_gbs, copy_gbs
    log(f"{gpu}: read bandwidth {read_gbs:.0f} GB/s, copy {copy_gbs:.0f} GB/s")
    art, res["export"] = export(args.work)
    log(json.dumps(res["export"]))
    if args.export_only:
        return 0

    free0, total = torch.cuda.mem_get_info()
    alloc0 = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    program = Program.load(art)
    torch.cuda.synchronize()
    target_bytes = (args.work / "ckpt" / "target" / "model.safetensors").stat().st_size
    head_bytes = (args.work / "ckpt" / "draft" / "model.safetensors").stat().st_size
    floors = Floors(SHAPE, 32000, K, read_gbs, copy_gbs)
    kv_all = (floors.kv_tok + floors.draft_kv_tok) * MAX_SEQ  # target + the draft's one layer
    free1, _ = torch.cuda.mem_get_info()
    mem = {
        "load_s": time.perf_counter() - t0,
        "torch_allocated_gib": (torch.cuda.memory_allocated() - alloc0) / 2**30,
        "device_used_gib": (free0 - free1) / 2**30,
        "ptd_gib": (art / "aoti_cuda_blob.ptd").stat().st_size / 2**30,
        "weights_gib": (target_bytes + head_bytes) / 2**30,
        "kv_caches_gib": kv_all / 2**30,
    }
    res["memory_after_load"] = mem
    log(json.dumps(mem))
    mem["used_vs_weights_plus_kv"] = mem["device_used_gib"] / (mem["weights_gib"] + mem["kv_caches_gib"])
    res["verify_latency"] = []
    for ctx in (1024, 16384):
        res["verify_latency"] += verify_latency(program, ctx, floors)

    prompt = torch.randint(0, 128000, (args.prompt_len,), generator=torch.Generator().manual_seed(0)).tolist()
    runs = {}
    outs = {}
    for label, kw in [
        ("target-only", {"spec": False}),
        ("speculative", {}),
        ("target-only+graph", {"spec": False, "cuda_graph": True}),
        ("speculative+graph", {"cuda_graph": True}),
    ]:
        t0 = time.perf_counter()
        outs[label], runs[label] = generate(program, prompt, args.new_tokens, **kw)
        runs[label]["wall_s"] = time.perf_counter() - t0
        st = runs[label]
        log(
            f"{label:20s} prompt {st['prompt_tokens']} prefill {st['prefill_s']:.2f}s "
            f"({st['prefill_tok_s']:.0f} tok/s) decode {st['decode_tok_s']:.1f} tok/s "
            f"acc.len {st['acceptance_length']:.2f} rounds {st['rounds']}"
        )
    res["long_context"] = runs
    res["identical"] = {k: outs[k] == outs["target-only"] for k in outs}
    res["graph_identical_to_eager"] = {
        k: outs[k + "+graph"] == outs[k] for k in ("target-only", "speculative")
    }
    log("identical to target-only:", res["identical"], "graph == eager:", res["graph_identical_to_eager"])
    for label, st in runs.items():
        rounds = max(1, st["rounds"])
        log(
            f"{label:20s} per round: draft {st['draft_s'] / rounds * 1e3:.2f} ms verify "
            f"{st['verify_s'] / rounds * 1e3:.2f} ms"
        )
    program.close()
    name = gpu.replace(" ", "_")
    out = args.out or Path(__file__).parent / "results" / f"runtime_1b_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], out.name).write_text(json.dumps(res, indent=1))
    log(f"\n{'ctx':>6} {'M':>2} {'eager µs':>9} {'graph µs':>9} {'floor µs':>9} {'graph/floor':>11}")
    for r in res["verify_latency"]:
        log(
            f"{r['ctx']:>6} {r['M']:>2} {r['eager_us']:>9.0f} {r['graph_us']:>9.0f} {r['floor_us']:>9.0f} "
            f"{r['graph_vs_floor']:>11.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
