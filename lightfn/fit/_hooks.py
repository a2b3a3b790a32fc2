"""How fit calls its callbacks and applies the signals they return.

fit knows callbacks only through the :class:`~lightfn.callbacks.Callback` protocol: it
builds a read-only :class:`~lightfn.callbacks.Context`, calls one hook on every callback in
list order, and applies each returned :class:`~lightfn.callbacks.Signal` before the next
callback runs (logged values and a new state are what later callbacks see); checkpoints
asked for are written after all ran. Nothing here knows a particular callback: the
defaults fit adds are chosen by :attr:`Callback.role` (:func:`with_defaults`).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..callbacks.base import Callback, Context, Signal
from ..callbacks.guard import Versions, checked_state
from ..errors import FitError
from ._run import to_tree

if TYPE_CHECKING:
    from ._loop import Loop

__all__ = ["with_defaults", "check_state_keys", "context", "emit", "overriding", "save", "notify_exception", "announce"]

Hook = Callable[[Callback, Context], "Signal | None"]


def with_defaults(callbacks: Sequence[Callback], progress: bool | None, total: int | None,
                  max_epochs: int | None) -> list[Callback]:
    """``callbacks`` plus fit's default for each role none of them has: a progress display
    (a live bar on a terminal or with ``progress=True``, plain lines elsewhere, nothing with
    ``progress=False``). The ``"lr"`` role's default is fit's own ``lr`` at its log points
    (see :func:`logs_lr`)."""
    from ..callbacks.progress import ProgressBar
    from ..callbacks.progress_log import ProgressLog

    callbacks = list(callbacks)
    if progress is False or any(cb.role == "progress" for cb in callbacks):
        return callbacks
    callbacks.append(ProgressBar(total=total) if progress or sys.stdout.isatty() else ProgressLog(max_epochs=max_epochs))
    return callbacks


def logs_lr(callbacks: Sequence[Callback]) -> bool:
    """fit logs ``lr`` itself unless a callback owns the learning-rate names (role ``"lr"``)."""
    return not any(cb.role == "lr" for cb in callbacks)


def checkpoint_dir(callbacks: Sequence[Callback]) -> Path | None:
    """The first callback's checkpoint folder (fit's default ``ckpt_dir``)."""
    return next((cb.checkpoint_dir for cb in callbacks if cb.checkpoint_dir is not None), None)


def check_state_keys(callbacks: Sequence[Callback]) -> None:
    """Refuse two stateful callbacks whose states would overwrite each other in checkpoints."""
    seen: dict[str, Callback] = {}
    for cb in callbacks:
        if not cb.state_dict():
            continue
        if cb.state_key in seen:
            raise FitError(
                f"callbacks {type(seen[cb.state_key]).__name__} and {type(cb).__name__} share state_key "
                f"{cb.state_key!r}, so their states would overwrite each other in checkpoints; give them different "
                "arguments or override state_key"
            )
        seen[cb.state_key] = cb


def _who(cb: Callback, i: int) -> str:
    return f"callback {type(cb).__name__} (callbacks[{i}])"


def context(loop: Loop, stage: str, extra: Mapping[str, float] | None = None, *, state: Any = None,
            batch_metrics: Mapping[str, torch.Tensor] | None = None) -> Context:
    """What callbacks see now. ``state``: shown as ``ctx.state`` (default: the train state)."""
    run, elapsed = loop.run, loop.shared_elapsed()
    pos = run.position
    return Context(state=run.state if state is None else state, step=pos.step, epoch=pos.epoch,
                   batch_idx=pos.batch, stage=stage, metrics={**run.logged, **(extra or {})}, is_main=loop.is_main,
                   elapsed=elapsed, total_elapsed=pos.elapsed + elapsed,
                   loggers=tuple(loop.loggers) if loop.is_main else (), batch_metrics=dict(batch_metrics or {}))


def emit(loop: Loop, hook: Hook, stage: str = "train", extra: Mapping[str, float] | None = None, *,
         state: Any = None, batch_metrics: Mapping[str, torch.Tensor] | None = None, eval_ok: bool = False,
         only: Sequence[int] | None = None) -> Any:
    """Call ``hook`` on every callback in order, applying each one's signal before the next
    runs; write the checkpoints asked for after all ran. Returns the ``eval_state`` asked
    for (allowed only with ``eval_ok``: ``on_validation_start``), or None.

    ``only``: the indices of the callbacks that override ``hook`` (:func:`overriding`), for
    per-step hooks: a callback that keeps the base class's no-op needs no context built."""
    run = loop.run
    saves, deletes, eval_state = [], [], None
    ctx: Context | None = None
    for i in range(len(loop.callbacks)) if only is None else only:
        cb = loop.callbacks[i]
        if ctx is None:  # rebuilt only after a signal changed what it shows
            ctx = context(loop, stage, extra, state=state, batch_metrics=batch_metrics)
            versions = Versions(ctx.state)
        signal = hook(cb, ctx)
        who = _who(cb, i)
        versions.check(who)
        if signal is None:
            continue
        if not isinstance(signal, Signal):
            raise FitError(f"{who} returned a {type(signal).__name__}; hooks return None or lf.callbacks.Signal")
        if signal.metadata:
            raise FitError(f"{who} returned Signal(metadata=...) outside on_save_checkpoint, where it has no checkpoint to go to")
        if signal.eval_state is not None:
            if not eval_ok:
                raise FitError(f"{who} returned Signal(eval_state=...) outside on_validation_start; to change the "
                               "training state return Signal(state=...)")
            eval_state, ctx = checked_state(run.state, signal.eval_state, who, "eval_state"), None
        if signal.log:
            loop.log(dict(signal.log))
            ctx = None
        if signal.state is not None:
            run.state, ctx = checked_state(run.state, signal.state, who), None
        if signal.stop:
            run.position.stop_requested = True
            loop.stop_reason = signal.reason or f"{type(cb).__name__} asked to stop"
        saves += signal.save
        deletes += signal.delete
    for path in dict.fromkeys(saves):  # two ModelCheckpoints may share one last.safetensors
        save(loop, path)
    for path in deletes:
        if loop.writes and path not in saves:
            loop.processes.delete(path)  # rank 0 only
    return eval_state


