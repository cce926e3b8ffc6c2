"""Lowering core on a toy model shaped like ours (CPU / XNNPACK, runs in CI).

The toy has what matters for lowering: weights used by several methods, KV caches
``[1, n_kv, max_seq_len, hd]`` written with ``index_copy_`` at ``input_pos`` and read back
through ``[:, :, :kv_window.shape[0]]`` (a backed SymInt), and three thin wrapper modules holding
the SAME model object, so buffer/parameter FQNs agree across methods. ``draft`` uses its own
caches. The protocol test is what proves ``share_mutable_buffers``: ``target_verify`` attends
to KV that only ``prefill`` wrote.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

pytest.importorskip("executorch")

from etspec.artifact import (  # noqa: E402
    FORMAT_VERSION,
    MANIFEST_METHOD,
    PTE_NAME,
    Manifest,
    MethodSig,
    TensorSig,
    read_manifest_from_pte,
)
from etspec.export.constants import manifest_constant_methods  # noqa: E402
from etspec.export.lower import lower  # noqa: E402
from etspec.export.torch_export import export_methods, method_signatures  # noqa: E402
from tests.export.pte_walk import describe_program  # noqa: E402

V, H, NH, NKV, HD = 96, 64, 4, 2, 16
MAX_SEQ, CHUNK, M_VERIFY = 64, 16, 4
TARGET_KV = ("m.k_cache", "m.v_cache")
DRAFT_KV = ("m.dk_cache", "m.dv_cache")


# --------------------------------------------------------------------------------------------
# Toy model
# --------------------------------------------------------------------------------------------


class Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(H, NH * HD, bias=False)
        self.k = nn.Linear(H, NKV * HD, bias=False)
        self.v = nn.Linear(H, NKV * HD, bias=False)
        self.o = nn.Linear(NH * HD, H, bias=False)

    def forward(self, x, input_pos, kv_window, k_cache, v_cache):
        t = x.shape[1]
        q = self.q(x).view(1, t, NH, HD).transpose(1, 2)
        k = self.k(x).view(1, t, NKV, HD).transpose(1, 2)
        v = self.v(x).view(1, t, NKV, HD).transpose(1, 2)
        k_cache.index_copy_(2, input_pos, k)
        v_cache.index_copy_(2, input_pos, v)
        n = kv_window.shape[0]
        keys = k_cache[:, :, :n].repeat_interleave(NH // NKV, 1)
        vals = v_cache[:, :, :n].repeat_interleave(NH // NKV, 1)
        # [1, 1, T, n]: ExecuTorch's CUDA backend swaps SDPA for its Triton kernel, which wants a
        # 4-D bool mask [B, H or 1, L_q, L_kv].
        mask = (torch.arange(n, device=x.device).unsqueeze(0) <= input_pos.unsqueeze(1)).view(1, 1, t, n)
        o = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        return self.o(o.transpose(1, 2).reshape(1, t, NH * HD))


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(V, H)
        self.attn = Attn()
        self.dattn = Attn()
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.head = nn.Linear(H, V, bias=False)
        for name in ("k_cache", "v_cache", "dk_cache", "dv_cache"):
            self.register_buffer(name, torch.zeros(1, NKV, MAX_SEQ, HD))

    def target(self, tokens, input_pos, kv_window):
        x = self.embed(tokens)
        h = x + self.attn(x, input_pos, kv_window, self.k_cache, self.v_cache)
        return self.head(h).argmax(-1), h

    def draft(self, tokens, feature, input_pos, kv_window):
        x = self.fc(torch.cat([self.embed(tokens), feature], -1))
        h = x + self.dattn(x, input_pos, kv_window, self.dk_cache, self.dv_cache)
        return self.head(h[:, -1:]).argmax(-1), h[:, -1]


class Prefill(nn.Module):
    def __init__(self, m: Toy) -> None:
        super().__init__()
        self.m = m

    def forward(self, tokens, input_pos, kv_window):
        ids, h = self.m.target(tokens, input_pos, kv_window)
        return ids[0, -1:], h


class Verify(nn.Module):
    def __init__(self, m: Toy) -> None:
        super().__init__()
        self.m = m

    def forward(self, tokens, input_pos, kv_window):
        return self.m.target(tokens, input_pos, kv_window)


class Draft(nn.Module):
    def __init__(self, m: Toy) -> None:
        super().__init__()
        self.m = m

    def forward(self, tokens, feature, input_pos, kv_window):
        return self.m.draft(tokens, feature, input_pos, kv_window)


def _i8(n: int, device: str | torch.device = "cpu") -> torch.Tensor:
    return torch.zeros(n, dtype=torch.int8, device=device)


def method_specs(m: Toy):
    t = Dim("T", min=1, max=CHUNK)
    r = Dim("R", min=1, max=CHUNK)
    kv = Dim("kv_len", min=1, max=MAX_SEQ)
    p = next(m.parameters())
    dev = p.device
    tok = lambda n: torch.zeros(1, n, dtype=torch.long, device=dev)
    pos = lambda a, b: torch.arange(a, b, device=dev)
    return {
        "prefill": (
            Prefill(m),
            (tok(5), pos(0, 5), _i8(5, dev)),
            ({1: t}, {0: t}, {0: kv}),
        ),
        "target_verify": (
            Verify(m),
            (tok(M_VERIFY), pos(5, 5 + M_VERIFY), _i8(5 + M_VERIFY, dev)),
            (None, None, {0: kv}),
        ),
        "draft": (
            Draft(m),
            (tok(3), torch.zeros(1, 3, H, dtype=p.dtype, device=dev), pos(0, 3), _i8(3, dev)),
            {"tokens": {1: r}, "feature": {1: r}, "input_pos": {0: r}, "kv_window": {0: kv}},
        ),
    }


def make_manifest(sigs: dict[str, MethodSig]) -> Manifest:
    return Manifest(
        backend="xnnpack",
        methods=sigs,
        max_seq_len=MAX_SEQ,
        max_prefill_chunk=CHUNK,
        draft_len=M_VERIFY - 1,
        vocab_size=V,
        draft_vocab_size=V,
        hidden_size=H,
        dtype="float32",
        tap_layers=[0],
        eos_token_ids=[1, 2],
        kv_bucket=None,
        checkpoints={"target": "sha256:" + "0" * 64},
        versions={"torch": torch.__version__},
    )


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)  # eager twin with identical weights and zeroed caches
    specs = method_specs(model)
    log: list[str] = []
    exported = export_methods(specs, progress=log.append)
    manifest = make_manifest(method_signatures(specs, exported))
    out = tmp_path_factory.mktemp("xnnpack")
    files = lower(exported, "xnnpack", manifest_constant_methods(manifest), out, progress=log.append)
    return {"model": reference, "manifest": manifest, "files": files, "out": out, "log": log}


@pytest.fixture(scope="module")
def program(artifact):
    from executorch.runtime import Runtime

    return Runtime.get().load_program(artifact["files"][0])


# --------------------------------------------------------------------------------------------
# Protocol: the real call sequence, ExecuTorch vs eager
# --------------------------------------------------------------------------------------------


class Harness:
    """Runs the same calls on the .pte and on the eager twin; tracks written KV positions so no
    call ever reads a position nobody wrote (ExecuTorch leaves mutable buffers uninitialised)."""

    def __init__(self, program, model: Toy) -> None:
        self.methods = {n: program.load_method(n) for n in ("prefill", "target_verify", "draft")}
        self.model = model
        self.written = {"target": set(), "draft": set()}
        self.calls: list[tuple[str, int, int]] = []

    def _check_window(self, cache: str, pos: torch.Tensor, window: int) -> None:
        after = self.written[cache] | set(pos.tolist())
        missing = set(range(window)) - after
        assert not missing, f"{cache} window {window} would read unwritten positions {sorted(missing)}"
        self.written[cache] = after

    def call(self, name: str, *args: torch.Tensor):
        window = args[-1].shape[0]
        self._check_window("draft" if name == "draft" else "target", args[-2], window)
        self.calls.append((name, args[0].shape[1], window))
        got = self.methods[name].execute(list(args))
        with torch.no_grad():
            if name == "prefill":
                ids, h = self.model.target(*args)
                want = (ids[0, -1:], h)
            elif name == "target_verify":
                want = self.model.target(*args)
            else:
                want = self.model.draft(*args)
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape)
            if w.dtype == torch.long:
                assert torch.equal(g, w), f"{name} ids differ: {g.tolist()} vs {w.tolist()}"
            else:
                torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
        return got


def _tokens(gen: torch.Generator, n: int) -> torch.Tensor:
    return torch.randint(3, V, (1, n), generator=gen)


def test_protocol_matches_eager_through_shared_kv(artifact, program):
    gen = torch.Generator().manual_seed(1)
    h = Harness(program, artifact["model"])

    # Chunked prefill with several dynamic T (incl. the bounds 1 and CHUNK).
    n = 0
    features = []
    for t in (7, 1, CHUNK, 3):
        pos = torch.arange(n, n + t)
        _, feat = h.call("prefill", _tokens(gen, t), pos, _i8(n + t))
        features.append(feat)
        n += t
    assert n == 27

    # Draft catch-up over the prompt (dynamic R), then single rows.
    feat = torch.cat(features, 1)
    r0 = 0
    for r in (CHUNK, n - CHUNK):
        h.call("draft", _tokens(gen, r), feat[:, r0 : r0 + r], torch.arange(r0, r0 + r), _i8(r0 + r))
        r0 += r

    # Verify rounds with varying accepted lengths: n advances by 1..M, KV beyond n is stale
    # (written by the previous verify) and must not be read: kv_window = n + M exactly.
    for accepted in (0, 3, 1, 2, 3, 0):
        pos = torch.arange(n, n + M_VERIFY)
        _, vfeat = h.call("target_verify", _tokens(gen, M_VERIFY), pos, _i8(n + M_VERIFY))
        # Interleave the draft (its own caches) between target calls.
        rows = accepted + 1
        dpos = torch.arange(r0, r0 + rows)
        h.call("draft", _tokens(gen, rows), vfeat[:, :rows], dpos, _i8(r0 + rows))
        r0 += rows
        n += accepted + 1

    # A prefill chunk after verify rounds (a new user turn), then one more verify.
    h.call("prefill", _tokens(gen, 5), torch.arange(n, n + 5), _i8(n + 5))
    n += 5
    h.call("target_verify", _tokens(gen, M_VERIFY), torch.arange(n, n + M_VERIFY), _i8(n + M_VERIFY))
    assert n + M_VERIFY <= MAX_SEQ
    windows = {w for name, _, w in h.calls if name == "target_verify"}
    assert len(windows) >= 5, windows


def test_verify_output_depends_on_prefill_kv():
    """The protocol test is only a proof of sharing if verify's result depends on KV written by
    another method: with caches it did not get from prefill (here: zeros, what a separate copy
    would hold at best), the eager result must change."""
    torch.manual_seed(0)
    m = Toy()
    fresh = copy.deepcopy(m)
    gen = torch.Generator().manual_seed(2)
    prompt = _tokens(gen, 10)
    draft = _tokens(gen, M_VERIFY)
    pos = torch.arange(10, 10 + M_VERIFY)
    with torch.no_grad():
        m.target(prompt, torch.arange(10), _i8(10))
        ids, feat = m.target(draft, pos, _i8(10 + M_VERIFY))
        ids0, feat0 = fresh.target(draft, pos, _i8(10 + M_VERIFY))
    assert (feat - feat0).abs().max() > 1e-2


def test_mutable_buffers_shared_and_weights_deduplicated(artifact):
    info = describe_program(artifact["files"][0])
    methods = info["methods"]
    placement = {}
    for name, kv in (("prefill", TARGET_KV), ("target_verify", TARGET_KV), ("draft", DRAFT_KV)):
        bufs = methods[name]["mutable_buffers"]
        # Named (emit_mutable_buffer_names) and placed on the shared arena, mem_id 2.
        assert set(kv) <= set(bufs), (name, bufs)
        for fqn, b in bufs.items():
            assert b["mem_id"] == 2, (name, fqn, b)
            placement.setdefault(fqn, set()).add((b["mem_id"], b["offset"]))
    assert all(len(p) == 1 for p in placement.values()), placement
    offsets = sorted(next(iter(p))[1] for p in placement.values())
    assert len(set(offsets)) == len(offsets)  # distinct caches do not overlap

    # Weights: prefill and verify use all target weights, draft re-uses embed and head; stored
    # once (sha256-keyed named data + hash-deduplicated constant buffer), not once per method.
    param_bytes = sum(p.numel() * p.element_size() for p in artifact["model"].parameters())
    stored = sum(d["bytes"] for d in info["named_data"].values()) + info["constant_buffer_bytes"]
    assert stored <= param_bytes * 1.05, (stored, param_bytes)
    assert info["pte_bytes"] < param_bytes * 1.5


def test_progress_reports_each_method(artifact):
    log = "\n".join(artifact["log"])
    for name in ("prefill", "target_verify", "draft"):
        assert f"torch.export {name} done in" in log
    assert "to_executorch" in log and PTE_NAME in log


# --------------------------------------------------------------------------------------------
# Manifest
# --------------------------------------------------------------------------------------------


def test_manifest_signatures(artifact):
    sigs = artifact["manifest"].methods
    assert sigs["prefill"].inputs == [
        TensorSig("tokens", "int64", [1, "T"]),
        TensorSig("input_pos", "int64", ["T"]),
        TensorSig("kv_window", "int8", ["kv_len"]),
    ]
    assert sigs["prefill"].dims == {"T": [1, CHUNK], "kv_len": [1, MAX_SEQ]}
    assert sigs["target_verify"].inputs[0] == TensorSig("tokens", "int64", [1, M_VERIFY])
    assert sigs["target_verify"].outputs == [
        TensorSig("out0", "int64", [1, M_VERIFY]),
        TensorSig("out1", "float32", [1, M_VERIFY, H]),
    ]
    assert [t.shape for t in sigs["draft"].inputs] == [[1, "R"], [1, "R", H], ["R"], ["kv_len"]]


def test_specialised_dynamic_dim_is_refused():
    """A dim named dynamic in the spec but static in the program (torch.export specialised it, as an
    example kv length equal to the cache size once did) must not reach the manifest as a range."""

    class Slice(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("cache", torch.randn(1, 8))

        def forward(self, kv_window: torch.Tensor) -> torch.Tensor:
            return self.cache[:, : kv_window.shape[0]].sum(-1)

    dyn = ({0: Dim("kv_len", min=1, max=8)},)
    args = (torch.zeros(5, dtype=torch.int8),)
    dynamic = export_methods({"m": (Slice(), args, dyn)}, progress=None)
    assert method_signatures({"m": (None, args, dyn)}, dynamic)["m"].dims == {"kv_len": [1, 8]}
    static = export_methods({"m": (Slice(), args, None)}, progress=None)
    with pytest.raises(ValueError, match="specialised the dynamic dim 'kv_len' of input 'kv_window' to 5"):
        method_signatures({"m": (None, args, dyn)}, static)


def test_manifest_roundtrip_and_validation(artifact, tmp_path):
    m = artifact["manifest"]
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.read(m.write(tmp_path / "manifest.json")) == m
    d = json.loads(m.to_json())
    with pytest.raises(ValueError, match="format_version"):
        Manifest.from_dict({**d, "format_version": FORMAT_VERSION + 1})
    # format 1 had one switch for both few-rows kernels
    old = {k: v for k, v in d.items() if k != "linear_rows"}
    for used in (False, True):
        v1 = Manifest.from_dict({**old, "format_version": 1, "midm_sdpa": used})
        assert v1.linear_rows is used and v1.midm_sdpa is used
    # formats 1-3 had no many-row kernel switch, format 4 only linear_chunk
    chunks = ("linear_chunk", "sdpa_chunk")
    v3 = Manifest.from_dict({k: v for k, v in {**d, "format_version": 3}.items() if k not in chunks})
    assert v3.linear_chunk is False and v3.sdpa_chunk is False
    assert v3.reduction_kernels == m.reduction_kernels
    v4 = Manifest.from_dict({k: v for k, v in {**d, "format_version": 4}.items() if k != "sdpa_chunk"})
    assert v4.sdpa_chunk is False and v4.linear_chunk == m.linear_chunk
    with pytest.raises(ValueError, match="unknown manifest fields"):
        Manifest.from_dict({**d, "surprise": 1})


def test_manifest_readable_from_pte(artifact, program):
    m = artifact["manifest"]
    (text,) = program.load_method(MANIFEST_METHOD).execute([])
    assert isinstance(text, str)
    assert Manifest.from_json(text) == m
    assert read_manifest_from_pte(artifact["files"][0]) == m
    scalars = {
        "get_max_seq_len": [MAX_SEQ],
        "get_max_prefill_chunk": [CHUNK],
        "get_draft_len": [M_VERIFY - 1],
        "get_vocab_size": [V],
        "get_hidden_size": [H],
        "get_format_version": [FORMAT_VERSION],
        "get_eos_ids": [1, 2],
    }
    for name, want in scalars.items():
        assert list(program.load_method(name).execute([])) == want, name


def test_constant_methods_are_checked(artifact):
    with pytest.raises(ValueError, match="clashes"):
        lower({"prefill": None}, "xnnpack", {"prefill": 1}, artifact["out"] / "x", progress=None)
    with pytest.raises(TypeError, match="not emittable"):
        lower({"prefill": None}, "xnnpack", {"get_x": {"a": 1}}, artifact["out"] / "x", progress=None)
    with pytest.raises(ValueError, match="unknown backend"):
        lower({"prefill": None}, "vulkan", {}, artifact["out"] / "x", progress=None)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error path on CPU-only machines")
def test_cuda_lowering_needs_gpu(tmp_path):
    torch.manual_seed(0)
    specs = method_specs(Toy())
    ep = export_methods({"prefill": specs["prefill"]}, progress=None)
    with pytest.raises(RuntimeError, match="cuda"):
        lower(ep, "cuda", {}, tmp_path, progress=None)


# --------------------------------------------------------------------------------------------
# CUDA (GPU box: torch 2.11 + ExecuTorch 1.2.0; skipped elsewhere)
# --------------------------------------------------------------------------------------------


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_lowering_artifact(tmp_path):
    """Lowers the toy with the CUDA/AOTI backend and records what the artifact holds per method
    (the runtime's loader depends on it); prints the description as JSON."""
    import os

    torch.manual_seed(0)
    model = Toy().to("cuda", torch.bfloat16)
    specs = method_specs(model)
    exported = export_methods(specs)
    manifest = make_manifest(method_signatures(specs, exported))
    manifest.backend = "cuda"
    manifest.dtype = "bfloat16"
    files = lower(exported, "cuda", manifest_constant_methods(manifest), tmp_path)
    names = sorted(f.name for f in files)
    assert names == ["aoti_cuda_blob.ptd", "model.pte"], names
    info = describe_program(files[0], [tmp_path / "aoti_cuda_blob.ptd"])
    info["files"] = {f.name: f.stat().st_size for f in files}
    info["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    info["buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers())
    text = json.dumps(info, indent=1, default=str)
    print(text)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "cuda_artifact.json"), "w") as f:
            f.write(text)
    assert read_manifest_from_pte(files[0]) == manifest
    for name in ("prefill", "target_verify", "draft"):
        assert info["methods"][name]["delegates"] == ["CudaBackend"], info["methods"][name]


