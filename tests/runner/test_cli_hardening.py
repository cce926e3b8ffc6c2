"""etspec-run as a careless user drives it: one clear line and exit 2 for every mistake, caught before
the program loads where the manifest suffices; honest streaming; stats that tell the whole story."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import etspec.runner.cli as cli
from etspec.runner.cli import build_parser
from etspec.runner.cli import main as run_main
from etspec.runner.text import decode, load_tokenizer
from tests.conftest import TINY_K, TINY_MAX_SEQ


@pytest.fixture
def art(tiny_artifacts):
    return tiny_artifacts("llama")


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if the program is loaded: the error must come from the manifest alone."""

    def refuse(*a, **k):
        raise AssertionError("Program.load ran before the error")

    monkeypatch.setattr(cli.Program, "load", refuse)


def _error(capsys, argv) -> str:
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("etspec-run: error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-ids", "1,999999"], "token id 999999 is outside the vocabulary [0, 256)"),
        (["--prompt-ids=-1,5"], "token id -1 is outside the vocabulary"),
        (["--prompt-ids", str(2**64)], f"token id {2**64} is outside the vocabulary"),
        (["--prompt-ids", "1,2", "--chat"], "--prompt-ids are already tokens"),
        (["--prompt", "hi", "--no-spec", "--draft-len", "2"], "--no-spec drafts nothing"),
        (["--prompt", "hi", "--seed", "3"], "--seed: decoding is greedy"),
        (["--prompt", "hi", "--draft-len", "9"], f"--draft-len must be between 1 and the exported {TINY_K}"),
        (["--prompt", "hi", "--simulate-acceptance", "9"], "--simulate-acceptance must be between 1 and k+1"),
        (["--prompt", "hi", "--cuda-graph"], "--cuda-graph needs a CUDA artifact"),
        (["--prompt", "x" * TINY_MAX_SEQ], f"the prompt has {TINY_MAX_SEQ} tokens"),
        (["--prompt-ids", ",".join(["5"] * (TINY_MAX_SEQ - TINY_K))], "shorten the prompt"),
    ],
)
def test_mistakes_caught_before_the_program_loads(art, capsys, no_load, extra, message):
    assert message in _error(capsys, ["--model", str(art), *extra])


def test_prompt_file_and_stats_file_mistakes(art, tmp_path, capsys, no_load):
    base = ["--model", str(art)]
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    assert "not UTF-8 text" in _error(capsys, base + ["--prompt-file", str(bad)])
    assert "is a directory" in _error(capsys, base + ["--prompt-file", str(tmp_path)])
    run = base + ["--prompt", "hi", "--stats-json"]
    assert "is a directory" in _error(capsys, run + [str(tmp_path)])
    assert "does not exist" in _error(capsys, run + [str(tmp_path / "no" / "s.json")])
    assert "not writable" in _error(capsys, run + ["/proc/version"])


def test_stats_report_the_whole_run(art, tmp_path, capsys):
    stats = tmp_path / "s.json"
    argv = ["--model", str(art), "--prompt", "Hello", "--max-new-tokens", "12", "--compare"]
    assert run_main(argv + ["--stats-json", str(stats)]) == 0
    out = capsys.readouterr().out
    assert out.index("--- target-only ---") < out.index("--- speculative ---")  # both texts labelled
    r = json.loads(stats.read_text())
    assert r["artifact"] == str(art.resolve()) and r["backend"] == "xnnpack" and r["dtype"] == "float32"
    assert r["draft_len"] == TINY_K and r["max_seq_len"] == TINY_MAX_SEQ and r["prompt_tokens"] == 5
    assert {"torch", "executorch", "etspec"} <= set(r["versions"]) and r["export_versions"]
    tok = load_tokenizer(art)
    for name in ("target-only", "speculative"):
        run = r[name]
        assert len(run["token_ids"]) == 12 and run["text"] == decode(tok, run["token_ids"])
        assert len(run["per_round"]) == run["rounds"]
        assert [p["accepted"] for p in run["per_round"]] == run["accepted"]
        timed = run["per_round"][1:] if name == "target-only" else run["per_round"]  # token 0: prefill's
        assert all(p["verify_ms"] > 0 for p in timed)
    spec = r["speculative"]["per_round"]
    assert all(p["draft_ms"] > 0 for p in spec[:-1]) and spec[-1]["draft_ms"] == 0.0


def test_acceptance_does_not_count_drafts_cut_by_the_budget(art, tmp_path, capsys):
    stats = tmp_path / "s.json"
    argv = ["--model", str(art), "--prompt", "Hi", "--max-new-tokens", "1", "--quiet"]
    argv += ["--simulate-acceptance", str(TINY_K + 1), "--stats-json", str(stats)]
    assert run_main(argv) == 0
    run = json.loads(stats.read_text())["speculative"]
    assert run["generated"] == 1 and run["accepted"] == [0] and run["acceptance_length"] == 1.0


def test_stream_prints_whole_characters(art, capsys, monkeypatch):
    """A generation whose tokens split multi-byte characters streams exactly the full decode."""
    text = "中文 😀 é"
    ids = list(text.encode())

    def fake_generate(self, prompt, max_new_tokens):
        for i in range(0, len(ids), 2):
            yield ids[i : i + 2]

    monkeypatch.setattr(cli.SpeculativeGenerator, "generate", fake_generate)
    assert run_main(["--model", str(art), "--prompt", "x", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_real_stream_equals_decode(art, tmp_path, capsys):
    """On CJK / emoji prompts the model's own output, as streamed, equals the decode of its ids."""
    for prompt in ("你好，世界", "emoji 😀🎉 ok"):
        stats = tmp_path / "s.json"
        argv = ["--model", str(art), "--prompt", prompt, "--max-new-tokens", "40", "--stats-json", str(stats)]
        assert run_main(argv) == 0
        assert capsys.readouterr().out == json.loads(stats.read_text())["speculative"]["text"] + "\n"


def _cli(art, *extra, **kw) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "etspec.runner.cli", "--model", str(art), "--prompt", "Hello", *extra]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, **kw)


def test_quiet_by_default_and_broken_pipe(art):
    """A normal run prints the text and our own summary lines only; `| head` ends quietly."""
    run = _cli(art, "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert all(line.startswith("[speculative]") for line in run.stderr.splitlines()), run.stderr
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    piped = subprocess.Popen(
        [sys.executable, "-m", "etspec.runner.cli", "--model", str(art), "--prompt", "Hello"]
        + ["--max-new-tokens", "60", "--draft-len", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    piped.stdout.read(1)
    piped.stdout.close()  # the reader leaves, as `head -c 1` does
    err = piped.stderr.read().decode()
    assert piped.wait(timeout=300) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_help_teaches():
    text = build_parser().format_help()
    assert "examples:" in text and "etspec-run --model" in text
    assert "(default: None)" not in text and "(default: False)" not in text
