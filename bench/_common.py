"""Shared by the GPU benchmarks: device ceilings, cached exports of shaped random pairs, timing."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

from etspec.fixtures.shaped import SHAPES, head_config, write_random_pair
from etspec.models.config import parse_target_config


def log(*a) -> None:
    print(*a, flush=True)


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), 1 GiB buffers."""
    a = torch.empty(1 << 29, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(20):
        b.copy_(a)
    e1.record()
    torch.cuda.synchronize()
    gbs = 2 * a.numel() * 2 * 20 / (e0.elapsed_time(e1) / 1e3) / 1e9
    del a, b
    torch.cuda.empty_cache()
    return gbs


def matmul_tflops(n: int = 8192) -> float:
    """Dense bf16 matmul rate (n x n x n, cuBLAS)."""
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    us = time_call(lambda: x @ y, n=20)
    return 2 * n**3 / (us / 1e6) / 1e12


def time_call(fn, n: int = 50) -> float:
    """Median µs per call, each call bracketed by CUDA events."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        fn()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3)
    return statistics.median(times)


def time_calls_in_graph(calls, target_ms: float = 3.0, replays: int = 11) -> float:
    """Median device time per call (µs) of a list of zero-arg callables, via CUDA-graph replay.

    The calls are captured in turn (each usually over its own input set, so that data is not served from
    L2), repeated to fill about `target_ms` per replay; a graph that cannot be captured is timed eagerly,
    back to back."""
    for c in calls:  # eager warm-up (compiles, refusals raise here)
        c()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for c in calls:
        c()
    torch.cuda.synchronize()
    est_ms = (time.perf_counter() - t0) * 1e3 / len(calls)
    inner = max(1, min(8, int(target_ms / max(est_ms, 1e-3) / len(calls))))
    seq = calls * inner
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    try:
        with torch.cuda.graph(g):
            for c in seq:
                c()
    except Exception as e:  # not capturable: time eagerly, back to back
        log(f"   (graph capture failed: {type(e).__name__}; eager timing)")
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for c in seq:
                c()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) * 1e3 / len(seq))
        return statistics.median(times)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        g.replay()
        e1.record()
        e1.synchronize()
        times.append(e0.elapsed_time(e1) * 1e3 / len(seq))
    del g
    return statistics.median(times)


@triton.jit
def _copy_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst + offs, tl.load(src + offs, mask=offs < n), mask=offs < n)


@triton.jit
def _empty_kernel(p):
    tl.store(p, 1.0)


def copy_bandwidths_gbs() -> dict[str, float]:
    """Device-to-device copy of 1 GiB (bytes read + written) three ways: eager ``copy_``
    (:func:`copy_bandwidth_gbs`), ``copy_`` replayed from a graph, a Triton copy kernel; the max is the
    ceiling."""
    n = 1 << 30  # bytes per buffer
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    res = {"copy_eager": copy_bandwidth_gbs()}
    res["copy_graph"] = 2 * n / (time_calls_in_graph([lambda: dst.copy_(src)], target_ms=20) * 1e-6) / 1e9
    blk = 8192
    grid = (triton.cdiv(src.numel(), blk),)
    us = time_calls_in_graph([lambda: _copy_kernel[grid](src, dst, src.numel(), BLOCK=blk, num_warps=8)], 20)
    res["copy_triton"] = 2 * n / (us * 1e-6) / 1e9
    return res


@triton.jit
def _read_kernel(src, out, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out + tl.program_id(0), tl.sum(acc))  # one value per program: the write traffic is nil


def read_bandwidth_gbs() -> float:
    """Streaming-read bandwidth (bytes read per second) of a 1 GiB buffer, best of a few Triton tilings:
    the ceiling of a weight stream, which reads and barely writes (a copy also writes what it reads)."""
    n = 1 << 30  # bytes
    src = torch.randn(n // 2, device="cuda", dtype=torch.bfloat16)

    def timed(block: int, iters: int, warps: int) -> float:
        grid = (triton.cdiv(src.numel(), block * iters),)
        out = torch.empty(grid[0], device="cuda", dtype=torch.float32)
        call = lambda: _read_kernel[grid](src, out, src.numel(), BLOCK=block, ITERS=iters, num_warps=warps)
        return n / (time_calls_in_graph([call], target_ms=20) * 1e-6) / 1e9

    return max(timed(*t) for t in ((4096, 8, 8), (8192, 4, 8), (2048, 16, 4), (4096, 16, 8)))


def empty_graph_node_us() -> float:
    """Cost of one empty kernel node inside a CUDA graph (µs): the fixed cost of a launch under replay."""
    x = torch.empty(1, device="cuda")
    return time_calls_in_graph([lambda: _empty_kernel[(1,)](x)] * 8, target_ms=0.5)


def write_random_pair_once(work: Path, shape: str, **overrides) -> Path:
    """`shape`'s random bf16 pair under work/ckpt (written once, then reused)."""
    ckpt = work / "ckpt"
    if not (ckpt / "draft" / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_random_pair(ckpt, shape, device="cuda", **overrides)
        # hand the weights' GPU memory back before the export's own process starts: the caching
        # allocator kept 16.8 GiB of the 12-layer Gemma 4 shape, which left its export out of memory
        torch.cuda.empty_cache()
        log(f"wrote random {shape} pair in {time.perf_counter() - t0:.1f}s")
    return ckpt


def export_shaped(
    work: Path,
    shape: str,
    *,
    max_seq: int,
    chunk: int,
    draft_len: int,
    extra_args: tuple[str, ...] = (),
    **overrides,
) -> tuple[Path, dict]:
    """Write `shape`'s random pair under work/ckpt and export it (bf16, CUDA) to work/art_k<draft_len>,
    both cached (exports of several k share the checkpoint; write it before exporting them in parallel).

    Returns the artifact directory and {export_s, files_mib} (export_s from the call that exported)."""
    ckpt, art = write_random_pair_once(work, shape, **overrides), work / f"art_k{draft_len}"
    info: dict = {}
    info_file = art.with_name(art.name + "_info.json")
    if (art / "manifest.json").is_file() and info_file.is_file():
        info = json.loads(info_file.read_text())
    if not (art / "manifest.json").is_file():
        cmd = [sys.executable, "-m", "etspec.export.cli", "--target", str(ckpt / "target"), "--draft"]
        cmd += [str(ckpt / "draft"), "--out", str(art), "--backend", "cuda", "--dtype", "bf16", "--force"]
        cmd += [
            "--max-seq-len",
            str(max_seq),
            "--max-prefill-chunk",
            str(chunk),
            "--draft-len",
            str(draft_len),
        ]
        t0 = time.perf_counter()
        info["steps"] = run_export(cmd + list(extra_args))
        info["export_s"] = time.perf_counter() - t0
        info["export_args"] = list(extra_args)
        info_file.write_text(json.dumps(info))
    info["files_mib"] = {f.name: f.stat().st_size / 2**20 for f in sorted(art.iterdir())}
    return art, info


def export_steps(lines) -> list[str]:
    """The export's own timing lines (each stage's `done in`, each CUDA method's AOTInductor split and
    peak GPU memory, `compiled in`), without their clock prefix: where an export's time goes."""
    keep = (" done in ", "AOTInductor", " compiled in ")
    return [
        line.split("] ", 1)[1].strip()
        for line in lines
        if line.startswith("[etspec-export") and "] " in line and any(k in line for k in keep)
    ]


def run_export(cmd: list[str]) -> list[str]:
    """Run an export command, its output passed through; returns `export_steps` of that output."""
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
    sys.stdout.flush()
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return export_steps(lines)


class Floors:
    """Bytes each call must read, from the shape, and their time at the measured read bandwidth (a weight
    stream is a read); `copy_factor` converts a floor to the copy-bandwidth floor older results used."""

    def __init__(self, shape: str, draft_vocab: int, k: int, read_gbs: float, copy_gbs: float):
        t = SHAPES[shape]
        d = head_config(t, draft_vocab)
        cfg = parse_target_config(t)
        h, hd, kvh, inter = t["hidden_size"], t["head_dim"], t["num_key_value_heads"], t["intermediate_size"]
        # per layer (its own head_dim and kv heads; a K = V layer has no v_proj and caches one tensor)
        self.target_bytes = 2 * t["vocab_size"] * h  # lm_head
        self.kv_layers: list[tuple[int, int | None]] = []  # (cache bytes per token, sliding window)
        for i in range(cfg.num_layers):
            lhd, lkv = cfg.layer_head_dim(i), cfg.layer_kv_heads(i)
            sliding = cfg.layer_types[i] == "sliding_attention"
            tensors = 1 if cfg.k_eq_v and not sliding else 2
            attn = h * cfg.num_heads * lhd * 2 + h * lkv * lhd * tensors
            self.target_bytes += 2 * (attn + 3 * h * inter)
            self.kv_layers.append((tensors * lkv * lhd * 2, cfg.sliding_window if sliding else None))
        self.kv_tok = sum(b for b, _ in self.kv_layers)  # cache bytes per token, every layer
        # one draft step: the head layer (2H-wide q/k/v) + its lm_head; fc (3H -> H) once per call
        d_attn = (
            2 * h * (d["num_attention_heads"] * hd)
            + 2 * h * kvh * hd * 2
            + (d["num_attention_heads"] * hd) * h
        )
        self.draft_step_bytes = 2 * (d_attn + 3 * h * d["intermediate_size"]) + 2 * draft_vocab * h
        self.fc_bytes = 2 * 3 * h * h
        self.draft_kv_tok = 2 * kvh * hd * 2
        self.k = k  # the exported draft length: the draft method computes all k steps
        self.bw = read_gbs * 1e9
        self.copy_factor = read_gbs / copy_gbs

    def verify_ms(self, ctx: int) -> float:
        kv = sum(b * (min(ctx, w) if w else ctx) for b, w in self.kv_layers)  # a window reads its last w
        return (self.target_bytes + kv) / self.bw * 1e3

    def draft_ms(self, ctx: int) -> float:
        return (self.fc_bytes + self.k * (self.draft_step_bytes + self.draft_kv_tok * ctx)) / self.bw * 1e3
