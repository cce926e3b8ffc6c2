"""GPU test of the CUDA executor on a program lowered by ExecuTorch's real CUDA backend.

Runs only where a GPU is visible (the `cuda` marker; tests/conftest.py skips it elsewhere). On the
GPU box (torch 2.11, ExecuTorch 1.2.0) this checks the 1.2.0 layout, the container C API of a
torch 2.11 .so, shared constants across methods, and CUDA-graph capture of method calls.
"""

from __future__ import annotations

import os

import pytest
import torch

from etspec.runtime.aoti_payload import BlobLayout
from etspec.runtime.cuda_executor import CudaProgram
from etspec.runtime.pte_reader import read_program

from . import aoti_artifacts as A

pytestmark = [pytest.mark.cuda, pytest.mark.slow]

OPTIONAL_FNS = (
    "AOTInductorModelContainerUpdateUserManagedConstantBufferPairs",
    "AOTInductorModelContainerExtractConstantsMapEntries",
    "AOTInductorModelContainerGetConstantDataSize",
    "AOTInductorModelContainerGetConstantOriginalFQN",
    "AOTInductorModelUpdateConstantsFromBlob",
    "AOTInductorGetLastError",
)


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.backends.cuda.cuda_partitioner import CudaPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    out = tmp_path_factory.mktemp("cuda_art")
    core = A.Core(seed=0).to("cuda")
    eps = A.export_methods(core, device="cuda")
    parts = {m: [CudaPartitioner([CudaBackend.generate_method_name_compile_spec(m)])] for m in eps}
    prog = to_edge_transform_and_lower(
        eps,
        partitioner=parts,
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
        constant_methods={"get_max_rows": A.ROWS},
    )
    et = prog.to_executorch(
        config=ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            emit_mutable_buffer_names=True,
        )
    )
    with open(out / "model.pte", "wb") as f:
        et.write_to_file(f)
    et.write_tensor_data_to_file(str(out))
    print("artifact files", sorted(os.listdir(out)))
    return out, core.cpu()


def _ref(core):
    ref = A.Core().cuda()
    ref.load_state_dict(core.state_dict())
    return ref, A.Write(ref), A.Read(ref)


def test_cuda_program_runs_real_cuda_backend_artifact(cuda_artifact, tmp_path):
    d, core = cuda_artifact
    with read_program(d) as p:
        w = p.method("write")
        payload = p.aoti_payload("write", w.delegate_calls[0].delegate_index)
        print("layout", payload.layout, "delegate args", w.delegate_calls[0].args, "inputs", w.inputs)
        assert payload.layout in (BlobLayout.METHOD_KEYS, BlobLayout.HASHED_KEYS, BlobLayout.FQN_MANIFEST)
    ref, ref_write, ref_read = _ref(core)
    so_dir = tmp_path / "so"
    so_dir.mkdir()
    # torch < 2.13 .so files cannot describe their constants: the shapes come from the model, as the
    # export manifest provides them for etspec artifacts
    prog = CudaProgram(
        d,
        device="cuda",
        tmp_dir=str(so_dir),
        constant_meta={f"core.{k}": v for k, v in core.state_dict().items()},
    )
    try:
        c = prog.method("write").containers[0]
        print({fn: c.has(fn) for fn in OPTIONAL_FNS})
        print("constants", [(ci.fqn, ci.kind, ci.dtype, ci.data_size) for ci in c.constants()])
        write, read = prog.method("write"), prog.method("read")
        n = 0
        for rows in (3, 1, 5):
            x = torch.randn(rows, A.H, device="cuda")
            pos = torch.arange(n, n + rows, device="cuda")
            win = torch.empty(n + rows, dtype=torch.int8, device="cuda")
            y, s = write(x, pos, win)
            ey, es = ref_write(x, pos, win)
            torch.testing.assert_close(y, ey, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(s, es, rtol=1e-4, atol=1e-4)
            scale = torch.tensor([0.5 + n], device="cuda")
            torch.testing.assert_close(read(scale, win)[0], ref_read(scale, win), rtol=1e-4, atol=1e-4)
            n += rows
        consts = prog.constants
        assert set(consts) == {"core.w", "core.offset", "core.cache"}
        nbytes = sum(t.numel() * t.element_size() for t in core.state_dict().values())
        assert prog.constant_nbytes() == nbytes
        torch.testing.assert_close(consts["core.cache"][:n], ref.cache[:n], rtol=1e-4, atol=1e-4)

        # CUDA graphs: capture write+read on static inputs (relaxed mode), replay with new data
        sx = torch.randn(2, A.H, device="cuda")
        spos = torch.tensor([n, n + 1], device="cuda")
        swin = torch.empty(n + 2, dtype=torch.int8, device="cuda")
        sscale = torch.ones(1, device="cuda")
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                write(sx, spos, swin)
                read(sscale, swin)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, capture_error_mode="relaxed"):
            gy, _ = write(sx, spos, swin)
            (gr,) = read(sscale, swin)
        for k in range(3):
            sx.copy_(torch.randn(2, A.H, device="cuda"))
            sscale.fill_(1.0 + k)
            g.replay()
            torch.cuda.synchronize()
            ey, _ = ref_write(sx, spos, swin)
            torch.testing.assert_close(gy, ey, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(gr, ref_read(sscale, swin), rtol=1e-4, atol=1e-4)
        assert len(os.listdir(so_dir)) == 2
    finally:
        prog.close()
    assert os.listdir(so_dir) == []


def test_cuda_dense_blob_with_constant_meta(cuda_artifact):
    d, core = cuda_artifact
    with read_program(d) as p:
        if p.aoti_payload("write", 0).layout is BlobLayout.FQN_MANIFEST:
            pytest.skip("the FQN manifest describes constants itself")
    _, ref_write, _ = _ref(core)
    meta = {f"core.{k}": v for k, v in core.state_dict().items()}
    with CudaProgram(d, device="cuda", constant_meta=meta) as prog:
        x = torch.randn(4, A.H, device="cuda")
        pos = torch.arange(4, device="cuda")
        win = torch.empty(4, dtype=torch.int8, device="cuda")
        y, s = prog.method("write")(x, pos, win)
        ey, es = ref_write(x, pos, win)
        torch.testing.assert_close(y, ey, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s, es, rtol=1e-4, atol=1e-4)
