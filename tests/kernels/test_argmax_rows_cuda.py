"""GPU tests of etspec::argmax_rows (run on the GPU box): the vocabularies of Llama 3 (128256), an
EAGLE-3 draft (32000) and Gemma (262144), every row count 1..16, ties and NaN against torch.argmax,
poisoned outputs and CUDA-graph replay."""

from __future__ import annotations

import pytest
import torch

from etspec.kernels import register_ops
from etspec.kernels.argmax_rows import launch
from tests.kernels.test_argmax_rows import make, with_ties

register_ops()

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]


@pytest.mark.parametrize("vocab", [128256, 32000, 262144, 1000])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_argmax(vocab, dtype):
    for rows in range(1, 17):
        x = with_ties(make(rows, vocab, dtype, seed=vocab + rows)).cuda()
        out = torch.full((rows,), -1, dtype=torch.int64, device="cuda")
        launch(x, out)
        assert torch.equal(out, torch.argmax(x, dim=-1)), rows
        assert torch.equal(torch.ops.etspec.argmax_rows(x[None]), torch.argmax(x[None], dim=-1))


def test_nan_counts_as_the_maximum():
    x = make(3, 128256, torch.bfloat16, seed=0).cuda()
    x[1, 70000] = float("nan")
    assert torch.equal(torch.ops.etspec.argmax_rows(x), torch.argmax(x, dim=-1))


def test_cuda_graph_replay():
    static = make(5, 128256, torch.bfloat16, seed=1).cuda()
    torch.ops.etspec.argmax_rows(static)  # compile outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ids = torch.ops.etspec.argmax_rows(static)
    for seed in (2, 3):
        x = make(5, 128256, torch.bfloat16, seed=seed).cuda()
        static.copy_(x)
        graph.replay()
        assert torch.equal(ids, torch.argmax(x, dim=-1))
