"""CPU tests of etspec::linear_rows: the Triton kernel under the interpreter (this file run as a script in
its own process, since TRITON_INTERPRET must be set before triton is imported), the CPU implementation,
argument errors, and the fake implementation under torch.export(strict=True) with a dynamic row count."""

from __future__ import annotations

import math
import sys
from dataclasses import replace

import pytest
import torch
import triton

from etspec.kernels import register_ops
from etspec.kernels.linear_rows import MAX_ROWS, default_config, plan_split_k
from tests.kernels.interpreter import run_interpreted

register_ops()

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def ref64(x, ws, gated=""):
    """Float64 math written apart from the kernel module: per output column block, then the gate."""
    x64 = x.double().reshape(-1, x.shape[-1])
    ys = [x64 @ w.double().T for w in ws]
    if gated:
        g, u = ys
        if gated == "silu":
            g = g / (1 + torch.exp(-g))
        else:
            g = 0.5 * g * (1 + torch.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g**3)))
        y = g * u
    else:
        y = torch.cat(ys, dim=-1)
    return y.reshape(*x.shape[:-1], y.shape[-1])


def make(rows, k, ns, dtype, seed, gated=""):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    if gated:
        ns = [ns[0], ns[0]]
    ws = [(torch.randn(n, k, generator=gen) / math.sqrt(k)).to(dtype) for n in ns]
    return x, ws


def rel_err(out, ref):
    return ((out.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


# rows, K, column widths, gated, dtype: ragged K (not a multiple of the K tile) and N (not a multiple of
# the column block), M = 1 and M = MAX_ROWS, one to three weights, both activations, fp32 and bf16.
INTERP_CASES = [
    (1, 64, [48], "", torch.float32),
    (3, 100, [40, 16, 24], "", torch.float32),
    (16, 96, [33], "gelu_tanh", torch.float32),
    (8, 256, [64], "silu", torch.bfloat16),
    (5, 512, [128, 32, 32], "", torch.bfloat16),
    (2, 300, [17, 70], "", torch.float32),
    (7, 64, [200], "silu", torch.float32),
]


def run_interp_cases() -> int:
    from etspec.kernels.linear_rows import launch

    for i, (rows, k, ns, gated, dt) in enumerate(INTERP_CASES):
        x, ws = make(rows, k, ns, dt, seed=i, gated=gated)
        w1, w2, w3 = (ws + [None, None])[:3]
        # the shipped tiles; more, narrower ones; and K split in three (a ragged last split where K is)
        for cfg in ({}, dict(block_n=16, block_k=64), dict(block_n=16, block_k=64, split_k=3)):
            n = ns[0] if gated else sum(ns)
            out = torch.full((rows, n), float("nan"), dtype=dt)
            launch(x, w1, w2, w3, gated, out, config=replace(default_config(gated), **cfg))
            err = rel_err(out, ref64(x, ws, gated))
            assert torch.isfinite(out).all(), (i, cfg, "unwritten output")
            assert err < TOL[dt], (i, cfg, err)
            print(f"case {i} cfg={cfg}: rel_err {err:.2e}")
    # linear_chunk's tiling: more rows than one row block (ragged last block), several column blocks
    # per weight, narrower tiles that leave K ragged; every row block of every column block written
    for i, (rows, k, ns, gated, dt) in enumerate(CHUNK_CASES):
        x, ws = make(rows, k, ns, dt, seed=100 + i, gated=gated)
        w1, w2, w3 = (ws + [None, None])[:3]
        for cfg in ({}, dict(block_m=16, block_n=16, block_k=32)):
            n = ns[0] if gated else sum(ns)
            out = torch.full((rows, n), float("nan"), dtype=dt)
            launch(x, w1, w2, w3, gated, out, config=replace(default_config(gated, chunk=True), **cfg))
            err = rel_err(out, ref64(x, ws, gated))
            assert torch.isfinite(out).all(), (i, cfg, "unwritten output")
            assert err < TOL[dt], (i, cfg, err)
            print(f"chunk case {i} cfg={cfg}: rel_err {err:.2e}")
    print("interpreter cases passed")
    return 0


# rows, K, column widths, gated, dtype for the chunk tiling (64-row blocks): 1 row, a ragged 2.3 blocks,
# exactly two blocks; K ragged against both K tiles
CHUNK_CASES = [
    (1, 64, [48], "", torch.float32),
    (150, 100, [130, 16, 24], "", torch.float32),
    (128, 96, [33], "silu", torch.bfloat16),
    (70, 80, [140], "gelu_tanh", torch.float32),
]


def test_interpreted_kernel_matches_float64():
    run_interpreted(__file__)


@pytest.mark.parametrize(
    "shape,k,ns,gated,dtype",
    [
        ((1, 1), 64, [64], "", torch.float32),
        ((1, 5), 128, [64, 16, 16], "", torch.bfloat16),
        ((2, 8), 96, [40], "silu", torch.float32),
        ((1, 3), 80, [24], "gelu_tanh", torch.float16),
    ],
)
def test_cpu_impl_matches_float64(shape, k, ns, gated, dtype):
    x, ws = make(math.prod(shape), k, ns, dtype, seed=k, gated=gated)
    x = x.view(*shape, k)
    out = torch.ops.etspec.linear_rows(x, *ws, gated=gated)
    assert out.shape == (*shape, ns[0] if gated else sum(ns)) and out.dtype == dtype
    assert rel_err(out, ref64(x, ws, gated)) < TOL[dtype]


@pytest.mark.parametrize("rows,gated", [(1, ""), (300, ""), (257, "silu")])
def test_chunk_cpu_impl_takes_any_rows(rows, gated):
    x, ws = make(rows, 64, [40, 24], torch.bfloat16, seed=rows, gated=gated)
    out = torch.ops.etspec.linear_chunk(x.view(1, rows, 64), *ws, gated=gated)
    assert out.shape == (1, rows, 40 if gated else 64)
    assert rel_err(out, ref64(x, ws, gated).view(1, rows, -1)) < TOL[torch.bfloat16]


def test_chunk_bad_arguments_name_the_op():
    x, w = torch.randn(1, 3, 16), torch.randn(24, 16)
    with pytest.raises(RuntimeError, match=r"linear_chunk: weights must be \[N, K\]"):
        torch.ops.etspec.linear_chunk(x, w[:, :8])


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda x, w: torch.ops.etspec.linear_rows(x, w, gated="relu"), "gated must be"),
        (lambda x, w: torch.ops.etspec.linear_rows(x, w[:, :8]), r"weights must be \[N, K\]"),
        (lambda x, w: torch.ops.etspec.linear_rows(x, w.double()), "dtypes differ"),
        (lambda x, w: torch.ops.etspec.linear_rows(x, w, gated="silu"), "two weights of one shape"),
        (lambda x, w: torch.ops.etspec.linear_rows(x, w, w[:8], gated="silu"), "two weights of one shape"),
        (lambda x, w: torch.ops.etspec.linear_rows(x.repeat(1, 6, 1), w), f"at most {MAX_ROWS} rows"),
    ],
)
def test_bad_arguments_raise(call, match):
    x, w = torch.randn(1, 3, 16), torch.randn(24, 16)
    with pytest.raises(RuntimeError, match=match):
        call(x, w)


