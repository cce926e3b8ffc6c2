"""CPU tests of etspec::sdpa_chunk: the CPU implementation against float64, the split plan, argument
checks, and the fake implementation under torch.export(strict=True) with a prefill-sized dynamic row
count. The Triton kernels themselves run under the interpreter with the sdpa_midm cases
(`midm_helpers.CHUNK_CASES`, test_sdpa_midm.py)."""

from __future__ import annotations

import math

import pytest
import torch
import triton

from etspec.kernels import register_ops
from etspec.kernels.sdpa_chunk import plan_chunk_splits
from tests.kernels.midm_helpers import TOL, CachedAttn, make_case, make_freq, ref64, rel_err, to_ring

register_ops()


@pytest.mark.parametrize(
    "hq,hkv,m,d,L,lb,window,ring,dtype",
    [
        (8, 2, 64, 64, 64, 80, 0, 0, torch.float32),
        (8, 2, 37, 128, 300, 512, 0, 0, torch.bfloat16),
        (4, 1, 100, 256, 150, 160, 0, 0, torch.float16),
        (4, 2, 40, 64, 300, 320, 32, 0, torch.float32),
        (4, 1, 24, 64, 150, 256, 16, 48, torch.float32),
        (8, 1, 12, 512, 40, 48, 0, 0, torch.bfloat16),
    ],
)
def test_cpu_impl_matches_float64(hq, hkv, m, d, L, lb, window, ring, dtype):
    q, k, v, pos = make_case(hq, hkv, m, d, L, lb, dtype, seed=L + m)
    freq, scale = make_freq(d), 1.0 / math.sqrt(d)
    k_in, v_in = (to_ring(c, L, ring) for c in (k, v)) if ring else (k, v)
    out = torch.ops.etspec.sdpa_chunk(q, k_in, v_in, freq, pos, scale, window, ring)
    assert out.shape == q.shape and out.dtype == dtype
    assert out.transpose(1, 2).is_contiguous(), "laid out as [1, M, Hq, D], the layout o_proj reads"
    assert torch.isfinite(out).all()
    assert rel_err(out, ref64(q, k, v, pos, freq, scale, window)) < TOL[dtype]


def test_plan_fills_the_sms_the_row_blocks_leave():
    n_sm = 132
    for span in (1, 63, 64, 1024, 5000, 131072):
        for hkv, blocks in ((8, 16), (8, 1), (1, 16), (1, 1), (4, 40)):
            ns, sl, bound = plan_chunk_splits(span, hkv, blocks, n_sm, 64, 1, 2)
            assert sl % 64 == 0 and ns * sl >= span and (ns - 1) * sl < span
            assert ns <= bound == max(1, n_sm // hkv)
            if hkv * blocks >= n_sm:  # a full 8B/1B chunk (16 blocks x 8 KV heads): one split
                assert ns == 1
            elif span >= 64 * 2 * n_sm:  # long spans: about one program per SM
                assert n_sm // 2 <= ns * hkv * blocks <= n_sm


def test_refuses_what_it_cannot_run():
    q, k, v, pos = make_case(2, 1, 4, 1024, 8, 8, torch.float32)
    with pytest.raises(RuntimeError, match="head dim above 512"):
        torch.ops.etspec.sdpa_chunk(q, k, v, make_freq(1024), pos, 0.1)
    q, k, v, pos = make_case(2, 1, 24, 64, 100, 100, torch.float32)
    with pytest.raises(RuntimeError, match="must hold the window and the chunk"):
        torch.ops.etspec.sdpa_chunk(q, k[:, :, :30], v[:, :, :30], make_freq(64), pos, 0.1, 16, 30)


def test_export_strict_fake_shapes():
    torch.manual_seed(0)
    mod = CachedAttn(max_seq=600, op="sdpa_chunk").eval()
    for p in mod.parameters():
        p.requires_grad_(False)
    dm = torch.export.Dim("m", min=1, max=256)
    dkv = torch.export.Dim("kv", min=1, max=600)
    ex = (torch.randn(1, 100, 64), torch.arange(0, 100), torch.empty(100, dtype=torch.int8))
    with torch.no_grad():
        ep = torch.export.export(mod, ex, dynamic_shapes=({1: dm}, {0: dm}, {0: dkv}), strict=True)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and "sdpa_chunk" in str(n.target)]
    assert len(nodes) == 1, "the op must stay one node in the exported graph"
    runner = ep.module()
    eager = CachedAttn(max_seq=600, op="sdpa_chunk").eval()
    eager.load_state_dict(mod.state_dict())
    pos0 = 0
    for m, bucket in ((256, 0), (200, 40), (1, 0), (7, 3)):
        x = torch.randn(1, m, 64)
        pos = torch.arange(pos0, pos0 + m)
        kvw = torch.empty(pos0 + m + bucket, dtype=torch.int8)
        got = runner(x, pos, kvw)
        assert got.shape == (1, 8, m, 64)
        torch.testing.assert_close(got, eager(x, pos, kvw), rtol=1e-5, atol=1e-5)
        pos0 += m


