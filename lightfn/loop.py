"""The parts of ``lf.fit`` that are not the loop itself: its plan, position and rules.

- :class:`Plan`: every counting flag of ``fit`` resolved once against the data (limits,
  validation schedule, stopping limits), validated with one clear message each.
- :class:`Position`: where the loop is (epoch, batch in the epoch, steps, ...): host ints,
  saved in every fit checkpoint so a resumed run continues at the exact batch.
- :func:`resolve_device`, and :func:`preemption_signal` (SIGTERM turned into a flag the
  loop polls between steps; ranks agree on it and on stopping in
  :meth:`lightfn.spread.Spread.vote`).
- What fit makes of its step and data arguments before looping: :func:`configure_steps`
  (precision, ``accumulate_grad_batches`` and ``gradient_clip_val`` applied to an
  ``lf.TrainStep``), :func:`first_batches` (``overfit_batches``), :func:`batch_dtype` and
  :func:`move_batch` (how each batch reaches the device; ``lf.validate`` uses them too).

Running the steps with on-device metric accumulation lives in :mod:`lightfn.runner`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch

from . import optim, tree
from .data import iterate, num_batches
from ._device import resolve_device
from .errors import FitError, LightfnError
from .step import EvalStep, TrainStep
from .transforms import Jitted

__all__ = ["FitError", "Plan", "Position", "make_plan", "resolve_device", "preemption_signal",
           "configure_steps", "first_batches", "batch_dtype", "move_batch", "positive"]


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """The resolved counting flags of one ``fit`` call (see ``fit``'s docstring).

    ``train_batches``: batches per epoch; ``val_batches`` / ``sanity_batches``: batches
    per validation / sanity run, one count per validation set (``None`` = as many as the
    data yields; empty without validation). ``val_every``: validate after every that many batches
    (``None``: at epoch end); counted over the whole run when ``val_check_every_n_epoch``
    is ``None``, else within each epoch.
    """

    max_epochs: int | None
    max_steps: int | None
    max_time: float | None
    min_epochs: int
    min_steps: int
    train_batches: int | None
    val_batches: tuple[int | None, ...]
    sanity_batches: tuple[int | None, ...]
    val_every: int | None
    check_val_every_n_epoch: int | None
    log_every_n_steps: int

    def epoch_validates(self, epoch: int) -> bool:
        n = self.check_val_every_n_epoch
        return n is None or (epoch + 1) % n == 0

    def validate_after_batch(self, pos: "Position") -> bool:
        """After the batch that brought ``pos`` to where it is, is a validation due?"""
        if self.val_every is None or not self.epoch_validates(pos.epoch):
            return False
        counter = pos.step if self.check_val_every_n_epoch is None else pos.batch
        return counter % self.val_every == 0

    def validate_at_epoch_end(self, pos: "Position") -> bool:
        return self.val_every is None and self.epoch_validates(pos.epoch) and pos.last_val_step != pos.step

    def epoch_full(self, pos: "Position") -> bool:
        return self.train_batches is not None and pos.batch >= self.train_batches

    def may_stop_early(self, pos: "Position") -> bool:
        """``min_epochs`` (epochs completed) and ``min_steps`` are met."""
        return pos.epoch + pos.epoch_done >= self.min_epochs and pos.step >= self.min_steps

    def out_of_budget(self, pos: "Position", elapsed: float) -> bool:
        return (self.max_steps is not None and pos.step >= self.max_steps) or (
            self.max_time is not None and pos.elapsed + elapsed >= self.max_time
        )


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise FitError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _count(name: str, value: int | float | None, available: int | None) -> int | None:
    """An int or a fraction of ``available`` batches (Lightning's limit_*_batches)."""
    if value is None:
        return available
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise FitError(f"{name} must be an int >= 0 or a float in [0, 1], got {value!r}")
    if isinstance(value, int):
        return value if available is None else min(value, available)
    if value > 1.0:
        raise FitError(f"{name}={value} is a fraction > 1; pass an int for a number of batches")
    if available is None:
        if value == 1.0:
            return None
        raise FitError(f"{name}={value} is a fraction, but the data has no len(); pass an int number of batches")
    n = int(available * value)
    if n == 0 and value > 0:
        raise FitError(f"{name}={value} of {available} batches is less than one batch; raise it or pass an int")
    return n


def parse_max_time(max_time: Any) -> float | None:
    """Seconds from a number, a ``timedelta``, a dict of timedelta fields, or ``"DD:HH:MM:SS"``."""
    if max_time is None:
        return None
    from .callbacks.timer import parse_duration

    try:
        return parse_duration(max_time)
    except LightfnError as e:
        raise FitError(f"max_time: {str(e).removeprefix('Timer: ')}") from None


def make_plan(
    *,
    n_train: int | None,
    n_val: tuple[int | None, ...],
    max_epochs: int | None,
    max_steps: int | None,
    max_time: float | str | datetime.timedelta | None,
    min_epochs: int,
    min_steps: int,
    check_val_every_n_epoch: int | None,
    val_check_interval: int | float | None,
    num_sanity_val_steps: int,
    limit_train_batches: int | float | None,
    limit_val_batches: int | float | None,
    log_every_n_steps: int,
) -> Plan:
    """Validate fit's counting flags and resolve them against the data's lengths.

    ``n_val``: the batch count of each validation set (``None`` when unknown); empty without
    validation. ``limit_val_batches`` and ``num_sanity_val_steps`` apply to each set, as
    Lightning applies them to each val dataloader.
    """
    has_val = bool(n_val)
    if max_epochs is None and max_steps is None:
        max_epochs = 1000  # Lightning's default when neither limit is given
    if max_epochs is not None and max_epochs != -1:
        _int("max_epochs", max_epochs, 0)
    if max_steps is not None and max_steps != -1:
        _int("max_steps", max_steps, 0)
    _int("min_epochs", min_epochs, 0)
    _int("min_steps", min_steps, 0)
    _int("log_every_n_steps", log_every_n_steps, 1)
    _int("num_sanity_val_steps", num_sanity_val_steps, -1)
    if check_val_every_n_epoch is not None:
        _int("check_val_every_n_epoch", check_val_every_n_epoch, 1)
    if n_train == 0:
        raise FitError(
            "train_data has no batches (an empty dataset, or a batch size larger than the data with drop_last=True)"
        )
    train_batches = _count("limit_train_batches", limit_train_batches, n_train)
    val_batches = tuple(_count("limit_val_batches", limit_val_batches, n) for n in n_val)
    if train_batches == 0:
        raise FitError(f"limit_train_batches={limit_train_batches!r} leaves no training batch")
    val_every = _val_every(val_check_interval, train_batches, check_val_every_n_epoch) if has_val else None
    sanity = val_batches if num_sanity_val_steps == -1 else tuple(_min(num_sanity_val_steps, n) for n in val_batches)
    return Plan(
        max_epochs=None if max_epochs == -1 else max_epochs,
        max_steps=None if max_steps == -1 else max_steps,
        max_time=parse_max_time(max_time),
        min_epochs=min_epochs,
        min_steps=min_steps,
        train_batches=train_batches,
        val_batches=val_batches,
        sanity_batches=sanity,
        val_every=val_every,
        check_val_every_n_epoch=check_val_every_n_epoch,
        log_every_n_steps=log_every_n_steps,
    )


def _min(a: int, b: int | None) -> int:
    return a if b is None else min(a, b)


def _val_every(interval: int | float | None, train_batches: int | None, every_n_epoch: int | None) -> int | None:
    if interval is None:
        if every_n_epoch is None:
            raise FitError("check_val_every_n_epoch=None needs an int val_check_interval (validate every N steps)")
        return None
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval <= 0:
        raise FitError(f"val_check_interval must be an int >= 1 (batches) or a float in (0, 1] (epoch fraction), got {interval!r}")
    if isinstance(interval, float):
        if interval > 1.0:
            raise FitError(f"val_check_interval={interval} is a fraction > 1; pass an int for a number of batches")
        if every_n_epoch is None:
            raise FitError("check_val_every_n_epoch=None needs an int val_check_interval, not a fraction")
        if train_batches is None:
            raise FitError("val_check_interval as a fraction needs data with a len(); pass an int number of batches")
        return max(1, int(train_batches * interval))
    if every_n_epoch is not None and train_batches is not None and interval > train_batches:
        raise FitError(
            f"val_check_interval={interval} is more than the {train_batches} batches of an epoch, so validation "
            "would never run; lower it, or pass check_val_every_n_epoch=None to count batches across epochs"
        )
    return interval


# ----------------------------------------------------------------------------- step options, data


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
    inner = step.fn if isinstance(step, Jitted) else step
    if not isinstance(step, TrainStep):
        asked = [f"{n}={v!r}" for n, v in (("precision", precision), ("accumulate_grad_batches", accumulate if accumulate != 1 else None),
                                            ("gradient_clip_val", clip)) if v is not None]
        if asked:
            raise FitError(
                f"{', '.join(asked)} apply to an lf.train_step(...) step, and this step is a {type(step).__name__}. "
                "For your own step: use lf.optim.multi_steps(opt, k) for accumulation, "
                "lf.optim.chain(lf.optim.clip_by_global_norm(v), opt) for clipping, and autocast inside the step for "
                "precision" + (" (or pass the TrainStep unjitted: fit compiles it)" if isinstance(step, Jitted) else "")
            )
        if isinstance(inner, TrainStep):
            state = inner.prepare_state(state)
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


def batch_dtype(step: Any) -> torch.dtype | None:
    """The dtype floating batches are cast to: that of a ``*-true`` precision (of an
    ``lf.TrainStep`` or ``lf.EvalStep``), else None."""
    inner = step.fn if isinstance(step, Jitted) else step
    if not isinstance(inner, (TrainStep, EvalStep)):
        return None
    return {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}.get(inner.precision)


def move_batch(batch: Any, device: torch.device, dtype: torch.dtype | None) -> Any:
    """``batch`` on ``device`` (without a host sync) and, for ``dtype``, its floating leaves cast."""
    first = next((x for x in tree.leaves(batch) if isinstance(x, torch.Tensor)), None)
    if first is not None and first.device != device:
        batch = tree.to_device(batch, device, non_blocking=True)
    # "*-true" precisions hold params in that dtype; floating inputs follow (as in Lightning).
    return batch if dtype is None else tree.cast(batch, dtype)


# ----------------------------------------------------------------------------- position


@dataclasses.dataclass(kw_only=True)
class Position:
    """Where the loop is. ``batch``: batches done in ``epoch``; ``step``: steps taken in
    the run; ``epoch_done``: ``epoch``'s end was processed (a checkpoint then resumes at the
    next epoch; it stays False when a stop closed the epoch before its last batch, so a
    resumed run continues inside it); ``last_val_step``: the step of the latest validation (so a resumed run
    neither repeats nor skips one); ``elapsed``: seconds spent by earlier runs resumed from."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    epoch_done: bool = False
    last_val_step: int = -1
    stop_requested: bool = False
    elapsed: float = 0.0


# ----------------------------------------------------------------------------- devices, processes


@contextlib.contextmanager
def preemption_signal() -> Iterator[Callable[[], bool]]:
    """Catch SIGTERM for the duration of the block; yield a function saying if it came.

    The previous handler is restored on exit. Outside the main thread (where Python allows
    no signal handlers) nothing is installed and the function always says False.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event.is_set
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