@pytest.mark.skipif(not (shutil.which("ld") and shutil.which("objcopy")), reason="needs binutils")
def test_identical_kernel_binaries_get_their_own_objects(tmp_path):
    """Two kernels of one graph with byte-identical binaries link once each (torch 2.11 AOTI bug)."""
    import torch._inductor.codecache as codecache

    from etspec.export.compat_kernel_objects import one_object_per_kernel

    cubin = tmp_path / "same.fatbin"
    cubin.write_bytes(b"\x7fkernel binary" * 64)

    def link(objs):
        return subprocess.run(
            ["ld", "-r", "-o", str(tmp_path / "all.o"), *objs], capture_output=True, text=True
        )

    def convert(names):
        return [codecache.convert_cubin_to_obj(str(cubin), n, "ld", "objcopy") for n in names]

    names = ["linear_rows_kernel_3", "linear_rows_kernel_7"]
    assert "multiple definition" in link(convert(names)).stderr  # the bug, unpatched
    with one_object_per_kernel():
        objs = convert(names)
    assert len(set(objs)) == 2
    assert link(objs).returncode == 0
    syms = subprocess.run(["nm", str(tmp_path / "all.o")], capture_output=True, text=True).stdout
    for n in names:
        assert f"__{n}_start" in syms and f"__{n}_end" in syms
    assert codecache.convert_cubin_to_obj is not None and "per_kernel" not in repr(
        codecache.convert_cubin_to_obj
    )
