"""Profile one method of an exported program on the GPU: kernel table per call (torch.profiler).

python bench/profile_method.py ART_DIR [--method target_verify] [--ctx 1024] [--rows 1]
"""

from __future__ import annotations

import argparse

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from etspec.runtime.program import Program


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("art")
    ap.add_argument("--method", default="target_verify", choices=["target_verify", "prefill", "draft"])
    ap.add_argument("--ctx", type=int, default=1024, help="tokens prefilled before the profiled calls")
    ap.add_argument("--rows", type=int, default=1, help="rows per profiled call (M or T)")
    ap.add_argument("--calls", type=int, default=10)
    args = ap.parse_args()
    with Program.load(args.art) as p:
        chunk = p.manifest.max_prefill_chunk
        prefill = p.method("prefill", check=False)
        fn = p.method(args.method, check=False)
        n = args.ctx + args.rows
        pos = torch.arange(n, device="cuda")
        win = torch.zeros(n, dtype=torch.int8, device="cuda")
        toks = torch.randint(0, p.manifest.vocab_size, (1, n), device="cuda")
        for s in range(0, args.ctx, chunk):
            prefill(
                toks[:, s : min(s + chunk, args.ctx)],
                pos[s : min(s + chunk, args.ctx)],
                win[: min(s + chunk, args.ctx)],
            )
        call = (toks[:, args.ctx :].clone(), pos[args.ctx :].clone(), win)
        if args.method == "draft":  # catch-up rows at the end of the context
            rows = toks[:, args.ctx - args.rows : args.ctx].clone()
            feat = torch.randn(1, args.rows, p.manifest.hidden_size, device="cuda", dtype=torch.bfloat16)
            call = (rows, feat, pos[args.ctx - args.rows : args.ctx].clone(), win[: args.ctx])
        for _ in range(3):
            fn(*call)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.calls):
                fn(*call)
            torch.cuda.synchronize()
    avgs = prof.key_averages()
    print(avgs.table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))
    kernels = [e for e in avgs if e.device_type == DeviceType.CUDA]
    n = sum(e.count for e in kernels) / args.calls
    us = sum(e.self_device_time_total for e in kernels) / args.calls
    print(f"{args.method}, ctx {args.ctx}, {args.rows} row(s): {n:.0f} kernels, {us:.0f} us in kernels/call")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
