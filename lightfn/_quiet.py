"""Scoped silencing of one known-harmless torch message printed while compiling.

On a machine with a CUDA toolkit (``nvcc`` or ``/usr/local/cuda``) but no GPU, a CUDA
build of torch logs ``No CUDA runtime is found, using CUDA_HOME=...`` when inductor first
imports ``torch.utils.cpp_extension`` to build CPU kernels: noise on every CPU run that
compiles, about nothing lightfn uses. Only that message is dropped, by a filter on that
one logger that exists only while lightfn compiles; other messages pass.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator

import torch

__all__ = ["compile_messages_quieted"]

_LOGGER = "torch.utils.cpp_extension"
_MESSAGE = "No CUDA runtime is found"


def _not_no_cuda_runtime(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_MESSAGE)


@contextlib.contextmanager
def compile_messages_quieted() -> Iterator[None]:
    """Within the block, drop ``torch.utils.cpp_extension``'s "No CUDA runtime is found"."""
    if _LOGGER in sys.modules or torch.compiler.is_compiling():
        # The message is logged once, when the module is first imported: nothing to drop.
        # (Inside a traced function the outer compile call holds the filter.)
        yield
        return
    logger = logging.getLogger(_LOGGER)
    logger.addFilter(_not_no_cuda_runtime)
    try:
        yield
    finally:
        logger.removeFilter(_not_no_cuda_runtime)
