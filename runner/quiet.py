"""Silence the third-party noise a normal run prints (and that says nothing about the run), by
logger and warning category/module, never globally; `-v` keeps everything."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Loggers whose messages at WARNING are known, harmless and not about this run:
#   torchao: "Failed to load .../_C_mxfp8...so" (CUDA-only extensions on a CPU install)
#   torch.utils._pytree: "<enum 'KernelPreference'> is an Enum subclass ..." (torchao's registration)
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


@contextmanager
def quiet_third_party(verbose: bool) -> Iterator[None]:
    if verbose:
        yield
        return
    saved = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for category in (FutureWarning, DeprecationWarning):
                warnings.filterwarnings("ignore", category=category, module=r"(torchao|executorch)(\.|$)")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
