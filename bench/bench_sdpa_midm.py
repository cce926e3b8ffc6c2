"""Benchmark etspec::sdpa_midm against F.scaled_dot_product_attention (GPU box).

Shapes: Llama-3.1-8B layer (Hq=32, Hkv=8, D=128), Gemma-2-9B global layer (Hq=16, Hkv=8, D=256) and
Gemma-4-31B full layer (Hq=32, Hkv=4, D=512, K = V: one cached tensor), bf16, M in {1,2,4,8}, L in
{4K..128K}, KV caches of max_seq_len 128K. Implementations:
- midm: torch.ops.etspec.sdpa_midm on the bounded slice cache[:, :, :L] (Lb = L here); for the K = V
  layer the one-tensor kernel (sdpa_midm_shared_kv's launch), which rebuilds the keys per tile;
- plain_shared (K = V layer only): what target_verify runs with --no-midm-sdpa, the keys rebuilt from the
  values over the slice, then SDPA (default backend choice);
- sdpa_<backend>: F.scaled_dot_product_attention on the bounded slice, one backend forced (flash, efficient,
  cudnn, math), enable_gqa=True, a causal-block bool mask when M > 1 (n/a where the backend refuses);
- naive: SDPA (default backend choice) over the whole 128K buffer with a mask.
Timing (bench/_common.py): every call is captured in a CUDA graph that cycles through N_SETS input sets
(so the KV is not served from L2), the graph is replayed and timed with CUDA events; median per call. The
read bandwidth (a streaming-read kernel), the device-to-device copy bandwidth (bytes read + written) and
a bf16 matmul rate are measured in the same run. KV GB/s counts 2*Hkv*L*D*2 bytes (the valid KV read
once; Hkv*L*D*2 for the K = V layer, whose cache is one tensor: the SDPA peers there read separately
stored keys, as a two-tensor cache would hold them); ratio_read = that over the read bandwidth
(ratio_copy over the copy bandwidth is kept).
The `split-only` column is the split kernel's own device time inside eager midm calls, from the
profiler's kernel records; the rest of the midm time is the reduce and the launch gaps.
`--sweep` times kernel configs (passed to `sdpa_midm.launch`) and then measures with the ones it chose.

    python bench/bench_sdpa_midm.py [--sweep] [--quick] [--models gemma4-31b-full] [--out DIR]
writes DIR/sdpa_midm_<gpu>.csv, .json and .png, then prints a table.
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
from _common import (
    copy_bandwidths_gbs,
    empty_graph_node_us,
    log,
    matmul_tflops,
    read_bandwidth_gbs,
    time_calls_in_graph,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

from etspec.kernels import register_ops
from etspec.kernels import sdpa_midm as sm
from etspec.models.config import RopeConfig
from etspec.models.layers import Rotary

register_ops()

MODELS = {"llama3.1-8b": (32, 8, 128), "gemma2-9b-global": (16, 8, 256), "gemma4-31b-full": (32, 4, 512)}
SHARED_KV = {"gemma4-31b-full"}  # K = V layers: one cached tensor
GEMMA4_FULL_ROPE = RopeConfig(theta=1e6, rope_type="proportional", partial_rotary_factor=0.25)
FULL_ROPE = RopeConfig(theta=5e5)  # the other shapes: every pair rotates (Llama 3.1's theta)
MS = (1, 2, 4, 8)
LS = (4096, 16384, 32768, 65536, 131072)
MAX_SEQ = 131072
N_SETS = 8
BACKENDS = {
    "sdpa_flash": SDPBackend.FLASH_ATTENTION,
    "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa_math": SDPBackend.MATH,
}
DT = torch.bfloat16


def kv_floor_ratio(ts, lens, hkv, d, read_gbs):
    """Sweep score: sum over lengths of time (µs) / bf16 K+V bytes at copy bandwidth; lower is better."""
    return sum(t / (2 * hkv * L * d * 2 / read_gbs / 1e3) for t, L in zip(ts, lens))


class Sets:
    """N_SETS independent (q per M, k cache, v cache) of max_seq_len 128K for one model shape, and the
    rotary frequencies the kernel turns the queries with (the peers take q as it is: rotating it is not
    what they are timed on). A K = V shape (`shared`) also has the key norm's weight its kernel rebuilds
    keys with, and its k caches hold those rebuilt keys (for the peers that read a separate key cache)."""

    def __init__(self, hq, hkv, d, shared=False):
        g = torch.Generator(device="cuda").manual_seed(0)
        self.hq, self.hkv, self.d, self.shared = hq, hkv, d, shared
        self.v = [torch.randn(1, hkv, MAX_SEQ, d, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
        self.freq = Rotary(GEMMA4_FULL_ROPE if shared else FULL_ROPE, d).rotated_freqs().cuda()
        if shared:
            self.w = 1 + 0.1 * torch.randn(d, device="cuda", generator=g)
            self.k = [sm.shared_kv_keys(v, self.w, self.freq) for v in self.v]
        else:
            shape = (1, hkv, MAX_SEQ, d)
            self.k = [torch.randn(shape, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
        self.q = {
            m: [torch.randn(1, hq, m, d, device="cuda", generator=g).to(DT) for _ in range(N_SETS)]
            for m in MS
        }

    def free(self):
        self.k = self.v = self.q = None


def make_calls(sets, impl, m, L, config=None):
    """Zero-arg calls of `impl`, one per input set; midm runs the kernels with `config` (default: the
    op's own for the head dim)."""
    d = sets.d
    scale = 1.0 / math.sqrt(d)
    pos = torch.arange(L - m, L, device="cuda")
    calls = []
    if impl == "midm":
        out = sm.output_like(sets.q[m][0])
        cfg = config or sm.default_config(d)
        extra = {"k_weight": sets.w} if sets.shared else {}
        for i in range(N_SETS):
            q, k, v = sets.q[m][i], sets.k[i][:, :, :L], sets.v[i][:, :, :L]
            calls.append(
                lambda q=q, k=k, v=v: sm.launch(q, k, v, sets.freq, pos, scale, 0, out, config=cfg, **extra)
            )
        return calls
    if impl == "plain_shared":
        j = torch.arange(L, device="cuda")
        mask = (j[None, :] <= pos[:, None])[None, None] if m > 1 else None
        for i in range(N_SETS):
            q, v = sets.q[m][i], sets.v[i][:, :, :L]

            def call(q=q, v=v):
                k = sm.shared_kv_keys(v, sets.w, sets.freq)
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

            calls.append(call)
        return calls
    if impl == "naive":
        j = torch.arange(MAX_SEQ, device="cuda")
        mask = (j[None, :] <= pos[:, None])[None, None]
        for i in range(N_SETS):
            q, k, v = sets.q[m][i], sets.k[i], sets.v[i]
            calls.append(
                lambda q=q, k=k, v=v: F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, scale=scale, enable_gqa=True
                )
            )
        return calls
    backend = BACKENDS[impl]
    j = torch.arange(L, device="cuda")
    mask = (j[None, :] <= pos[:, None])[None, None] if m > 1 else None
    for i in range(N_SETS):
        q, k, v = sets.q[m][i], sets.k[i][:, :, :L], sets.v[i][:, :, :L]

        def call(q=q, k=k, v=v):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

        calls.append(call)
    return calls


