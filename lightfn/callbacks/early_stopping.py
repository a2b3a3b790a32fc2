"""EarlyStopping: stop training when a monitored metric stops improving.

Lightning's semantics, as a callback that only reads logged host floats (no device sync):

- When it checks: with ``check_on_train_epoch_end=None`` (the default) after every
  validation run (``on_validation_end`` with stage ``"validate"``; sanity validation never
  counts), or at each epoch end when no validation has run in this fit (a fit without
  ``val_data``). ``True`` checks only at epoch end, ``False`` only after validation.
- An improvement beats the best value so far by more than ``min_delta`` in the mode's
  direction (lower for ``"min"``, higher for ``"max"``). After ``patience`` checks in a row
  without one, it asks the loop to stop (``fit`` defers that until ``min_epochs`` /
  ``min_steps`` are met).
- ``stopping_threshold``: stop as soon as the metric is at least this good.
  ``divergence_threshold``: stop as soon as it is worse than this. ``check_finite``: stop
  on NaN/inf.
- A monitor name that is not among the logged metrics when it checks raises
  :class:`MisconfigurationError` listing the names that are logged.

>>> import lightfn as lf
>>> es = lf.callbacks.EarlyStopping(monitor="val/loss", mode="min", patience=2)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any, Literal

from ..errors import MisconfigurationError
from ._common import decode_float, encode_float, missing_metric_error
from .base import Callback, Context, Signal

__all__ = ["EarlyStopping"]

_log = logging.getLogger(__name__)


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` checks.

    Args:
        monitor: a logged metric name, e.g. ``"val/loss"`` or ``"val/acc"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: checks in a row without improvement before stopping.
        min_delta: an improvement must beat the best by more than this (>= 0).
        check_finite: stop when the monitored value is NaN or infinite.
        stopping_threshold: stop once the value is better than this.
        divergence_threshold: stop once the value is worse than this.
        check_on_train_epoch_end: where to check (see the module docstring); ``None`` picks
            after validation when the fit validates, else epoch end.
        verbose: log each check's outcome to the ``lightfn`` logger at INFO.

    Attributes:
        wait_count: checks since the last improvement.
        best_score: the best value seen (``inf`` / ``-inf`` before the first check).
        stopped_epoch: the epoch at which it asked to stop (0 if it has not).
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: Literal["min", "max"] = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        verbose: bool = False,
    ) -> None:
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"EarlyStopping: mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(patience, int) or patience < 0:
            raise MisconfigurationError(f"EarlyStopping: patience must be an int >= 0, got {patience!r}")
        if not min_delta >= 0:
            raise MisconfigurationError(f"EarlyStopping: min_delta must be >= 0, got {min_delta!r}")
        self.monitor = monitor
        self.mode = mode
        self.patience = patience
        self.min_delta = float(min_delta)
        self.check_finite = check_finite
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_on_train_epoch_end = check_on_train_epoch_end
        self.verbose = verbose
        self.wait_count = 0
        self.stopped_epoch = 0
        self.best_score = math.inf if mode == "min" else -math.inf
        # Whether any validation (sanity included) ran in this fit: decides where the
        # default mode checks. Not saved: a resumed fit sees its own validations again.
        self._validation_seen = False

    @property
    def state_key(self) -> str:
        return f"EarlyStopping[{self.monitor}]"

    # -- comparisons in the mode's direction ------------------------------------------------

    def _better(self, a: float, b: float) -> bool:
        """``a`` is strictly better than ``b`` (False when either is NaN)."""
        return a < b if self.mode == "min" else a > b

    def _improves(self, current: float) -> bool:
        # Handicap the candidate by min_delta: min mode needs current + min_delta < best,
        # max mode current - min_delta > best.
        handicapped = current + self.min_delta if self.mode == "min" else current - self.min_delta
        return self._better(handicapped, self.best_score)

    # -- hooks ------------------------------------------------------------------------------

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self._validation_seen = False
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        self._validation_seen = True
        if ctx.stage != "validate" or self.check_on_train_epoch_end is True:
            return None
        return self._check(ctx, where="after validation")

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        if self.check_on_train_epoch_end is False:
            return None
        if self.check_on_train_epoch_end is None and self._validation_seen:
            return None
        return self._check(ctx, where="at epoch end")

    def _check(self, ctx: Context, *, where: str) -> Signal | None:
        if self.monitor not in ctx.metrics:
            hint = ""
            if where == "at epoch end" and self.monitor.startswith("val/") and not self._validation_seen:
                hint = (
                    " No validation has run before this epoch end: pass val_data (and an eval_step) "
                    "to fit, or, if validation runs less often than every epoch, pass "
                    "check_on_train_epoch_end=False so EarlyStopping checks only after validation."
                )
            raise missing_metric_error("EarlyStopping", self.monitor, ctx.metrics, hint)
        current = float(ctx.metrics[self.monitor])
        stop, reason = self._evaluate(current)
        if self.verbose:
            _log.info("EarlyStopping %s at epoch %d, step %d: %s", where, ctx.epoch, ctx.step,
                      reason or f"{self.monitor}={current:.6g}, best {self.best_score:.6g}, "
                      f"{self.wait_count}/{self.patience} checks without improvement")
        if not stop:
            return None
        self.stopped_epoch = ctx.epoch
        return Signal(stop=True, reason=reason)

    def _evaluate(self, current: float) -> tuple[bool, str]:
        """Update the bookkeeping with one value; return (stop, reason)."""
        name = self.monitor
        if self.check_finite and not math.isfinite(current):
            return True, (f"EarlyStopping: {name} = {current} is not finite; "
                          f"best value so far was {self.best_score:.6g}")
        if self.stopping_threshold is not None and self._better(current, self.stopping_threshold):
            return True, (f"EarlyStopping: {name} = {current:.6g} reached the stopping threshold "
                          f"{self.stopping_threshold:.6g}")
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, current):
            return True, (f"EarlyStopping: {name} = {current:.6g} is worse than the divergence "
                          f"threshold {self.divergence_threshold:.6g}")
        if self._improves(current):
            self.best_score = current
            self.wait_count = 0
            return False, ""
        self.wait_count += 1
        if self.wait_count >= self.patience:
            return True, (f"EarlyStopping: {name} did not improve by more than {self.min_delta:g} "
                          f"for {self.wait_count} checks (patience {self.patience}); "
                          f"best {name} = {self.best_score:.6g}")
        return False, ""

    # -- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "wait_count": self.wait_count,
            "stopped_epoch": self.stopped_epoch,
            "best_score": encode_float(self.best_score),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("monitor") != self.monitor or state.get("mode") != self.mode:
            raise MisconfigurationError(
                f"EarlyStopping(monitor={self.monitor!r}, mode={self.mode!r}) cannot resume from the "
                f"state of EarlyStopping(monitor={state.get('monitor')!r}, mode={state.get('mode')!r}): "
                "its best score means something else. Resume with the same monitor and mode."
            )
        self.wait_count = int(state["wait_count"])
        self.stopped_epoch = int(state["stopped_epoch"])
        self.best_score = decode_float(state["best_score"])
