"""GPU tests of etspec::linear_rows (run on the GPU box): the projections of the Llama-3.2-1B and
Llama-3.1-8B shapes and their EAGLE-3 heads against float64, every row count 1..16, poisoned outputs,
row independence (a row's bits do not depend on the other rows: target-only and speculative decoding
must agree), and CUDA-graph replay; etspec::linear_chunk (the same kernel in 64-row blocks) on prefill
chunks of those shapes, and both ops lowered through the CUDA partitioner."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.linear_rows import MAX_ROWS, default_config, launch
from tests.kernels.test_linear_rows import TOL, make, ref64, rel_err

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

BF16 = torch.bfloat16
TOL_GPU = {**TOL, torch.float32: 1e-4}  # fp32 dots run in full precision ("ieee"), not tf32


def _shapes(h: int, kv: int, inter: int, vocab: int) -> list[tuple[int, list[int], str]]:
    """(K, column widths, gated) of one layer's calls: qkv, o, gate+up, down, lm_head, draft fc/qkv."""
    return [
        (h, [h, kv, kv], ""),
        (h, [h], ""),
        (h, [inter], "silu"),
        (inter, [h], ""),
        (h, [vocab], ""),
        (3 * h, [h], ""),
        (2 * h, [h, kv, kv], ""),
    ]


CASES = [(k, ns, g, m, BF16) for k, ns, g in _shapes(2048, 512, 8192, 128256) for m in (1, 5)]
CASES += [(k, ns, g, m, BF16) for k, ns, g in _shapes(4096, 1024, 14336, 32000) for m in (1, 8)]
CASES += [
    (4096, [14336], "gelu_tanh", 3, BF16),
    (1000, [333, 77], "", 16, BF16),  # ragged K and N
    (2048, [2048], "", 7, torch.float16),
    (512, [256, 64, 64], "", 4, torch.float32),
    (640, [1000], "silu", 2, torch.float32),
]


