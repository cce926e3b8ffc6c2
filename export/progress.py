"""Progress lines while a program is exported and lowered: timed stages, and a bar per method over the
partitions the backend compiles.

ExecuTorch has no progress callback, so :func:`lowering_progress` wraps calls it makes anyway (see its
docstring); everything here only reports and never changes what is lowered.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from tqdm import tqdm

from .patching import patched

Progress = Callable[[str], None]


def print_progress(msg: str) -> None:
    """The default :data:`Progress`: one flushed line per message on stdout."""
    print(f"[etspec-export] {msg}", flush=True)


@contextmanager
def timed(progress: Progress, what: str) -> Iterator[None]:
    """Say when `what` starts, and how long it took once the block ends."""
    progress(f"{what} ...")
    t0 = time.perf_counter()
    yield
    progress(f"{what} done in {time.perf_counter() - t0:.1f}s")


class _CompileMeter:
    """A bar per method over its partitions, fed by the backend's per-partition ``preprocess`` calls."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.planned: deque[tuple[str, int]] = deque()  # (method, partitions), in compile order
        self.bar: tqdm | None = None

    def start(self) -> None:
        if self.bar is None:
            self.method, self.total = self.planned.popleft() if self.planned else ("partitions", 0)
            self.n, self.t0 = 0, time.perf_counter()
            # disable=None: no bar when stderr is not a terminal; the per-method line below still comes.
            self.bar = tqdm(
                total=self.total or None,
                desc=f"{self.method}: compile",
                unit="partition",
                leave=False,
                disable=None,
            )

    def done(self) -> None:
        assert self.bar is not None
        self.n += 1
        self.bar.update()
        if self.n == self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            dt = time.perf_counter() - self.t0
            self.progress(f"{self.method}: {self.n} partition{'s' * (self.n != 1)} compiled in {dt:.1f}s")


@contextmanager
def lowering_progress(
    partitioners: Mapping[str, list[Any]], backend: type, progress: Progress
) -> Iterator[None]:
    """Stage lines per method, and a bar over each method's partitions, while ExecuTorch lowers.

    ExecuTorch has no progress callback, so the hooks are calls it makes anyway: a method's partitioner is
    asked ``transform_for_pre_decomposition`` / ``ops_to_not_decompose`` when that method's edge conversion
    starts and ``partition`` once it is in edge dialect; the backend's ``preprocess_multimethod`` then
    compiles every partition, by default one ``preprocess`` call each, method by method in partition order
    (``exir/backend/backend_details.py``). CUDA's own ``preprocess_multimethod`` makes no per-partition
    calls: it gets the stage lines and one timed compile line.
    """
    meter = _CompileMeter(progress)
    announced: set[str] = set()

    def announce(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if name not in announced:
                announced.add(name)
                progress(f"{name}: to edge dialect ...")
            return fn(*args, **kwargs)

        return wrapped

    def count(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            result = fn(*args, **kwargs)
            n = len(result.partition_tags)
            if n:
                meter.planned.append((name, n))
            progress(f"{name}: {n} {backend.__name__} partition{'s' * (n != 1)}")
            return result

        return wrapped

    def per_partition(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            meter.start()
            result = fn(*args, **kwargs)
            meter.done()
            return result

        return wrapped

    def all_partitions(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            total = sum(n for _, n in meter.planned)
            with timed(progress, f"{backend.__name__}: compile {total} partitions"):
                try:
                    return fn(*args, **kwargs)
                finally:
                    meter.close()

        return wrapped

    hooks = {
        "transform_for_pre_decomposition": announce,
        "ops_to_not_decompose": announce,
        "partition": count,
    }
    for name, plist in partitioners.items():
        for part in plist:
            for attr, make in hooks.items():
                if hasattr(part, attr):  # transform_for_pre_decomposition is newer than ExecuTorch 1.2
                    setattr(part, attr, make(name, getattr(part, attr)))
    try:
        with (
            patched(backend, "preprocess", per_partition),
            patched(backend, "preprocess_multimethod", all_partitions),
        ):
            yield
    finally:
        meter.close()
        for plist in partitioners.values():
            for part in plist:
                for attr in hooks:
                    vars(part).pop(attr, None)
