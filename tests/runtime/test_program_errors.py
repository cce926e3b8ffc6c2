"""Program.load and method calls on bad artifacts and bad inputs: clear exceptions, never a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from etspec.runtime.errors import ArtifactError, MethodInputError, UnsupportedLayoutError
from etspec.runtime.program import Program
from tests.conftest import TINY_K, TINY_MAX_SEQ


@pytest.fixture
def art(tiny_artifacts, tmp_path):
    return shutil.copytree(tiny_artifacts("llama"), tmp_path / "art")


def _edit_manifest(art, **changes):
    path = art / "manifest.json"
    m = json.loads(path.read_text())
    m.update(changes)
    path.write_text(json.dumps(m))


def test_newer_format_is_refused(art):
    _edit_manifest(art, format_version=99)
    with pytest.raises(UnsupportedLayoutError, match="newer than this etspec reads"):
        Program.load(art)


def test_unknown_backend_and_missing_files(art, tmp_path):
    with pytest.raises(ArtifactError, match="no such artifact directory"):
        Program.load(tmp_path / "nope")
    _edit_manifest(art, backend="vulkan")
    with pytest.raises(UnsupportedLayoutError, match="backend 'vulkan'"):
        Program.load(art)
    _edit_manifest(art, backend="cuda")
    with pytest.raises(ArtifactError, match="missing aoti_cuda_blob.ptd"):
        Program.load(art)
    (art / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        Program.load(art)


def test_truncated_program(art):
    data = (art / "model.pte").read_bytes()
    (art / "model.pte").write_bytes(data[: len(data) // 3])
    with pytest.raises(ArtifactError):
        Program.load(art)


def test_bad_inputs(art):
    with Program.load(art) as p:
        verify = p.method("target_verify")
        tokens, pos, win = (
            torch.zeros(1, 2, dtype=torch.long),
            torch.arange(2),
            torch.zeros(2, dtype=torch.int8),
        )
        with pytest.raises(MethodInputError, match="must be int64"):
            verify(tokens.int(), pos, win)
        with pytest.raises(MethodInputError, match="expects 3 inputs"):
            verify(tokens, pos)
        with pytest.raises(MethodInputError, match="must have shape"):
            verify(tokens[0], pos, win)
        with pytest.raises(MethodInputError, match="dim M is 2 in one input and 3"):
            verify(tokens, torch.arange(3), win)
        many = torch.zeros(1, TINY_K + 2, dtype=torch.long)
        with pytest.raises(MethodInputError, match="outside"):
            verify(many, torch.arange(TINY_K + 2), torch.zeros(TINY_K + 2, dtype=torch.int8))
        with pytest.raises(MethodInputError, match="outside"):
            verify(tokens, pos, torch.zeros(TINY_MAX_SEQ + 1, dtype=torch.int8))
        with pytest.raises(MethodInputError, match="no method"):
            p.method("decode")
