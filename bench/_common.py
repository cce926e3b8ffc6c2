"""Shared by the GPU benchmarks: device ceilings, cached exports of shaped random pairs, timing."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from etspec.models.shaped import write_random_pair


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
    """Write `shape`'s random pair under work/ckpt and export it (bf16, CUDA) to work/art, both cached.

    Returns the artifact directory and {export_s, files_mib} (export_s from the call that exported)."""
    ckpt, art = work / "ckpt", work / "art"
    if not (ckpt / "draft" / "model.safetensors").is_file():
        t0 = time.perf_counter()
        write_random_pair(ckpt, shape, device="cuda", **overrides)
        log(f"wrote random {shape} pair in {time.perf_counter() - t0:.1f}s")
    info: dict = {}
    info_file = work / "export_info.json"
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
        subprocess.run(cmd + list(extra_args), check=True)
        info["export_s"] = time.perf_counter() - t0
        info_file.write_text(json.dumps(info))
    info["files_mib"] = {f.name: f.stat().st_size / 2**20 for f in sorted(art.iterdir())}
    return art, info
