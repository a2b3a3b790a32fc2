"""The callback protocol: callbacks observe the loop and return signals.

A callback gets a read-only :class:`Context` at fixed points of ``lf.fit`` and may return
a :class:`Signal` asking the loop to stop, to log extra values, or to write or delete
checkpoints. It never reaches into the loop: everything it may change goes through the
signal, and ``fit`` decides (e.g. a stop request is deferred until ``min_epochs``).

Hook order (each hook calls the callbacks in list order)::

    on_fit_start
    [sanity validation: on_validation_end with stage="sanity"]
    for each epoch:
        for each batch: step -> on_train_batch_end
            [every val_check_interval steps: validation -> on_validation_end]
        [every check_val_every_n_epoch epochs: validation -> on_validation_end]
        on_epoch_end
    on_fit_end                      (on_exception instead, when the loop raises; a SIGTERM
                                     too: fit writes last.safetensors, then raises Preempted)

>>> import lightfn as lf
>>> class StopAt(lf.callbacks.Callback):
...     def __init__(self, n): self.n = n
...     def on_train_batch_end(self, ctx):
...         if ctx.step >= self.n:
...             return lf.callbacks.Signal(stop=True, reason=f"reached step {self.n}")
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Mapping
from typing import Any

__all__ = ["Context", "Signal", "Callback"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What a callback may observe.

    Attributes:
        state: the current TrainState (device tensors; read, never mutate).
        step: train steps taken so far in the run, i.e. calls of the step function, one
            per batch (a host int kept by fit; no device sync). With
            ``accumulate_grad_batches=k`` the optimizer updates once every k steps; fit's
            ``max_steps``, ``log_every_n_steps`` and the logged ``step`` count the same way.
        epoch: the current epoch, from 0.
        batch_idx: batches done in the current epoch.
        metrics: the latest logged values by name (``"train/loss"``, ``"train/loss_epoch"``,
            ``"val/loss"``, ``"lr"``, ``"epoch"``...): host floats, refreshed at log points,
            after validation and at epoch end.
        stage: ``"train"``, ``"validate"`` or ``"sanity"`` inside fit; ``"eval"`` /
            ``"test"`` in ``on_validation_end`` called by ``lf.validate`` / ``lf.test``
            (a standalone evaluation: not part of any run, so fit's callbacks ignore it).
        is_main: True on the process that logs and writes files (rank 0).
        elapsed: seconds since fit started.
    """

    state: Any
    step: int
    epoch: int
    batch_idx: int
    metrics: Mapping[str, float]
    stage: str = "train"
    is_main: bool = True
    elapsed: float = 0.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class Signal:
    """What a callback may ask of the loop.

    Attributes:
        stop: end training after this hook (honoured once ``min_epochs``/``min_steps``
            are met).
        reason: why, for the progress bar and the log.
        log: extra values to log under the given names (e.g. the learning rate).
        save: paths where fit writes a full loop checkpoint (state, loop position,
            callback states), atomically.
        delete: checkpoint paths fit removes (e.g. one that fell out of the top k).
    """

    stop: bool = False
    reason: str = ""
    log: Mapping[str, float] = dataclasses.field(default_factory=dict)
    save: tuple[pathlib.Path, ...] = ()
    delete: tuple[pathlib.Path, ...] = ()


class Callback:
    """Base class: override the hooks you need; each returns ``None`` or a :class:`Signal`.

    A callback with bookkeeping that must survive a resume (best scores, counters)
    returns it from :meth:`state_dict` (JSON-serializable values only) and restores it in
    :meth:`load_state_dict`; fit stores it in the checkpoint under :attr:`state_key`.
    """

    @property
    def state_key(self) -> str:
        """The name this callback's state is stored under (unique per callback in a fit)."""
        return type(self).__name__

    def on_fit_start(self, ctx: Context) -> Signal | None:
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        return None

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        return None

    def on_fit_end(self, ctx: Context) -> Signal | None:
        return None

    def on_exception(self, ctx: Context, error: BaseException) -> Signal | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
