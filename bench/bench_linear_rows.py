"""GPU box: etspec::linear_rows against the read bandwidth and against the matmuls it replaces.

For each projection of a Llama-3.2-1B / Llama-3.1-8B layer (and lm_head) at 1, 5 and 8 rows: µs per call
(CUDA-graph replay, so launch cost is excluded for all), the fraction of the read bandwidth (a
streaming-read kernel; the copy bandwidth is kept beside it) its weight bytes reach, and the same for
the kernel without K splits, for cuBLAS (`F.linear`) and for the Triton mm template AOTInductor picks
(`torch.compile(mode="max-autotune-no-cudagraphs")` restricted to Triton, as ExecuTorch's CUDA backend
is). Every call is timed over enough copies of its weights to exceed the L2 cache three times, as in a
model, where no layer's weights are in L2 when it runs.
`--sweep` times column blocks x K splits instead and prints the best per shape.
`--prefetch` times each model's four layer projections back to back (q/k/v, o, gate+up, down, over
enough layers' weights to exceed L2 three times), each call asking L2 for the first lines of the next
call's weight as its programs finish (`launch(prefetch=...)`), at several prefetch sizes against none:
µs per layer and the fraction of the read bandwidth.
`--chunk` times etspec::linear_chunk (the kernel in 64-row blocks) on prefill chunks instead (64 and 256
rows, plus the Gemma-4-31B shape's projections) against the same peers: these calls are bound by
compute as much as by the weight stream, so each row also gives its rate against the dense bf16 matmul
rate measured in the same run, and `--chunk --sweep` times a grid of chunk tiles.

    python bench/bench_linear_rows.py [--sweep] [--chunk] [--prefetch] [--no-inductor]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from _common import copy_bandwidth_gbs, log, matmul_tflops, read_bandwidth_gbs, time_calls_in_graph

from etspec.kernels.linear_rows import RowsConfig, default_config, launch

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
CHUNK_SHAPES = {  # prefill's projections (lm_head runs on one row there)
    **{n: v for n, v in SHAPES.items() if "lm" not in n},
    "g4 qkv sliding": (5376, [8192, 4096, 4096], ""),
    "g4 qk full": (5376, [16384, 2048], ""),
    "g4 o sliding": (8192, [5376], ""),
    "g4 gate+up": (5376, [21504], "gelu_tanh"),
    "g4 down": (21504, [5376], ""),
}
CHUNK_ROWS = (64, 256)
LAYERS = {m: [f"{m} qkv", f"{m} o", f"{m} gate+up", f"{m} down"] for m in ("1b", "8b")}
PREFETCH_MIB = (0, 2, 8, 24)


def weights(k: int, ns: list[int], gated: str, copies: int = 0) -> list[list[torch.Tensor]]:
    """`copies` copies of one call's weights; 0: enough that they exceed the L2 cache three times (at
    least two)."""
    ns = [ns[0], ns[0]] if gated else ns
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    copies = copies or max(2, min(16, -(-3 * l2 // (2 * k * sum(ns)))))
    return [
        [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for n in ns] for _ in range(copies)
    ]


def weight_bytes(ws: list[torch.Tensor]) -> int:
    return sum(w.numel() * w.element_size() for w in ws)


def ours(x, ws, gated, config: RowsConfig | None = None):
    """The kernel with `config` (default: the op's own), into a preallocated output."""
    n = ws[0].shape[0] if gated else sum(w.shape[0] for w in ws)
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device="cuda")
    w1, w2, w3 = (ws + [None, None])[:3]
    return lambda: launch(x, w1, w2, w3, gated, out, config=config)


def reference(x, *ws, gated: str = ""):
    """The eager math the op replaces (separate matmuls; activation and product after)."""
    if gated:
        g = F.linear(x, ws[0])
        g = F.silu(g) if gated == "silu" else F.gelu(g, approximate="tanh")
        return g * F.linear(x, ws[1])
    return torch.cat([F.linear(x, w) for w in ws], -1) if len(ws) > 1 else F.linear(x, ws[0])


def triton_mm(gated: str):
    import torch._inductor.config as ic

    ic.max_autotune_gemm_backends = "TRITON"
    fn = lambda x, *ws: reference(x, *ws, gated=gated)
    return torch.compile(fn, mode="max-autotune-no-cudagraphs", dynamic=False)


def us_per_call(make_call, copies: list[list[torch.Tensor]]) -> float:
    """µs per call, each call of the replayed sequence on the next copy of the weights."""
    return time_calls_in_graph([make_call(ws) for ws in copies], target_ms=2.0)


