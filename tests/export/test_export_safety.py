"""`etspec-export` as a careful user meets it: inputs checked before --out is touched, the artifact swapped in
only when complete, one-line errors, backend-fitting defaults, quiet third-party noise, help that teaches.

The expensive steps are stand-ins (`fake_export`): `export_methods` returns nothing and `lower` writes a
small model.pte, so each export here costs a tiny checkpoint load. One test lowers a toy model for real to
check the progress hooks and warning filters against ExecuTorch itself.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from etspec.export import cli
from etspec.export.cli import main as export_main

STAGE_PREFIX = ".o.etspec-tmp-"


def _argv(target: Path, draft: Path, out: Path | str, *extra: str) -> list[str]:
    return ["--target", str(target), "--draft", str(draft), "--out", str(out), *extra]


def _snapshot(path: Path) -> dict[str, bytes] | bytes | None:
    """Everything at `path`: None if absent, a file's bytes, or a directory's files by relative name."""
    if not path.exists():
        return None
    if path.is_file():
        return path.read_bytes()
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*")) if f.is_file()} | {
        str(d.relative_to(path)) + "/": b"" for d in path.rglob("*") if d.is_dir()
    }


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("etspec-export: error: "), err
    return lines[0]


@pytest.fixture
def pair(tiny_checkpoints) -> tuple[Path, Path]:
    return tiny_checkpoints("llama")


@pytest.fixture
def own_pair(tmp_path, pair) -> tuple[Path, Path]:
    """Copies of the tiny pair that a test may damage."""
    return (
        Path(shutil.copytree(pair[0], tmp_path / "target")),
        Path(shutil.copytree(pair[1], tmp_path / "draft")),
    )


@pytest.fixture
def artifact(tmp_path) -> Path:
    """An earlier export at tmp_path/o, as --force may replace it."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "manifest.json").write_text('{"format_version": 1}\n')
    (out / "model.pte").write_bytes(b"old program")
    (out / "stale.ptd").write_bytes(b"old data")
    return out


@pytest.fixture
def fake_export(monkeypatch):
    """Stand-ins for torch.export and the lowering. `state.during(stage)` runs inside the fake lowering;
    `state.error` is raised there after a partial model.pte is written."""
    state = SimpleNamespace(during=None, error=None, stages=[])

    def fake_lower(exported, backend, constant_methods, out_dir, progress=None, **kwargs):
        stage = Path(out_dir)
        state.stages.append(stage)
        (stage / "model.pte").write_bytes(b"new program" if state.error is None else b"half a prog")
        if state.during is not None:
            state.during(stage)
        if state.error is not None:
            raise state.error
        return [stage / "model.pte"]

    monkeypatch.setattr(cli, "export_methods", lambda specs, progress=None: {})
    monkeypatch.setattr(cli, "lower", fake_lower)
    return state


@pytest.fixture
def no_deletes(monkeypatch, fake_export):
    """Fail at once if a refused export deletes anything; nor may it get as far as the (fake) export."""

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"shutil.rmtree({path}) called by an export that should have been refused")

    def reached(stage: Path) -> None:
        raise AssertionError(f"an export that should have been refused got to the lowering, into {stage}")

    monkeypatch.setattr(shutil, "rmtree", refuse)
    fake_export.during = reached


# --------------------------------------------------------------------------------------------
# No data loss: refusals before anything is written
# --------------------------------------------------------------------------------------------


def test_force_with_a_bad_draft_keeps_the_earlier_artifact(tmp_path, capsys, own_pair, artifact, fake_export):
    target, draft = own_pair
    cfg = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    before = _snapshot(artifact)
    assert export_main(_argv(target, draft, artifact, "--force")) == 2
    assert "is not an EAGLE-3 head" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(artifact) == before
    assert fake_export.stages == []


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(
    "where", ["is target", "inside target", "contains target", "is draft", "link to target"]
)
def test_out_overlapping_a_checkpoint_is_refused(tmp_path, capsys, own_pair, no_deletes, where, force):
    target, draft = own_pair
    (target / "manifest.json").write_text("{}")  # so that only the overlap rule can refuse
    (draft / "manifest.json").write_text("{}")
    (tmp_path / "manifest.json").write_text("{}")
    if where == "link to target":
        (tmp_path / "link").symlink_to(target)
    out = {
        "is target": target,
        "inside target": target / "art",
        "contains target": tmp_path,
        "is draft": draft,
        "link to target": tmp_path / "link",
    }[where]
    before = _snapshot(tmp_path)
    assert export_main(_argv(target, draft, out, *(["--force"] if force else []))) == 2
    assert f"--out {out} overlaps --" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("where", ["cwd", "parent of cwd", "home", "root"])
