"""What fit makes of its step arguments, decided once at its entry.

:func:`classify` unwraps and classifies a step (an ``lf.jit`` wrapper, an ``lf.TrainStep``
underneath, a step already wrapped by ``lf.distributed.data_parallel`` /
``fully_sharded``): the one place fit asks "what kind of step is this?". The step answers
its own questions (``TrainStep.batch_dtype``). :func:`configure_steps` applies fit's
``precision`` / ``accumulate_grad_batches`` / ``gradient_clip_val`` to an ``lf.TrainStep``;
:func:`first_batches` takes ``overfit_batches``; :func:`move_batch` brings a batch to the
device (``lf.validate`` uses it too).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import torch

from .. import optim, tree
from ..data import iterate, num_batches
from ..distributed.data_parallel import _AverageGrads
from ..distributed.fully_sharded import FullyShardedStep
from ..errors import FitError
from ..step import EvalStep, TrainStep
from .._compile.jit import Jitted

__all__ = ["StepKind", "classify", "configure_steps", "first_batches", "move_batch", "positive"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StepKind:
    """What fit needs to know of a step.

    ``inner``: the step under an ``lf.jit`` wrapper (the step itself otherwise);
    ``jitted``: the caller compiled it with ``lf.jit``, so fit calls it as given (no fused
    metric accumulation); ``distributed``: ``"ddp"`` / ``"fsdp"`` when it is already
    wrapped by ``lf.distributed.data_parallel`` / ``fully_sharded``, else None.
    """

    inner: Any
    jitted: bool
    distributed: str | None

    @property
    def train_step(self) -> TrainStep | None:
        """The ``lf.TrainStep`` underneath, if it is one."""
        return self.inner if isinstance(self.inner, TrainStep) else None

    @property
    def batch_dtype(self) -> torch.dtype | None:
        """The dtype floating batch leaves are cast to (a ``*-true`` precision), else None."""
        return self.inner.batch_dtype if isinstance(self.inner, (TrainStep, EvalStep)) else None


def classify(step: Any) -> StepKind:
    """Unwrap and classify ``step`` (see :class:`StepKind`)."""
    jitted = isinstance(step, Jitted)
    inner = step.fn if jitted else step
    if isinstance(inner, FullyShardedStep):
        distributed: str | None = "fsdp"
    elif isinstance(inner, TrainStep) and isinstance(inner.grad_transform, _AverageGrads):
        distributed = "ddp"
    else:
        distributed = None
    return StepKind(inner=inner, jitted=jitted, distributed=distributed)


def positive(name: str, value: Any) -> int:
    """``value`` after checking it is an int >= 1 (``fast_dev_run=n``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FitError(f"{name} must be True or an int >= 1, got {value!r}")
    return value


def configure_steps(step: Any, state: Any, eval_step: Any, precision: str | None, accumulate: int,
                     clip: float | None) -> tuple[Any, Any, Any]:
    """Apply precision / accumulation / clipping to an ``lf.TrainStep`` (refused for others)."""
    if isinstance(accumulate, bool) or not isinstance(accumulate, int) or accumulate < 1:
        raise FitError(f"accumulate_grad_batches must be an int >= 1, got {accumulate!r}")
    if clip is not None and not (isinstance(clip, (int, float)) and clip > 0):
        raise FitError(f"gradient_clip_val must be a number > 0, got {clip!r}")
    kind = classify(step)
    if not isinstance(step, TrainStep):
        asked = [f"{n}={v!r}" for n, v in (("precision", precision), ("accumulate_grad_batches", accumulate if accumulate != 1 else None),
                                            ("gradient_clip_val", clip)) if v is not None]
        if asked:
            raise FitError(
                f"{', '.join(asked)} apply to an lf.train_step(...) step, and this step is a {type(step).__name__}. "
                "For your own step: use lf.optim.multi_steps(opt, k) for accumulation, "
                "lf.optim.chain(lf.optim.clip_by_global_norm(v), opt) for clipping, and autocast inside the step for "
                "precision" + (" (or pass the TrainStep unjitted: fit compiles it)" if kind.jitted else "")
            )
        if kind.train_step is not None:
            state = kind.train_step.prepare_state(state)
        return step, state, eval_step
    if accumulate != 1 or clip is not None:
        if int(state.step) != 0:
            raise FitError(
                f"accumulate_grad_batches / gradient_clip_val re-initialize the optimizer state, but the state has "
                f"already taken {int(state.step)} steps; build the optimizer with lf.optim.multi_steps / "
                "lf.optim.clip_by_global_norm instead, or pass a fresh state (resume_from restores a run)"
            )
        opt = step.optimizer
        if clip is not None:
            opt = optim.chain(optim.clip_by_global_norm(float(clip)), opt)
        if accumulate > 1:
            opt = optim.multi_steps(opt, accumulate)
        step = step.replace(optimizer=opt)
        state = state.replace(opt_state=step.init_opt_state(state.params))
    if precision is not None:
        step = step.replace(precision=precision)
        if isinstance(eval_step, EvalStep):
            eval_step = eval_step.replace(precision=precision)
    return step, step.prepare_state(state), eval_step


def first_batches(data: Any, overfit: int | float) -> list[Any]:
    """The first ``overfit`` batches (an int, or a fraction) of epoch 0, taken once."""
    n = num_batches(data)
    if isinstance(overfit, float) and not isinstance(overfit, bool):
        if not 0 < overfit <= 1 or n is None:
            raise FitError(f"overfit_batches={overfit} must be an int, or a fraction in (0, 1] of data with a len()")
        count = max(1, int(n * overfit))
    elif isinstance(overfit, int) and not isinstance(overfit, bool) and overfit > 0:
        count = overfit
    else:
        raise FitError(f"overfit_batches must be an int >= 0 or a float in (0, 1], got {overfit!r}")
    batches = list(itertools.islice(iterate(data, 0), count))
    if not batches:
        raise FitError("train_data has no batches (an empty dataset, or a batch size larger than the data?)")
    return batches


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``batch`` on ``device`` (without a host sync) and, for ``dtype``, its floating leaves cast."""
    first = next((x for x in tree.leaves(batch) if isinstance(x, torch.Tensor)), None)
    if first is not None and first.device != device:
        batch = tree.to_device(batch, device, non_blocking=True)
    # "*-true" precisions hold params in that dtype; floating inputs follow (as in Lightning).
    return batch if dtype is None else tree.cast(batch, dtype)
