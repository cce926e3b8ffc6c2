"""Profile one method of an exported program on the GPU: kernel table per call (torch.profiler).

Loads the program once and profiles every (context, rows) pair asked for; `--json` writes every kernel
row per call, with each kernel's category (`categorize`), for the results files.

    python bench/profile_method.py ART_DIR [--method target_verify] [--ctx 1024,32768] [--rows 1,6]
    python bench/profile_method.py out/e2e_llama-3.1-8b/art_k5 --ctx 1024,32768 --rows 1,6 --json prof.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from etspec.runtime.program import Program

# (category, substrings of the kernel name): the first category whose substring the name holds
CATEGORIES = (
    ("linear_rows", ("_linear_rows", "_linear_chunk")),
    ("attention", ("_midm_", "sdpa", "flash", "bmm", "softmax")),
    ("norm + residual add", ("_rms_norm_rows", "rsqrt")),
    ("argmax", ("argmax",)),
    ("RoPE + KV write", ("index_copy", "cos", "sin", "index_put", "scatter")),
)


def categorize(name: str) -> str:
    """The profile table's row for a kernel name (Inductor names its kernels after the fused ops)."""
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "rest"


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def profile_point(p: Program, method: str, ctx: int, rows: int, calls: int) -> dict:
    """Prefill `ctx` random tokens, then time `calls` calls of `method` with `rows` rows."""
    chunk = p.manifest.max_prefill_chunk
    prefill = p.method("prefill", check=False)
    fn = p.method(method, check=False)
    n = ctx + rows
    pos = torch.arange(n, device="cuda")
    win = torch.zeros(n, dtype=torch.int8, device="cuda")
    toks = torch.randint(0, p.manifest.vocab_size, (1, n), device="cuda")
    for s in range(0, ctx, chunk):
        e = min(s + chunk, ctx)
        prefill(toks[:, s:e], pos[s:e], win[:e])
    call = (toks[:, ctx:].clone(), pos[ctx:].clone(), win)
    if method == "draft":  # catch-up rows at the end of the context
        feat = torch.randn(1, rows, p.manifest.hidden_size, device="cuda", dtype=torch.bfloat16)
        call = (toks[:, ctx - rows : ctx].clone(), feat, pos[ctx - rows : ctx].clone(), win[:ctx])
    for _ in range(3):
        fn(*call)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn(*call)
        torch.cuda.synchronize()
    avgs = prof.key_averages()
    print(avgs.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    kernels = sorted(
        (e for e in avgs if e.device_type == DeviceType.CUDA), key=lambda e: -e.self_device_time_total
    )
    rows_out = [
        {
            "kernel": e.key,
            "category": categorize(e.key),
            "calls_per_call": e.count / calls,
            "us_per_call": round(e.self_device_time_total / calls, 2),
        }
        for e in kernels
    ]
    cats: dict[str, dict] = {}
    for r in rows_out:
        c = cats.setdefault(r["category"], {"launches": 0.0, "us": 0.0})
        c["launches"] += r["calls_per_call"]
        c["us"] = round(c["us"] + r["us_per_call"], 2)
    n_k = sum(r["calls_per_call"] for r in rows_out)
    us = sum(r["us_per_call"] for r in rows_out)
    summary = f"{method}, ctx {ctx}, {rows} row(s): {n_k:.0f} kernels, {us:.0f} us in kernels/call"
    print(summary)
    for cat, c in sorted(cats.items(), key=lambda kv: -kv[1]["us"]):
        print(f"  {cat:<22} {c['launches']:5.0f} launches {c['us']:9.1f} us")
    return {
        "method": method,
        "ctx": ctx,
        "rows": rows,
        "summary": summary,
        "categories": cats,
        "kernels": rows_out,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art")
    ap.add_argument("--method", default="target_verify", choices=["target_verify", "prefill", "draft"])
    ap.add_argument("--ctx", type=_ints, default=[1024], help="tokens prefilled first (comma list)")
    ap.add_argument("--rows", type=_ints, default=[1], help="rows per profiled call, M or T (comma list)")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--json", type=Path, help="write every kernel row per call here")
    args = ap.parse_args()
    if not (Path(args.art) / "manifest.json").is_file():
        ap.error(f"{args.art}: no manifest.json (not an exported program)")
    with Program.load(args.art) as p:
        runs = [profile_point(p, args.method, c, r, args.calls) for c in args.ctx for r in args.rows]
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": getattr(sys.modules.get("triton"), "__version__", None),
            "python": platform.python_version(),
            "artifact": str(args.art),
            "command": " ".join(["python", "bench/profile_method.py", *sys.argv[1:]]),
            "note": f"torch.profiler over {args.calls} calls; per-call figures = totals / {args.calls}",
            "runs": runs,
        }
        args.json.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
