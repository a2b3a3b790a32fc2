"""Timer: measure training time and stop the run once a time budget is spent.

The clock is ``ctx.total_elapsed``: seconds of training kept by the loop on the host (no
device sync), including the runs a resumed run continues (the checkpoint's loop position
carries them), so a resumed run continues the clock where the checkpoint left it instead of
starting a fresh budget. The value is also in :meth:`Timer.state_dict`, so
:meth:`Timer.time_elapsed` reads right after a resume, before the first hook.

>>> import lightfn as lf
>>> timer = lf.callbacks.Timer(duration="00:12:00:00")        # 12 hours
>>> timer.duration
43200.0
>>> lf.callbacks.Timer(duration=dict(minutes=5)).duration
300.0
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Mapping
from typing import Any, Literal

from .._duration import Duration, seconds_of
from ..errors import MisconfigurationError
from .base import Callback, Context, Signal

__all__ = ["Timer", "parse_duration"]

def parse_duration(duration: Duration) -> float:
    """Seconds from a number of seconds, a ``timedelta``, a dict of ``timedelta`` keyword
    arguments (``dict(days=1, hours=2)``) or a ``"DD:HH:MM:SS"`` string."""
    return seconds_of(duration, who="Timer", error=MisconfigurationError)


class Timer(Callback):
    """Track elapsed training time; with ``duration``, stop once it is exceeded.

    Args:
        duration: the time budget (see :func:`parse_duration`), or ``None`` to only measure.
        interval: check after every optimizer ``"step"`` (``on_train_batch_end``) or at each
            ``"epoch"`` end.

    The stop request goes through ``fit`` like any other (deferred until ``min_epochs`` /
    ``min_steps``).
    """

    def __init__(self, duration: Duration | None = None, interval: Literal["step", "epoch"] = "step") -> None:
        if interval not in ("step", "epoch"):
            raise MisconfigurationError(f"Timer: interval must be 'step' or 'epoch', got {interval!r}")
        self.duration: float | None = None if duration is None else parse_duration(duration)
        self.interval = interval
        self.start_time: float | None = None  # wall-clock (time.time()) when this fit started
        self._elapsed = 0.0   # ctx.total_elapsed at the latest hook (the loop counts resumed time)

    def time_elapsed(self) -> float:
        """Seconds of training so far, including the runs this one resumed from."""
        return self._elapsed

    def time_remaining(self) -> float | None:
        """Seconds left of ``duration`` (``None`` without one)."""
        return None if self.duration is None else max(self.duration - self.time_elapsed(), 0.0)

    def _tick(self, ctx: Context, interval: str | None = None) -> Signal | None:
        """Read the clock; at this timer's ``interval`` (``None``: only read), stop once the
        budget is spent."""
        self._elapsed = float(ctx.total_elapsed)
        if interval != self.interval or self.duration is None or self._elapsed < self.duration:
            return None
        spent = datetime.timedelta(seconds=round(self._elapsed))
        budget = datetime.timedelta(seconds=round(self.duration))
        return Signal(stop=True, reason=f"Timer: time limit {budget} reached (elapsed {spent}) "
                                        f"at epoch {ctx.epoch}, step {ctx.step}")

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self.start_time = time.time() - float(ctx.elapsed)
        return self._tick(ctx)

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        return self._tick(ctx, "step")

    def on_validation_end(self, ctx: Context) -> Signal | None:
        return self._tick(ctx)

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        return self._tick(ctx, "epoch")

    def on_fit_end(self, ctx: Context) -> Signal | None:
        return self._tick(ctx)

    def state_dict(self) -> dict[str, Any]:
        return {"time_elapsed": self.time_elapsed()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._elapsed = float(state["time_elapsed"])
