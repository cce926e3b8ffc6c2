"""CPU tests of etspec::sdpa_midm: Triton kernels under the interpreter (own process), the CPU
implementation, and the fake implementation under torch.export(strict=True)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import triton

from etspec.kernels import register_ops
from etspec.kernels.sdpa_midm import MAX_M, plan_splits
from tests.kernels.interpreter import run_interpreted
from tests.kernels.midm_helpers import (
    TOL,
    CachedAttn,
    make_case,
    make_freq,
    make_shared,
    ref64,
    rel_err,
    shared_keys64,
)

register_ops()

HERE = Path(__file__).resolve().parent


_TRITON = tuple(int(x) for x in triton.__version__.split(".")[:2])


@pytest.mark.skipif(
    _TRITON < (3, 7),
    reason="Triton 3.6's interpreter gives scalar loads a 1-element shape, so data-dependent loop bounds "
    "fail there (seen on the GPU box); CI's Triton 3.9 runs it",
)
def test_interpreted_kernels_match_float64():
    run_interpreted(HERE / "midm_helpers.py")


@pytest.mark.parametrize(
    "hq,hkv,m,d,L,lb,window,dtype,rotated",
    [
        (8, 2, 4, 64, 37, 64, 0, torch.float32, 1.0),
        (8, 8, 1, 128, 1, 16, 0, torch.float32, 1.0),
        (16, 2, 8, 64, 8, 8, 0, torch.bfloat16, 1.0),
        (4, 1, 3, 256, 100, 128, 0, torch.float16, 0.25),
        (4, 2, 4, 64, 300, 512, 32, torch.float32, 1.0),
    ],
)
@pytest.mark.parametrize("softcap", [0.0, 0.7])
def test_cpu_impl_matches_float64(hq, hkv, m, d, L, lb, window, dtype, rotated, softcap):
    q, k, v, pos = make_case(hq, hkv, m, d, L, lb, dtype, seed=L + m)
    freq, scale = make_freq(d, rotated), 1.0 / math.sqrt(d)
    out = torch.ops.etspec.sdpa_midm(q, k, v, freq, pos, scale, window, 0, softcap)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "laid out as [1, M, Hq, D], the layout o_proj reads"
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window, softcap)) < TOL[dtype]


@pytest.mark.parametrize(
    "hq,hkv,m,d,L,lb,window,dtype",
    [
        (4, 1, 4, 512, 40, 64, 0, torch.float32),
        (8, 2, 3, 64, 37, 64, 0, torch.bfloat16),
        (4, 1, 2, 128, 100, 128, 16, torch.float32),
    ],
)
def test_shared_kv_cpu_impl_matches_float64(hq, hkv, m, d, L, lb, window, dtype):
    """K = V: the keys are rebuilt from the one cached tensor; float64 keys built independently."""
    q, _, kv, pos = make_case(hq, hkv, m, d, L, lb, dtype, seed=L + d)
    w, freq = make_shared(d, seed=m)
    scale = 1.0 / math.sqrt(d)
    out = torch.ops.etspec.sdpa_midm_shared_kv(q, kv, w, freq, pos, scale, window)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    assert out.transpose(1, 2).is_contiguous()
    assert rel_err(out, ref64(q, shared_keys64(kv, w, freq), kv, pos, freq, scale, window)) < TOL[dtype]


def test_plan_splits_depends_on_bound_only():
    # grid from Lb (and SMs); splits are whole tiles and cover the bound
    for lb in (1, 63, 64, 4096, 5000, 131072):
        ns, sl, mx = plan_splits(lb, 8, 132, 64, 2, 2)
        assert sl % 64 == 0 and ns * sl >= lb and (ns - 1) * sl < lb
        assert ns <= mx == math.ceil(2 * 132 / 8)


def test_export_strict_fake_shapes():
    torch.manual_seed(0)
    mod = CachedAttn().eval()
    for p in mod.parameters():
        p.requires_grad_(False)
    dm = torch.export.Dim("m", min=1, max=MAX_M)
    dkv = torch.export.Dim("kv", min=1, max=128)
    ex = (torch.randn(1, 4, 64), torch.arange(10, 14), torch.empty(14, dtype=torch.int8))
    with torch.no_grad():
        ep = torch.export.export(mod, ex, dynamic_shapes=({1: dm}, {0: dm}, {0: dkv}), strict=True)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "sdpa_midm" in str(n.target)]
    assert len(nodes) == 1, "the op must stay one node in the exported graph"
    val = nodes[0].meta["val"]
    assert val.shape[0] == 1 and val.shape[1] == 8 and val.shape[3] == 64
    x_node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x")
    assert isinstance(val.shape[2], torch.SymInt) and str(val.shape[2]) == str(x_node.meta["val"].shape[1])
    # run the exported program (CPU impl) for other M and L; compare with eager
    runner = ep.module()
    eager = CachedAttn().eval()
    eager.load_state_dict(mod.state_dict())
    pos0 = 0
    for m, bucket in ((5, 0), (1, 0), (8, 20)):
        x = torch.randn(1, m, 64)
        pos = torch.arange(pos0, pos0 + m)
        kvw = torch.empty(pos0 + m + bucket, dtype=torch.int8)  # bucketed bound > exact length
        got = runner(x, pos, kvw)
        want = eager(x, pos, kvw)
        assert got.shape == (1, 8, m, 64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        pos0 += m
