"""`etspec-export --backend xnnpack` on tiny pairs, run through ExecuTorch for several rounds vs eager."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from etspec.artifact import Manifest, read_manifest_from_pte
from etspec.export.cli import main as export_main
from etspec.export.methods import method_specs
from etspec.export.torch_export import export_methods
from etspec.fixtures.tiny import write_tiny_pair
from etspec.models.checkpoint import load_speculator
from etspec.models.greedy import speculative_greedy, target_greedy
from etspec.runtime.program import Program
from tests.conftest import TINY_CHUNK as CHUNK
from tests.conftest import TINY_K as K
from tests.conftest import TINY_MAX_SEQ as MAX_SEQ
from tests.conftest import exported_families
from tests.helpers import random_prompt
from tests.recorder import Recorder


@pytest.fixture(scope="module", params=exported_families())  # mistral: sliding-window layers
def artifact(request, tiny_checkpoints, tiny_artifacts):
    target, draft = tiny_checkpoints(request.param)
    return target, draft, tiny_artifacts(request.param)


@pytest.mark.slow
def test_rounds_match_eager(artifact):
    target, draft, out = artifact
    program = Program.load(out)
    eager = load_speculator(target, draft, MAX_SEQ, K)
    rec = Recorder(program, eager)
    for plen, seed in [(5, 0), (37, 1)]:  # 37: a three-chunk prefill
        prompt = random_prompt(plen, seed)
        spec = speculative_greedy(rec, prompt, 30, chunk=CHUNK)
        base = target_greedy(rec, prompt, 30, chunk=CHUNK)  # M = 1 through the same target_verify
        assert spec.tokens == base.tokens
    assert rec.calls > 40


@pytest.mark.slow
def test_gemma4_rounds_match_eager(tiny_checkpoints, tiny_artifacts):
    """Gemma 4 through XNNPACK: K = V full layers twice as wide as the sliding ones (their own KV cache
    shapes), every call of a speculative and a target-only run equal to eager."""
    target, draft = tiny_checkpoints("gemma4_text")
    program = Program.load(tiny_artifacts("gemma4_text"))
    # features reach ~27 here; XNNPACK's fp32 kernels land within ~4e-5 of float64 relative to that, as
    # for the tiny Gemma 3 pair (eager fp32: ~4e-7; llama: ~4e-7 both), so floats compare at 2e-3 and
    # ids stay exact
    rec = Recorder(program, load_speculator(target, draft, MAX_SEQ, K), atol=2e-3)
    assert rec.eager.target.layers[2].self_attn.v_proj is None
    prompt = random_prompt(37, 3)  # a three-chunk prefill
    spec = speculative_greedy(rec, prompt, 20, chunk=CHUNK)
    assert spec.tokens == target_greedy(rec, prompt, 20, chunk=CHUNK).tokens
    assert rec.calls > 20


@pytest.mark.slow
def test_manifest_roundtrip(artifact):
    _, _, out = artifact
    on_disk = Manifest.read(out / "manifest.json")
    # the embedded copy is written before the program exists, so only manifest.json records the files
    assert read_manifest_from_pte(out / "model.pte") == dataclasses.replace(on_disk, files={})
    assert set(on_disk.files) == {"model.pte"}
    program = Program.load(out)
    assert program.manifest == on_disk
    assert on_disk.draft_len == K and on_disk.max_seq_len == MAX_SEQ and on_disk.backend == "xnnpack"
    assert on_disk.tap_layers == [2, 4, 5] and on_disk.eos_token_ids == [2]
    assert not on_disk.midm_sdpa and on_disk.kv_bucket is None
    assert on_disk.methods["target_verify"].dims["M"] == [1, K + 1]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["manifest.json", "model.pte", "tokenizer.json", "tokenizer_config.json"]


def test_no_softmax_over_the_vocabulary(tmp_path):
    """Greedy ids are argmaxes inside the graphs: no (log_)softmax over a vocab-sized dim anywhere."""
    target, draft = write_tiny_pair(tmp_path, "gemma2")  # gemma2 attention has a real softmax (softcap)
    spec = load_speculator(target, draft, 64, 2)
    exported = export_methods(method_specs(spec, 8), progress=None)
    vocabs = {spec.target.cfg.vocab_size, spec.draft_head.cfg.draft_vocab_size}
    softmaxes = 0
    for name, ep in exported.items():
        for node in ep.graph.nodes:
            if node.op == "call_function" and "softmax" in str(node.target):
                softmaxes += 1
                last = node.args[0].meta["val"].shape[-1]
                assert not (isinstance(last, int) and last in vocabs), (name, node)
    assert softmaxes > 0  # the check above did look at real softmax nodes


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.__setitem__(1, "/nonexistent"), "--target /nonexistent: not a directory"),
        (lambda a: a.extend(["--backend", "cuda"]), "--backend cuda needs an NVIDIA GPU"),
        (
            lambda a: a.extend(["--max-seq-len", "100000"]),
            "exceeds the target's max_position_embeddings 4096",
        ),
        (lambda a: a.extend(["--max-prefill-chunk", "0"]), "--max-prefill-chunk must be between"),
        (lambda a: a.append("--linear-chunk"), "--linear-chunk needs --backend cuda"),
        (lambda a: a.append("--sdpa-chunk"), "--sdpa-chunk needs --backend cuda"),
    ],
)
def test_cli_errors(tmp_path, capsys, tiny_checkpoints, change, message):
    if torch.cuda.is_available() and "cuda" in message:
        pytest.skip("a GPU is present")
    target, draft = tiny_checkpoints("llama")
    argv = ["--target", str(target), "--draft", str(draft), "--out", str(tmp_path / "o")]
    change(argv)
    assert export_main(argv) == 2
    assert message in capsys.readouterr().err


def test_cli_refuses_bad_models_and_non_empty_out(tmp_path, capsys, tiny_checkpoints):
    src_target, draft = tiny_checkpoints("llama")
    target = Path(shutil.copytree(src_target, tmp_path / "target"))
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep").write_text("x")
    assert export_main(["--target", str(target), "--draft", str(draft), "--out", str(out)]) == 2
    assert "not empty (use --force" in capsys.readouterr().err
    cfg = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    assert export_main(["--target", str(target), "--draft", str(draft), "--out", str(tmp_path / "o2")]) == 2
    assert "unsupported model_type 'gpt2'" in capsys.readouterr().err
    (target / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32}))
    assert export_main(["--target", str(target), "--draft", str(draft), "--out", str(tmp_path / "o3")]) == 2
    assert "draft head does not match the target" in capsys.readouterr().err
