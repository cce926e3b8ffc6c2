"""CPU tests of the AOTI executor machinery: .pte/.ptd reading, the ctypes container, CudaProgram.

The artifacts are real ExecuTorch programs (ExecuTorch's lowering + serializer) whose delegates are
AOTInductor CPU shared objects packaged in ExecuTorch 1.2 / 1.4 / 1.5.1 blob layouts
(see aoti_artifacts.py). Two AOTI compiles per session; everything else reuses them.
"""

from __future__ import annotations

import gc
import os
import shutil

import pytest
import torch

from etspec.runtime.aoti_container import AotiContainer
from etspec.runtime.aoti_payload import BlobLayout, parse_aoti_payload
from etspec.runtime.compat_dense_blob import ConstantMeta
from etspec.runtime.cuda_executor import CudaProgram
from etspec.runtime.elf_validation import validate_shared_object
from etspec.runtime.errors import (
    AotiCallError,
    ArtifactError,
    ConstantBindingError,
    MethodInputError,
    MissingBlobError,
    UnsupportedLayoutError,
)
from etspec.runtime.fqn_weight_manifest import parse_fqn_manifest
from etspec.runtime.method_info import DelegateInfo
from etspec.runtime.pte_reader import read_program

from . import aoti_artifacts as A

pytestmark = pytest.mark.slow
IDS = {A.BACKEND_ID}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """layout -> export directory (model.pte + aoti_cuda_blob.ptd), plus the source module."""
    root = tmp_path_factory.mktemp("aoti")
    core = A.Core(seed=0)
    dirs = {layout: A.build_program(root / layout, layout, core) for layout in A.LAYOUTS}
    return dirs, core


def _reference(core):
    ref = A.Core()
    ref.load_state_dict(core.state_dict())
    return ref, A.Write(ref), A.Read(ref)


def _win(n):
    return torch.empty(n, dtype=torch.int8)


