"""GPU: lossless speculative sampling from a CUDA artifact, eager and with CUDA graphs.

The small-vocabulary pair (fixtures.tiny) exported with `--backend cuda --sampling` in fp32 (the verify
kernels on), so the compiled distributions and transformers' float64 ones agree to rounding.
Distribution checks are chi-square tests at p = 1e-6 over 20 000 seeded runs, as on the CPU
(tests/runner/test_sampling.py). The CUDA program finds the top-k / top-p thresholds by interval search
(the ExecuTorch CUDA backend has no sort kernel), the CPU one by sorting: both must give the target's
distribution.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from etspec.export.cli import main as export_main
from etspec.runtime.program import Program
from tests.conftest import TINY_CHUNK, TINY_K, TINY_MAX_SEQ
from tests.export.pte_walk import describe_program
from tests.helpers import generate
from tests.sampling_reference import ALPHA, distribution_p_value, exact_first_two, sample_first_two

pytestmark = [pytest.mark.cuda, pytest.mark.slow]
RUNS = 20_000
PROMPT = [12, 6, 20]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from etspec.fixtures.tiny import write_small_vocab_pair

    root = Path(os.environ.get("ETSPEC_CUDA_ART_CACHE") or tmp_path_factory.mktemp("cuda_art"))
    ckpt, out = root / "small-vocab-ckpt", root / "small-vocab-sampling"
    if not (out / "manifest.json").is_file() or not (ckpt / "target").is_dir():
        target, draft = write_small_vocab_pair(ckpt)
        argv = ["--target", str(target), "--draft", str(draft), "--out", str(out), "--backend", "cuda"]
        argv += ["--dtype", "fp32", "--max-seq-len", str(TINY_MAX_SEQ), "--sampling", "--force"]
        argv += ["--max-prefill-chunk", str(TINY_CHUNK), "--draft-len", str(TINY_K)]
        t0 = time.perf_counter()
        assert export_main(argv) == 0
        print(f"cuda sampling export took {time.perf_counter() - t0:.1f}s")
    with Program.load(out) as program:
        yield program, ckpt / "target", out


@pytest.fixture(scope="module")
def hf_target(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pair[1])).eval()


def test_sampled_methods_are_cuda_delegates(pair):
    program, _, out = pair
    info = describe_program(out / "model.pte", [out / "aoti_cuda_blob.ptd"])
    for name in ("target_verify_sample", "draft_sample"):
        assert info["methods"][name]["delegates"] == ["CudaBackend"], info["methods"][name]
    assert program.manifest.sampling and program.manifest.midm_sdpa


@pytest.mark.parametrize(
    "graph,spec,temperature,kw,k",
    [
        (False, True, 0.6, {"top_p": 0.8, "top_k": 8}, 3),
        (True, True, 1.0, {}, 1),
        (True, False, 1.0, {"top_p": 0.8, "top_k": 8}, None),
    ],
    ids=["eager-spec-filtered-k3", "graphs-spec-k1", "graphs-target-only-filtered"],
)
def test_sampling_matches_target_distribution(pair, hf_target, graph, spec, temperature, kw, k):
    program = pair[0]
    eos = set(program.manifest.eos_token_ids)
    exact = exact_first_two(hf_target, PROMPT, temperature, kw.get("top_p", 1.0), kw.get("top_k", 0), eos)
    extra = {"draft_len": k} if spec else {"spec": False}
    t0 = time.perf_counter()
    counts, accepted = sample_first_two(
        program, PROMPT, RUNS, seed=3, temperature=temperature, cuda_graph=graph, **extra, **kw
    )
    print(f"{RUNS} runs in {time.perf_counter() - t0:.1f}s, {accepted} drafts accepted")
    assert distribution_p_value(exact, counts) > ALPHA
    if spec:
        assert accepted > RUNS // 10


def test_seeded_runs_repeat_and_graphs_equal_eager(pair):
    from etspec.runner.sampling import Sampling

    program = pair[0]
    for prompt in ([5], PROMPT, list(range(3, 23))):
        for spec in (True, False):
            runs = [
                generate(
                    program, prompt, 32, spec=spec, cuda_graph=g, sampling=Sampling(0.9, 0.95, 0, seed=s)
                )[0]
                for g, s in ((False, 1), (False, 1), (True, 1), (False, 2))
            ]
            assert runs[0] == runs[1] == runs[2], (prompt, spec)
            assert runs[0] != runs[3]
            greedy = generate(program, prompt, 32, spec=spec)[0]
            cold = generate(program, prompt, 32, spec=spec, cuda_graph=True, sampling=Sampling(1e-4, seed=0))[
                0
            ]
            assert cold == greedy, (prompt, spec)
