"""The exception types lightfn raises.

Every error lightfn raises on bad input derives from :class:`LightfnError`, so a caller
can catch them all in one place; the subclasses say which part of the library refused.
They also derive from the builtin a Python user would expect (``ValueError``/``TypeError``)
so code written against plain PyTorch keeps catching them.
"""

from __future__ import annotations

__all__ = [
    "LightfnError",
    "TreeError",
    "StepError",
    "CompileError",
    "CheckpointError",
    "ExportError",
    "DistributedError",
]


class LightfnError(Exception):
    """Base class of every error lightfn raises on purpose."""


class TreeError(LightfnError, ValueError):
    """Two pytrees that must match do not (structure, shape or dtype)."""


class StepError(LightfnError, TypeError):
    """A loss function, step function or its outputs have the wrong form."""


class CompileError(LightfnError, RuntimeError):
    """``lf.jit`` could not compile a function into one graph."""


class CheckpointError(LightfnError, ValueError):
    """A checkpoint file is unreadable, corrupted, or does not fit the template."""


class ExportError(LightfnError, RuntimeError):
    """A function could not be exported (traced) for inference."""


class DistributedError(LightfnError, RuntimeError):
    """The process group or the sharded step is misconfigured."""
