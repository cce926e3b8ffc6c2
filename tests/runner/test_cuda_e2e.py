"""GPU: `etspec-export --backend cuda` of the tiny pair, run by the CUDA executor and the runner.

Each artifact (etspec's kernels on, off, and on with linear_chunk and sdpa_chunk for the many-row
calls) is exported once per session (set ETSPEC_CUDA_ART_CACHE to keep them between runs). fp32 so
that the compiled program and the eager model agree on every argmax; the bf16 path is exercised by the
benchmarks and tests/kernels.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from etspec.export.cli import main as export_main
from etspec.models.checkpoint import load_speculator
from etspec.models.greedy import speculative_greedy, target_greedy
from etspec.models.layers import ALL_KERNELS, FewRowsKernels
from etspec.runner.generator import SpeculativeGenerator
from etspec.runtime.program import Program
from tests.conftest import TINY_CHUNK, TINY_K, TINY_MAX_SEQ
from tests.export.pte_walk import describe_program
from tests.helpers import generate, random_prompt
from tests.recorder import Recorder

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

NO_KERNELS = ["--no-midm-sdpa", "--no-linear-rows", "--no-reduction-kernels"]
# each artifact's export flags and the kernels its eager twin runs
ARTS = {
    "midm": ([], ALL_KERNELS),
    "no-midm": (NO_KERNELS, FewRowsKernels()),
    "chunk": (["--linear-chunk", "--sdpa-chunk"], replace(ALL_KERNELS, linear_chunk=True, sdpa_chunk=True)),
}


@pytest.fixture(scope="module", params=list(ARTS))
def cuda_art(request, tiny_checkpoints, tmp_path_factory):
    target, draft = tiny_checkpoints("llama")
    root = Path(os.environ.get("ETSPEC_CUDA_ART_CACHE") or tmp_path_factory.mktemp("cuda_art"))
    out = root / request.param
    if not (out / "manifest.json").is_file():
        argv = ["--target", str(target), "--draft", str(draft), "--out", str(out), "--backend", "cuda"]
        argv += ["--dtype", "fp32", "--max-seq-len", str(TINY_MAX_SEQ), "--force"]
        argv += ["--max-prefill-chunk", str(TINY_CHUNK), "--draft-len", str(TINY_K)]
        t0 = time.perf_counter()
        assert export_main(argv + ARTS[request.param][0]) == 0
        print(f"[{request.param}] cuda export took {time.perf_counter() - t0:.1f}s")
    return target, draft, out, ARTS[request.param][1]


def test_artifact_files_and_delegates(cuda_art):
    _, _, out, kernels = cuda_art
    files = {f.name: f.stat().st_size for f in out.iterdir()}
    print("artifact:", files)
    assert {"model.pte", "aoti_cuda_blob.ptd", "manifest.json", "tokenizer.json"} <= set(files)
    info = describe_program(out / "model.pte", [out / "aoti_cuda_blob.ptd"])
    for name in ("prefill", "target_verify", "draft"):
        assert info["methods"][name]["delegates"] == ["CudaBackend"], info["methods"][name]
    with Program.load(out) as p:
        m = p.manifest
        assert m.backend == "cuda"
        got = FewRowsKernels(m.midm_sdpa, m.linear_rows, m.reduction_kernels, m.linear_chunk, m.sdpa_chunk)
        assert got == kernels


def test_rounds_match_eager(cuda_art):
    """20+ rounds of the docs/design.md §4 protocol, every call compared with the eager model (ids exact)."""
    target, draft, out, kernels = cuda_art
    eager = load_speculator(target, draft, TINY_MAX_SEQ, TINY_K, kernels=kernels, device="cuda")
    with Program.load(out) as program:
        torch.cuda.reset_peak_memory_stats()
        rec = Recorder(program, eager, atol=2e-3)
        for plen, seed in [(5, 0), (37, 1)]:  # 37: a three-chunk prefill
            prompt = random_prompt(plen, seed)
            spec = speculative_greedy(rec, prompt, 40, chunk=TINY_CHUNK)
            base = target_greedy(rec, prompt, 40, chunk=TINY_CHUNK)
            assert spec.tokens == base.tokens
            assert spec.rounds >= 10
        assert rec.calls > 60


def test_prefill_kv_is_seen_by_verify(cuda_art):
    """Shared KV: target_verify after prefill of prompt A and of prompt B (same last token, same
    position) must differ, as the cache written by prefill differs."""
    _, _, out, _ = cuda_art
    with Program.load(out) as p:
        prefill, verify = p.method("prefill"), p.method("target_verify")
        win = torch.zeros(TINY_MAX_SEQ, dtype=torch.int8, device="cuda")
        pos = torch.arange(TINY_MAX_SEQ, device="cuda")
        feats = []
        for seed in (0, 1):
            toks = torch.randint(3, 256, (1, 12), generator=torch.Generator().manual_seed(seed)).cuda()
            prefill(toks, pos[:12], win[:12])
            _, f = verify(torch.tensor([[7]], device="cuda"), pos[12:13], win[:13])
            feats.append(f.clone())
        assert not torch.allclose(feats[0], feats[1])


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager", "graph"])
def test_runner_lossless(cuda_art, cuda_graph):
    _, _, out, _ = cuda_art
    with Program.load(out) as program:
        accepted = 0
        for plen, seed in [(1, 0), (16, 1), (17, 2), (45, 3)]:
            prompt = random_prompt(plen, seed)
            ref, _, _ = generate(program, prompt, 32, spec=False)
            for k in range(1, TINY_K + 1):
                got, stats, _ = generate(program, prompt, 32, draft_len=k, cuda_graph=cuda_graph)
                assert got == ref, (plen, k, cuda_graph)
                accepted += sum(stats.accepted)
            base, _, _ = generate(program, prompt, 32, spec=False, cuda_graph=cuda_graph)
            assert base == ref
        assert accepted > 0


def test_graph_replay_equals_eager_per_call(cuda_art):
    _, _, out, _ = cuda_art
    with Program.load(out) as program:
        eager = program.method("target_verify")
        graphed = program.method("target_verify", cuda_graph=True)
        prefill = program.method("prefill")
        win = torch.zeros(TINY_MAX_SEQ, dtype=torch.int8, device="cuda")
        pos = torch.arange(TINY_MAX_SEQ, device="cuda")
        toks = torch.randint(3, 256, (1, 40), generator=torch.Generator().manual_seed(5)).cuda()
        prefill(toks[:, :16], pos[:16], win[:16])
        prefill(toks[:, 16:32], pos[16:32], win[:32])
        for n in range(32, 38):  # the same bucket-sized window while the valid length grows
            block = toks[:, n - 32 : n - 28]
            a = [t.clone() for t in eager(block, pos[n : n + 4], win[:64])]
            b = [t.clone() for t in graphed(block, pos[n : n + 4], win[:64])]
            assert torch.equal(a[0], b[0])
            torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)


def test_out_of_vocab_ids_refused_before_any_launch(cuda_art, monkeypatch):
    """An id outside the vocabulary would make the embedding gather read out of bounds on the GPU: the
    runner and the checked method refuse it before any kernel is launched."""
    _, _, out, _ = cuda_art
    with Program.load(out) as program:
        vocab = program.manifest.vocab_size
        launches: list[str] = []
        open_method = program._executor.method

        def counting(name: str):
            run = open_method(name)
            return lambda *inputs: launches.append(name) or run(*inputs)

        monkeypatch.setattr(program._executor, "method", counting)
        gen = SpeculativeGenerator(program)
        for bad in ([5, vocab], [-1, 5], [2**64]):
            with pytest.raises(ValueError, match="outside the vocabulary"):
                next(gen.generate(bad, 4))
        checked = program.method("prefill")
        tokens = torch.tensor([[5, vocab + 7]], device="cuda")
        with pytest.raises(ValueError, match="outside the vocabulary"):
            checked(tokens, torch.arange(2, device="cuda"), torch.zeros(2, dtype=torch.int8, device="cuda"))
        torch.cuda.synchronize()
        assert launches == []


def test_gemma4_k_eq_v_rounds_match_eager(tiny_checkpoints, tmp_path):
    """The tiny Gemma 4 pair exported for CUDA with the few-rows kernels: its K = V full layers cache one
    tensor and verify through etspec::sdpa_midm_shared_kv, its sliding layers through etspec::sdpa_midm
    over ring caches (window + 2 x 16 rows, wrapped by the 57 positions of a run), inside the
    AOTInductor program; every call of a speculative and a target-only run equals eager (full-length
    caches), and the runner with graphs equals target-only."""
    target, draft = tiny_checkpoints("gemma4_text")
    out = tmp_path / "gemma4"
    argv = ["--target", str(target), "--draft", str(draft), "--out", str(out), "--backend", "cuda"]
    argv += ["--dtype", "fp32", "--max-seq-len", str(TINY_MAX_SEQ), "--force"]
    argv += ["--max-prefill-chunk", str(TINY_CHUNK), "--draft-len", str(TINY_K)]
    assert export_main(argv) == 0
    both = ALL_KERNELS
    eager = load_speculator(target, draft, TINY_MAX_SEQ, TINY_K, kernels=both, device="cuda")
    full = eager.target.layers[2].self_attn
    assert full.k_cache is None and full.shared_kv and full.use_sdpa_midm
    sliding = eager.target.layers[0].self_attn
    assert sliding.window and sliding.use_sdpa_midm
    with Program.load(out) as program:
        rec = Recorder(program, eager, atol=2e-3)
        prompt = random_prompt(37, 3)  # a three-chunk prefill
        spec = speculative_greedy(rec, prompt, 20, chunk=TINY_CHUNK)
        assert spec.tokens == target_greedy(rec, prompt, 20, chunk=TINY_CHUNK).tokens
        assert rec.calls > 20
        ref, _, _ = generate(program, prompt, 24, spec=False)
        got, _, _ = generate(program, prompt, 24, cuda_graph=True)
        assert got == ref