def sweep_shape(x, copies, gated: str, grid: dict, chunk: bool = False) -> list[tuple[float, dict]]:
    """µs of every grid point (on the rest of the op's config: linear_rows', or with `chunk`
    linear_chunk's), fastest first; a point that does not compile (shared memory) is logged and left out."""
    res = []
    for vals in itertools.product(*grid.values()):
        point = dict(zip(grid, vals))
        cfg = replace(default_config(gated, chunk), **point)
        try:
            res.append((us_per_call(lambda ws, c=cfg: ours(x, ws, gated, c), copies), point))
        except Exception as e:  # a tile that does not fit the shared memory
            log(f"{point}: {type(e).__name__}")
    return sorted(res, key=lambda r: r[0])


def sweep(read: float) -> dict:
    """Column blocks x K splits per shape, and the op's own plan beside the best."""
    grid = dict(block_n=(16, 32, 64), split_k=(1, 2, 4, 8))
    best = {}
    for name in ("1b qkv", "1b o", "1b gate+up", "1b down", "8b qkv", "8b o", "8b gate+up", "8b down"):
        k, ns, gated = SHAPES[name]
        copies = weights(k, ns, gated)
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            res = sweep_shape(x, copies, gated, grid)
            us, cfg = res[0]
            frac = weight_bytes(copies[0]) / (us / 1e6) / read
            planned = us_per_call(lambda ws, x=x, g=gated: ours(x, ws, g), copies)
            best[f"{name} M={m}"] = {"us": us, "read_frac": frac, "cfg": cfg, "planned_us": planned}
            best[f"{name} M={m}"]["all"] = res
            log(f"{name:12s} M={m}: best {us:7.1f} µs ({frac:.0%} of read) {cfg}; the plan {planned:7.1f} µs")
    return best


def chunk_sweep(read: float, tflops: float) -> dict:
    """Chunk tiles (rows x columns x K tile x warps x stages) per prefill shape at 256 rows."""
    grid = dict(block_m=(32, 64, 128), block_n=(64, 128), block_k=(32, 64), num_warps=(4, 8))
    grid["num_stages"] = (3, 4)
    best = {}
    for name, (k, ns, gated) in CHUNK_SHAPES.items():
        copies = weights(k, ns, gated)
        x = torch.randn(256, k, device="cuda", dtype=torch.bfloat16)
        res = sweep_shape(x, copies, gated, grid, chunk=True)
        us, cfg = res[0]
        shipped = us_per_call(lambda ws, x=x, g=gated: ours(x, ws, g, default_config(g, chunk=True)), copies)
        flops = 2 * 256 * k * sum(w.shape[0] for w in copies[0])
        best[name] = {"us": us, "cfg": cfg, "shipped_us": shipped, "all": res}
        best[name] |= {"read_frac": weight_bytes(copies[0]) / (us / 1e6) / read}
        best[name] |= {"mma_frac": flops / (us / 1e6) / (tflops * 1e12)}
        log(f"{name:16s} best {us:7.1f} µs {cfg}; shipped {shipped:7.1f} µs")
    return best


def measure_row(x, copies, gated: str, mm, kernels: dict[str, RowsConfig]) -> dict:
    """µs per call of our kernel in each of `kernels`' configs, cuBLAS and (with `mm`) the Triton
    template on these rows."""
    row = {
        f"{name}_us": us_per_call(lambda ws, c=c: ours(x, ws, gated, c), copies)
        for name, c in kernels.items()
    }
    row["cublas_us"] = us_per_call(lambda ws: lambda: reference(x, *ws, gated=gated), copies)
    if mm is not None:
        mm(x, *copies[0])  # compile + autotune outside the timing
        row["triton_mm_us"] = us_per_call(lambda ws: lambda: mm(x, *ws), copies)
    return row


def _timing(row: dict, impl: str) -> str:
    mma = f", {row[f'{impl}_mma']:.0%} mma" if f"{impl}_mma" in row else ""
    return f"{impl} {row[f'{impl}_us']:7.1f} µs ({row[f'{impl}_read']:.0%}{mma})"


def measure_shapes(shapes: dict, row_counts, chunk: bool, inductor: bool, ceilings: dict) -> list[dict]:
    """Every shape at every row count: our kernel (linear_rows with its planned and with no K splits, or
    linear_chunk), cuBLAS and the Triton template, each as a fraction of every rate in `ceilings` (bytes
    per second for "read" and "copy", FLOP per second for "mma")."""
    rows = []
    for name, (k, ns, gated) in shapes.items():
        copies = weights(k, ns, gated)
        mm = triton_mm(gated) if inductor else None
        wb = weight_bytes(copies[0])
        if chunk:
            kernels = {"chunk": default_config(gated, chunk=True)}
        else:
            kernels = {
                "ours": default_config(gated),
                "ours_unsplit": replace(default_config(gated), split_k=1),
            }
        impls = (*kernels, "cublas") + (("triton_mm",) if inductor else ())
        for m in row_counts:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "M": m, "weight_mb": wb / 1e6, "copies": len(copies)}
            row |= measure_row(x, copies, gated, mm, kernels)
            work = {"read": wb, "copy": wb, "mma": 2 * m * k * sum(w.shape[0] for w in copies[0])}
            for impl in impls:
                for ceiling, rate in ceilings.items():
                    row[f"{impl}_{ceiling}"] = work[ceiling] / (row[f"{impl}_us"] / 1e6) / rate
            rows.append(row)
            log(f"{name:16s} M={m:3d}: " + "  ".join(_timing(row, i) for i in impls))
    return rows


