"""The exception types lightfn raises: every one lightfn defines lives here.

Every error lightfn raises on bad input derives from :class:`LightfnError`, so a caller
can catch them all in one place; the subclasses say which part of the library refused.
They also derive from the builtin a Python user would expect (``ValueError``/``TypeError``)
so code written against plain PyTorch keeps catching them. The one exception that is not
an error, :class:`Preempted`, is a clean ``SystemExit`` that ``fit`` raises after a SIGTERM.

* :class:`LightfnError`: the base of all below (but ``Preempted``);
* :class:`TreeError`: two pytrees that must match do not;
* :class:`StepError`: a loss or step function, or its output, has the wrong form;
  :class:`StateMismatchError` (a ``StepError``): an optimizer state from another optimizer;
* :class:`CompileError`: ``lf.jit`` could not compile a function into one graph;
* :class:`CheckpointError`: a checkpoint is unreadable or does not fit its template;
* :class:`ExportError`: a function could not be exported for inference;
* :class:`DistributedError`: the process group or a sharded step is misconfigured;
* :class:`DeviceError`: a ``device`` argument names no device;
* :class:`FitError`: an argument of ``lf.fit`` (or ``validate``/``test``) does not fit the run;
* :class:`Preempted`: ``fit`` stopped cleanly after a SIGTERM (a ``SystemExit``);
* :class:`DataError`: a dataset or loader argument is unusable;
* :class:`LoggerError`: a value handed to a logger cannot be logged;
* :class:`MisconfigurationError`: a callback's arguments do not fit the run;
* :class:`NonFiniteLossError`: a monitored metric became NaN or infinite;
* :class:`OptimizerConfigError`: an optimizer hyperparameter is out of range;
* :class:`PrivacyError`: a differential-privacy setting is out of range.

All are importable as ``lf.<Name>``; the public namespaces that always offered one keep
it too (``lf.callbacks.MisconfigurationError``, ``lf.loggers.LoggerError``,
``lf.optim.StateMismatchError``, ``lf.data.DataError``...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ._diagnostics import keystr

__all__ = [
    "LightfnError",
    "TreeError",
    "StepError",
    "CompileError",
    "CheckpointError",
    "ExportError",
    "DistributedError",
    "DeviceError",
    "FitError",
    "Preempted",
    "DataError",
    "LoggerError",
    "MisconfigurationError",
    "NonFiniteLossError",
    "StateMismatchError",
    "OptimizerConfigError",
    "PrivacyError",
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


class DeviceError(LightfnError, ValueError):
    """A ``device`` argument (of fit, predict, validate...) names no device."""


class FitError(LightfnError, ValueError):
    """An argument of ``lf.fit`` does not fit the run (bad flag value, empty data...)."""


class Preempted(SystemExit):
    """Raised by ``fit`` after a SIGTERM once ``last.safetensors`` is written.

    A ``SystemExit`` with code 0: an uncaught one ends the process cleanly (the job
    scheduler can requeue it and the next run resumes with ``resume_from="last"``); catch
    it to do something else. ``checkpoint`` is the file written (``None`` if nowhere to).
    Callbacks see it in ``on_exception`` (not ``on_fit_end``: training did not end).
    """

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__(0)
        self.checkpoint = checkpoint


class DataError(LightfnError, ValueError):
    """A dataset or loader argument is unusable (empty data, mismatched lengths, bad sizes)."""


class LoggerError(LightfnError, ValueError):
    """A value handed to a logger cannot be logged (a tensor metric, a bad image...)."""


class MisconfigurationError(LightfnError, ValueError):
    """A callback's arguments do not fit the run (unknown monitor name, bad duration...)."""


class NonFiniteLossError(LightfnError, FloatingPointError):
    """A monitored metric became NaN or infinite: training diverged."""


class StateMismatchError(StepError):
    """An optimizer state was built by a different optimizer than the one updating it.

    ``path`` is where in the optimizer state the wrong piece sits; composite transforms
    (chain, masked, multi_transform, multi_steps) prepend their part of the path as the
    error travels up, so the message names the exact sub-state.
    """

    def __init__(self, detail: str, path: tuple[Any, ...] = ()) -> None:
        self.detail = detail
        self.path = path
        super().__init__(f"{keystr(path, root='opt_state')}: {detail}")

    def prefixed(self, *keys: Any) -> StateMismatchError:
        """The same error, located one level further down from the root."""
        return StateMismatchError(self.detail, tuple(keys) + self.path)


class OptimizerConfigError(LightfnError, ValueError):
    """An optimizer hyperparameter is out of its valid range (e.g. a negative learning rate)."""


class PrivacyError(LightfnError, ValueError):
    """A differential-privacy setting is out of range, or the accountant library is missing."""
