"""Lower an exported program through ExecuTorch's CudaPartitioner (AOTInductor) and run its delegate from
Python through the AOTI container C API (ctypes), as the probe did: kernel tests check that an op
compiles into a delegate and computes there what it computes eagerly."""

from __future__ import annotations

import ctypes
import inspect
import os
import tempfile

import torch


def lower_for_cuda(ep, method: str, out_dir: str) -> str:
    """`ep` as the one method `method` of a CUDA-delegated program in out_dir; returns the .pte path."""
    from executorch.backends.cuda.cuda_backend import CudaBackend
    from executorch.backends.cuda.cuda_partitioner import CudaPartitioner
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes import MemoryPlanningPass

    prog = to_edge_transform_and_lower(
        {method: ep},
        partitioner={method: [CudaPartitioner([CudaBackend.generate_method_name_compile_spec(method)])]},
        compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True),
    )
    et = prog.to_executorch(
        config=ExecutorchBackendConfig(
            extract_delegate_segments=True,
            memory_planning_pass=MemoryPlanningPass(alloc_graph_input=False),
            emit_mutable_buffer_names=True,
        )
    )
    pte_path = os.path.join(out_dir, f"{method}.pte")
    with open(pte_path, "wb") as f:
        et.write_to_file(f)
    et.write_tensor_data_to_file(out_dir)
    return pte_path


def named_blobs(pte_path, out_dir):
    from executorch.exir._serialize._cord import Cord
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.extension.flat_tensor.serialize.serialize import FlatTensorSerializer

    pte = deserialize_pte_binary(open(pte_path, "rb").read())
    blobs = {}
    nd = pte.named_data
    for key, e in nd.pte_data.items():
        blobs[key] = bytes(nd.buffers[e.buffer_index])
    for fn in os.listdir(out_dir):
        if fn.endswith(".ptd"):
            fts = FlatTensorSerializer()
            data = Cord(open(os.path.join(out_dir, fn), "rb").read())
            if "name" in inspect.signature(fts.deserialize_to_named_data_store_output).parameters:
                o = fts.deserialize_to_named_data_store_output(data, fn[:-4])
            else:
                o = fts.deserialize_to_named_data_store_output(data)
            for key, e in o.pte_data.items():
                blobs[key] = bytes(o.buffers[e.buffer_index])
            for _tag, dd in (o.external_data or {}).items():
                for key, e in dd.items():
                    blobs[key] = bytes(o.buffers[e.buffer_index])
    program = pte.program if hasattr(pte, "program") else pte
    return program, blobs


def delegate_input_order(program, n_in):
    """Method-input index of each delegate input, read from the execution plan's DelegateCall."""
    from executorch.exir.schema import DelegateCall

    plan = program.execution_plan[0]
    for chain in plan.chains:
        for ins in chain.instructions:
            if isinstance(ins.instr_args, DelegateCall):
                return [plan.inputs.index(a) for a in ins.instr_args.args[:n_in]]
    raise AssertionError("no DelegateCall in the plan")


class AotiMethod:
    """The probe's recipe: dlopen the delegate .so, create a container, load the weights blob."""

    def __init__(self, so_bytes, weights):
        for lib in ("libtorch_cpu.so", "libtorch_cuda.so", "libtorch.so", "libc10.so", "libc10_cuda.so"):
            p = os.path.join(os.path.dirname(torch.__file__), "lib", lib)
            if os.path.exists(p):
                ctypes.CDLL(p, mode=ctypes.RTLD_GLOBAL)
        fd, self.so_path = tempfile.mkstemp(suffix=".so")
        os.write(fd, so_bytes)
        os.close(fd)
        self.lib = ctypes.CDLL(self.so_path, mode=ctypes.RTLD_LOCAL)
        self.handle = ctypes.c_void_p()
        err = self.lib.AOTInductorModelContainerCreateWithDevice(
            ctypes.byref(self.handle), ctypes.c_size_t(1), b"cuda", None
        )
        assert err == 0, err
        self.wbuf = (ctypes.c_uint8 * len(weights)).from_buffer_copy(weights)
        assert self.lib.AOTInductorModelUpdateConstantsFromBlob(self.handle, self.wbuf) == 0
        ni, no = ctypes.c_size_t(), ctypes.c_size_t()
        self.lib.AOTInductorModelContainerGetNumInputs(self.handle, ctypes.byref(ni))
        self.lib.AOTInductorModelContainerGetNumOutputs(self.handle, ctypes.byref(no))
        self.ni, self.no = ni.value, no.value

    def __call__(self, *tensors):
        get_ptr = ctypes.pythonapi.PyCapsule_GetPointer
        get_ptr.restype, get_ptr.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
        new_cap = ctypes.pythonapi.PyCapsule_New
        new_cap.restype = ctypes.py_object
        new_cap.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        caps = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(tensors))
        in_arr = (ctypes.c_void_p * len(caps))(*[get_ptr(c, None) for c in caps])
        out_arr = (ctypes.c_void_p * self.no)()
        stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
        err = self.lib.AOTInductorModelContainerRun(
            self.handle, in_arr, ctypes.c_size_t(len(caps)), out_arr, ctypes.c_size_t(self.no), stream, None
        )
        assert err == 0, ("run", err)
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [new_cap(out_arr[i], None, None) for i in range(self.no)]
        )

    def close(self):
        os.unlink(self.so_path)
