"""How AOTInductor compiles each CUDA method: which methods it autotunes, and where each compile's time goes.

ExecuTorch's CUDA backend compiles every method with ``max_autotune`` (1.2.0 hard-codes it): every Triton
GEMM template config, and several configs of every pointwise and reduction kernel, are compiled and timed
on the GPU at export. That buys speed only where a matmul is left to AOTInductor. With etspec's kernels on,
``target_verify`` holds none: its projections, attention, norms and argmax are etspec's fixed-config
Triton kernels, and tuning could only pick configs for the small fused elementwise kernels between them,
by timing on whatever else the GPU was running at the time (``draft`` keeps two: the K/V projections of
its catch-up rows, up to a prefill chunk of them). Such a method is compiled with
Inductor's heuristic configs instead: a shorter export, and an artifact whose speed does not depend on the
export machine's load. A method that keeps an aten matmul, convolution or SDPA (prefill always does) stays
tuned: with the CUDA backend's Triton-only GEMM choice and tuning off, Inductor would emit an aten extern
call the ExecuTorch CUDA runtime does not have (the export then stops on ExecuTorch's "missing fallback
kernels" error; ``etspec-export --autotune-every-method`` tunes every method).

Each method's compile then reports where its time went, from Inductor's own timers
(``torch._dynamo.utils.compilation_time_metrics``), and the GPU memory it peaked at.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch.export import ExportedProgram

from .patching import patched
from .progress import Progress

_MATMUL_OPS = frozenset(
    {"linear", "matmul", "mv", "addmv", "dot", "vdot", "einsum", "tensordot", "bilinear", "addr", "outer"}
)

# Inductor timers (`dynamo_timed` keys) grouped by what the time bought; they may nest, so they need not sum
# to the whole compile.
_TIMERS: dict[str, Callable[[str], bool]] = {
    "GEMM tuning": lambda k: k.endswith(("_template_autotuning", "_template_precompiling")),
    "kernel config tuning": lambda k: k == "CachingAutotuner.benchmark_all_configs",
    "Triton compile": lambda k: k == "async_compile.wait",
    "C++ compile": lambda k: k == "compile_file",
}


def matmul_ops(ep: ExportedProgram) -> set[str]:
    """The aten matmul-like ops (matmuls, convolutions, SDPA) anywhere in `ep`'s graphs."""
    found: set[str] = set()
    for gm in ep.graph_module.modules():
        if not isinstance(gm, torch.fx.GraphModule):
            continue
        for node in gm.graph.nodes:
            op = node.target
            if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload):
                continue
            if op.namespace != "aten":
                continue
            name = op._schema.name.split("::")[-1]
            if (
                "mm" in name
                or name in _MATMUL_OPS
                or name.startswith(("conv", "_conv"))
                or "scaled_dot_product" in name
            ):
                found.add(name)
    return found


def methods_to_tune(exported: Mapping[str, ExportedProgram], every_method: bool = False) -> dict[str, bool]:
    """Method name -> whether AOTInductor autotunes it: only methods with a matmul of its own, unless
    `every_method`."""
    return {name: every_method or bool(matmul_ops(ep)) for name, ep in exported.items()}


def _timer_totals() -> dict[str, float]:
    from torch._dynamo.utils import compilation_time_metrics

    return {
        group: sum(sum(v) for k, v in compilation_time_metrics.items() if match(k))
        for group, match in _TIMERS.items()
    }


@contextmanager
def tuned_per_method(backend: type, tune: Mapping[str, bool], progress: Progress) -> Iterator[None]:
    """While the block runs, `backend` (ExecuTorch's CudaBackend) compiles method m with ``max_autotune``
    only where ``tune[m]``, and each method's AOTInductor compile ends with one line on where its time
    went. The hooks are calls the backend makes for every method in ExecuTorch 1.2 to 1.5: its
    ``get_aoti_compile_options(compile_specs)`` (the specs name the method), then
    ``torch._inductor.aot_compile`` with those options."""
    current: list[str] = []  # the method whose options were asked for last: the one aot_compile builds

    def options(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(compile_specs: Any) -> Any:
            method = backend.method_name_from_compile_specs(compile_specs)
            current[:] = [method]
            # Asked before the method's program moves to the GPU: the previous method's device copy is
            # garbage by now, but held in reference cycles (fx graphs) until a full collection.
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            out = dict(fn(compile_specs))
            if not tune.get(method, True):
                out["max_autotune"] = False
            return out

        return wrapped

    inductor = torch._inductor
    aot_compile = inductor.aot_compile

    def timed_aot_compile(*args: Any, **kwargs: Any) -> Any:
        before, t0 = _timer_totals(), time.perf_counter()
        result = aot_compile(*args, **kwargs)
        spent = ", ".join(f"{g} {t - before[g]:.1f}s" for g, t in _timer_totals().items())
        method = current[0] if current else "method"
        how = "with" if (kwargs.get("options") or {}).get("max_autotune", True) else "without"
        peak = ""
        if torch.cuda.is_available():
            peak = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
        progress(f"{method}: AOTInductor {time.perf_counter() - t0:.1f}s {how} autotuning ({spent}{peak})")
        return result

    with patched(backend, "get_aoti_compile_options", options):
        inductor.aot_compile = timed_aot_compile
        try:
            yield
        finally:
            inductor.aot_compile = aot_compile