def test_out_cwd_home_or_root_is_refused(tmp_path, capsys, monkeypatch, pair, no_deletes, where):
    work, home = tmp_path / "work" / "sub", tmp_path / "home"
    for d in (work, home):
        d.mkdir(parents=True)
        (d / "manifest.json").write_text("{}")  # looks like an artifact: --force alone would replace it
        (d / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    monkeypatch.setenv("HOME", str(home))
    out, message = {
        "cwd": (".", "is or contains the current directory"),
        "parent of cwd": ("..", "is or contains the current directory"),
        "home": ("~", "is or contains the home directory"),
        "root": ("/", "is a filesystem root"),
    }[where]
    before = _snapshot(tmp_path)
    assert export_main(_argv(*pair, out, "--force")) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_out_that_is_a_file_is_refused(tmp_path, capsys, pair, no_deletes, force):
    out = tmp_path / "o"
    out.write_text("my notes")
    assert export_main(_argv(*pair, out, *(["--force"] if force else []))) == 2
    assert f"--out {out} exists and is not a directory" in _one_error_line(capsys.readouterr().err)
    assert out.read_text() == "my notes"


def test_force_replaces_only_an_artifact(tmp_path, capsys, pair, no_deletes):
    out = tmp_path / "o"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    assert export_main(_argv(*pair, out, "--force")) == 2
    assert "holds no etspec artifact (no manifest.json)" in _one_error_line(capsys.readouterr().err)
    assert (out / "thesis.tex").read_text() == "years of work"


# --------------------------------------------------------------------------------------------
# No data loss: the staging directory and the swap
# --------------------------------------------------------------------------------------------


def _prepare(state: str, tmp_path: Path, artifact: Path) -> tuple[Path, list[str]]:
    """--out in the given state (and the flags it needs)."""
    if state == "artifact":
        return artifact, ["--force"]
    shutil.rmtree(artifact)
    if state == "empty":
        artifact.mkdir()
        return artifact, []
    if state == "missing parents":
        return tmp_path / "new" / "deeper" / "o", []
    return artifact, []


@pytest.mark.parametrize("error", [RuntimeError("lowering failed"), KeyboardInterrupt()], ids=repr)
@pytest.mark.parametrize("state", ["missing", "missing parents", "empty", "artifact"])
def test_failed_export_leaves_out_as_it_was(tmp_path, capsys, pair, artifact, fake_export, state, error):
    out, flags = _prepare(state, tmp_path, artifact)
    before_out, before_parent = _snapshot(out), _snapshot(tmp_path)

    def during(stage: Path) -> None:
        assert stage.parent == out.parent and stage.name.startswith(f".{out.name}.etspec-tmp-")
        assert _snapshot(out) == before_out  # the export writes beside --out, not into it

    fake_export.during, fake_export.error = during, error
    if isinstance(error, KeyboardInterrupt):
        assert export_main(_argv(*pair, out, *flags)) == 130
        assert "interrupted; --out is as it was" in capsys.readouterr().err
    else:
        with pytest.raises(RuntimeError, match="lowering failed"):
            export_main(_argv(*pair, out, *flags))
    assert fake_export.stages, "the export did not reach the lowering"
    assert _snapshot(out) == before_out
    assert _snapshot(tmp_path) == before_parent  # no staging directory, no created parents


@pytest.mark.parametrize("state", ["missing", "missing parents", "empty", "artifact"])
def test_successful_export_is_swapped_in(tmp_path, pair, artifact, fake_export, state):
    out, flags = _prepare(state, tmp_path, artifact)
    before_out = _snapshot(out)

    def during(stage: Path) -> None:
        assert stage != out and _snapshot(out) == before_out

    fake_export.during = during
    assert export_main(_argv(*pair, out, *flags)) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.pte",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (out / "model.pte").read_bytes() == b"new program"
    assert json.loads((out / "manifest.json").read_text())["backend"] == "xnnpack"
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".o.etspec-")]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # as mkdir makes it, not mkdtemp's 0700


