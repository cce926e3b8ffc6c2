"""GPU tests of etspec::sdpa_chunk (run on the GPU box): prefill chunks of real layer shapes against
float64 (NaN-filled caches past L, bucketed bounds, windows, ring caches, ragged row counts), and the op
lowered through ExecuTorch's CudaPartitioner (AOTInductor, a dynamic row count up to 256: the split
count and the partials' size are symbolic) with the delegate run from Python against eager."""

from __future__ import annotations

import math
import os

import pytest
import torch

from etspec.kernels import register_ops
from tests.kernels.midm_helpers import (
    check_delegate_against_eager,
    lower_cached_attn,
    make_case,
    make_freq,
    ref64,
    rel_err,
    to_ring,
)

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
TOL_GPU = {BF16: 1e-2, F16: 2e-3, F32: 1e-4}
LLAMA8B = (32, 8, 128)
LLAMA1B = (32, 8, 64)
GEMMA3 = (8, 4, 256)  # Gemma-3-like sliding layer (window 1024)
GEMMA4_FULL = (32, 4, 512)  # Gemma-4-31B full layer (its keys rebuilt from the values by the caller)

# (Hq, Hkv, D), M, L, Lb, window, dtype
CASES = [
    (LLAMA8B, 256, 256, 1024, 0, BF16),  # a prompt's first chunk
    (LLAMA8B, 256, 4096, 5120, 0, BF16),
    (LLAMA8B, 256, 32768 + 256, 34816, 0, BF16),
    (LLAMA8B, 37, 1000, 1024, 0, BF16),  # a prompt's last, ragged chunk: row blocks span two heads
    (LLAMA8B, 1, 3001, 4096, 0, F32),
    (LLAMA1B, 256, 2048, 3072, 0, BF16),
    (LLAMA1B, 200, 131072 - 5, 131072, 0, BF16),  # positions past 105615 (the slow cosine range)
    (LLAMA1B, 64, 700, 1024, 0, F16),
    (GEMMA3, 256, 5000, 6144, 1024, BF16),
    (GEMMA3, 256, 700, 1024, 1024, BF16),  # the window not yet full
    (GEMMA3, 19, 3000, 4096, 1024, F32),
    (GEMMA4_FULL, 256, 8192 + 256, 9216, 0, BF16),
    (GEMMA4_FULL, 100, 65536 + 100, 66560, 0, BF16),
    (GEMMA4_FULL, 33, 2000, 2048, 0, F32),
]


def _id(c):
    (hq, hkv, d), m, L, lb, w, dt = c
    return f"h{hq}-{hkv}-d{d}-M{m}-L{L}-Lb{lb}-w{w}-{str(dt)[6:]}"


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_matches_float64(case):
    (hq, hkv, d), m, L, lb, window, dtype = case
    q, k, v, pos = make_case(
        hq, hkv, m, d, L, lb, dtype, device="cuda", seed=L + m, max_seq=lb + 64, q_strided=True
    )
    scale, freq = 1.0 / math.sqrt(d), make_freq(d, 0.25 if d == 512 else 1.0).cuda()
    out = torch.ops.etspec.sdpa_chunk(q, k, v, freq, pos, scale, window)
    torch.cuda.synchronize()
    assert out.shape == q.shape and out.dtype == dtype and out.transpose(1, 2).is_contiguous()
    assert torch.isfinite(out).all(), "NaN/Inf in the output"
    err = rel_err(out, ref64(q, k, v, pos, freq, scale, window))
    print(f"{_id(case)} rel_err={err:.2e}")
    assert err < TOL_GPU[dtype]


@pytest.mark.parametrize("cap", [50.0, 0.5])
def test_softcap_matches_float64(cap):
    """Gemma 2's logit softcap on a 256-row chunk of its (16, 8, 256) layer over a 4096 window."""
    (hq, hkv, d), m, L, window = (16, 8, 256), 256, 6000, 4096
    q, k, v, pos = make_case(hq, hkv, m, d, L, L, BF16, device="cuda", seed=L, max_seq=L + 64)
    scale, freq = 1.0 / math.sqrt(d), make_freq(d).cuda()
    out = torch.ops.etspec.sdpa_chunk(q, k, v, freq, pos, scale, window, 0, cap)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window, cap)) < TOL_GPU[BF16]


@pytest.mark.parametrize("m,L", [(256, 70000 + 3), (256, 900), (7, 5000)])
def test_ring_matches_float64(m, L):
    """A sliding layer's ring cache (window + 2 x a 256-row chunk rows; never-written rows NaN), wrapped
    and not yet wrapped, against float64 over the full cache."""
    (hq, hkv, d), window = GEMMA3, 1024
    ring = window + 2 * 256
    q, k, v, pos = make_case(hq, hkv, m, d, L, L, BF16, device="cuda", seed=L, max_seq=L)
    kr, vr = (to_ring(c, L, ring)[:, :, : min(ring, L)] for c in (k, v))
    scale, freq = 1.0 / math.sqrt(d), make_freq(d).cuda()
    out = torch.ops.etspec.sdpa_chunk(q, kr, vr, freq, pos, scale, window, ring)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window)) < TOL_GPU[BF16]


# --------------------------------------------------------------------------------------------------
# Export -> ExecuTorch CudaPartitioner -> AOTInductor delegate, run through the container C API
# --------------------------------------------------------------------------------------------------

HQ, HKV, HD, MAXS, CHUNK = 8, 2, 128, 4096, 256


@pytest.fixture(scope="module")
def lowered(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("chunk_lower"))
    model, pte_path = lower_cached_attn(out_dir, "sdpa_chunk", HQ, HKV, HD, MAXS, CHUNK, "prefill")
    return model, pte_path, out_dir


def test_lowers_through_cuda_partitioner(lowered):
    _, pte_path, out_dir = lowered
    assert os.path.getsize(pte_path) > 0
    assert any(f.endswith(".ptd") for f in os.listdir(out_dir))


def test_lowered_delegate_matches_eager(lowered):
    # full chunks, a ragged one, single rows, with bucketed kv_window bounds
    plan = [(256, 0)] * 6 + [(100, 0), (1, 0), (256, 37), (3, 500), (1, 1), (256, 0)]
    check_delegate_against_eager(*lowered, plan)