def _layer_call(launches: list[tuple], mib: int):
    """One layer's projections as one callable: each launch prefetches the next one's first weight."""

    def run():
        for x, ws, gated, out, nxt in launches:
            w1, w2, w3 = (ws + [None, None])[:3]
            launch(x, w1, w2, w3, gated, out, prefetch=nxt if mib else None, prefetch_bytes=mib << 20)

    return run


def layer_streams(read: float, rows=(1, 6)) -> list[dict]:
    """µs per layer of the four projections back to back, without and with each call prefetching the
    next call's first weight (q's for q/k/v, the gate's for gate+up) into L2, per prefetch size."""
    out = []
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    for model, names in LAYERS.items():
        specs = [SHAPES[n] for n in names]
        per_layer = sum(2 * k * sum([ns[0], ns[0]] if g else ns) for k, ns, g in specs)
        n_layers = max(2, -(-3 * l2 // per_layer))
        chain = [
            (i, weights(k, ns, g, copies=1)[0]) for _ in range(n_layers) for i, (k, ns, g) in enumerate(specs)
        ]
        for m in rows:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k, _, _ in specs]
            ys = [
                torch.empty(m, ns[0] if g else sum(ns), device="cuda", dtype=torch.bfloat16)
                for _, ns, g in specs
            ]
            launches = [
                (xs[i], ws, specs[i][2], ys[i], chain[(j + 1) % len(chain)][1][0])
                for j, (i, ws) in enumerate(chain)
            ]
            for mib in PREFETCH_MIB:
                calls = [_layer_call(launches[4 * j : 4 * j + 4], mib) for j in range(n_layers)]
                us = time_calls_in_graph(calls, target_ms=3.0)
                row = {"model": model, "rows": m, "prefetch_mib": mib, "us_per_layer": us, "layers": n_layers}
                row["read_frac"] = per_layer / (us / 1e6) / read
                out.append(row)
                log(
                    f"{model} M={m} prefetch {mib:2d} MiB: {us:7.1f} us/layer, {row['read_frac']:.1%} of read"
                )
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sweep", action="store_true", help="time the tuning grid instead")
    ap.add_argument("--no-inductor", action="store_true", help="skip the Triton mm template peer")
    ap.add_argument("--chunk", action="store_true", help="etspec::linear_chunk on prefill chunks instead")
    ap.add_argument(
        "--prefetch", action="store_true", help="a layer's projections back to back, with L2 prefetch"
    )
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    gpu = torch.cuda.get_device_name()
    read, copy = read_bandwidth_gbs() * 1e9, copy_bandwidth_gbs() * 1e9
    res: dict = {"device": gpu, "torch": torch.__version__, "triton": triton.__version__}
    res |= {
        "python": platform.python_version(),
        "command": " ".join(["python", *sys.argv]),
        "read_gbs": read / 1e9,
        "copy_gbs": copy / 1e9,
    }
    log(f"{gpu}: read {read / 1e9:.0f} GB/s, copy {copy / 1e9:.0f} GB/s (read + write)")
    if args.chunk:
        res["matmul_tflops"] = tflops = matmul_tflops()
        log(f"dense bf16 matmul {tflops:.0f} TFLOP/s")
    if args.prefetch:
        res["layers"] = layer_streams(read)
    elif args.chunk and args.sweep:
        res["sweep"] = chunk_sweep(read, tflops)
    elif args.sweep:
        res["sweep"] = sweep(read)
    else:
        ceilings = {"read": read, "copy": copy} | ({"mma": tflops * 1e12} if args.chunk else {})
        shapes, counts = (CHUNK_SHAPES, CHUNK_ROWS) if args.chunk else (SHAPES, (1, 5, 8))
        res["rows"] = measure_shapes(shapes, counts, args.chunk, not args.no_inductor, ceilings)
    args.out.mkdir(parents=True, exist_ok=True)
    kind = (
        "_prefetch" if args.prefetch else ("_chunk" if args.chunk else "") + ("_sweep" if args.sweep else "")
    )
    path = args.out / f"linear_rows{kind}_{gpu.replace(' ', '_')}.json"
    path.write_text(json.dumps(res, indent=1))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