def test_failed_swap_puts_the_earlier_artifact_back(
    tmp_path, capsys, monkeypatch, pair, artifact, fake_export
):
    before = _snapshot(artifact)
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(STAGE_PREFIX):
            raise PermissionError(13, "Permission denied")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert export_main(_argv(*pair, artifact, "--force")) == 2
    assert "could not move the finished artifact" in _one_error_line(capsys.readouterr().err)
    assert _snapshot(artifact) == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------------------------
# User mistakes: one line on stderr, exit 2, nothing written
# --------------------------------------------------------------------------------------------


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def _shard(directory: Path) -> Path:
    """Turn a single-file checkpoint into a one-shard indexed one; returns the shard."""
    from safetensors import safe_open

    shard = directory / "model-00001-of-00001.safetensors"
    (directory / "model.safetensors").rename(shard)
    with safe_open(shard, framework="pt") as f:
        weight_map = {k: shard.name for k in f.keys()}
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return shard


@pytest.mark.parametrize("where", ["target", "draft", "target shard"])
def test_truncated_safetensors_is_one_line(tmp_path, capsys, own_pair, fake_export, where):
    target, draft = own_pair
    broken = _shard(target) if where == "target shard" else (draft if where == "draft" else target)
    if broken.is_dir():
        broken = broken / "model.safetensors"
    _truncate(broken)
    out = tmp_path / "o"
    assert export_main(_argv(target, draft, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{broken}: not a readable safetensors file" in line
    assert not out.exists() and not list(tmp_path.glob(".o.*"))


def _bad_config(text: str, role: str):
    def change(target: Path, draft: Path) -> None:
        ((target if role == "target" else draft) / "config.json").write_text(text)

    return change


@pytest.mark.parametrize(
    "extra, change, message",
    [
        (["--max-seq-len", "0"], None, "--max-seq-len must be at least 16"),
        (["--max-seq-len", "0", "--draft-len", "0"], None, "--draft-len must be >= 1 (got 0)"),
        (["--draft-len", "0"], None, "--draft-len must be >= 1 (got 0)"),
        (["--draft-len", "-3"], None, "--draft-len must be >= 1 (got -3)"),
        (
            ["--max-prefill-chunk", "4096"],
            None,
            "--max-prefill-chunk must be between 1 and --max-seq-len 2048",
        ),
        ([], _bad_config("{not json", "target"), "config.json is not valid JSON"),
        ([], _bad_config("{not json", "draft"), "config.json is not valid JSON"),
        ([], _bad_config("[1, 2]", "target"), "config.json must hold a JSON object, not a list"),
        ([], _bad_config('"llama"', "draft"), "config.json must hold a JSON object, not a str"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(
    tmp_path, capsys, own_pair, fake_export, extra, change, message
):
    target, draft = own_pair
    if change is not None:
        change(target, draft)
    out = tmp_path / "o"
    assert export_main(_argv(target, draft, out, *extra)) == 2
    assert message in _one_error_line(capsys.readouterr().err)
    assert not out.exists() and fake_export.stages == []


# --------------------------------------------------------------------------------------------
# Defaults, help
# --------------------------------------------------------------------------------------------


def test_dtype_default_follows_the_backend(tmp_path, capsys, monkeypatch, pair, fake_export):
    assert export_main(_argv(*pair, tmp_path / "cpu")) == 0
    assert json.loads((tmp_path / "cpu" / "manifest.json").read_text())["dtype"] == "float32"
    assert "bf16" not in capsys.readouterr().err

    assert export_main(_argv(*pair, tmp_path / "bf16", "--dtype", "bf16")) == 0
    assert json.loads((tmp_path / "bf16" / "manifest.json").read_text())["dtype"] == "bfloat16"
    assert capsys.readouterr().err.count("XNNPACK runs bf16 slowly") == 1

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    args = cli.build_parser().parse_args(_argv(*pair, tmp_path / "gpu", "--backend", "cuda"))
    cli._check_args(args)
    assert args.dtype == "bf16"


def test_help_teaches(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # unwrapped
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "examples:" in text and "--backend cuda" in text and "--out art/llama1b-cpu" in text
    assert "prompt + generated tokens + the k verify rows" in text
    assert "fp32 for xnnpack, bf16 for cuda" in text
    assert "--force replaces an earlier etspec artifact" in text


# --------------------------------------------------------------------------------------------
# Quiet by default, -v shows everything
# --------------------------------------------------------------------------------------------

# What the real lowering emits (seen with -W always on torch 2.13 / ExecuTorch 1.5.1), as
# (category, module the warning is attributed to, message).
NOISE = [
    (
        FutureWarning,
        "copyreg",
        "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, "
        "TreeSpec) and treespec.is_leaf()` instead.",
    ),
    (
        UserWarning,
        "executorch.exir.emit._emitter",
        "Mutation on a buffer in the model is detected. ExecuTorch "
        "assumes buffers that are mutated in the graph have a meaningless initial state, ...",
    ),
    (
        DeprecationWarning,
        "torch.jit._script",
        "`torch.jit.script_method` is deprecated. Please switch to `torch.compile` or `torch.export`.",
    ),
    (
        DeprecationWarning,
        "executorch.exir.dialects.edge._ops",
        "read_text is deprecated. Use files() instead.",
    ),
]
NOISE_LOGS = [
    (
        "torchao",
        "Failed to load /venv/lib/python3.11/site-packages/torchao/_C_mxfp8.so: Could not load this library",
    ),
    (
        "torch.utils._pytree",
        "<enum 'KernelPreference'> is an Enum subclass and is now natively supported by "
        "torch.compile as an opaque value type.",
    ),
]
SIGNAL = (UserWarning, "executorch.exir.program", "something the user should see")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.add(record.getMessage())


@pytest.mark.parametrize("verbose", [False, True])
def test_known_noise_is_hidden_unless_verbose(tmp_path, monkeypatch, pair, fake_export, verbose):
    def noisy(stage: Path) -> None:
        for category, module, message in [*NOISE, SIGNAL]:
            warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
        for name, message in NOISE_LOGS:
            logging.getLogger(name).warning(message)

    fake_export.during = noisy
    monkeypatch.setattr(sys, "warnoptions", [])
    records = _Records()  # on each logger itself: torch's loggers do not propagate to the root
    for name, _ in NOISE_LOGS:
        logging.getLogger(name).addHandler(records)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            assert export_main(_argv(*pair, tmp_path / "o", *(["-v"] if verbose else []))) == 0
    finally:
        for name, _ in NOISE_LOGS:
            logging.getLogger(name).removeHandler(records)
    shown = {str(w.message) for w in seen}
    assert SIGNAL[2] in shown  # never a blanket ignore
    noise, noise_logs = {m for _, _, m in NOISE}, {m for _, m in NOISE_LOGS}
    if verbose:
        assert shown >= noise and records.messages >= noise_logs
    else:
        assert not shown & noise and not records.messages & noise_logs


@pytest.mark.slow
def test_real_lowering_reports_each_method_quietly(tmp_path, monkeypatch):
    """A toy model lowered by ExecuTorch itself: stage lines and a compile line per method, and none of the
    warnings the lowering is known to raise."""
    pytest.importorskip("executorch")
    from etspec.export.constants import manifest_constant_methods
    from etspec.export.lower import lower
    from etspec.export.torch_export import export_methods, method_signatures
    from tests.export.test_lower import Toy, make_manifest, method_specs

    monkeypatch.setattr(sys, "warnoptions", [])
    torch.manual_seed(0)
    specs = method_specs(Toy())
    log: list[str] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # record whatever the export's filters, added on top, let through
        with cli._quiet_third_party(verbose=False):
            exported = export_methods(specs, progress=log.append)
            consts = manifest_constant_methods(make_manifest(method_signatures(specs, exported)))
            lower(exported, "xnnpack", consts, tmp_path, progress=log.append)
    for name in specs:
        assert f"{name}: to edge dialect ..." in log
        mine = [line for line in log if line.startswith(f"{name}: ")]
        assert [line for line in mine if line.endswith("XnnpackBackend partitions")], log
        assert [line for line in mine if "partitions compiled in" in line], log
    assert [f"{w.category.__name__} ({w.filename}): {str(w.message)[:100]}" for w in seen] == []
