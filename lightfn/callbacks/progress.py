"""ProgressBar: a tqdm bar per epoch showing the step, it/s, the latest loss and val metrics.

It reads only what the loop already copied to the host (``ctx.metrics``, refreshed at log
points, after validation and at epoch end), so showing progress costs no device sync.
``lf.fit`` adds one by default when stdout is a terminal (``progress=None``); ``True``
forces it, ``False`` turns it off.

>>> import lightfn as lf
>>> bar = lf.callbacks.ProgressBar(total=100)   # total: batches per epoch, if known
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO, Any

from tqdm.auto import tqdm

from .._members import is_member_name
from .base import Callback, Context, Signal

__all__ = ["ProgressBar"]


def _fmt(value: float) -> str:
    return f"{value:.4g}"


class ProgressBar(Callback):
    """Show training progress with tqdm (rank 0 only).

    Args:
        total: batches per epoch, for a bar with an ETA (``None``: a counter).
        file: where to draw (default ``sys.stdout``).
        leave: keep each finished epoch's bar on screen.
    """

    role = "progress"

    def __init__(self, total: int | None = None, file: IO[str] | None = None, leave: bool = True) -> None:
        self.total = total
        self.file = file
        self.leave = leave
        self.bar: Any = None
        self._epoch = -1
        self._shown: dict[str, str] = {}

    def _postfix(self, ctx: Context) -> dict[str, str]:
        m: Mapping[str, float] = ctx.metrics
        out = {"step": str(ctx.step)}
        loss = m.get("train/loss", m.get("train/loss_epoch"))
        if loss is not None:
            out["loss"] = _fmt(loss)
        for name in sorted(m):
            if name.startswith("val/") and not is_member_name(name):
                out[name] = _fmt(m[name])
        return out

    def _refresh(self, ctx: Context) -> None:
        if not ctx.is_main:
            return
        if self.bar is None or ctx.epoch != self._epoch:
            self._close()
            self._epoch = ctx.epoch
            self.bar = tqdm(total=self.total, desc=f"epoch {ctx.epoch}", initial=max(ctx.batch_idx, 0),
                            file=self.file or sys.stdout, leave=self.leave, dynamic_ncols=True)
        if ctx.batch_idx > self.bar.n:
            self.bar.update(ctx.batch_idx - self.bar.n)
        shown = self._postfix(ctx)
        if shown != self._shown:  # only when the loop logged something new
            self._shown = shown
            self.bar.set_postfix(shown, refresh=False)

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self._epoch, self._shown = -1, {}
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        self._refresh(ctx)
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        if ctx.stage == "validate" and self.bar is not None:
            self._refresh(ctx)
        return None

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        if self.bar is not None and ctx.is_main:
            self._refresh(ctx)
            self.bar.refresh()
        self._close()
        return None

    def on_fit_end(self, ctx: Context) -> Signal | None:
        self._close()
        return None

    def on_exception(self, ctx: Context, error: BaseException) -> Signal | None:
        self._close()
        return None