def split_kernel_us(calls):
    """Mean device time (µs) of the split kernel per call, from the profiler's records of eager calls."""
    from torch.profiler import ProfilerActivity, profile

    for c in calls:
        c()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(4):
            for c in calls:
                c()
        torch.cuda.synchronize()
    ev = [e for e in prof.key_averages() if "_midm_split_kernel" in e.key]
    return ev[0].self_device_time_total / ev[0].count if ev else None


def measure(sets, impl, m, L, config=None):
    try:
        if impl == "split_only":
            return split_kernel_us(make_calls(sets, "midm", m, L, config)), ""
        return time_calls_in_graph(make_calls(sets, impl, m, L, config)), ""
    except Exception as e:  # backend refuses (mask / GQA / head dim) or runs out of memory
        torch.cuda.synchronize()
        msg = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        return None, msg


def check_midm(sets, m, L, config=None):
    """Relative error of midm (the op, or the kernels with `config`) vs the math backend in fp32 (sanity
    check inside the benchmark)."""
    hq, hkv, d = sets.hq, sets.hkv, sets.d
    pos = torch.arange(L - m, L, device="cuda")
    q, k, v = sets.q[m][0], sets.k[0][:, :, :L], sets.v[0][:, :, :L]
    scale, freq = 1.0 / math.sqrt(d), sets.freq
    if config is None and sets.shared:
        out = torch.ops.etspec.sdpa_midm_shared_kv(q, v, sets.w, freq, pos, scale).float()
    elif config is None:
        out = torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale).float()
    else:
        extra = {"k_weight": sets.w} if sets.shared else {}
        out = sm.launch(q, k, v, freq, pos, scale, 0, sm.output_like(q), config=config, **extra).float()
    qf = sm.rotate(q, pos, freq).float().reshape(hkv, hq // hkv * m, d)
    s = torch.einsum("hrd,hld->hrl", qf, k[0].float()) / math.sqrt(d)
    j = torch.arange(L, device="cuda")
    allowed = (j[None, :] <= pos[:, None]).repeat(hq // hkv, 1)
    s = s.masked_fill(~allowed[None], float("-inf"))
    ref = torch.einsum("hrl,hld->hrd", s.softmax(-1), v[0].float()).view(1, hq, m, d)
    return ((out - ref).norm() / ref.norm()).item()


def sweep(models, read_gbs, results):
    """Kernel variants (tile, warps, stages), then split plans, per head dim; returns {D: chosen config}."""
    chosen = {}
    for name, (hq, hkv, d) in models.items():
        sets = Sets(hq, hkv, d, shared=name in SHARED_KV)
        m = 4

        base = sm.default_config(d)
        best, best_score = None, float("inf")
        # head dim 512: smaller tiles, and programs of 16 rows (the fp32 accumulator) or all rows
        tiles, stages, row_opts = (
            ((16, 32, 64), (1, 2, 3), (16, 0)) if d >= 512 else ((32, 64, 128), (2, 3, 4), (0,))
        )
        for bn, nw, ns, rows in itertools.product(tiles, (4, 8), stages, row_opts):
            cfg = replace(base, block_n=bn, num_warps=nw, num_stages=ns, rows=rows)
            ts = []
            for L in (16384, 131072):
                t, err = measure(sets, "midm", m, L, cfg)
                ts.append(t)
            if None in ts:
                log(f"  sweep {name} bn={bn} nw={nw} ns={ns} rows={rows}: fails ({err})")
                continue
            score = kv_floor_ratio(ts, (16384, 131072), hkv, d, read_gbs)
            log(
                f"  sweep {name} bn={bn} nw={nw} ns={ns} rows={rows}: 16K {ts[0]:.1f} us, "
                f"128K {ts[1]:.1f} us  score {score:.3f}"
            )
            results.append(
                dict(
                    model=name,
                    stage="kernel",
                    block_n=bn,
                    num_warps=nw,
                    num_stages=ns,
                    rows=rows,
                    t16k_us=ts[0],
                    t128k_us=ts[1],
                )
            )
            if score < best_score:
                best, best_score = cfg, score
        best2, best2_score = best, float("inf")
        # split plans at short contexts, where the split count matters most, and at 128K, where a kernel
        # bound by latency rather than bytes gains from more programs per SM
        plan_lens = (4096, 16384, 131072)
        for ppsm, mt in itertools.product((1, 2, 3, 4), (1, 2, 4, 8)):
            cfg = replace(best, ppsm=ppsm, min_tiles=mt)
            ts = [measure(sets, "midm", m, L, cfg)[0] for L in plan_lens]
            if None in ts:
                continue
            score = kv_floor_ratio(ts, plan_lens, hkv, d, read_gbs)
            log(
                f"  sweep {name} ppsm={ppsm} min_tiles={mt}: 4K {ts[0]:.1f} us, 16K {ts[1]:.1f} us, "
                f"128K {ts[2]:.1f} us score {score:.3f}"
            )
            results.append(
                dict(
                    model=name,
                    stage="plan",
                    ppsm=ppsm,
                    min_tiles=mt,
                    t4k_us=ts[0],
                    t16k_us=ts[1],
                    t128k_us=ts[2],
                )
            )
            if score < best2_score:
                best2, best2_score = cfg, score
        chosen[d] = best2
        log(f"  sweep {name}: chosen D={d}: {best2}")
        sets.free()
        torch.cuda.empty_cache()
    return chosen


def sweep_big_r(read_gbs, results):
    """The best config for >= 32 rows per KV head (Llama GQA 4 x M=8), reported only: the op has one
    config per head dim, which the measurements that follow keep using. The `rows` variants split the 32
    rows over two programs (each 16-row block's partials are its own; the key tiles are read twice)."""
    hq, hkv, d = MODELS["llama3.1-8b"]
    sets = Sets(hq, hkv, d)
    best, best_score = None, float("inf")
    for bn, nw, ns, pp, rows in [
        (64, 4, 3, 1, 0),  # = the D=128 default
        (64, 4, 4, 1, 0),
        (64, 8, 3, 1, 0),
        (64, 8, 4, 1, 0),
        (64, 4, 3, 2, 0),
        (64, 8, 3, 2, 0),
        (32, 4, 4, 1, 0),
        (32, 4, 4, 2, 0),
        (128, 8, 3, 1, 0),
        (64, 4, 3, 1, 16),
        (64, 4, 4, 1, 16),
        (128, 4, 3, 1, 16),
    ]:
        cfg = replace(sm.default_config(d), block_n=bn, num_warps=nw, num_stages=ns, ppsm=pp, rows=rows)
        ts = [measure(sets, "midm", 8, L, cfg)[0] for L in (16384, 131072)]
        if None in ts:
            continue
        score = kv_floor_ratio(ts, (16384, 131072), hkv, d, read_gbs)
        log(f"  sweep big-R {cfg}: 16K {ts[0]:.1f} us, 128K {ts[1]:.1f} us score {score:.3f}")
        row = dict(block_n=bn, num_warps=nw, num_stages=ns, ppsm=pp, rows=rows)
        results.append(dict(model="llama3.1-8b", stage="big_r", M=8, **row, t16k_us=ts[0], t128k_us=ts[1]))
        if score < best_score:
            best, best_score = cfg, score
    log(f"  sweep big-R: best D={d} rows>=32: {best}")
    sets.free()
    torch.cuda.empty_cache()
    return asdict(best) if best else None


COLORS = {
    "midm": "C0",
    "sdpa_flash": "C1",
    "sdpa_efficient": "C2",
    "sdpa_cudnn": "C3",
    "sdpa_math": "C4",
    "naive": "C5",
}


def plot(rows, path, read_gbs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), len(MS), figsize=(4.2 * len(MS), 3.8 * len(models)), squeeze=False)
    for a, model in enumerate(models):
        for b, m in enumerate(MS):
            ax = axes[a][b]
            sub = [r for r in rows if r["model"] == model and r["M"] == m]
            for impl in dict.fromkeys(r["impl"] for r in sub if r["impl"] != "split_only"):
                pts = [(r["L"], r["time_us"]) for r in sub if r["impl"] == impl and r["time_us"]]
                if pts:
                    lw = 2.5 if impl == "midm" else 1.2
                    ax.plot(*zip(*pts, strict=True), marker="o", lw=lw, label=impl, color=COLORS.get(impl))
            floor = [(r["L"], r["kv_bytes"] / read_gbs / 1e3) for r in sub if r["impl"] == "midm"]
            ax.plot(*zip(*floor, strict=True), "k--", lw=1, label="KV bytes / read BW")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{model} M={m}", fontsize=10)
            ax.set_xlabel("L (valid keys)")
            ax.set_ylabel("time per call (us)")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--sweep", action="store_true", help="tune tile/warps/stages and split plan first")
    ap.add_argument(
        "--sweep-big-r", action="store_true", help="report the best config for >= 32 rows (Llama M=8) first"
    )
    ap.add_argument("--quick", action="store_true", help="fewer shapes (smoke test)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.cuda.get_device_name()
    props = torch.cuda.get_device_properties(0)
    slug = dev.replace("NVIDIA ", "").split()[0].lower() + (f"_{args.tag}" if args.tag else "")
    meta = dict(
        device=dev,
        sms=props.multi_processor_count,
        torch=torch.__version__,
        triton=triton.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version(),
        python=platform.python_version(),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        command=" ".join(["python", *sys.argv]),
    )
    log("meta", meta)
    t_start = time.time()
    read_gbs = read_bandwidth_gbs()
    copies = copy_bandwidths_gbs()
    copy_gbs = max(copies.values())
    tflops = matmul_tflops()
    node_us = empty_graph_node_us()
    meta.update(read_GBps=read_gbs, copy_GBps=copy_gbs, copy_detail_GBps=copies)
    meta.update(bf16_matmul_TFLOPs=tflops, empty_graph_node_us=node_us)
    log(
        f"read bandwidth {read_gbs:.0f} GB/s, copy bandwidth {copy_gbs:.0f} GB/s (read+written; "
        + ", ".join(f"{k} {v:.0f}" for k, v in copies.items())
        + f"), bf16 matmul {tflops:.0f} TFLOP/s, empty kernel node in a graph {node_us:.2f} us"
    )
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        ap.error(f"--models: unknown {sorted(unknown)} (have {', '.join(MODELS)})")
    models = {n: MODELS[n] for n in args.models.split(",")}
    ms, ls = (MS, LS) if not args.quick else ((1, 4), (4096, 131072))
    sweep_rows = []
    configs = {d: sm.default_config(d) for _, _, d in models.values()}
    if args.sweep:
        chosen = sweep(models, read_gbs, sweep_rows)
        configs.update(chosen)
        meta["chosen_cfg"] = {str(k): asdict(v) for k, v in chosen.items()}
    if args.sweep_big_r:
        meta["best_cfg_big_r"] = sweep_big_r(read_gbs, sweep_rows)
    meta["cfg"] = {str(k): asdict(v) for k, v in configs.items()}
    rows = []
    for name, (hq, hkv, d) in models.items():
        shared = name in SHARED_KV
        impls = ["midm", "split_only", *(["plain_shared"] if shared else []), *BACKENDS, "naive"]
        sets = Sets(hq, hkv, d, shared=shared)
        cfg = configs[d]
        for m in ms:
            for L in ls:
                kv_bytes = (1 if shared else 2) * hkv * L * d * 2
                own = None if cfg == sm.default_config(d) else cfg  # the op itself where it is the same
                err = check_midm(sets, m, L, own) if L <= 32768 else float("nan")
                for impl in impls:
                    t, why = measure(sets, impl, m, L, cfg)
                    gbs = kv_bytes / (t * 1e-6) / 1e9 if t else None
                    rows.append(
                        dict(
                            model=name,
                            Hq=hq,
                            Hkv=hkv,
                            D=d,
                            M=m,
                            L=L,
                            impl=impl,
                            time_us=t,
                            kv_bytes=kv_bytes,
                            kv_GBps=gbs,
                            ratio_read=(gbs / read_gbs) if gbs else None,
                            ratio_copy=(gbs / copy_gbs) if gbs else None,
                            note=why,
                            midm_rel_err=err if impl == "midm" else None,
                        )
                    )
                    log(
                        f"{name} M={m} L={L} {impl}: "
                        + (f"{t:.1f} us {gbs:.0f} GB/s {gbs / read_gbs:.0%} of read" if t else f"n/a ({why})")
                    )
        sets.free()
        torch.cuda.empty_cache()
    base = os.path.join(args.out, f"sdpa_midm_{slug}")
    with open(base + ".csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["# " + json.dumps(meta)])
        keys = list(rows[0])
        w.writerow(keys)
        for r in rows:
            w.writerow([("" if r[k] is None else r[k]) for k in keys])
    with open(base + ".json", "w") as f:
        json.dump(dict(meta=meta, rows=rows, sweep=sweep_rows), f, indent=1)
    try:
        plot(rows, base + ".png", read_gbs)
    except Exception as e:
        log("plot failed:", e)
    # short table last
    log(
        f"\n{dev}  torch {torch.__version__}  triton {triton.__version__}  read {read_gbs:.0f} GB/s  "
        f"({time.time() - t_start:.0f} s)"
    )
    log(
        f"{'model':18s} {'M':>2s} {'L':>7s} | {'midm us':>8s} {'GB/s':>6s} {'%read':>6s} | "
        f"{'best SDPA(slice)':>24s} | {'naive us':>9s} | {'x SDPA':>6s} {'err':>8s} | {'split-only':>10s}"
    )
    for name in models:
        for m in ms:
            for L in ls:
                sub = {r["impl"]: r for r in rows if r["model"] == name and r["M"] == m and r["L"] == L}
                mi = sub["midm"]
                sd = [(r["time_us"], k) for k, r in sub.items() if k.startswith("sdpa_") and r["time_us"]]
                bt, bk = min(sd) if sd else (None, "-")
                nv = sub["naive"]["time_us"]
                mt = mi["time_us"]
                log(
                    f"{name:18s} {m:2d} {L:7d} | {mt or float('nan'):8.1f} {mi['kv_GBps'] or 0:6.0f} "
                    f"{(mi['ratio_read'] or 0):6.1%} | {(bt or float('nan')):8.1f} {bk[5:]:>15s} | "
                    f"{(nv or float('nan')):9.1f} | {((bt / mt) if (bt and mt) else float('nan')):6.1f} "
                    f"{mi['midm_rel_err']:8.1e} | {sub['split_only']['time_us'] or float('nan'):10.1f}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
