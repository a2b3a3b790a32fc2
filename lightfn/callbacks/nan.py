"""TerminateOnNaN: fail the run loudly as soon as a monitored metric is NaN or infinite.

It reads the logged host floats only, so it costs no device sync: a NaN is seen at the
first point where the loop copies metrics to the host (every ``log_every_n_steps`` steps,
after validation, at epoch end). Pass ``log_every_n_steps=1`` to ``fit`` to catch the
exact step.

It raises :class:`NonFiniteLossError` rather than asking to stop: a diverged run should
fail, not end looking like a finished one. ``fit`` then calls ``on_exception`` on every
callback and re-raises.

>>> import lightfn as lf
>>> guard = lf.callbacks.TerminateOnNaN(monitor=("train/loss", "val/loss"))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import MisconfigurationError, NonFiniteLossError
from .base import Callback, Context, Signal

__all__ = ["TerminateOnNaN"]


class TerminateOnNaN(Callback):
    """Raise :class:`NonFiniteLossError` when a monitored metric is NaN/inf.

    Args:
        monitor: logged metric names to watch (a single name is accepted too). The default
            watches the step value ``train/loss`` (logged every ``log_every_n_steps`` steps)
            and its epoch mean ``train/loss_epoch`` (any NaN step makes it NaN, so an epoch
            shorter than ``log_every_n_steps`` is covered too). A name not logged yet is
            skipped, but if *none* of them has been logged by the end of the first epoch the
            guard could never fire, so it raises :class:`MisconfigurationError` naming the
            metrics that are logged.
    """

    def __init__(self, monitor: str | Iterable[str] = ("train/loss", "train/loss_epoch")) -> None:
        self.monitor: tuple[str, ...] = (monitor,) if isinstance(monitor, str) else tuple(monitor)
        if not self.monitor:
            raise MisconfigurationError("TerminateOnNaN: monitor must name at least one metric")
        self._seen = False  # has any monitored name been logged in this fit?

    def _check(self, ctx: Context) -> None:
        for name in self.monitor:
            value = ctx.metrics.get(name)
            if value is None:
                continue
            self._seen = True
            if math.isfinite(value):
                continue
            raise NonFiniteLossError(
                f"{name} = {value} at step {ctx.step} (epoch {ctx.epoch}, batch {ctx.batch_idx}, "
                f"stage {ctx.stage!r}): training diverged. Metrics reach the host only at log points "
                "(every log_every_n_steps steps, after validation, at epoch end), so the first bad "
                "step may be earlier (fit(log_every_n_steps=1) pinpoints it). Usual fixes: a lower learning "
                "rate, gradient clipping (gradient_clip_val=1.0), a loss that cannot take "
                "log(0) or divide by 0, or bf16 instead of fp16."
            )

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self._seen = False
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        self._check(ctx)
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        self._check(ctx)
        return None

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        self._check(ctx)
        if not self._seen:
            logged = ", ".join(repr(k) for k in sorted(ctx.metrics)) or "none"
            raise MisconfigurationError(
                f"TerminateOnNaN watches {list(self.monitor)}, but none of them was logged by the end of "
                f"epoch {ctx.epoch}, so it could never catch a NaN; logged metrics: {logged}. Pass the "
                "names to watch, e.g. TerminateOnNaN(monitor=('train/g_loss', 'train/d_loss'))."
            )
        return None
