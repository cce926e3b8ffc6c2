"""Benchmark etspec::sdpa_chunk, prefill's attention, against what prefill ran before it and against
PyTorch's fused SDPA kernels (GPU box).

One prefill chunk of M = 256 rows at the end of a context of L keys (positions L-256 .. L-1), bf16, on
the Llama-3.1-8B layer (Hq=32, Hkv=8, D=128), the Llama-3.2-1B layer (32, 8, 64) and a Gemma-3 sliding
layer (8, 4, 256, window 1024) and a Gemma-4-31B full layer (32, 4, 512; keys as its prefill passes
them, rebuilt from the values). Implementations:
- chunk: torch.ops.etspec.sdpa_chunk on the slice cache[:, :, :L] (it rotates q itself);
- plain_math: the models' plain path (`models.layers.attend`: K/V repeated per query head, a boolean
  mask) with SDPA forced to the math backend, as AOTInductor compiles it in an export without the kernel;
- sdpa_<backend>: F.scaled_dot_product_attention with enable_gqa and the same mask, one backend forced
  (n/a where the backend refuses a mask or the shape).
Timing: `_common.time_calls_in_graph` (CUDA-graph replay, median per call) over N_SETS input sets. The
ceiling is a bf16 matmul's rate measured in the same run: each figure is the attention's useful FLOPs
(4 x D x Hq x the keys each row sees) per second as a ratio of it. `--sweep` first times kernel configs
(row block, key tile, warps, stages: `sdpa_chunk.launch_chunk`'s config) per head dim and measures with
the ones it chose.

    python bench/bench_sdpa_chunk.py [--sweep] [--quick] [--out DIR]
writes DIR/sdpa_chunk_<gpu>.csv and .json, then prints a table.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
import triton
from _common import log, matmul_tflops, read_bandwidth_gbs, time_calls_in_graph
from torch.nn.attention import SDPBackend, sdpa_kernel

from etspec.kernels import register_ops
from etspec.kernels import sdpa_chunk as sc
from etspec.kernels.sdpa_midm import output_like, rotate
from etspec.models.config import RopeConfig
from etspec.models.layers import Rotary, attend, attention_mask

register_ops()

# name: (Hq, Hkv, D, window)
SHAPES = {
    "llama3.1-8b": (32, 8, 128, 0),
    "llama3.2-1b": (32, 8, 64, 0),
    "gemma3-sliding": (8, 4, 256, 1024),
    "gemma4-31b-full": (32, 4, 512, 0),  # K = V: the caller passes keys rebuilt from the values
}
M = 256
LS = (256, 1024, 4096, 16384, 65536, 131072)
N_SETS = 2
BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
}
DT = torch.bfloat16


def useful_flops(hq: int, d: int, L: int, window: int) -> float:
    """4 x D x Hq x (keys row i sees), summed over the chunk's rows: QK^T and PV, masked keys not counted."""
    pos = torch.arange(L - M, L)
    seen = pos + 1 if window <= 0 else torch.clamp(pos + 1, max=window)
    return 4.0 * d * hq * float(seen.sum())


