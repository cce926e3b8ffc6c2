"""Lossless speculative sampling end to end: the XNNPACK program's sampled output distribution against the
exact target-only distribution (enumerated from transformers' float64 logits), reproducibility, the
greedy limit and the flags.

Each distribution check is a chi-square test at p = 1e-6 over 20 000 seeded runs (false failure: below
1e-5 for the whole module); the first two generated tokens form the cells (24 x 24 on the small-vocabulary
pair, EOS ends a sequence)."""

from __future__ import annotations

import pytest

from etspec.runner.cli import main as run_main
from etspec.runtime.program import Program
from tests.helpers import generate
from tests.sampling_reference import ALPHA, distribution_p_value, exact_first_two, sample_first_two

RUNS = 20_000
FILTERS = {"none": {}, "top-p 0.8, top-k 8": {"top_p": 0.8, "top_k": 8}}
PROMPTS = {1: [5], 3: [12, 6, 20]}  # k = 1 starts from a one-token prompt (a one-row first step)


@pytest.fixture(scope="module")
def pair(small_vocab_artifact):
    art, target = small_vocab_artifact
    with Program.load(art) as program:
        yield program, target


@pytest.fixture(scope="module")
def hf_target(pair):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(pair[1])).eval()


@pytest.mark.first
@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("filters", list(FILTERS))
@pytest.mark.parametrize("temperature", [0.6, 1.0])
def test_speculative_sampling_matches_target_distribution(pair, hf_target, temperature, filters, k):
    program, _ = pair
    prompt, kw = PROMPTS[k], FILTERS[filters]
    eos = set(program.manifest.eos_token_ids)
    exact = exact_first_two(hf_target, prompt, temperature, kw.get("top_p", 1.0), kw.get("top_k", 0), eos)
    counts, accepted = sample_first_two(
        program, prompt, RUNS, seed=k, temperature=temperature, draft_len=k, **kw
    )
    assert distribution_p_value(exact, counts) > ALPHA
    assert accepted > RUNS // 10, "the head must get drafts accepted, or the accept path goes untested"


@pytest.mark.slow
@pytest.mark.parametrize("temperature,filters", [(1.0, "none"), (0.6, "top-p 0.8, top-k 8")])
def test_target_only_sampling_matches_target_distribution(pair, hf_target, temperature, filters):
    program, _ = pair
    kw = FILTERS[filters]
    prompt = PROMPTS[3]
    eos = set(program.manifest.eos_token_ids)
    exact = exact_first_two(hf_target, prompt, temperature, kw.get("top_p", 1.0), kw.get("top_k", 0), eos)
    counts, _ = sample_first_two(program, prompt, RUNS, seed=7, temperature=temperature, spec=False, **kw)
    assert distribution_p_value(exact, counts) > ALPHA


def test_a_wrong_draft_distribution_is_caught(pair, hf_target, monkeypatch):
    """The check has power: verifying against placeholder draft distributions (zeros, so every draft is
    accepted) must fail it."""
    from etspec.runner.generator import SpeculativeGenerator

    program, _ = pair
    real = SpeculativeGenerator._draft

    def wrong_probs(self, *args):
        drafts = real(self, *args)
        self._draft_probs = self._rand.no_drafts
        return drafts

    monkeypatch.setattr(SpeculativeGenerator, "_draft", wrong_probs)
    exact = exact_first_two(hf_target, PROMPTS[3], 1.0, 1.0, 0, set(program.manifest.eos_token_ids))
    counts, _ = sample_first_two(program, PROMPTS[3], 4000, seed=3, temperature=1.0)
    assert distribution_p_value(exact, counts) < ALPHA


@pytest.mark.parametrize("spec", [True, False])
def test_same_seed_same_output_and_the_greedy_limit(pair, spec):
    program, _ = pair
    prompt = PROMPTS[3]
    greedy, _, _ = generate(program, prompt, 24, spec=spec)
    from etspec.runner.sampling import Sampling

    runs = [generate(program, prompt, 24, spec=spec, sampling=Sampling(1.0, seed=s))[0] for s in (11, 11, 12)]
    assert runs[0] == runs[1] and runs[0] != runs[2]
    cold, stats, _ = generate(program, prompt, 24, spec=spec, sampling=Sampling(1e-4, seed=0))
    assert cold == greedy  # T -> 0: every draw is the argmax
    if spec:
        assert stats.acceptance_length > 1.2  # drafts get accepted at the greedy limit too


def _cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = run_main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_sampling_flags(pair, tiny_artifacts, capsys):
    art = str(pair[0].directory)
    base = ["--model", art, "--prompt-ids", "5,7,9", "--max-new-tokens", "12"]
    code, out1, err = _cli(base + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"], capsys)
    assert code == 0 and "sampled at temperature 0.8, top-p 0.9; seed 5" in err
    code, out2, _ = _cli(base + ["--temperature", "0.8", "--top-p", "0.9", "--seed", "5"], capsys)
    assert code == 0 and out1 == out2
    code, _, err = _cli(base + ["--temperature", "0.8", "--compare"], capsys)
    assert code == 0 and "not expected to be equal" in err
    for bad, msg in [
        (["--top-p", "0.9"], "need a --temperature > 0"),
        (["--temperature", "-1"], "--temperature must be a finite number >= 0"),
        (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--temperature", "1", "--top-k", "-2"], "--top-k must be an integer >= 0"),
        (["--seed", "3"], "--seed: decoding is greedy"),
    ]:
        code, _, err = _cli(base + bad, capsys)
        assert code == 2 and msg in err and "Traceback" not in err, (bad, err)
    greedy_only = str(tiny_artifacts("llama"))
    code, _, err = _cli(["--model", greedy_only, "--prompt-ids", "5,7", "--temperature", "0.7"], capsys)
    assert code == 2 and "re-export it with etspec-export --sampling" in err
