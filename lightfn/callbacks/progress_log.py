"""ProgressLog: one plain line per epoch, for output that is not a terminal.

A live tqdm bar redraws one line with carriage returns: in a CI log, a ``nohup`` file or a
notebook's captured output that is noise, and with no bar at all a long run looks hung.
So when stdout is not a terminal ``lf.fit`` adds this callback instead of
:class:`~lightfn.callbacks.ProgressBar` (``progress=None``; ``progress=False`` silences
both). Each finished epoch prints::

    epoch 1/10  step 250  train/loss_epoch=0.4123  val/loss=0.3987  12.3s

(the epoch counted from 1, of ``max_epochs`` when known; the step count; the epoch means of
the train metrics and the latest validation values, as logged; seconds since fit started).
fit also writes through :meth:`ProgressLog.write` when the first call of a compiled train
step starts and ends, with the time it took. Like the bar it reads only values the loop
already copied to the host, and prints on rank 0 only.

>>> import io, lightfn as lf
>>> log = lf.callbacks.ProgressLog(max_epochs=10, file=io.StringIO())
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import IO

from .._members import is_member_name
from .base import Callback, Context, Signal

__all__ = ["ProgressLog", "epoch_line"]


def epoch_line(epoch: int, max_epochs: int | None, step: int, metrics: Mapping[str, float], elapsed: float) -> str:
    """The line for a finished epoch (``epoch`` counted from 0, shown from 1)."""
    # An ensemble's members are left to the loggers: the line shows their means.
    shown = [f"{name}={metrics[name]:.4g}" for name in sorted(metrics)
             if ((name.startswith("train/") and name.endswith("_epoch")) or name.startswith("val/"))
             and not is_member_name(name)]
    total = "" if max_epochs is None else f"/{max_epochs}"
    return "  ".join([f"epoch {epoch + 1}{total}", f"step {step}", *shown, f"{elapsed:.1f}s"])


class ProgressLog(Callback):
    """Print one plain line per finished epoch (rank 0 only).

    Args:
        max_epochs: shown as ``epoch i/max_epochs`` (``None``: ``epoch i``).
        file: where to print (default: ``sys.stdout`` at the time of printing).
    """

    role = "progress"

    def __init__(self, max_epochs: int | None = None, file: IO[str] | None = None) -> None:
        self.max_epochs = max_epochs
        self.file = file

    def write(self, line: str) -> None:
        """Print ``line`` and flush it, so a log file being followed shows it at once."""
        out = self.file or sys.stdout
        print(line, file=out, flush=True)

    def on_announce(self, ctx: Context, text: str) -> bool:
        if ctx.is_main:
            self.write(text)
        return True

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        if ctx.is_main:
            self.write(epoch_line(ctx.epoch, self.max_epochs, ctx.step, ctx.metrics, ctx.elapsed))
        return None