@pytest.mark.parametrize("d,window,ring", [(128, 0, 0), (64, 0, 0), (256, 1024, 1536), (512, 0, 0)])
def test_chunk_kernels_compile_for_hopper(d, window, ring):
    """The split kernel with its row bounds (which the interpreter runs without Triton's type checks;
    with a softcap at D = 256) and the reduce kernel compile through ptxas to sm_90 cubins at the op's
    configs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from etspec.kernels.sdpa_chunk import chunk_config
    from etspec.kernels.sdpa_midm import _midm_reduce_kernel, _midm_split_kernel

    cfg = chunk_config(d)
    ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "pos_ptr": "*i64"}
    ptrs |= {p: "*fp32" for p in ("po_ptr", "pm_ptr", "pl_ptr")}
    ints = ("M", "R", "G", "S", "MAX_SPLITS", "sq_h", "sq_m", "sk_h", "sk_n", "sv_h", "sv_n")
    consts = {
        "D": d,
        "BLOCK_R": cfg.rows,
        "BLOCK_N": cfg.block_n,
        "QK_SCALE": 0.18,
        "CAP_IN": 0.0025 if d == 256 else 0.0,  # Gemma 2's softcap 50 at head dim 256
        "CAP_OUT": 72.13 if d == 256 else 0.0,
        "WINDOW": window,
        "RING": ring,
        "FP32_DOT": False,
        "UPCAST": False,
        "SHARED_KV": False,
        "PAIRS": d // 8 if d == 512 else d // 2,  # Gemma 4's full layers rotate a quarter of the pairs
        "PAIRS_W": d // 8 if d == 512 else d // 2,
        "ROW_BOUNDS": True,
    }
    sig = ptrs | {i: "i32" for i in ints} | {"w_ptr": "*fp32", "f_ptr": "*fp32"}
    sig |= {c: "constexpr" for c in consts}
    src = ASTSource(
        fn=_midm_split_kernel, signature=sig, constexprs={(list(sig).index(c),): v for c, v in consts.items()}
    )
    target = GPUTarget("cuda", 90, 32)
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    assert triton.compile(src, target=target, options=opts).asm["cubin"]
    sig = {"po_ptr": "*fp32", "pm_ptr": "*fp32", "pl_ptr": "*fp32", "pos_ptr": "*i64", "o_ptr": "*bf16"}
    sig |= {i: "i32" for i in ("so_h", "so_m", "M", "S", "MAX_SPLITS")}
    consts = {"D": d, "BLOCK_S": 32, "WINDOW": window}
    sig |= {c: "constexpr" for c in consts}
    src = ASTSource(
        fn=_midm_reduce_kernel,
        signature=sig,
        constexprs={(list(sig).index(c),): v for c, v in consts.items()},
    )
    assert triton.compile(src, target=target, options={"num_warps": 4}).asm["cubin"]