def overriding(callbacks: Sequence[Callback], hook: Callable[[type], Any]) -> tuple[int, ...]:
    """The indices of the callbacks whose class overrides the :class:`Callback` method
    ``hook`` reads from a class, e.g. ``overriding(cbs, lambda c: c.on_train_batch_end)``."""
    base = hook(Callback)
    return tuple(i for i, cb in enumerate(callbacks) if hook(type(cb)) is not base)


def save(loop: Loop, path: str | Path, agreed: bool = True) -> None:
    """Write the run to ``path``; ``agreed``: every rank saves this path now (see
    :meth:`Processes.save`). Each callback's ``on_save_checkpoint`` sees it first and may
    add metadata."""
    if not loop.writes:
        return
    run = loop.snapshot()
    metadata = dict(loop.metadata)
    view, ctx = types.MappingProxyType(to_tree(run)), context(loop, "train")
    versions = Versions(ctx.state)
    for i, cb in enumerate(loop.callbacks):
        signal = cb.on_save_checkpoint(ctx, Path(path), view)
        who = _who(cb, i)
        versions.check(who)
        if signal is None:
            continue
        if not isinstance(signal, Signal) or (signal.stop or signal.log or signal.save or signal.delete
                                              or signal.state is not None or signal.eval_state is not None):
            raise FitError(f"{who}.on_save_checkpoint returned {signal!r}; it may return None or "
                           "Signal(metadata={...}) only (it runs while a checkpoint is written)")
        clash = sorted(set(signal.metadata) & set(loop.metadata))
        if clash:
            raise FitError(f"{who}.on_save_checkpoint added metadata {clash[0]!r}, which fit writes itself; rename it")
        metadata.update(signal.metadata)
    loop.processes.save(path, run, agreed=agreed, metadata=metadata)


def notify_exception(loop: Loop, error: BaseException) -> None:
    """``on_exception`` on every callback; a checkpoint one asks for is written by this rank
    alone. A callback failing here is logged: the original error is the one raised."""
    ctx = context(loop, "train")
    for cb in loop.callbacks:
        try:
            signal = cb.on_exception(ctx, error)
            for path in signal.save if isinstance(signal, Signal) else ():
                save(loop, path, agreed=False)
        except Exception as e:  # noqa: BLE001 - the original error is the one to raise
            loop.logger.error("callback %s failed in on_exception: %s", type(cb).__name__, e)


def announce(loop: Loop, text: str) -> bool:
    """Offer ``text`` to every callback (rank 0); True when one showed it."""
    if not loop.is_main:
        return True
    ctx = context(loop, "train")
    return any([cb.on_announce(ctx, text) for cb in loop.callbacks])  # a list: every callback sees it
