"""``lf.validate`` and ``lf.test``: evaluate a trained or loaded state the way fit validates.

Lightning's ``trainer.validate`` / ``trainer.test``: one pass of an eval step over some
data, returning each metric's mean weighted by rows (a short last batch counts for the
rows it holds). It is the very pass fit runs for its validation
(:func:`lightfn.fit._accumulate.evaluate`), so on the same state and data ``lf.validate`` returns
exactly the ``val/<name>`` values fit logs.

The best checkpoint of a run to a test score, in one line::

    ckpt = lf.callbacks.ModelCheckpoint("ckpts", monitor="val/loss")
    state = lf.fit(step, state, train, val_data=val, eval_step=evaluate, callbacks=[ckpt])
    scores = lf.test(evaluate, lf.load(ckpt.best_model_path, like=state), test_data)
    # {"test/loss": 0.0123, ...}
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict, Unpack

import torch
from tqdm.auto import tqdm

from .. import tree
from .._device import resolve_device
from ..callbacks.base import Callback, Context, Signal
from ..data import iterate, num_batches
from ..errors import FitError
from ..eval_sets import named_sets, prefix
from ..loggers.base import Logger
from ..metrics import ComputeFn
from ..state import TrainState
from ._accumulate import AccumulatingEvalStep, evaluate
from ._steps import classify, move_batch

__all__ = ["validate", "test"]

EvalStepFn = Callable[[Any, Any], Mapping[str, torch.Tensor]]


class EvalOptions(TypedDict, total=False):
    """The keyword options ``lf.validate`` and ``lf.test`` share (see :func:`validate`)."""

    loggers: Sequence[Logger]
    callbacks: Sequence[Callback]
    device: torch.device | str | None
    jit: bool
    progress: bool | None
    compute_metrics: ComputeFn | None


def validate(eval_step: EvalStepFn, state: Any, data: Any, **options: Unpack[EvalOptions]) -> dict[str, float]:
    """Run ``eval_step`` over ``data`` on ``state``; return ``{"val/<name>": mean}``.

    Args:
        eval_step: ``(state, batch) -> metrics``, e.g. ``lf.eval_step(loss_fn)``.
        state: the state to evaluate (an ``lf.TrainState``, e.g. one returned by fit or
            loaded with ``lf.load(path, like=state)``); never modified.
        data: an ``lf.data.ArrayLoader``, a ``DataLoader`` or any iterable of batches
            (epoch 0's order); or several, as fit's ``val_data`` takes them: a dict
            ``{"clean": a, "noisy": b}`` returns ``val/clean/<name>``..., a list of loaders
            ``val/0/<name>``... (see :mod:`lightfn.eval_sets`).
        loggers: each gets the values once, at the state's step (``int(state.step)`` for a
            TrainState, else 0), then is flushed.
        callbacks: each gets ``on_validation_end`` with ``ctx.stage == "eval"`` and the
            values in ``ctx.metrics``. Only a returned Signal's ``log`` is used (its values
            are logged and returned too): there is no loop to stop and no run to save.
        device: where to evaluate (the state is copied there); ``None``: where the state is.
            Batches are moved to it.
        jit: compile the eval step with the accumulation (``lf.jit``), as fit does.
        progress: a tqdm bar over the batches: ``None`` when stdout is a terminal.
        compute_metrics: ``fn({name: total}) -> {name: scalar}`` for the states the eval
            step returns as ``lf.metrics.Sum(...)`` (summed over all of ``data``): F1,
            perplexity...; returned as ``val/<name>``, as fit's (:mod:`lightfn.metrics`).
    """
    return _run("val", "eval", eval_step, state, data, **options)


def test(eval_step: EvalStepFn, state: Any, data: Any, **options: Unpack[EvalOptions]) -> dict[str, float]:
    """:func:`validate` for a test set: returns ``{"test/<name>": mean}``; callbacks see
    ``ctx.stage == "test"``.

    ``lf.test(evaluate, lf.load(ckpt.best_model_path, like=state), test_data)`` scores the
    best checkpoint a ``ModelCheckpoint`` kept.
    """
    return _run("test", "test", eval_step, state, data, **options)


test.__test__ = False  # type: ignore[attr-defined]  # a library function, not a pytest test when imported by name


def _run(metric: str, stage: str, eval_step: EvalStepFn, state: Any, data: Any, *, loggers: Sequence[Logger] = (),
         callbacks: Sequence[Callback] = (), device: torch.device | str | None = None, jit: bool = False,
         progress: bool | None = None, compute_metrics: ComputeFn | None = None) -> dict[str, float]:
    t0 = time.monotonic()
    if not callable(eval_step):
        raise FitError(f"eval_step must be a function (state, batch) -> metrics, e.g. lf.eval_step(loss_fn); got {type(eval_step).__name__}")
    if data is None:
        raise FitError(f"lf.{'test' if stage == 'test' else 'validate'} needs data: a loader or an iterable of batches")
    if device is None:
        target = tree.device_of(state)
    else:
        target = resolve_device(device, error=FitError)
        state = tree.to_device(state, target)
    dtype = classify(eval_step).batch_dtype
    evaluator = AccumulatingEvalStep(eval_step, compile=jit, compute_metrics=compute_metrics)  # one for every set: the step is traced once
    show = sys.stdout.isatty() if progress is None else progress
    values: dict[str, float] = {}
    for name, loader in named_sets(data, "data").items():
        batches = iterate(loader, 0)
        bar = tqdm(batches, total=num_batches(loader), desc=stage if name is None else f"{stage} {name}", leave=False,
                   dynamic_ncols=True) if show else None
        try:
            values.update(evaluate(evaluator, state, batches if bar is None else bar, prefix=prefix(metric, name),
                                   move=lambda batch: move_batch(batch, target, dtype),
                                   what="data" if name is None else f"data[{name!r}]"))
        finally:
            if bar is not None:
                bar.close()
    step = int(state.step) if isinstance(state, TrainState) else 0
    ctx = Context(state=state, step=step, epoch=0, batch_idx=0, metrics=dict(values), stage=stage,
                  elapsed=time.monotonic() - t0)
    extra: dict[str, float] = {}
    for cb in callbacks:
        signal = cb.on_validation_end(ctx)
        if signal is not None and not isinstance(signal, Signal):
            raise FitError(f"callback {type(cb).__name__} returned a {type(signal).__name__}; hooks return None or lf.callbacks.Signal")
        if signal is not None:
            extra.update({k: float(v) for k, v in signal.log.items()})
    values.update(extra)
    for logger in loggers:
        logger.log_metrics(dict(values), step)
        logger.flush()
    return values
