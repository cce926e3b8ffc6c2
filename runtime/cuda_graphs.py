"""CUDA-graph replay for a method: one captured graph per set of input shapes, static input buffers.

A graph freezes shapes, so the caller keeps shapes few (kv_window rounded up to a bucket; the methods
take the exact valid length from input_pos on the device) and every replay reads fresh values from the
static inputs. A shape set with no graph yet is captured on first use after eager warm-up runs, so a
call never replays a graph recorded for other shapes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Shapes = tuple[tuple[int, ...], ...]


class _Graph:
    def __init__(
        self, run: Callable, capture_run: Callable, inputs: Sequence[torch.Tensor], pool, warmup: int
    ):
        self.inputs = [t.clone() for t in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):  # lazy initialisation and allocator warm-up outside the capture
                run(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # relaxed: the AOTI container records and queries events while capturing
        with torch.cuda.graph(self.graph, pool=pool, stream=stream, capture_error_mode="relaxed"):
            self.outputs = tuple(capture_run(*self.inputs))

    def __call__(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        for static, t in zip(self.inputs, inputs):
            static.copy_(t, non_blocking=True)
        self.graph.replay()
        return self.outputs


class GraphedMethod:
    """`run` serves the warm-up calls; `fresh()` gives a callable for one capture (AOTI containers
    cannot run again once captured, so each graph is recorded on containers of its own)."""

    def __init__(
        self,
        run: Callable[..., Sequence[torch.Tensor]],
        fresh: Callable[[], Callable[..., Sequence[torch.Tensor]]],
        name: str,
        warmup: int = 2,
    ):
        self.run, self.fresh, self.name, self.warmup = run, fresh, name, warmup
        self.graphs: dict[Shapes, _Graph] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = tuple(tuple(t.shape) for t in inputs)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = _Graph(self.run, self.fresh(), inputs, self.pool, self.warmup)
        return graph(inputs)
