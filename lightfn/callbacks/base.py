"""The callback protocol: callbacks observe the loop and return signals.

A callback gets a read-only :class:`Context` at fixed points of ``lf.fit`` and may return
a :class:`Signal` asking the loop to stop, to log extra values, to write or delete
checkpoints, or to continue from another state. It never reaches into the loop:
everything it may change goes through the signal, and ``fit`` decides (e.g. a stop request
is deferred until ``min_epochs``).

Hook order (each hook calls the callbacks in list order)::

    on_fit_start
    [sanity validation: on_validation_start, on_validation_batch_end per batch,
                        on_validation_end, all with stage="sanity"]
    for each epoch:
        on_train_epoch_start        (also for the epoch a resumed run continues)
        for each batch: step -> on_train_batch_end
            [every val_check_interval steps: validation (the hooks above, stage="validate")]
        [every check_val_every_n_epoch epochs: validation]
        on_epoch_end
    on_fit_end                      (on_exception instead, when the loop raises; a SIGTERM
                                     too: fit writes last.safetensors, then raises Preempted)
    on_save_checkpoint              (whenever fit writes a checkpoint, just before writing)

Within one hook, what a callback returns is applied before the next callback runs: a
value it logs (``Signal(log=...)``) is in the next callbacks' ``ctx.metrics`` (so an
``EarlyStopping`` listed after it may monitor it), and a state it returns
(``Signal(state=...)``) is their ``ctx.state`` and the state training continues from.
Checkpoints a hook's signals ask for are written after every callback of that hook ran.

``ctx.state`` is the state as of the hook, never a copy (copying a model every step would
cost as much as the step): its tensors are the loop's own, and a compiled step overwrites
them in place at the next step (clone what you keep, as ``EMA`` does). Changing them in
place is refused: fit compares the tensors' version counters before and after each
callback (a few host integer reads, no device work) and raises a ``FitError`` naming the
callback and the tensor's path. To change the state, return ``Signal(state=new_state)``.

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
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

__all__ = ["Context", "Signal", "Callback"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Context:
    """What a callback may observe.

    Attributes:
        state: the current TrainState as of the hook (the loop's own device tensors: read
            them, clone what you keep, never change them in place; return
            ``Signal(state=...)`` instead). During validation hooks: the state validated
            (another one when a callback asked for it with ``Signal(eval_state=...)``).
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
        elapsed: seconds since this fit call started.
        total_elapsed: seconds of training in the run, including the runs it was resumed
            from (what ``max_time`` and ``lf.callbacks.Timer`` count).
        loggers: fit's loggers (``lf.loggers.Logger``), e.g. to log an image or text a
            logger supports; empty on ranks other than 0 and with ``fast_dev_run``.
        batch_metrics: in ``on_validation_batch_end``: that batch's metrics as named in the
            log (``"val/loss"``...), 0-d device tensors (reading one with ``float()``
            waits for the device; on several ranks: this rank's batch). Empty elsewhere.
    """

    state: Any
    step: int
    epoch: int
    batch_idx: int
    metrics: Mapping[str, float]
    stage: str = "train"
    is_main: bool = True
    elapsed: float = 0.0
    total_elapsed: float = 0.0
    loggers: Sequence[Any] = ()
    batch_metrics: Mapping[str, torch.Tensor] = dataclasses.field(default_factory=dict)


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
        state: a new state to continue from (e.g. ``ctx.state.replace(params=...)`` to
            average weights or reset an optimizer state), or ``None`` for no change. It must
            have the current state's tree structure, shapes and dtypes (a compiled step is
            built for those); fit refuses anything else naming the callback and the first
            differing path. Honoured in every hook but ``on_save_checkpoint`` and
            ``on_exception``.
        eval_state: only from ``on_validation_start``: the state this validation run
            evaluates (e.g. one with averaged params); training continues from its own
            state. Checked like ``state``.
        metadata: only from ``on_save_checkpoint``: JSON values added to the metadata of
            the checkpoint being written (read back as ``lf.read_metadata(path)["metadata"]``).
    """

    stop: bool = False
    reason: str = ""
    log: Mapping[str, float] = dataclasses.field(default_factory=dict)
    save: tuple[pathlib.Path, ...] = ()
    delete: tuple[pathlib.Path, ...] = ()
    state: Any = None
    eval_state: Any = None
    metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)


class Callback:
    """Base class: override the hooks you need; each returns ``None`` or a :class:`Signal`.

    A callback with bookkeeping that must survive a resume (best scores, counters,
    averaged weights) returns it from :meth:`state_dict` and restores it in
    :meth:`load_state_dict`; fit stores it in every checkpoint under :attr:`state_key`.
    Its values are JSON-serializable values, or tensors: a tensor, or a dict with string
    keys of tensors (nested), at the top level of the dict. Tensors are stored as tensors
    (bit-exact), and come back on the state's device.
    """

    #: What this callback stands for among the defaults fit adds: a progress display
    #: (``"progress"``) or the learning-rate log (``"lr"``). fit adds its own default for a
    #: role (a progress bar or line log; ``"lr"`` at its log points) only when no callback
    #: it was given has that role.
    role: ClassVar[str | None] = None

    @property
    def checkpoint_dir(self) -> pathlib.Path | None:
        """The folder this callback writes checkpoints to, if any: fit's default
        ``ckpt_dir`` (SIGTERM's ``last.safetensors``, ``resume_from="last"``) is the first
        callback's that has one."""
        return None

    def on_announce(self, ctx: Context, text: str) -> bool:
        """A message from fit for the person watching (the model summary, "compiling the
        train step..."): return True when shown. fit prints it itself when no callback
        shows it (rank 0 only)."""
        return False

    @property
    def state_key(self) -> str:
        """The name this callback's state is stored under (unique per callback in a fit)."""
        return type(self).__name__

    def on_fit_start(self, ctx: Context) -> Signal | None:
        return None

    def on_train_epoch_start(self, ctx: Context) -> Signal | None:
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        return None

    def on_validation_start(self, ctx: Context) -> Signal | None:
        return None

    def on_validation_batch_end(self, ctx: Context) -> Signal | None:
        """After each validation batch; ``ctx.batch_metrics`` holds that batch's metrics."""
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        return None

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        return None

    def on_fit_end(self, ctx: Context) -> Signal | None:
        return None

    def on_exception(self, ctx: Context, error: BaseException) -> Signal | None:
        return None

    def on_save_checkpoint(self, ctx: Context, path: pathlib.Path, checkpoint: Mapping[str, Any]) -> Signal | None:
        """Fit is about to write ``checkpoint`` (the pytree :mod:`lightfn.fit._run` describes:
        state fields, ``"loop"``, ``"callbacks"`` with every callback's state) to ``path``.
        Read it, don't change it; return ``Signal(metadata={...})`` to add JSON metadata.
        What resume needs belongs in :meth:`state_dict`, which is already in it."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None