class _Mlp(torch.nn.Module):
    def __init__(self, op: str, h=32, inter=48):
        super().__init__()
        self.gate = torch.nn.Linear(h, inter, bias=False)
        self.up = torch.nn.Linear(h, inter, bias=False)
        self.down = torch.nn.Linear(inter, h, bias=False)
        self.op = getattr(torch.ops.etspec, op)

    def forward(self, x):
        g = self.op(x, self.gate.weight, self.up.weight, gated="silu")
        return self.op(g, self.down.weight)


@pytest.mark.parametrize("op,most", [("linear_rows", 8), ("linear_chunk", 300)])
def test_export_strict_keeps_one_node_per_call_with_dynamic_rows(op, most):
    torch.manual_seed(0)
    mod = _Mlp(op).eval().requires_grad_(False)
    m = torch.export.Dim("m", min=1, max=most)
    with torch.no_grad():
        ep = torch.export.export(mod, (torch.randn(1, 4, 32),), dynamic_shapes=({1: m},), strict=True)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function" and op in str(n.target)]
    assert len(nodes) == 2
    assert isinstance(nodes[0].meta["val"].shape[1], torch.SymInt)
    runner = ep.module()
    for rows in (1, most - 1):
        x = torch.randn(1, rows, 32)
        torch.testing.assert_close(runner(x), mod(x))
        want = torch.nn.functional.silu(mod.gate(x)) * mod.up(x) @ mod.down.weight.T
        torch.testing.assert_close(runner(x), want, rtol=1e-5, atol=1e-5)


if __name__ == "__main__":
    sys.exit(run_interp_cases())


def test_k_splits_only_where_they_paid():
    """On an H200 (132 SMs) the plan splits the 1B down projection alone (docs/kernels.md): the split
    count comes from the shape and the SM count, never from the row count."""
    h200 = {  # name: (column blocks, K tiles) under the default tiles
        "1b qkv": (96, 8),
        "1b o": (64, 8),
        "1b gate+up": (128, 16),
        "1b down": (64, 32),
        "8b qkv": (192, 16),
        "8b o": (128, 16),
        "8b gate+up": (224, 32),
        "8b down": (128, 56),
        "8b lm_head": (4008, 16),
    }
    assert {name: plan_split_k(b, t, 132) for name, (b, t) in h200.items()} == {
        **{name: 1 for name in h200},
        "1b down": 4,
    }
    assert plan_split_k(16, 64, 132) == 8  # capped
    assert plan_split_k(10, 40, 132) == 4  # 10 tiles per split; 8 splits would leave 5


@pytest.mark.parametrize("gated, lines", [("", 8), ("silu", 2)])
def test_prefetching_kernel_compiles_for_hopper(gated, lines):
    """The kernel with its L2 prefetch of the next weight (`launch(prefetch=...)`: inline PTX, which the
    interpreter cannot run) compiles through ptxas to an sm_90 cubin, and the prefetches survive into
    its PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from etspec.kernels.linear_rows import _linear_rows_kernel

    cfg = default_config(gated)
    ptrs = ("x_ptr", "w1_ptr", "w2_ptr", "w3_ptr", "out_ptr", "part_ptr", "pf_ptr")
    ints = ("M", "K", "K_SPLIT", "N1", "N2", "N3", "stride_xm", "stride_om", "PF_N", "PF_K")
    consts = {
        "SPLIT": 1,
        "GATES": 2 if gated else 1,
        "BLOCK_M": cfg.block_m,
        "BLOCK_N": cfg.block_n,
        "BLOCK_K": cfg.block_k,
        "ACT": 1 if gated else 0,
        "EVEN_K": True,
        "FP32_DOT": False,
        "UPCAST": False,
        "PF_LINES": lines,
        "PF_STEP": 64,
        "PF_ROWS": 16,
    }
    sig = {p: "*bf16" for p in ptrs} | {i: "i32" for i in ints} | {c: "constexpr" for c in consts}
    src = ASTSource(
        fn=_linear_rows_kernel,
        signature=sig,
        constexprs={(list(sig).index(c),): v for c, v in consts.items()},
    )
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": cfg.num_warps})
    assert compiled.asm["cubin"]
    assert "prefetch.global.L2" in compiled.asm["ptx"]