@pytest.mark.parametrize("k,ns,gated,m,dtype", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_matches_float64(k, ns, gated, m, dtype):
    x, ws = make(m, k, ns, dtype, seed=k + m if gated else k + m + sum(ns), gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    w1, w2, w3 = (ws + [None, None])[:3]
    n = ns[0] if gated else sum(ns)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    launch(x, w1, w2, w3, gated, out)
    assert torch.isfinite(out).all(), "unwritten output"
    assert rel_err(out, ref64(x, ws, gated)) < TOL_GPU[dtype]
    # the op itself (allocates its output; [1, m, K] like the models' calls)
    got = torch.ops.etspec.linear_rows(x.view(1, m, k), *ws, gated=gated)
    assert got.shape == (1, m, n)
    torch.testing.assert_close(got[0], out, rtol=0, atol=0)


CHUNK_CASES = [(k, ns, g, m, BF16) for k, ns, g in _shapes(2048, 512, 8192, 128256)[:4] for m in (256, 37)]
CHUNK_CASES += [(k, ns, g, 256, BF16) for k, ns, g in _shapes(4096, 1024, 14336, 32000)[:4]]
CHUNK_CASES += [
    (1000, [333, 77], "", 129, BF16),  # ragged K, N and rows
    (5376, [21504], "gelu_tanh", 200, BF16),  # Gemma-4-31B gate+up
    (512, [256, 64, 64], "", 100, torch.float32),
    (640, [1000], "silu", 3, torch.float32),
]


@pytest.mark.parametrize("k,ns,gated,m,dtype", CHUNK_CASES, ids=lambda v: str(v).replace(" ", ""))
def test_chunk_matches_float64(k, ns, gated, m, dtype):
    x, ws = make(m, k, ns, dtype, seed=k + m, gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    w1, w2, w3 = (ws + [None, None])[:3]
    n = ns[0] if gated else sum(ns)
    out = torch.full((m, n), float("nan"), dtype=dtype, device="cuda")
    launch(x, w1, w2, w3, gated, out, config=default_config(gated, chunk=True))
    assert torch.isfinite(out).all(), "unwritten output"
    assert rel_err(out, ref64(x, ws, gated)) < TOL_GPU[dtype]
    got = torch.ops.etspec.linear_chunk(x.view(1, m, k), *ws, gated=gated)
    torch.testing.assert_close(got[0], out, rtol=0, atol=0)


@pytest.mark.parametrize(
    "k,ns,gated,m,split",
    [
        (14336, [4096], "", 8, 2),
        (4096, [4096], "", 1, 8),
        (4096, [14336], "silu", 5, 4),
        (1000, [333, 77], "", 16, 3),  # ragged K: the last split ends in a partial tile
        (8192, [2048], "gelu_tanh", 2, 8),
    ],
)
def test_k_splits_match_float64(k, ns, gated, m, split):
    """Explicit K splits (the op plans its own from the shape): partials and their fixed-order sum."""
    x, ws = make(m, k, ns, BF16, seed=split + m, gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    w1, w2, w3 = (ws + [None, None])[:3]
    out = torch.full((m, ns[0] if gated else sum(ns)), float("nan"), dtype=BF16, device="cuda")
    launch(x, w1, w2, w3, gated, out, config=replace(default_config(gated), split_k=split))
    assert torch.isfinite(out).all(), "unwritten output"
    assert rel_err(out, ref64(x, ws, gated)) < TOL_GPU[BF16]


@pytest.mark.parametrize(
    "k,ns,gated",
    [(2048, [2048, 512, 512], ""), (2048, [8192], "silu"), (8192, [2048], ""), (14336, [4096], "")],
)
def test_rows_are_independent_bit_for_bit(k, ns, gated):
    """Each row's result is identical whatever the other rows are and however many there are (the 1B
    down shape, K 8192 -> 2048, runs with planned K splits)."""
    x, ws = make(MAX_ROWS, k, ns, BF16, seed=1, gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    full = torch.ops.etspec.linear_rows(x, *ws, gated=gated)
    for m in range(1, MAX_ROWS + 1):
        part = torch.ops.etspec.linear_rows(x[:m].clone(), *ws, gated=gated)
        assert torch.equal(part, full[:m]), f"M={m}"
    y = x.clone()
    y[1:] = torch.randn_like(y[1:])
    assert torch.equal(torch.ops.etspec.linear_rows(y, *ws, gated=gated)[0], full[0])


def test_cuda_graph_replay():
    x, ws = make(5, 4096, [4096, 1024, 1024], BF16, seed=2)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    out = torch.empty(5, 6144, dtype=BF16, device="cuda")
    launch(x, *ws, "", out)  # compile outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        launch(x, *ws, "", out)
    for seed in range(3):
        x.copy_(torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(BF16))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        assert rel_err(out, ref64(x, ws)) < TOL_GPU[BF16]


@pytest.mark.parametrize(
    "k,ns,gated,nxt", [(4096, [4096, 1024, 1024], "", (4096, 4096)), (2048, [8192], "silu", (2048, 8192))]
)
@pytest.mark.parametrize("mib", [1, 8, 64])
def test_prefetch_changes_no_result(k, ns, gated, nxt, mib):
    """With the next weight's L2 prefetch (sizes from a few lines per row to the whole next weight), the
    result is the one without it, bit for bit, eager and replayed from a CUDA graph."""
    x, ws = make(6, k, ns, BF16, seed=3, gated=gated)
    x, ws = x.cuda(), [w.cuda() for w in ws]
    w1, w2, w3 = (ws + [None, None])[:3]
    nxt_w = torch.randn(nxt, dtype=BF16, device="cuda")
    n = ns[0] if gated else sum(ns)
    want = launch(x, w1, w2, w3, gated, torch.empty(6, n, dtype=BF16, device="cuda"))
    out = torch.full((6, n), float("nan"), dtype=BF16, device="cuda")
    assert torch.equal(launch(x, w1, w2, w3, gated, out, prefetch=nxt_w, prefetch_bytes=mib << 20), want)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        launch(x, w1, w2, w3, gated, out, prefetch=nxt_w, prefetch_bytes=mib << 20)
    out.fill_(float("nan"))
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, want)


class _Rows(torch.nn.Module):
    """A 1B down projection (planned with K splits under linear_rows) and an MLP's gate+up, as the models
    call the op `op`."""

    def __init__(self, op: str):
        super().__init__()
        fixed = lambda w: torch.nn.Parameter(w.cuda(), requires_grad=False)
        (d,), (g, u) = make(1, 8192, [2048], BF16, seed=7)[1], make(1, 2048, [4096], BF16, 8, "silu")[1]
        self.d, self.g, self.u = fixed(d), fixed(g), fixed(u)
        self.op = getattr(torch.ops.etspec, op)

    def forward(self, x):
        y = self.op(x, self.d)
        return self.op(y, self.g, self.u, gated="silu")


@pytest.mark.parametrize("op,most", [("linear_rows", MAX_ROWS), ("linear_chunk", 256)])
def test_lowered_through_cuda_partitioner_matches_eager(tmp_path, op, most):
    """AOTInductor compiles the op body (both kernels, the partials planned inside) into the delegate,
    with a dynamic row count, and the delegate gives the eager op's result."""
    from tests.kernels.aoti_helpers import AotiMethod, delegate_input_order, lower_for_cuda, named_blobs

    model = _Rows(op).eval()
    dm = torch.export.Dim("m", min=1, max=most)
    x = torch.randn(1, 5, 8192, device="cuda").to(BF16)
    with torch.no_grad():
        ep = torch.export.export(model, (x,), dynamic_shapes=({1: dm},), strict=True)
    pte = lower_for_cuda(ep, "rows", str(tmp_path))
    program, blobs = named_blobs(pte, str(tmp_path))
    so = next(v for k, v in blobs.items() if k.endswith("so_blob"))
    weights = next(v for k, v in blobs.items() if k.endswith("weights_blob"))
    meth = AotiMethod(so, weights)
    try:
        assert delegate_input_order(program, meth.ni) == [0]
        for m in sorted({1, 3, 8, most, max(1, most - 61)}):
            x = torch.randn(1, m, 8192, device="cuda").to(BF16)
            got = meth(x)[0]
            want = model(x)
            assert got.shape == want.shape == (1, m, 4096)
            assert torch.isfinite(got).all()
            assert rel_err(got, want.double()) < TOL_GPU[BF16], m
    finally:
        meth.close()