def _open(d, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("backend_ids", IDS)
    return CudaProgram(d, **kw)


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", A.LAYOUTS)
def test_reader_describes_methods_and_layout(built, layout):
    dirs, _ = built
    with read_program(dirs[layout]) as p:
        assert sorted(p.executable_methods()) == ["read", "write"]
        assert p.constant_methods == {"get_max_rows": A.ROWS, "get_layout": layout}
        w = p.method("write")
        specs = w.input_specs
        assert [s.dtype for s in specs] == [torch.float32, torch.int64, torch.int8]
        assert [s.sizes for s in specs] == [(A.XMAX, A.H), (A.XMAX,), (A.ROWS,)]
        assert all(s.dynamism == "dynamic_bound" for s in specs)
        (call,) = w.delegate_calls
        # the delegate takes (win, x, pos): not the method's (x, pos, win)
        assert call.args[:3] == (w.inputs[2], w.inputs[0], w.inputs[1])
        assert call.args[3:] == w.outputs
        payload = p.aoti_payload("write", call.delegate_index, IDS)
        assert payload.layout is BlobLayout(layout)
        if layout == "fqn_manifest":
            assert {e.fqn for e in payload.entries} == {"core.w", "core.offset", "core.cache"}
            assert payload.weights_key is None
        else:
            assert p.named_data.nbytes(payload.weights_key) > 0
            assert p.named_data.source(payload.weights_key).endswith("aoti_cuda_blob.ptd")
        assert p.named_data.source(payload.so_key).endswith("model.pte")


# ----------------------------------------------------------------------------------------------
# running: argument mapping, shared constants (weights and the mutable cache)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", A.LAYOUTS)
def test_methods_match_eager_and_share_constants(built, layout, tmp_path):
    dirs, core = built
    ref, ref_write, ref_read = _reference(core)
    torch.manual_seed(1)
    with _open(dirs[layout], tmp_dir=str(tmp_path)) as prog:
        write, read = prog.method("write"), prog.method("read")
        n = 0
        for rows in (3, 1, 5):  # the cache persists across calls and across methods
            x, pos, win = torch.randn(rows, A.H), torch.arange(n, n + rows), _win(n + rows)
            y, s = write(x, pos, win)
            ey, es = ref_write(x, pos, win)
            torch.testing.assert_close(y, ey)
            torch.testing.assert_close(s, es)
            scale = torch.tensor([0.5 + n])
            (r,) = read(scale, win)  # read's container sees what write's container wrote
            torch.testing.assert_close(r, ref_read(scale, win))
            n += rows
        # one tensor per FQN, shared by both containers (1x memory, not 2x)
        consts = prog.constants
        assert set(consts) == {"core.w", "core.offset", "core.cache"}
        assert prog.constant_nbytes() == sum(t.numel() * t.element_size() for t in core.state_dict().values())
        torch.testing.assert_close(consts["core.cache"][:n], ref.cache[:n])
        # a write through the shared storage is seen by both methods
        consts["core.w"].mul_(2)
        ref.w.mul_(2)
        (r,) = read(torch.ones(1), _win(n))
        torch.testing.assert_close(r, ref_read(torch.ones(1), _win(n)))
        y, _ = write(torch.ones(1, A.H), torch.tensor([n]), _win(n + 1))
        torch.testing.assert_close(y, ref_write(torch.ones(1, A.H), torch.tensor([n]), _win(n + 1))[0])


def test_dense_blob_with_constant_meta_matches_probe(built):
    dirs, core = built
    _, ref_write, ref_read = _reference(core)
    x, pos, win = torch.randn(4, A.H), torch.arange(4), _win(4)
    meta = {f"core.{k}": ConstantMeta.from_tensor(v) for k, v in core.state_dict().items()}
    outs = []
    for kw in ({}, {"constant_meta": meta}):
        with _open(dirs["method_keys"], **kw) as prog:
            outs.append(prog.method("write")(x, pos, win) + prog.method("read")(torch.ones(1), win))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(outs[1][0], ref_write(x, pos, win)[0])


def test_old_so_without_metadata_needs_meta_or_private(built, monkeypatch):
    """A torch < 2.13 .so cannot describe its constants: sharing needs constant_meta."""
    dirs, core = built
    real_has = AotiContainer.has
    monkeypatch.setattr(
        AotiContainer,
        "has",
        lambda self, fn: False if fn.endswith("ExtractConstantsMapEntries") else real_has(self, fn),
    )
    with pytest.raises(ConstantBindingError, match="constant_meta"):
        _open(dirs["method_keys"])
    # private copies cannot hold a cache that two methods must share
    with pytest.raises(ConstantBindingError, match="core.cache"):
        _open(dirs["method_keys"], allow_private_constants=True)
    # one method alone may own its constants
    _, ref_write, _ = _reference(core)
    x = torch.randn(2, A.H)
    with _open(dirs["method_keys"], methods=["write"], allow_private_constants=True) as prog:
        torch.testing.assert_close(
            prog.method("write")(x, torch.arange(2), _win(2))[0], ref_write(x, torch.arange(2), _win(2))[0]
        )
    # metadata makes it shareable again
    meta = {f"core.{k}": v for k, v in core.state_dict().items()}
    with _open(dirs["method_keys"], constant_meta=meta) as prog:
        assert set(prog.constants) == {"core.w", "core.offset", "core.cache"}


# ----------------------------------------------------------------------------------------------
# temp files
# ----------------------------------------------------------------------------------------------


def test_temp_so_files_are_private_and_removed(built, tmp_path):
    dirs, _ = built
    d = tmp_path / "so"
    d.mkdir()
    prog = _open(dirs["hashed_keys"], tmp_dir=str(d))
    files = os.listdir(d)
    assert len(files) == 2 and all(f.startswith("etspec_aoti_") and f.endswith(".so") for f in files)
    assert all((os.stat(d / f).st_mode & 0o077) == 0 for f in files)  # mkstemp: owner only
    prog.close()
    assert os.listdir(d) == []
    prog.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        prog.run("write", torch.randn(1, A.H), torch.arange(1), _win(1))
    # a container that is only garbage collected also removes its file
    so, _ = A.so_and_blob("write")
    c = AotiContainer(so, device="cpu", name="gc", tmp_dir=str(d))
    assert len(os.listdir(d)) == 1
    del c
    gc.collect()
    assert os.listdir(d) == []


def test_no_temp_files_left_on_errors(built, tmp_path):
    dirs, core = built
    d = tmp_path / "so"
    d.mkdir()
    # fails after both containers were created (while binding constants)
    bad = {f"core.{k}": v.to(torch.float64) for k, v in core.state_dict().items()}
    with pytest.raises(ConstantBindingError, match="dtype"):
        _open(dirs["method_keys"], constant_meta=bad, tmp_dir=str(d))
    assert os.listdir(d) == []
    # fails before any .so is written
    with pytest.raises(MissingBlobError):
        _open(dirs["method_keys"], data_paths=[], tmp_dir=str(d))
    with pytest.raises(ArtifactError):
        AotiContainer(b"\x7fELF" + b"\0" * 100, device="cpu", tmp_dir=str(d))
    assert os.listdir(d) == []


# ----------------------------------------------------------------------------------------------
# error paths
# ----------------------------------------------------------------------------------------------


def test_input_errors_are_clear(built):
    dirs, _ = built
    with _open(dirs["fqn_manifest"]) as prog:
        write = prog.method("write")
        x, pos, win = torch.randn(2, A.H), torch.arange(2), _win(2)
        cases = [
            ((x, pos), "takes 3 inputs"),
            ((x.double(), pos, win), "dtype"),
            ((x, pos.int(), win), "dtype"),
            ((x[0], pos, win), "dims"),
            ((torch.randn(A.XMAX + 1, A.H), torch.arange(A.XMAX + 1), win), "upper bound"),
            ((x, pos, _win(A.ROWS + 1)), "upper bound"),
            ((torch.randn(A.H, 2).t(), pos, win), "contiguous"),
            ((x.to("meta"), pos, win), "on meta"),
            ((x, pos, [1, 2]), "expected a tensor"),
        ]
        for args, msg in cases:
            with pytest.raises(MethodInputError, match=msg) as ei:
                write(*args)
            assert "'write'" in str(ei.value)
        # still usable afterwards
        assert write(x, pos, win)[0].shape == (2, A.H)
        # a data-dependent error inside the compiled kernel comes back as an exception too
        with pytest.raises(AotiCallError, match="AOTInductorModelContainerRun") as ei:
            write(x, torch.tensor([0, A.ROWS + 5]), win)
        assert ei.value.method == "write" and "index out of bounds" in str(ei.value)


@pytest.mark.parametrize("layout", A.LAYOUTS)
def test_missing_blob(built, layout):
    dirs, _ = built
    with pytest.raises(MissingBlobError, match=r"\.ptd") as ei:
        _open(dirs[layout], data_paths=[])
    assert "write" in str(ei.value) or "read" in str(ei.value)


def test_unsupported_backend_and_layouts(built):
    dirs, _ = built
    with pytest.raises(UnsupportedLayoutError, match=A.BACKEND_ID):
        CudaProgram(dirs["method_keys"], device="cpu")  # default backend ids: CudaBackend only
    spec = (("method_name", b"m"),)
    with pytest.raises(UnsupportedLayoutError, match="unrecognised AOTI delegate payload"):
        parse_aoti_payload(DelegateInfo(0, "CudaBackend", spec, b"\x01\x02garbage"), "m")
    with pytest.raises(UnsupportedLayoutError, match="ETCUDAFQN9"):
        parse_aoti_payload(DelegateInfo(0, "CudaBackend", spec, b"ETCUDAFQN9rest"), "m")
    p = parse_aoti_payload(DelegateInfo(0, "CudaBackend", spec, b""), "m")
    assert (p.layout, p.so_key, p.weights_key) == (BlobLayout.METHOD_KEYS, "m_so_blob", "m_weights_blob")
    p = parse_aoti_payload(DelegateInfo(0, "CudaBackend", spec, b"a_so_blob\nb_weights_blob"), "m")
    assert (p.layout, p.so_key, p.weights_key) == (BlobLayout.HASHED_KEYS, "a_so_blob", "b_weights_blob")


def test_fqn_manifest_parser_rejects_every_truncation():
    CudaWeightEntry, encode_cuda_weight_metadata = A._fqn_encoder()

    entries = [
        CudaWeightEntry("a.weight", "cuda_fqn_weight:cuda:a.weight", 24, 6, 1, 0, (2, 3), (3, 1)),
        CudaWeightEntry("kv.k_cache", "cuda_fqn_weight:cuda:kv.k_cache", 64, 15, 1, 4, (2, 2, 6), (12, 6, 1)),
    ]
    data = encode_cuda_weight_metadata("abc_so_blob", entries)
    so_key, parsed = parse_fqn_manifest(data)
    assert so_key == "abc_so_blob"
    assert [(e.fqn, e.dtype, e.sizes, e.strides, e.storage_offset) for e in parsed] == [
        ("a.weight", torch.float32, (2, 3), (3, 1), 0),
        ("kv.k_cache", torch.bfloat16, (2, 2, 6), (12, 6, 1), 4),
    ]
    for n in range(len(data)):
        with pytest.raises(ArtifactError):
            parse_fqn_manifest(data[:n])
    with pytest.raises(ArtifactError, match="trailing"):
        parse_fqn_manifest(data + b"\0")
    too_big = CudaWeightEntry("x", "k", 8, 6, 1, 0, (4,), (1,))  # 16 bytes of view in 8 bytes
    with pytest.raises(ArtifactError, match="needs 16 bytes"):
        parse_fqn_manifest(encode_cuda_weight_metadata("s_so_blob", [too_big]))


def test_truncated_or_corrupt_pte_raises(built, tmp_path):
    dirs, _ = built
    src = dirs["hashed_keys"]
    data = (src / "model.pte").read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(src / "aoti_cuda_blob.ptd", d / "aoti_cuda_blob.ptd")
    cases = {f"cut{n}": data[:n] for n in (0, 7, 16, 40, 200, len(data) // 3, len(data) // 2, len(data) - 1)}
    cases["garbage"] = os.urandom(4096)
    cases["magic"] = data[:4] + b"XX" + data[6:]
    for name, blob in cases.items():
        (d / "model.pte").write_bytes(blob)
        with pytest.raises(ArtifactError):
            _open(d)
        print("ok", name)
    # a flipped byte inside a sha256-keyed shared object is caught before it is loaded
    so, _ = A.so_and_blob("write")
    i = data.find(so[:4096])
    assert i > 0
    j = i + len(so) // 2
    (d / "model.pte").write_bytes(data[:j] + bytes([data[j] ^ 0xFF]) + data[j + 1 :])
    with pytest.raises(ArtifactError, match="corrupt"):
        _open(d)


@pytest.mark.parametrize("layout", ["method_keys", "fqn_manifest"])
def test_truncated_ptd_raises(built, tmp_path, layout):
    dirs, _ = built
    src = dirs[layout]
    ptd = (src / "aoti_cuda_blob.ptd").read_bytes()
    d = tmp_path / "bad"
    d.mkdir()
    shutil.copy(src / "model.pte", d / "model.pte")
    for n in (0, 10, 48, 100, len(ptd) // 2, len(ptd) - 1):
        (d / "aoti_cuda_blob.ptd").write_bytes(ptd[:n])
        with pytest.raises(ArtifactError):
            _open(d)


def test_truncated_or_garbage_so_never_reaches_dlopen(built, tmp_path):
    so, _ = A.so_and_blob("read")
    validate_shared_object(so)
    for n in (0, 3, 63, 64, 200, len(so) // 2, len(so) - 1):
        with pytest.raises(ArtifactError):
            AotiContainer(so[:n], device="cpu", tmp_dir=str(tmp_path))
    with pytest.raises(ArtifactError, match="not an ELF"):
        AotiContainer(b"MZ" + os.urandom(500), device="cpu", tmp_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []


def test_container_api_errors(built, tmp_path):
    so, blob = A.so_and_blob("write")
    with AotiContainer(so, device="cpu", name="write", tmp_dir=str(tmp_path)) as c:
        assert (c.num_inputs, c.num_outputs) == (3, 2)
        consts = {ci.fqn: ci for ci in c.constants()}
        assert consts["core.cache"].kind == "buffer" and consts["core.w"].kind == "parameter"
        assert consts["core.w"].dtype == torch.float32
        # count mismatch is refused in Python (the container would abort the process)
        with pytest.raises(MethodInputError, match="takes 3 inputs"):
            c.run([torch.zeros(1)])
        # a failing C call names the method and the function, with the container's message
        with pytest.raises(AotiCallError, match=r"\[write\] AOTInductorModelContainerGetConstantName") as ei:
            c._get_str("AOTInductorModelContainerGetConstantName", 999)
        assert "range" in str(ei.value)
        with pytest.raises(ArtifactError, match="weights blob has"):
            c.load_constants_from_blob(blob[: c.blob_nbytes() - 1])
        with pytest.raises(ConstantBindingError, match="dtype"):
            c.bind_constants({consts["core.w"].name: torch.zeros(A.H, A.H, dtype=torch.float64)})
        with pytest.raises(ConstantBindingError, match="no constant named"):
            c.bind_constants({"nope": torch.zeros(1)})
        # a dense blob load followed by extraction gives the exported values
        c.load_constants_from_blob(blob)
        got = c.extract_constants()
        torch.testing.assert_close(got["core.offset"], A.Core().offset)
    with pytest.raises(RuntimeError, match="closed"):
        c.run([])
