"""GPU tests of etspec::sdpa_midm (run on the GPU box): real sizes against float64, NaN-filled cache
past L, bucketed bounds, CUDA-graph replay while L grows inside the bucket, and lowering through
ExecuTorch's CudaPartitioner (AOTInductor) with the delegate run from Python (ctypes) vs eager."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.sdpa_midm import MAX_M, default_config, launch
from tests.kernels.midm_helpers import (
    check_delegate_against_eager,
    lower_cached_attn,
    make_case,
    make_freq,
    make_shared,
    ref64,
    rel_err,
    shared_keys64,
    to_ring,
)

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
TOL_GPU = {BF16: 1e-2, F16: 2e-3, F32: 1e-4}
LLAMA = (32, 8, 128)  # Llama-3.1-8B layer: Hq, Hkv, D
GEMMA2 = (16, 8, 256)  # Gemma-2-9B layer
GEMMA3 = (8, 4, 256)  # Gemma-3-4B-like layer (local layers: window 1024)
GQA1 = (8, 8, 64)


def _bucket(n, b=1024):
    return (n + b - 1) // b * b


CASES = []
for _m in (1, 2, 4, 8):
    for _L in (_m, 1000, 4097):
        CASES.append((LLAMA, _m, _L, _bucket(_L) + 1024, 0, BF16))
CASES += [
    (LLAMA, 2, 32768 + 5, _bucket(32768 + 5), 0, BF16),
    (LLAMA, 4, 131072, 131072, 0, BF16),
    (LLAMA, 8, 131072 - 3, 131072, 0, BF16),
    (LLAMA, 4, 2000, 3072, 0, F32),
    (LLAMA, 5, 3001, 4096, 0, F16),
    (GEMMA2, 1, 5000, 8192, 0, BF16),
    (GEMMA2, 4, 5000, 8192, 0, BF16),
    (GEMMA2, 8, 65536 + 17, _bucket(65536 + 17), 0, BF16),
    (GEMMA2, 4, 10000, 16384, 4096, BF16),
    (GEMMA2, 4, 3000, 4096, 4096, BF16),
    (GEMMA3, 8, 70000, 131072, 1024, BF16),
    (GQA1, 3, 777, 2048, 0, F16),
    (GQA1, 7, 7, 7, 0, BF16),
]


def _id(c):
    (hq, hkv, d), m, L, lb, w, dt = c
    return f"h{hq}-{hkv}-d{d}-M{m}-L{L}-Lb{lb}-w{w}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_float64(case):
    (hq, hkv, d), m, L, lb, window, dtype = case
    q, k, v, pos = make_case(
        hq, hkv, m, d, L, lb, dtype, device="cuda", seed=L * 7 + m, max_seq=lb + 64, q_strided=(m % 2 == 0)
    )
    scale, freq = 1.0 / math.sqrt(d), make_freq(d, 0.25 if m == 3 else 1.0).cuda()
    out = torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale, window)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert torch.isfinite(out).all(), "NaN/Inf in the output"
    err = rel_err(out, ref64(q, k, v, pos, freq, scale, window))
    print(f"{_id(case)} rel_err={err:.2e}")
    assert err < TOL_GPU[dtype]


# Gemma 2's attention logit softcap (50; 0.5 saturates every score): verify through the kernel
SOFTCAP_CASES = [
    (GEMMA2, 5, 9000, 9216, 0, 50.0),
    (GEMMA2, 1, 700, 1024, 4096, 0.5),
    (LLAMA, 8, 3000, 4096, 0, 0.5),
]


@pytest.mark.parametrize(
    "case", SOFTCAP_CASES, ids=[f"h{c[0][0]}-M{c[1]}-L{c[2]}-cap{c[5]}" for c in SOFTCAP_CASES]
)
def test_softcap_matches_float64(case):
    (hq, hkv, d), m, L, lb, window, cap = case
    q, k, v, pos = make_case(hq, hkv, m, d, L, lb, BF16, device="cuda", seed=L + m, max_seq=lb + 64)
    scale, freq = 1.0 / math.sqrt(d), make_freq(d).cuda()
    out = torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale, window, 0, cap)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window, cap)) < TOL_GPU[BF16]


GEMMA4_FULL = (32, 4, 512)  # Gemma-4-31B full-attention layer: K = V, one cached tensor
SHARED_CASES = [
    (GEMMA4_FULL, 1, 5000, 8192, 0, BF16),
    (GEMMA4_FULL, 4, 5000, 8192, 0, BF16),
    (GEMMA4_FULL, 8, 70000 + 3, 71680, 0, BF16),
    (GEMMA4_FULL, 5, 3001, 4096, 0, F32),
    # positions past 105615, where the fastest pair's angle leaves CUDA's fast cosine range
    (GEMMA4_FULL, 4, 131072 - 5, 131072, 0, BF16),
]


@pytest.mark.parametrize("case", SHARED_CASES, ids=[_id(c) for c in SHARED_CASES])
def test_shared_kv_matches_float64(case):
    """K = V layers: keys rebuilt in the kernel from the value rows (rope(w * v)), Gemma 4's widths."""
    (hq, hkv, d), m, L, lb, window, dtype = case
    q, _, v, pos = make_case(hq, hkv, m, d, L, lb, dtype, device="cuda", seed=L + m, max_seq=lb + 64)
    w, freq = (t.cuda() for t in make_shared(d, seed=m))
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.etspec.sdpa_midm_shared_kv(q, v, w, freq, pos, scale, window)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    err = rel_err(out, ref64(q, shared_keys64(v, w, freq), v, pos, freq, scale, window))
    print(f"shared {_id(case)} rel_err={err:.2e}")
    assert err < TOL_GPU[dtype]


