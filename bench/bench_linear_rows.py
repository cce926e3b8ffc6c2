"""GPU box: etspec::linear_rows against the copy bandwidth and against the matmuls it replaces.

For each projection of a Llama-3.2-1B / Llama-3.1-8B layer (and lm_head) at 1, 5 and 8 rows: µs per call
(CUDA-graph replay, so launch cost is excluded for all), the fraction of copy bandwidth its weight bytes
reach, and the same for cuBLAS (`F.linear`) and for the Triton mm template AOTInductor picks
(`torch.compile(mode="max-autotune-no-cudagraphs")` restricted to Triton, as ExecuTorch's CUDA backend is).
`--sweep` times the tuning grid instead and prints the best config per shape.

    python bench/bench_linear_rows.py [--sweep] [--no-inductor]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from _common import copy_bandwidth_gbs, graph_us, log

from etspec.kernels.linear_rows import RowsConfig, launch

SHAPES = {  # name: (K, column widths, gated)
    "1b qkv": (2048, [2048, 512, 512], ""),
    "1b o": (2048, [2048], ""),
    "1b gate+up": (2048, [8192], "silu"),
    "1b down": (8192, [2048], ""),
    "1b lm_head": (2048, [128256], ""),
    "8b qkv": (4096, [4096, 1024, 1024], ""),
    "8b o": (4096, [4096], ""),
    "8b gate+up": (4096, [14336], "silu"),
    "8b down": (14336, [4096], ""),
    "8b lm_head": (4096, [128256], ""),
    "8b head lm": (4096, [32000], ""),
}


def weights(k: int, ns: list[int], gated: str) -> list[torch.Tensor]:
    ns = [ns[0], ns[0]] if gated else ns
    return [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n in ns]


def weight_bytes(ws: list[torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in ws)


def ours(x, ws, gated, config: RowsConfig | None = None):
    """The kernel with `config` (default: the op's own tiles), into a preallocated output."""
    n = ws[0].shape[0] if gated else sum(w.shape[0] for w in ws)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device="cuda")
    w1, w2, w3 = (ws + [None, None])[:3]
    return lambda: launch(x, w1, w2, w3, gated, out, config=config)


def reference_fn(ws, gated):
    """The eager math the op replaces (separate matmuls; activation and product after)."""
    if gated:
        return lambda x: F.silu(F.linear(x, ws[0])) * F.linear(x, ws[1])
    return lambda x: torch.cat([F.linear(x, w) for w in ws], -1) if len(ws) > 1 else F.linear(x, ws[0])


def inductor_fn(ws, gated):
    import torch._inductor.config as ic

    ic.max_autotune_gemm_backends = "TRITON"
    return torch.compile(reference_fn(ws, gated), mode="max-autotune-no-cudagraphs", dynamic=False)


def sweep(bw: float) -> dict:
    grid = dict(block_n=(16, 32, 64), block_k=(128, 256), num_warps=(4, 8), num_stages=(3, 4, 6))
    best = {}
    for name in ("1b qkv", "1b o", "1b gate+up", "1b down", "8b o", "8b gate+up", "8b down", "8b lm_head"):
        k, ns, gated = SHAPES[name]
        ws = weights(k, ns, gated)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = []
            for vals in itertools.product(*grid.values()):
                cfg = dict(zip(grid, vals))
                try:
                    us = graph_us(ours(x, ws, gated, RowsConfig(**cfg)), rep=20)
                except Exception as e:  # out of shared memory etc.
                    log(f"{name} {cfg}: {type(e).__name__}")
                    continue
                res.append((us, cfg))
            res.sort(key=lambda r: r[0])
            us, cfg = res[0]
            frac = weight_bytes(ws) / (us / 1e6) / bw
            best[f"{name} M={m}"] = {"us": us, "bw_frac": frac, "cfg": cfg, "top5": res[:5]}
            log(f"{name:12s} M={m}: best {us:7.1f} µs ({frac:.0%}) {cfg}")
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time the tuning grid instead")
    ap.add_argument("--no-inductor", action="store_true", help="skip the Triton mm template peer")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    bw = copy_bandwidth_gbs() * 1e9
    res: dict = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__}
    res |= {
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "copy_gbs": bw / 1e9,
    }
    log(f"{gpu}: copy {bw / 1e9:.0f} GB/s")
    if args.sweep:
        res["sweep"] = sweep(bw)
    else:
        rows = []
        for name, (k, ns, gated) in SHAPES.items():
            ws = weights(k, ns, gated)
            ref = reference_fn(ws, gated)
            ind = None if args.no_inductor else inductor_fn(ws, gated)
            for m in (1, 5, 8):
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = {"shape": name, "M": m, "weight_mb": weight_bytes(ws) / 1e6}
                row["ours_us"] = graph_us(ours(x, ws, gated))
                row["cublas_us"] = graph_us(lambda f=ref, a=x: f(a))
                if ind is not None:
                    ind(x)  # compile + autotune outside the timing
                    row["inductor_us"] = graph_us(lambda f=ind, a=x: f(a))
                for impl in ("ours", "cublas", "inductor"):
                    if f"{impl}_us" in row:
                        row[f"{impl}_bw"] = weight_bytes(ws) / (row[f"{impl}_us"] / 1e6) / bw
                rows.append(row)
                log(
                    f"{name:12s} M={m}: ours {row['ours_us']:7.1f} µs ({row['ours_bw']:.0%})  cuBLAS "
                    f"{row['cublas_us']:7.1f} ({row['cublas_bw']:.0%})"
                    + (f"  Triton mm {row['inductor_us']:7.1f} ({row['inductor_bw']:.0%})" if ind else "")
                )
        res["rows"] = rows
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"linear_rows{'_sweep' if args.sweep else ''}_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