class Sets:
    """N_SETS independent (q, k cache, v cache) of L_max keys for one shape, and its RoPE frequencies."""

    def __init__(self, hq, hkv, d, window, l_max):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.hq, self.hkv, self.d, self.window = hq, hkv, d, window
        shape = (1, hkv, l_max, d)
        self.k = [torch.randn(shape, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
        self.v = [torch.randn(shape, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
        self.q = [torch.randn(1, hq, M, d, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
        self.freq = Rotary(RopeConfig(theta=5e5), d).rotated_freqs().cuda()

    def free(self):
        self.k = self.v = self.q = None


def make_calls(sets: Sets, impl: str, L: int, config=None) -> list:
    """Zero-arg calls of `impl`, one per input set; `config` for the chunk kernel (default: the op's)."""
    d, w = sets.d, sets.window
    scale = 1.0 / math.sqrt(d)
    pos = torch.arange(L - M, L, device="cuda")
    calls = []
    for i in range(N_SETS):
        q, k, v = sets.q[i], sets.k[i][:, :, :L], sets.v[i][:, :, :L]
        if impl == "chunk":
            out = output_like(q)
            calls.append(
                lambda q=q, k=k, v=v, out=out: sc.launch_chunk(
                    q, k, v, sets.freq, pos, scale, w, out, config=config
                )
            )
        elif impl == "plain_math":
            mask = attention_mask(pos, L, w or None)

            def plain(q=q, k=k, v=v, mask=mask):
                with sdpa_kernel(SDPBackend.MATH):
                    return attend(q, k, v, mask, scale)

            calls.append(plain)
        else:
            mask = attention_mask(pos, L, w or None)

            def fused(q=q, k=k, v=v, mask=mask, backend=BACKENDS[impl]):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(
                        q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
                    )

            calls.append(fused)
    return calls


def measure(sets: Sets, impl: str, L: int, config=None) -> tuple[float | None, str]:
    try:
        return time_calls_in_graph(make_calls(sets, impl, L, config)), ""
    except Exception as e:  # backend refuses (mask / GQA / head dim) or runs out of memory
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return None, msg


def check_chunk(sets: Sets, L: int, config=None) -> float:
    """Relative error of the chunk kernel against fp32 math over the rotated queries (a sanity check)."""
    d, w = sets.d, sets.window
    pos = torch.arange(L - M, L, device="cuda")
    q, k, v = sets.q[0], sets.k[0][:, :, :L], sets.v[0][:, :, :L]
    scale = 1.0 / math.sqrt(d)
    out = sc.launch_chunk(q, k, v, sets.freq, pos, scale, w, output_like(q), config=config).float()
    qf = rotate(q, pos, sets.freq).float()
    rep = sets.hq // sets.hkv
    kf, vf = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
    ref = F.scaled_dot_product_attention(qf, kf, vf, attn_mask=attention_mask(pos, L, w or None), scale=scale)
    return ((out - ref).norm() / ref.norm()).item()


def sweep_shape(name: str, shape: tuple, results: list):
    """One shape's configs in two stages: row block x key tile x warps at the default pipeline depth,
    then stages x programs per SM (the split count's aim) around the best; each scored by the summed
    time at 16K and 128K (4K and 16K for a sliding layer, whose work stops growing at its window).
    Returns the fastest config."""
    hq, hkv, d, window = shape
    lens = (4096, 16384) if window else (16384, 131072)
    sets = Sets(hq, hkv, d, window, max(lens))
    base = sc.chunk_config(d)
    best, best_t = base, float("inf")

    def trial(cfg):
        nonlocal best, best_t
        ts = [measure(sets, "chunk", L, cfg)[0] for L in lens]
        what = f"rows={cfg.rows} bn={cfg.block_n} nw={cfg.num_warps} ns={cfg.num_stages} ppsm={cfg.ppsm}"
        if None in ts:
            log(f"  sweep {name} {what}: fails")
            return
        log(f"  sweep {name} {what}: " + ", ".join(f"{t:.0f} us" for t in ts))
        results.append(dict(model=name, D=d, **asdict(cfg), times_us=ts))
        if sum(ts) < best_t:
            best, best_t = cfg, sum(ts)

    rows_opts = (16, 32) if d >= 512 else (32, 64) if d >= 256 else (32, 64, 128)
    tiles = (16, 32, 64) if d >= 512 else (32, 64, 128)
    for rows, bn, nw in itertools.product(rows_opts, tiles, (4, 8)):
        trial(replace(base, rows=rows, block_n=bn, num_warps=nw))
    tiled = best
    for ns, ppsm in itertools.product((2, 3, 4), (1, 2)):
        if (ns, ppsm) != (tiled.num_stages, tiled.ppsm):
            trial(replace(tiled, num_stages=ns, ppsm=ppsm))
    log(f"  sweep {name}: chosen D={d}: {best}")
    sets.free()
    torch.cuda.empty_cache()
    return best


def sweep(shapes: dict, results: list) -> dict:
    """{D: the config `sweep_shape` chose on the first shape of that head dim}."""
    chosen = {}
    for name, shape in shapes.items():
        if shape[2] not in chosen:
            chosen[shape[2]] = sweep_shape(name, shape, results)
    return chosen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep", action="store_true", help="tune row block, key tile, warps, stages first")
    ap.add_argument("--quick", action="store_true", help="two contexts (smoke test)")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    slug = dev.replace("NVIDIA ", "").split()[0].lower() + (f"_{args.tag}" if args.tag else "")
    meta = dict(
        device=dev,
        sms=torch.cuda.get_device_properties(0).multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(["python", *sys.argv]),
        rows=M,
    )
    t_start = time.time()
    tflops, read_gbs = matmul_tflops(), read_bandwidth_gbs()
    meta.update(bf16_matmul_TFLOPs=tflops, read_GBps=read_gbs)
    log(f"{dev}: bf16 matmul {tflops:.0f} TFLOP/s, read bandwidth {read_gbs:.0f} GB/s")
    ls = (1024, 16384) if args.quick else LS
    sweep_rows: list = []
    configs = {d: sc.chunk_config(d) for _, _, d, _ in SHAPES.values()}
    if args.sweep:
        configs.update(sweep(SHAPES, sweep_rows))
    meta["cfg"] = {str(k): asdict(v) for k, v in configs.items()}
    rows = []
    for name, (hq, hkv, d, window) in SHAPES.items():
        sets = Sets(hq, hkv, d, window, max(ls))
        cfg = configs[d]
        for L in ls:
            flops = useful_flops(hq, d, L, window)
            err = check_chunk(sets, L, cfg) if L <= 16384 else float("nan")
            for impl in ("chunk", "plain_math", *BACKENDS):
                t, why = measure(sets, impl, L, cfg)
                tf = flops / (t * 1e-6) / 1e12 if t else None
                rows.append(
                    dict(
                        model=name,
                        Hq=hq,
                        Hkv=hkv,
                        D=d,
                        window=window,
                        M=M,
                        L=L,
                        impl=impl,
                        time_us=t,
                        TFLOPs=tf,
                        ratio_matmul=(tf / tflops) if tf else None,
                        note=why,
                        chunk_rel_err=err if impl == "chunk" else None,
                    )
                )
                log(f"{name} L={L} {impl}: " + (f"{t:.1f} us {tf:.0f} TFLOP/s" if t else f"n/a ({why})"))
        sets.free()
        torch.cuda.empty_cache()
    base = os.path.join(args.out, f"sdpa_chunk_{slug}")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# " + json.dumps(meta)])
        w.writerow(list(rows[0]))
        for r in rows:
            w.writerow([("" if v is None else v) for v in r.values()])
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows), f, indent=1)
    log(f"\n{dev}  matmul {tflops:.0f} TFLOP/s  ({time.time() - t_start:.0f} s)  M = {M}")
    log(
        f"{'shape':15s} {'L':>7s} | {'chunk us':>9s} {'% mm':>5s} {'err':>8s} | {'math us':>9s} "
        f"{'x math':>6s} | {'best fused':>22s} {'x fused':>7s}"
    )
    for name in SHAPES:
        for L in ls:
            sub = {r["impl"]: r for r in rows if r["model"] == name and r["L"] == L}
            ch, ma = sub["chunk"], sub["plain_math"]
            fused = [(r["time_us"], k) for k, r in sub.items() if k.startswith("sdpa_") and r["time_us"]]
            ft, fk = min(fused) if fused else (None, "-")
            ct, mt = ch["time_us"], ma["time_us"]
            nan, share = float("nan"), ch["ratio_matmul"] or 0
            log(
                f"{name:15s} {L:7d} | {ct or nan:9.1f} {share:5.0%} {ch['chunk_rel_err']:8.1e} | "
                f"{mt or nan:9.1f} {((mt / ct) if (mt and ct) else nan):6.1f} | "
                f"{ft or nan:12.1f} {fk[5:]:>9s} {((ft / ct) if (ft and ct) else nan):7.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
