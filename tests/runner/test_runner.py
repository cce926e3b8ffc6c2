"""etspec-run / SpeculativeGenerator on exported tiny pairs (XNNPACK through ExecuTorch)."""

from __future__ import annotations

import json

import pytest
import torch

from etspec.runner.cli import main as run_main
from etspec.runner.generator import ContextLimitError, SpeculativeGenerator
from etspec.runtime.program import Program
from tests.conftest import TINY_K, TINY_MAX_SEQ, exported_families
from tests.helpers import generate, random_prompt


@pytest.fixture(scope="module", params=exported_families())
def program(request, tiny_artifacts):
    with Program.load(tiny_artifacts(request.param)) as p:
        yield p


@pytest.mark.slow
def test_lossless_over_prompts_lengths_and_k(program):
    accepted = 0
    for plen, seed in [(1, 0), (2, 1), (15, 2), (16, 3), (17, 4), (40, 5), (63, 6)]:  # up to 4 prefill chunks
        prompt = random_prompt(plen, seed)
        ref, base_stats, _ = generate(program, prompt, 24, spec=False)
        assert base_stats.rounds == len(ref)
        assert len(ref) == 24 or (
            ref[-1] in program.manifest.eos_token_ids and base_stats.stop_reason == "eos"
        )
        for k in range(1, TINY_K + 1):
            out, stats, chunks = generate(program, prompt, 24, draft_len=k)
            assert out == ref, (plen, k)
            # every round commits j + 1 tokens (the last one may be cut by the budget)
            assert stats.generated == len(out) == sum(len(c) for c in chunks)
            assert [len(c) for c in chunks[:-1]] == [j + 1 for j in stats.accepted[:-1]]
            assert len(stats.histogram()) == k + 1 and sum(stats.histogram()) == stats.rounds
            accepted += sum(stats.accepted)
    assert accepted > 0


def test_eos_max_new_tokens_and_context_limit(program):
    prompt = random_prompt(9, 7)
    ref, _, _ = generate(program, prompt, 30, spec=False)
    gen = SpeculativeGenerator(program)
    gen.eos = {ref[10]}
    out = [t for c in gen.generate(prompt, 30) for t in c]
    assert out == ref[: ref.index(ref[10]) + 1] and gen.stats.stop_reason == "eos"
    out, stats, _ = generate(program, prompt, 5)
    assert out == ref[:5] and stats.stop_reason == "max_new_tokens"
    long = random_prompt(TINY_MAX_SEQ - TINY_K - 4, 8)  # room for 4 tokens
    a, sa, _ = generate(program, long, 50, spec=False)
    b, sb, _ = generate(program, long, 50)
    assert a == b and len(a) == 4 and sb.stop_reason == "context_limit"
    with pytest.raises(ContextLimitError, match="no room"):
        generate(program, random_prompt(TINY_MAX_SEQ - TINY_K, 9), 5)


VIEW_OPS = {"aten::as_strided", "aten::slice", "aten::select", "aten::alias", "aten::view"}
VIEW_OPS |= {"aten::resolve_conj", "aten::resolve_neg", "aten::detach"}


def test_steady_state_round_has_no_allocations_and_fixed_op_count(program):
    """Profile decode rounds: the runner's own work per round is a fixed, small set of ops that creates
    no tensors (CPU here: host tensors), i.e. its buffers are reused. Views cost no kernel and are left
    out of the count; ExecuTorch's pybindings return each output as a fresh tensor (clone), which is the
    executor's, not the runner's."""
    gen = SpeculativeGenerator(program)
    prompt = random_prompt(12, 10)
    it = gen.generate(prompt, 60)
    for _ in range(3):
        next(it)
    per_round = []
    for _ in range(6):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            next(it)
        ops = [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS]
        per_round.append(sorted(ops))
    counts = {name: per_round[0].count(name) for name in set(per_round[0])}
    print(f"runner ops per round (views excluded): {len(per_round[0])} {counts}")
    creators = {"aten::empty", "aten::zeros", "aten::arange", "aten::tensor", "aten::full", "aten::cat"}
    outputs = 3  # verify returns 2 tensors, draft 1
    for ops in per_round:
        assert not creators & set(ops), ops
        assert ops.count("aten::clone") <= outputs and ops.count("aten::empty_strided") <= outputs, ops
        assert len(ops) <= 20, ops


def test_simulated_acceptance_is_forced_and_labelled(tiny_artifacts, tmp_path, capsys):
    """Benchmark-only acceptance: rounds commit exactly the forced counts, and every output says so."""
    with Program.load(tiny_artifacts("llama")) as p:
        out, st, chunks = generate(p, random_prompt(9, 3), 60, simulate_acceptance=2.5)
        assert st.accepted[:6] == [1, 2, 1, 2, 1, 2] and abs(st.acceptance_length - 2.5) < 0.05
        assert [len(c) for c in chunks[:-1]] == [j + 1 for j in st.accepted[:-1]] and len(out) == 60
        assert st.simulated_acceptance == 2.5 and "SIMULATED ACCEPTANCE 2.5" in st.summary("x")
        ones, st1, _ = generate(p, random_prompt(9, 3), 20, simulate_acceptance=1.0)
        assert set(st1.accepted) == {0} and st1.rounds == 20
        full, st4, _ = generate(p, random_prompt(9, 3), 20, simulate_acceptance=TINY_K + 1)
        assert set(st4.accepted[:-1]) == {TINY_K}
        with pytest.raises(ValueError, match="speculative decoding only"):
            SpeculativeGenerator(p, spec=False, simulate_acceptance=2.0)
    stats = tmp_path / "sim.json"
    argv = ["--model", str(tiny_artifacts("llama")), "--prompt", "Hello", "--max-new-tokens", "12"]
    assert run_main(argv + ["--simulate-acceptance", "3", "--stats-json", str(stats), "--quiet"]) == 0
    assert "SIMULATED ACCEPTANCE 3.0" in capsys.readouterr().err
    assert json.loads(stats.read_text())["speculative"]["simulated_acceptance"] == 3.0


def test_cli_compare_and_stats(tiny_artifacts, tmp_path, capsys):
    art = tiny_artifacts("llama")
    stats = tmp_path / "stats.json"
    argv = ["--model", str(art), "--prompt", "Hello tiny model", "--max-new-tokens", "20", "--compare"]
    assert run_main(argv + ["--stats-json", str(stats)]) == 0
    captured = capsys.readouterr()
    assert "outputs identical: True" in captured.err
    report = json.loads(stats.read_text())
    assert report["identical"] and report["speculative"]["generated"] == 20
    assert report["speculative"]["acceptance_length"] >= 1.0 and report["prompt_tokens"] == 16
    assert (
        run_main(["--model", str(art), "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--quiet"]) == 0
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft-len", "9"], "--draft-len must be between 1 and the exported 3"),
        (["--cuda-graph"], "--cuda-graph needs a CUDA artifact"),
        (["--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
        (["--prompt-file", "/nonexistent"], "no such file"),
        (["--prompt", "x" * 200], "the prompt has 200 tokens"),
        (["--simulate-acceptance", "2", "--no-spec"], "goes with speculative runs only"),
        (["--simulate-acceptance", "4.5"], "--simulate-acceptance must be between 1 and k+1 = 4"),
    ],
)
def test_cli_errors(tiny_artifacts, capsys, extra, message):
    argv = ["--model", str(tiny_artifacts("llama"))]
    if not any(a.startswith("--prompt") for a in extra):
        argv += ["--prompt", "hi"]
    assert run_main(argv + extra) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_artifact(tmp_path, capsys):
    assert run_main(["--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
