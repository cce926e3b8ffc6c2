"""Damaged artifacts and out-of-vocabulary ids are refused with a clear error before native code runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from etspec.artifact import Manifest, file_record
from etspec.runner.cli import main as run_main
from etspec.runner.generator import SpeculativeGenerator
from etspec.runtime.errors import ArtifactError, MethodInputError
from etspec.runtime.program import Program, check_files, read_manifest


@pytest.fixture
def art(tiny_artifacts, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_artifacts("llama"), tmp_path / "art"))


def _flip(path: Path, at: float, n: int = 16) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i : i + n] = bytes(b ^ 0x5A for b in data[i : i + n])
    path.write_bytes(bytes(data))


def test_export_records_sizes_and_hashes(art):
    files = read_manifest(art).files
    assert set(files) == {"model.pte"}
    assert files["model.pte"] == file_record(art / "model.pte")


def test_manifest_that_is_not_an_object(art):
    (art / "manifest.json").write_text(json.dumps([1, 2]))
    with pytest.raises(ArtifactError, match="a manifest is a JSON object, this file holds a list"):
        Program.load(art)


def test_flipped_weight_bytes_are_caught(art, capsys):
    """Same size, different bytes: exit 0 and `--compare` identical on the old runtime."""
    _flip(art / "model.pte", 0.6)
    with pytest.raises(ArtifactError, match="model.pte: sha256 differs .* corrupt"):
        Program.load(art)
    assert run_main(["--model", str(art), "--prompt", "hi", "--compare"]) == 2
    assert "corrupt" in capsys.readouterr().err


def test_truncated_or_grown_program_is_caught(art):
    pte = art / "model.pte"
    pte.write_bytes(pte.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match="bytes, the export wrote"):
        Program.load(art)


def test_corrupt_delegate_does_not_abort_the_process(art):
    """An XNNPACK delegate with a damaged header makes ExecuTorch abort (pybind11 terminate) inside
    load_method: the hash check must refuse it first."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    pte = art / "model.pte"
    data = bytearray(pte.read_bytes())
    result = deserialize_pte_binary(bytes(data))
    program = getattr(result, "program", result)
    plan = next(p for p in program.execution_plan if p.name == "prefill")
    blob = bytes(program.backend_delegate_data[plan.delegates[0].processed.index].data)
    at = data.find(blob[:256])
    assert at > 0
    data[at : at + 32] = b"\xab" * 32
    pte.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{pte}: sha256 differs .* corrupt"):
        Program.load(art).method("prefill")


def test_weights_file_hash_checked_on_request(tmp_path):
    """The .ptd weights: size on every load, sha256 only with verify (it reads every byte)."""
    ptd = tmp_path / "aoti_cuda_blob.ptd"
    ptd.write_bytes(torch.randn(1000).numpy().tobytes())
    m = Manifest("cuda", {}, 64, 8, 2, 256, 64, "bfloat16", files={ptd.name: file_record(ptd)})
    check_files(tmp_path, m, verify=True)
    _flip(ptd, 0.5)
    check_files(tmp_path, m, verify=False)  # same size: only the hash can tell
    with pytest.raises(ArtifactError, match="aoti_cuda_blob.ptd: sha256 differs"):
        check_files(tmp_path, m, verify=True)
    with pytest.raises(ArtifactError, match="records no file hashes"):
        check_files(tmp_path, Manifest("cuda", {}, 64, 8, 2, 256, 64, "bfloat16"), verify=True)


def test_out_of_vocab_ids_refused_in_the_python_api(art, monkeypatch):
    with Program.load(art) as p:
        calls = []
        gen = SpeculativeGenerator(p)
        gen._prefill = lambda *a: calls.append(a)  # any method call would be recorded
        for bad in ([5, 999999], [-1], [2**64]):
            with pytest.raises(MethodInputError, match="outside the vocabulary"):
                next(gen.generate(bad, 4))
        assert not calls
        tokens = torch.tensor([[5, 300]])
        with pytest.raises(MethodInputError, match=r"\[prefill\] token id 300 is outside"):
            p.method("prefill")(tokens, torch.arange(2), torch.zeros(2, dtype=torch.int8))
