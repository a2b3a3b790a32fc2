"""fit's :class:`Plan`: every counting flag of ``lf.fit`` resolved once against the data.

Limits (``max_epochs``, ``max_steps``, ``max_time``, ``limit_*_batches``), the validation
schedule (``val_check_interval``, ``check_val_every_n_epoch``, sanity batches) and the early
stop floor (``min_epochs``, ``min_steps``), each validated with one clear message; the
loop then asks the plan, at a :class:`~lightfn.fit._run.Position`, what is due.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import TYPE_CHECKING, Any

from .._duration import seconds_of
from ..errors import FitError

if TYPE_CHECKING:
    from ._run import Position

__all__ = ["Plan", "make_plan"]


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

    def validate_after_batch(self, pos: Position) -> bool:
        """After the batch that brought ``pos`` to where it is, is a validation due?"""
        if self.val_every is None or not self.epoch_validates(pos.epoch):
            return False
        counter = pos.step if self.check_val_every_n_epoch is None else pos.batch
        return counter % self.val_every == 0

    def validate_at_epoch_end(self, pos: Position) -> bool:
        return self.val_every is None and self.epoch_validates(pos.epoch) and pos.last_val_step != pos.step

    def epoch_full(self, pos: Position) -> bool:
        return self.train_batches is not None and pos.batch >= self.train_batches

    def may_stop_early(self, pos: Position) -> bool:
        """``min_epochs`` (epochs completed) and ``min_steps`` are met."""
        return pos.epoch + pos.epoch_done >= self.min_epochs and pos.step >= self.min_steps

    def out_of_budget(self, pos: Position, elapsed: float) -> bool:
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
        max_time=None if max_time is None else seconds_of(max_time, who="max_time", error=FitError),
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
