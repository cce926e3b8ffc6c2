"""Shared fixtures: tiny Hugging Face checkpoints written once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from etspec.fixtures.tiny import tiny_target_config

FAMILIES = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3_text", "gemma4_text"]


def pytest_collection_modifyitems(config, items):
    # `first` tests wait on a long export: started first, the other worker runs the rest meanwhile
    items.sort(key=lambda item: "first" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def write_hf_target(directory: Path, family: str, seed: int = 0, **overrides) -> Path:
    """Save a random transformers model of the tiny config, in its own (safetensors) layout."""
    import transformers

    cfg = tiny_target_config(family)
    cfg.update(overrides)
    cfg.setdefault("initializer_range", 0.1)  # larger than the default 0.02, so logits separate clearly
    torch.manual_seed(seed)
    hf_cfg = transformers.AutoConfig.for_model(**cfg)
    model = transformers.AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="eager").eval()
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def hf_targets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {fam: write_hf_target(root / fam, fam) for fam in FAMILIES}


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    # CI machines have 2 cores and `make test` runs 2 xdist workers; oversubscription makes tiny models
    # slower, not faster.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // workers)))


EXPORTED = ("llama", "mistral")  # the tiny pairs exported for XNNPACK: without / with sliding-window layers


def exported_families() -> list[str]:
    return list(EXPORTED)


TINY_MAX_SEQ, TINY_CHUNK, TINY_K = 96, 16, 3


def _shared_root(tmp_path_factory, name: str) -> Path:
    """A directory every xdist worker of this run sees (the workers' base temps share a parent), so a
    tiny pair is written and exported once per run, not once per worker."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{family: (target_dir, draft_dir)} written on first use (the head is trained, so it costs seconds)."""
    from filelock import FileLock

    from etspec.fixtures.tiny import write_tiny_pair

    root = _shared_root(tmp_path_factory, "ckpt")

    def get(family: str) -> tuple[Path, Path]:
        d = root / family
        with FileLock(root / f"{family}.lock"):
            if not (d / "done").is_file():
                write_tiny_pair(d, family)
                (d / "done").touch()
        return d / "target", d / "draft"

    return get


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoints, tmp_path_factory):
    """{family: artifact dir}: `etspec-export --backend xnnpack` of the tiny pair, once per run and shared
    by the xdist workers (ETSPEC_TEST_ART_CACHE=DIR keeps them between local runs; CI always exports
    afresh). A worker that finds a pair being exported by another exports a pair nobody has started."""
    from filelock import FileLock, Timeout

    from etspec.export.cli import main as export_main

    keep = os.environ.get("ETSPEC_TEST_ART_CACHE")
    root = Path(keep) if keep else _shared_root(tmp_path_factory, "art")
    root.mkdir(parents=True, exist_ok=True)

    def build(family: str) -> None:
        out = root / family
        if (out / "manifest.json").is_file():
            return
        target, draft = tiny_checkpoints(family)
        argv = ["--target", str(target), "--draft", str(draft), "--out", str(out), "--backend", "xnnpack"]
        argv += ["--dtype", "fp32", "--max-seq-len", str(TINY_MAX_SEQ)]
        argv += ["--max-prefill-chunk", str(TINY_CHUNK), "--draft-len", str(TINY_K)]
        assert export_main(argv + ["--force"]) == 0

    def get(family: str) -> Path:
        lock = FileLock(root / f"{family}.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:  # another worker is exporting it: use the wait to export one nobody has
            for other in EXPORTED:
                spare = FileLock(root / f"{other}.lock")
                try:
                    spare.acquire(timeout=0)
                except Timeout:
                    continue
                try:
                    build(other)
                finally:
                    spare.release()
            lock.acquire()
        try:
            build(family)
        finally:
            lock.release()
        return root / family

    return get


@pytest.fixture(scope="session")
def small_vocab_artifact(tmp_path_factory) -> tuple[Path, Path]:
    """(artifact, target checkpoint): `etspec-export --backend xnnpack --sampling` of the small-vocabulary
    pair (fixtures.tiny), once per run and shared by the xdist workers (ETSPEC_TEST_ART_CACHE keeps it
    between local runs)."""
    from filelock import FileLock

    from etspec.export.cli import main as export_main
    from etspec.fixtures.tiny import write_small_vocab_pair

    keep = os.environ.get("ETSPEC_TEST_ART_CACHE")
    root = Path(keep) if keep else _shared_root(tmp_path_factory, "art")
    root.mkdir(parents=True, exist_ok=True)
    out, ckpt = root / "small-vocab-sampling", root / "small-vocab-ckpt"
    with FileLock(root / "small-vocab-sampling.lock"):
        if not (out / "manifest.json").is_file() or not (ckpt / "target").is_dir():
            target, draft = write_small_vocab_pair(ckpt)
            argv = ["--target", str(target), "--draft", str(draft), "--out", str(out), "--backend", "xnnpack"]
            argv += ["--dtype", "fp32", "--max-seq-len", str(TINY_MAX_SEQ), "--sampling", "--force"]
            argv += ["--max-prefill-chunk", str(TINY_CHUNK), "--draft-len", str(TINY_K)]
            assert export_main(argv) == 0
    return out, ckpt / "target"
