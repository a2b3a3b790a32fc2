"""``lf.fit``: the training loop Lightning users expect, built from public pieces.

``fit(step, state, train_data, ...)`` runs any pure step ``(state, batch) -> (state,
metrics)`` over epochs of batches, validates, logs, calls callbacks and returns the
trained state. Everything it does is reachable without it: ``lf.jit`` compiles the step
(fused with on-device metric accumulation, :mod:`lightfn.fit._accumulate`), ``lf.data.iterate``
walks the data from any position, callbacks return :class:`~lightfn.callbacks.Signal`\\ s,
and the whole loop state is one pytree written with ``lf.save`` (:class:`lightfn.fit._run.Run`).

>>> state = lf.fit(lf.train_step(loss_fn, opt), state, lf.data.ArrayLoader(x, 64),
...                val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=10,
...                callbacks=[lf.callbacks.ModelCheckpoint("ckpts", monitor="val/loss")],
...                loggers=[lf.loggers.CSVLogger("logs")])
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .. import tree
from .._compile.background import Builder
from .._compile.jit import jit_disabled
from .._device import resolve_device
from ..callbacks.base import Callback
from ..data import num_batches
from ..distributed.strategy import Strategy
from ..errors import FitError
from ..eval_sets import named_sets
from ..loggers.base import Logger
from ..metrics import ComputeFn
from ..state import TrainState
from ..summary import summary as model_summary
from . import _hooks as hooks
from ._accumulate import AccumulatingEvalStep, AccumulatingTrainStep
from ._loop import Loop, set_what
from ._plan import make_plan
from ._processes import setup_processes
from ._run import Run, data_seed, run_metadata
from ._steps import classify, configure_steps, first_batches, positive

__all__ = ["fit"]


def fit(
    step: Callable[[Any, Any], tuple[Any, Mapping[str, torch.Tensor]]],
    state: Any,
    train_data: Any,
    *,
    val_data: Any = None,
    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]] | None = None,
    compute_metrics: ComputeFn | None = None,
    max_epochs: int | None = None,
    max_steps: int | None = None,
    max_time: Any = None,
    min_epochs: int = 0,
    min_steps: int = 0,
    check_val_every_n_epoch: int | None = 1,
    val_check_interval: int | float | None = None,
    num_sanity_val_steps: int = 2,
    limit_train_batches: int | float | None = None,
    limit_val_batches: int | float | None = None,
    fast_dev_run: bool | int = False,
    overfit_batches: int | float = 0,
    jit: bool | str = True,
    device: torch.device | str = "auto",
    precision: str | None = None,
    accumulate_grad_batches: int = 1,
    gradient_clip_val: float | None = None,
    callbacks: Sequence[Callback] = (),
    loggers: Sequence[Logger] = (),
    log_every_n_steps: int = 50,
    progress: bool | None = None,
    summary: bool | None = None,
    resume_from: str | os.PathLike[str] | None = None,
    hparams: Mapping[str, Any] | None = None,
    ckpt_dir: str | os.PathLike[str] | None = None,
    strategy: str | Strategy | None = None,
) -> Any:
    """Train ``state`` with ``step`` over ``train_data``; return the trained state.

    The caller's ``state`` is never modified: fit copies it to the device first (the
    compiled step then updates the copy in place). A *step* is one call of ``step``, i.e.
    one batch: ``max_steps``, ``log_every_n_steps``, ``val_check_interval`` and the logged
    ``step`` all count calls (with ``accumulate_grad_batches=k`` the optimizer updates every
    k steps).

    Args:
        step: ``(state, batch) -> (new_state, metrics)``: an ``lf.train_step``, any pure
            function of that form, or one already wrapped in ``lf.jit``. ``metrics`` is a
            dict of scalar tensors, logged as ``train/<name>``. An ``lf.ensemble`` step
            over a state stacked with ``lf.tree.stack`` trains K members at once: its
            ``(K,)`` metrics are logged as their mean under the usual name and per member
            as ``<name>/member_<i>`` (``train/loss/member_0``, ``train/loss_epoch/member_0``,
            ``val/loss/member_3``), each accumulated over rows as for that member alone;
            callbacks may monitor either. Checkpoints hold the stacked state.
        state: the initial state (usually an ``lf.TrainState``; any pytree works).
        train_data: an ``lf.data.ArrayLoader`` (exact resume, no host copies), a
            ``torch.utils.data.DataLoader`` or any re-iterable of batches (see
            ``lf.data.iterate`` for what resume means for each).
        val_data: validation data (needs ``eval_step``): one loader (an
            ``lf.data.ArrayLoader``, a ``DataLoader`` or a list of batches), logged as
            ``val/<name>``; or several: a dict ``{"clean": a, "noisy": b}`` logged as
            ``val/clean/<name>``, ``val/noisy/<name>``, or a list of loaders ``[a, b]``
            logged as ``val/0/<name>``, ``val/1/<name>`` (a list is read as loaders only
            when its elements are loaders, not batches; anything unclear is refused: see
            :mod:`lightfn.eval_sets`). ``ModelCheckpoint`` / ``EarlyStopping`` may monitor
            any of these names. ``limit_val_batches`` and ``num_sanity_val_steps`` count
            per set.
        eval_step: ``(state, batch) -> metrics``, e.g. ``lf.eval_step(loss_fn)``; logged as
            means over each validation run, weighted by rows: ``val/<name>``.
        compute_metrics: ``fn({name: total}) -> {name: scalar}``: the epoch-level values
            (F1, perplexity...) of the metric states a step returns as
            ``lf.metrics.Sum(...)``, summed over the epoch's batches and the ranks; logged
            as ``val/<name>`` after validation and ``train/<name>_epoch`` at an epoch's end,
            and monitorable. See :mod:`lightfn.metrics`.
        max_epochs: stop after this many epochs (default 1000 when ``max_steps`` is not
            given either, like Lightning; -1: no limit).
        max_steps: stop after this many steps (-1 or None: no limit). A stop inside an
            epoch still closes it (its means, validation, ``on_epoch_end``), but its
            checkpoints keep the position inside it: resumed with a larger ``max_steps``,
            the run trains the rest of that epoch, bit-identical to a run never stopped.
        max_time: stop once this much training time is spent (seconds, a ``timedelta``,
            a dict like ``dict(hours=1)`` or ``"DD:HH:MM:SS"``; a resumed run counts the
            time before the checkpoint).
        min_epochs, min_steps: a stop asked by a callback (e.g. ``EarlyStopping``) waits
            until this many epochs are complete and steps taken.
        check_val_every_n_epoch: validate in every n-th epoch; ``None`` with an int
            ``val_check_interval`` validates every that many steps across epochs.
        val_check_interval: ``None``: validate at the end of the epoch; an int: after every
            that many batches of the epoch; a float: after every that fraction of it.
        num_sanity_val_steps: validation batches run before training to catch a broken
            eval step early (not logged; -1: all; 0: none).
        limit_train_batches, limit_val_batches: use only this many batches per epoch /
            per validation (an int, or a float fraction of the data).
        fast_dev_run: run 1 batch (or this many) of training and validation, in one epoch,
            writing nothing: no loggers, checkpoints or progress bar.
        overfit_batches: train on the same first batches every epoch (an int, or a float
            fraction) and validate on them too: the first batches of ``train_data``'s
            epoch 0, taken once and reused, so no reshuffle ever changes them.
        jit: compile the step and the eval step (one graph each, fused with the metric
            accumulation; the train graph donates the state). ``"background"``: training
            starts at once, eagerly, while a child process builds both graphs into the
            ahead-of-time cache; each switches to its compiled graph as soon as it is built
            (the switch steps are recorded in the run and its checkpoints), and a later run
            loads them before its first step (:mod:`lightfn.fit._background`: what
            bit-identical resume means then). ``"sync"``: compile before the first step with
            ``lf.jit`` (every step compiled; with ``LIGHTFN_AOT=1`` the graphs come from the
            ahead-of-time cache). ``True`` (default): ``"background"`` for one CPU process
            and a step not already wrapped in ``lf.jit``, else ``"sync"``. ``False``: eager.
            A step already wrapped in ``lf.jit`` is used as it is. ``LIGHTFN_DISABLE_JIT=1``
            makes every mode eager.
        device: ``"auto"`` (CUDA, else MPS, else CPU) or any torch device. The state is
            copied there; batches are moved there without a host sync (a device-resident
            ``ArrayLoader`` needs no move).
        precision: ``"32-true"``, ``"bf16-mixed"``, ``"16-mixed"`` (dynamic loss scaling in
            the state), ``"bf16-true"``... applied to an ``lf.TrainStep``/``lf.EvalStep``
            (for a hand-written step, apply autocast inside it instead).
        accumulate_grad_batches: average the gradients of k steps per optimizer update
            (``lf.optim.multi_steps`` around the TrainStep's optimizer).
        gradient_clip_val: clip gradients to this global norm before the optimizer
            (``lf.optim.clip_by_global_norm``, applied to the accumulated gradient).
        callbacks: ``lf.callbacks.Callback`` objects, called in list order at each hook
            (order documented in :mod:`lightfn.callbacks.base`).
        loggers: ``lf.loggers.Logger`` objects; only rank 0 logs. Logged names:
            ``train/<name>`` (the step's value every ``log_every_n_steps`` steps),
            ``train/<name>_epoch`` (epoch means, weighted by batch size), ``val/<name>``,
            ``epoch``, and ``lr`` at the step log points when the state is an
            ``lf.TrainState`` whose optimizer holds one learning rate. With an
            ``lf.callbacks.LearningRateMonitor`` among ``callbacks`` fit logs no ``lr`` of
            its own: the monitor then owns every learning-rate name (one rule, no duplicates).
        log_every_n_steps: how often step metrics are copied to the host and logged.
        progress: ``None``: a live tqdm bar (``lf.callbacks.ProgressBar``) when stdout is a
            terminal, else plain lines (``lf.callbacks.ProgressLog``: one per epoch, and
            one when the first call of a compiled train step starts and ends, with how
            long it took); ``True``: the bar always; ``False``: nothing at all.
        summary: print ``lf.summary`` of the params once at the start (rank 0 only);
            ``None``: when progress output is on (``progress`` is not ``False``).
        resume_from: a checkpoint written by fit, or ``"last"`` (``last.safetensors`` in
            the first ModelCheckpoint's dirpath, or ``ckpt_dir``): restores the state, the
            loop position, the metric sums, the latest logged values and every callback's
            state, and continues at the exact batch (``state`` is then only the template).
            With an ``lf.data.ArrayLoader`` the result is bit-identical to a run never
            interrupted: its order is a pure function of (seed, epoch), the seed is in the
            checkpoint (a loader with another seed is refused) and randomness in the step
            comes from the state. With a ``DataLoader`` or another iterable, fit restarts
            that epoch's iteration and draws and discards the batches already done (they
            are loaded again, which costs time); that is exact only if the iterable yields
            the same batches in the same order each time (a list, no shuffle, a
            ``DistributedSampler``, whose ``set_epoch`` fit calls). A loader shuffled by an
            unseeded generator resumes at the right count in a *new* order, so some samples
            of that epoch are seen twice and others not at all; fit cannot detect that.
        hparams: hyperparameters (a JSON-able dict), logged to every logger at the start
            and stored in the metadata of every checkpoint fit writes: read them back with
            ``lf.read_metadata(path)["hparams"]`` (Lightning's ``save_hyperparameters``).
        ckpt_dir: where a SIGTERM writes ``last.safetensors`` (default: the first
            ModelCheckpoint's dirpath). On SIGTERM fit finishes the current step, writes
            it, and raises :class:`Preempted` (a clean ``SystemExit(0)``).
        strategy: run on every process torchrun started (refused outside torchrun):
            ``"ddp"`` (params replicated, gradients averaged in the step), ``"fsdp"`` (params
            and optimizer state sharded, ZeRO-3), or an ``lf.distributed.Strategy`` (e.g.
            ``gather_checkpoints=True``). A step already wrapped by
            ``lf.distributed.data_parallel``/``fully_sharded`` needs none. Each rank trains on
            its rows of every batch; rank 0 logs and writes; fsdp checkpoints are folders of
            per-rank files. See :mod:`lightfn.fit._processes`.
    """
    if fast_dev_run:
        n = 1 if fast_dev_run is True else positive("fast_dev_run", fast_dev_run)
        max_epochs, max_steps, limit_train_batches, limit_val_batches = 1, n, n, n
        num_sanity_val_steps, val_check_interval, check_val_every_n_epoch = 0, None, 1
        loggers, progress = (), False
    if summary is None:
        summary = progress is not False
    device = resolve_device(device, error=FitError)
    metadata = run_metadata(hparams)  # checks hparams before anything runs
    val_sets = {} if val_data is None else named_sets(val_data)  # refuses an unclear form before anything runs
    step, state, eval_step = configure_steps(step, state, eval_step, precision, accumulate_grad_batches, gradient_clip_val)
    summarized = state.params if isinstance(state, TrainState) else state  # whole tensors, before any sharding
    processes = setup_processes(strategy, step, state, eval_step)
    with processes.guard():  # from here on, the control group fit made is released however fit ends
        step, state, eval_step = processes.step, processes.state, processes.eval_step
        device = processes.device(device)
        train_data = processes.shard_data(train_data, "train_data")
        val_sets = {name: processes.shard_data(data, set_what(name)) for name, data in val_sets.items()}
        if overfit_batches:
            train_data = first_batches(train_data, overfit_batches)
            val_sets = {None: train_data} if eval_step is not None else val_sets
            limit_train_batches = limit_val_batches = None
        if val_sets and eval_step is None:
            raise FitError("val_data needs an eval_step, e.g. eval_step=lf.eval_step(loss_fn)")
        plan = make_plan(
            n_train=num_batches(train_data), n_val=tuple(num_batches(data) for data in val_sets.values()),
            max_epochs=max_epochs, max_steps=max_steps, max_time=max_time, min_epochs=min_epochs, min_steps=min_steps,
            check_val_every_n_epoch=check_val_every_n_epoch, val_check_interval=val_check_interval,
            num_sanity_val_steps=num_sanity_val_steps, limit_train_batches=limit_train_batches,
            limit_val_batches=limit_val_batches, log_every_n_steps=log_every_n_steps,
        )
        callbacks = hooks.with_defaults(callbacks, progress, plan.train_batches, plan.max_epochs)
        ckpt_dir = hooks.checkpoint_dir(callbacks) if ckpt_dir is None else ckpt_dir
        mode = jit_mode(jit, step, processes.active, device)
        builder = Builder() if mode == "background" else None
        compile_ = mode != "off"
        loop = Loop(
            plan=plan, train=AccumulatingTrainStep(step, compile=compile_, compute_metrics=compute_metrics,
                                                   builder=builder),
            evaluate=AccumulatingEvalStep(eval_step, compile=compile_, compute_metrics=compute_metrics,
                                          builder=builder) if val_sets else None,
            run=Run(state=_copy_to(state, device), data_seed=data_seed(train_data)), train_data=train_data,
            val_sets=val_sets, callbacks=callbacks, loggers=list(loggers), device=device,
            batch_dtype=classify(step).batch_dtype, processes=processes, writes=not fast_dev_run,
            ckpt_dir=None if ckpt_dir is None else Path(ckpt_dir), metadata=metadata, log_lr=hooks.logs_lr(callbacks),
        )
        if resume_from is not None:
            loop.resume(_resume_path(resume_from, loop.ckpt_dir))
        if summary and processes.is_main:
            text = model_summary(summarized)
            if not hooks.announce(loop, text):
                print(text, flush=True)
        return processes.finish(loop(hparams))


def jit_mode(jit: bool | str, step: Any, distributed: bool, device: torch.device) -> str:
    """fit's ``jit`` argument as ``"off"``, ``"sync"`` or ``"background"`` (see fit)."""
    if jit is False or jit == "off":
        return "off"
    if jit is not True and jit not in ("sync", "background"):
        raise FitError(f"jit={jit!r}: use True (the default), False, 'sync' or 'background'")
    if jit_disabled():
        return "sync"  # lf.jit runs every graph eagerly
    # Background builds fork: not after CUDA is initialized, not beside collectives (every
    # rank would have to switch at the same step).
    possible = (not distributed and device.type == "cpu" and not classify(step).jitted and hasattr(os, "fork")
                and not (torch.distributed.is_available() and torch.distributed.is_initialized()))
    if jit == "background" and not possible:
        raise FitError(
            "jit='background' needs one CPU process and a step not wrapped in lf.jit (the build runs in a forked "
            f"child); here device={device}, strategy={'set' if distributed else 'none'}. Use jit='sync' or True"
        )
    return "background" if possible and jit != "sync" else "sync"


def _resume_path(resume_from: str | os.PathLike[str], ckpt_dir: Path | None) -> Path:
    if resume_from == "last":
        if ckpt_dir is None:
            raise FitError('resume_from="last" needs a ModelCheckpoint callback (its dirpath) or ckpt_dir=')
        return ckpt_dir / "last.safetensors"
    return Path(resume_from)


def _copy_to(state: Any, device: torch.device) -> Any:
    """A copy of ``state`` on ``device`` (the compiled step donates it, never the caller's)."""
    return tree.map(lambda x: x.detach().to(device, copy=True) if isinstance(x, torch.Tensor) else x, state)
