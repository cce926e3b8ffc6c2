"""`etspec-convert` on the command line: inputs it accepts, one-line errors (exit 2) for user mistakes,
and an --out that is never half-written or lost."""

from __future__ import annotations

import zipfile

import gguf
import pytest

from etspec.convert.cli import main
from tests.convert.tiny_gguf import write_metadata_only_gguf, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    return write_tiny_gguf(path, gguf.GGMLQuantizationType.Q8_0, tied=True).path


def _error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("etspec-convert: error: "), err
    assert message in err, err


def _snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_convert_and_replace_with_force(tiny, tmp_path, capsys):
    out = tmp_path / "models" / "tiny"  # parents are created
    assert main([str(tiny), "--out", str(out)]) == 0
    summary = capsys.readouterr().out
    assert "LlamaForCausalLM" in summary and "model.safetensors" in summary and "fp32" in summary
    assert (out / "config.json").is_file()
    (out / "stale.txt").write_text("from an earlier run")
    assert main([str(tiny), "--out", str(out), "--dtype", "bf16", "--force"]) == 0
    assert not (out / "stale.txt").exists() and '"dtype": "bfloat16"' in (out / "config.json").read_text()
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]  # no staging or old copies left


@pytest.mark.parametrize("packing", ["directory", "wheel"])
def test_gguf_inside_a_directory_or_wheel(tiny, tmp_path, packing):
    if packing == "directory":
        source = tmp_path / "pkg"
        (source / "sub").mkdir(parents=True)
        (source / "sub" / "tiny.gguf").write_bytes(tiny.read_bytes())
    else:
        source = tmp_path / "tiny_model-0.1-py3-none-any.whl"
        with zipfile.ZipFile(source, "w") as zf:
            zf.write(tiny, "tiny_model/tiny.gguf")
    out = tmp_path / "out"
    assert main([str(source), "--out", str(out)]) == 0
    assert (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([source.name, "out"])  # no extraction left


def test_bad_inputs(tiny, tmp_path, capsys):
    out = str(tmp_path / "out")
    for size in (200, 5000):
        truncated = tmp_path / f"truncated-{size}.gguf"
        truncated.write_bytes(tiny.read_bytes()[:size])
        _error(capsys, [str(truncated), "--out", out], "truncated or corrupt?")
    _error(capsys, [str(tmp_path / "missing.gguf"), "--out", out], "no such file or directory")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    _error(capsys, [str(text), "--out", out], "is not a GGUF file")
    empty = tmp_path / "empty"
    empty.mkdir()
    _error(capsys, [str(empty), "--out", out], "holds no .gguf file")
    fake_wheel = tmp_path / "x.whl"
    fake_wheel.write_text("not a zip")
    _error(capsys, [str(fake_wheel), "--out", out], "is not a valid wheel")
    assert not (tmp_path / "out").exists()


def test_two_ggufs_in_a_directory(tiny, tmp_path, capsys):
    (tmp_path / "src").mkdir()
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / "src" / name).write_bytes(tiny.read_bytes())
    argv = [str(tmp_path / "src"), "--out", str(tmp_path / "o2")]
    _error(capsys, argv, "holds 2 .gguf files (a.gguf, b.gguf)")


def test_unsupported_architectures(tmp_path, capsys):
    neox = write_metadata_only_gguf(tmp_path / "neox.gguf", "gptneox")
    _error(capsys, [str(neox), "--out", str(tmp_path / "o1")], "cannot load GGUF architecture 'gptneox'")
    phi3 = write_metadata_only_gguf(tmp_path / "phi3.gguf", "phi3")  # transformers reads it, etspec does not
    _error(capsys, [str(phi3), "--out", str(tmp_path / "o2")], "etspec cannot export this model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox.gguf", "phi3.gguf"]


def test_out_is_protected(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    _error(capsys, [str(tiny), "--out", str(out)], "not empty (use --force")
    a_file = tmp_path / "file"
    a_file.write_text("x")
    _error(capsys, [str(tiny), "--out", str(a_file), "--force"], "is not a directory")
    _error(capsys, [str(tiny), "--out", str(tiny), "--force"], "is not a directory")
    # --out holding the input: replacing it would delete the GGUF.
    inner = out / "model.gguf"
    inner.write_bytes(tiny.read_bytes())
    _error(capsys, [str(inner), "--out", str(out), "--force"], "would delete the input")
    _error(capsys, [str(out), "--out", str(out), "--force"], "would delete the input")
    monkeypatch.chdir(out)
    _error(capsys, [str(tiny), "--out", ".", "--force"], "is or holds the current directory")
    assert (out / "keep.txt").read_text() == "user data" and inner.is_file()


def test_failed_conversion_leaves_out_as_it_was(tmp_path, capsys):
    bad = write_metadata_only_gguf(tmp_path / "phi3.gguf", "phi3")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = _snapshot(out)
    _error(capsys, [str(bad), "--out", str(out), "--force"], "etspec cannot export")
    assert _snapshot(out) == before
    _error(capsys, [str(bad), "--out", str(tmp_path / "new" / "deeper")], "etspec cannot export")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "phi3.gguf"]  # no new dirs, no staging