# sliding layers over their ring caches (window + 2 x a 256-row chunk): Gemma-4-31B's sliding layer, a
# Gemma-3-like one; wrapped many times, and not yet wrapped
RING_CASES = [((32, 16, 256), 4, 70000 + 3, 1024, 1536), ((8, 4, 256), 1, 900, 1024, 1536)]


@pytest.mark.parametrize("case", RING_CASES, ids=[f"h{c[0][0]}-M{c[1]}-L{c[2]}" for c in RING_CASES])
def test_ring_matches_float64(case):
    """A ring cache (key j in row j % ring, never-written rows NaN) against float64 over the full one."""
    (hq, hkv, d), m, L, window, ring = case
    q, k, v, pos = make_case(hq, hkv, m, d, L, L, BF16, device="cuda", seed=L, max_seq=L)
    kr, vr = (to_ring(c, L, ring)[:, :, : min(ring, L)] for c in (k, v))
    scale, freq = 1.0 / math.sqrt(d), make_freq(d).cuda()
    out = torch.ops.etspec.sdpa_midm(q, kr, vr, freq, pos, scale, window, ring)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window)) < TOL_GPU[BF16]


ROW_BLOCK_CASES = [(LLAMA, 8, 20000 + 9, 20480, False), (GEMMA4_FULL, 8, 9000 + 1, 9216, True)]


@pytest.mark.parametrize(
    "case",
    ROW_BLOCK_CASES,
    ids=[f"{'shared' if c[4] else 'plain'}-D{c[0][2]}-M{c[1]}" for c in ROW_BLOCK_CASES],
)
def test_row_blocks_match_float64(case):
    """Programs of 16 rows (MidmConfig.rows) where G*M is 32 or 64: each row block writes its own
    partials, and the reduce sees every row."""
    (hq, hkv, d), m, L, lb, shared = case
    q, k, v, pos = make_case(hq, hkv, m, d, L, lb, BF16, device="cuda", seed=L, max_seq=lb + 64)
    w, freq = (t.cuda() for t in make_shared(d, seed=3, rotated=0.25 if shared else 1.0))
    extra = {"k_weight": w} if shared else {}
    out = torch.full(q.shape, float("nan"), dtype=BF16, device="cuda")
    scale = 1.0 / math.sqrt(d)
    launch(q, k, v, freq, pos, scale, 0, out, config=replace(default_config(d), rows=16), **extra)
    torch.cuda.synchronize()
    keys = shared_keys64(v, w, freq) if shared else k
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, keys, v, pos, freq, scale)) < TOL_GPU[BF16]


def test_cuda_graph_replay_inside_bucket():
    """One graph captured for a bucket bound Lb stays correct as L grows inside the bucket."""
    hq, hkv, d = LLAMA
    m, lb = 4, 8192
    scale = 1.0 / math.sqrt(d)
    q, k, v, pos = make_case(hq, hkv, m, d, 100, lb, BF16, device="cuda", seed=1, max_seq=lb + 64)
    freq = make_freq(d).cuda()
    kc, vc = k, v  # views of the caches; refilled below
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale)
    gen = torch.Generator(device="cuda").manual_seed(5)
    for L in (4, 100, 1023, 1025, 4000, 8191, 8192):
        q.copy_(torch.randn(q.shape, generator=gen, device="cuda"))
        kc.copy_(torch.randn(kc.shape, generator=gen, device="cuda"))
        vc.copy_(torch.randn(vc.shape, generator=gen, device="cuda"))
        kc[:, :, L:] = float("nan")
        vc[:, :, L:] = float("nan")
        pos.copy_(torch.arange(L - m, L, device="cuda"))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"L={L}: NaN"
        err = rel_err(out, ref64(q, kc, vc, pos, freq, scale))
        assert err < TOL_GPU[BF16], f"L={L}: rel_err {err}"


# --------------------------------------------------------------------------------------------------
# Export -> ExecuTorch CudaPartitioner -> AOTInductor delegate, run through the container C API
# --------------------------------------------------------------------------------------------------

HQ, HKV, HD, MAXS = 8, 2, 128, 2048


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("midm_lower"))
    model, pte_path = lower_cached_attn(out_dir, "sdpa_midm", HQ, HKV, HD, MAXS, MAX_M, "verify")
    return model, pte_path, out_dir


def test_lowers_through_cuda_partitioner(lowered):
    _, pte_path, out_dir = lowered
    assert os.path.getsize(pte_path) > 0
    assert any(f.endswith(".ptd") for f in os.listdir(out_dir))


def test_lowered_delegate_matches_eager(lowered):
    # prefill-like blocks of MAX_M rows, then verify blocks, with bucketed kv_window bounds
    plan = [(8, 0)] * 40 + [(5, 0), (1, 0), (8, 37), (3, 500), (1, 1)]
    check_delegate_against_eager(*lowered, plan)
