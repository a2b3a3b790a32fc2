"""``lf.fit``: the training loop Lightning users expect, built from public pieces.

``fit(step, state, train_data, ...)`` runs any pure step ``(state, batch) -> (state,
metrics)`` over epochs of batches, validates, logs, calls callbacks and returns the
trained state. Everything it does is reachable without it: ``lf.jit`` compiles the step
(fused with on-device metric accumulation, :mod:`lightfn.runner`), ``lf.data.iterate``
walks the data from any position, callbacks return :class:`~lightfn.callbacks.Signal`\\ s,
and the whole loop state is one pytree written with ``lf.save`` (:mod:`lightfn.resume`).

>>> state = lf.fit(lf.train_step(loss_fn, opt), state, lf.data.ArrayLoader(x, 64),
...                val_data=val, eval_step=lf.eval_step(loss_fn), max_epochs=10,
...                callbacks=[lf.callbacks.ModelCheckpoint("ckpts", monitor="val/loss")],
...                loggers=[lf.loggers.CSVLogger("logs")])
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from . import optim, tree
from .callbacks.base import Callback, Context, Signal
from .callbacks.guard import Versions, checked_state
from .callbacks.checkpoint import ModelCheckpoint
from .callbacks.lr_monitor import LearningRateMonitor
from .callbacks.progress import ProgressBar
from .callbacks.progress_log import ProgressLog
from .data import iterate, num_batches
from .errors import Preempted
from .eval_sets import named_sets, prefix
from .loggers.base import Logger
from .loop import (FitError, Plan, Position, batch_dtype, configure_steps, first_batches, make_plan, move_batch,
                   positive, preemption_signal, resolve_device)
from .resume import data_seed, pack, run_metadata
from ._members import collapse_equal, expand, with_suffix
from .metrics import ComputeFn
from .runner import EvalRunner, TrainRunner, evaluate, to_host, zeros_like
from .state import TrainState
from .summary import summary as model_summary
from .distributed.strategy import Strategy
from .spread import Spread, setup_strategy

__all__ = ["fit", "Preempted", "FitError"]

_log = logging.getLogger("lightfn.fit")


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
    jit: bool = True,
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
        jit: compile the step and the eval step with ``lf.jit`` (one graph each, fused with
            the metric accumulation; the train graph donates the state). ``False`` runs
            eagerly; a step already wrapped in ``lf.jit`` is used as it is.
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
            per-rank files. See :mod:`lightfn.spread`.
    """
    if fast_dev_run:
        n = 1 if fast_dev_run is True else positive("fast_dev_run", fast_dev_run)
        max_epochs, max_steps, limit_train_batches, limit_val_batches = 1, n, n, n
        num_sanity_val_steps, val_check_interval, check_val_every_n_epoch = 0, None, 1
        loggers, progress = (), False
    if summary is None:
        summary = progress is not False
    device = resolve_device(device)
    metadata = run_metadata(hparams)  # checks hparams before anything runs
    val_sets = {} if val_data is None else named_sets(val_data)  # refuses an unclear form before anything runs
    step, state, eval_step = configure_steps(step, state, eval_step, precision, accumulate_grad_batches, gradient_clip_val)
    summarized = state.params if isinstance(state, TrainState) else state  # whole tensors, before any sharding
    spread = setup_strategy(strategy, step, state, eval_step, callbacks)
    with spread.guard():  # from here on, the control group fit made is released however fit ends
        step, state, eval_step, device = spread.step, spread.state, spread.eval_step, spread.device(device)
        train_data = spread.shard_data(train_data, "train_data")
        val_sets = {name: spread.shard_data(data, _set_what(name)) for name, data in val_sets.items()}
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
        callbacks = _with_progress(list(callbacks), progress, plan.train_batches, plan.max_epochs)
        log = next((cb for cb in callbacks if isinstance(cb, ProgressLog)), None)
        if ckpt_dir is None:
            ckpt_dir = next((cb.dirpath for cb in callbacks if isinstance(cb, ModelCheckpoint)), None)
        loop = _Loop(
            plan=plan, train=TrainRunner(step, compile=jit, compute_metrics=compute_metrics),
            evaluate=EvalRunner(eval_step, compile=jit, compute_metrics=compute_metrics) if val_sets else None,
            state=_copy_to(state, device), train_data=train_data, val_sets=val_sets,
            callbacks=callbacks, loggers=list(loggers), device=device, writes=not fast_dev_run,
            ckpt_dir=None if ckpt_dir is None else Path(ckpt_dir), batch_dtype=batch_dtype(step), spread=spread,
            metadata=metadata, say=log.write if log is not None and spread.main else None,
        )
        if resume_from is not None:
            loop.restore(_resume_path(resume_from, loop.ckpt_dir))
        if summary and spread.main:
            text = model_summary(summarized)
            if log is not None:
                log.write(text)
            else:
                print(text, flush=True)
        return spread.finish(loop.run(hparams))


class _Loop:
    """The mutable parts of one fit run and the loop over them."""

    def __init__(self, *, plan: Plan, train: TrainRunner, evaluate: EvalRunner | None, state: Any, train_data: Any,
                 val_sets: dict[str | None, Any], callbacks: list[Callback], loggers: list[Logger], device: torch.device, writes: bool,
                 ckpt_dir: Path | None, batch_dtype: torch.dtype | None, spread: Spread,
                 metadata: Mapping[str, Any], say: Callable[[str], None] | None = None) -> None:
        self.plan, self.train, self.evaluate, self.state = plan, train, evaluate, state
        self.train_data, self.val_sets, self.callbacks, self.loggers = train_data, val_sets, callbacks, loggers
        self.device, self.writes, self.ckpt_dir, self.main = device, writes, ckpt_dir, spread.main
        self.batch_dtype, self.spread, self.metadata = batch_dtype, spread, metadata
        self.say = say  # plain progress lines (None: no ProgressLog, or not rank 0)
        # Only a step that goes through torch.compile has its first call announced: an
        # eager run is never said to compile.
        self.compile_pending = say is not None and train.compiles
        self.log_lr = not any(isinstance(cb, LearningRateMonitor) for cb in callbacks)
        self.pos, self.acc, self.metrics = Position(), None, {}
        self.stop_reason, self.t0 = "", time.monotonic()
        # What callbacks see as elapsed time. Ranks that vote share one clock (the largest at
        # the last vote, 0 before it), so time-based callback decisions agree everywhere.
        self.clock: float | None = 0.0 if spread.voting else None
        _check_state_keys(callbacks)

    def restore(self, path: Path) -> None:
        self.state, self.pos, self.acc, names, self.metrics = self.spread.restore(path, self.state, self.callbacks, data_seed(self.train_data))
        self.train.expected_names = names if self.acc is not None else None
        _log.info("resumed from %s at epoch %d, batch %d, step %d", path, self.pos.epoch, self.pos.batch, self.pos.step)

    def run(self, hparams: Mapping[str, Any] | None) -> Any:
        plan, pos = self.plan, self.pos
        with preemption_signal() as preempted:
            try:
                if hparams and self.main:
                    for logger in self.loggers:
                        logger.log_hparams(dict(hparams))
                self.emit(lambda cb, ctx: cb.on_fit_start(ctx))
                if any(plan.sanity_batches):
                    self.validate("sanity")
                if pos.batch and plan.validate_after_batch(pos) and pos.last_val_step != pos.step:
                    self.validate()  # resumed from a checkpoint written just before a due validation
                while not self.finished():
                    self.emit(lambda cb, ctx: cb.on_train_epoch_start(ctx))
                    cut = False  # the epoch stopped before its last batch (max_steps, max_time, a stop)
                    for batch in self.batches():
                        self.state, self.acc, metrics = self.train_step(self.to_device(batch))
                        pos.batch, pos.step = pos.batch + 1, pos.step + 1
                        if pos.step % plan.log_every_n_steps == 0:
                            self.log_step(metrics)
                        self.emit(lambda cb, ctx: cb.on_train_batch_end(ctx))
                        if plan.validate_after_batch(pos):
                            self.validate()
                        now = self.elapsed()
                        (stop, sigterm), self.clock = self.spread.vote((self.should_stop(now), preempted()), now, self.device)
                        if sigterm:
                            return self.preempt()
                        if stop:
                            cut = not plan.epoch_full(pos)
                            break
                    self.end_epoch(cut)
                self.emit(lambda cb, ctx: cb.on_fit_end(ctx))
            except BaseException as error:  # a Preempted included: training did not end
                self.on_exception(error)
                raise
            finally:
                for logger in self.loggers if self.main else ():
                    logger.flush()
        if self.stop_reason:
            _log.info("fit stopped at epoch %d, step %d: %s", pos.epoch, pos.step, self.stop_reason)
        return self.state

    # -- the pieces of the loop -------------------------------------------------------------

    def finished(self) -> bool:
        max_epochs = self.plan.max_epochs
        return (max_epochs is not None and self.pos.epoch >= max_epochs) or self.should_stop()

    def should_stop(self, elapsed: float | None = None) -> bool:
        """Stop now? ``elapsed`` defaults to :meth:`shared_elapsed` (so voting ranks answer
        alike between votes)."""
        pos = self.pos
        if elapsed is None:
            elapsed = self.shared_elapsed()
        return (pos.stop_requested and self.plan.may_stop_early(pos)) or self.plan.out_of_budget(pos, elapsed)

    def batches(self) -> Any:
        pos, n = self.pos, self.plan.train_batches
        data = iterate(self.train_data, pos.epoch, start=pos.batch)
        return data if n is None else itertools.islice(data, max(0, n - pos.batch))

    def train_step(self, batch: Any) -> tuple[Any, torch.Tensor, Mapping[str, torch.Tensor]]:
        if not self.compile_pending:
            return self.train(self.state, self.acc, batch)
        # The first call of a compiled step traces and compiles it (seconds to minutes):
        # say so, so a quiet log does not look hung, and how long it took. Host wall time
        # of the call: compilation is synchronous, the step's own kernels are not waited for.
        assert self.say is not None
        self.say("compiling the train step (its first call)...")
        start = time.monotonic()
        out = self.train(self.state, self.acc, batch)
        self.compile_pending = False
        self.say(f"train step compiled in {time.monotonic() - start:.1f} s")
        return out

    def end_epoch(self, cut: bool = False) -> None:
        """Log the epoch's means, validate if due and call ``on_epoch_end``.

        ``cut``: training stops before the epoch's last batch. The epoch is closed as
        Lightning closes it (means of the batches done, validation, epoch-end hooks and
        checkpoints), but the position stays inside it and its sums are kept, so a run
        resumed from such a checkpoint with a larger ``max_steps`` / ``max_time`` trains
        the rest of the epoch: the same bits as a run never stopped.
        """
        pos = self.pos
        if self.acc is None or (pos.batch == 0 and not pos.epoch_done):
            raise FitError(
                f"train_data yielded no batches in epoch {pos.epoch} (an empty dataset, a batch size larger than the "
                "data, or a one-shot iterator already consumed: pass a list, an lf.data.ArrayLoader or a DataLoader)"
            )
        self.log({f"train/{with_suffix(k, '_epoch')}": v for k, v in self.train.values(self.spread.sum(self.acc)).items()})
        if self.evaluate is not None and self.plan.validate_at_epoch_end(pos):
            self.validate()
        pos.epoch_done = not cut
        self.emit(lambda cb, ctx: cb.on_epoch_end(ctx))
        if cut:
            return  # the run ends here; the position and sums stay mid-epoch
        pos.epoch, pos.batch, pos.epoch_done = pos.epoch + 1, 0, False
        self.acc = zeros_like(self.acc)

    def validate(self, stage: str = "validate") -> None:
        counts = self.plan.sanity_batches if stage == "sanity" else self.plan.val_batches
        eval_state = self.emit(lambda cb, ctx: cb.on_validation_start(ctx), stage=stage, eval_ok=True)
        state = self.state if eval_state is None else eval_state
        on_batch = None
        if any(type(cb).on_validation_batch_end is not Callback.on_validation_batch_end for cb in self.callbacks):
            def on_batch(metrics: Mapping[str, torch.Tensor]) -> None:
                self.emit(lambda cb, ctx: cb.on_validation_batch_end(ctx), stage=stage, state=state, batch_metrics=metrics)
        values: dict[str, float] = {}
        for (name, data), n in zip(self.val_sets.items(), counts):
            if stage == "sanity" and n == 0:
                continue  # this set's limit leaves no sanity batch; the others still run
            values.update(evaluate(self.evaluate, state, iterate(data, 0), prefix=prefix("val", name), limit=n,
                                   move=self.to_device, reduce=self.spread.sum, what=_set_what(name), on_batch=on_batch))
        if stage == "sanity":  # not logged; callbacks see it only in this hook
            self.emit(lambda cb, ctx: cb.on_validation_end(ctx), stage=stage, extra=values, state=state)
            return
        self.pos.last_val_step = self.pos.step
        self.log(values)
        self.emit(lambda cb, ctx: cb.on_validation_end(ctx), stage=stage, state=state)

    def log_step(self, metrics: Mapping[str, torch.Tensor]) -> None:
        # An ensemble's (K,) metrics are spelled out (mean and members) before the
        # ranks average them: every value reduced and logged is a scalar.
        values = {f"train/{k}": v for k, v in self.spread.mean(expand(metrics)).items()}
        lr = _single_lr(self.state) if self.log_lr else None
        if lr is None:
            self.log(values)
            return
        values.update(expand({"lr": lr}))
        # One transfer for metrics and rates; one rate shared by all members logs as "lr".
        self.log(collapse_equal(to_host(values), "lr"))

    def log(self, values: Mapping[str, Any]) -> None:
        """Copy device values to the host in one transfer, remember and log them."""
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        host = {**{k: float(v) for k, v in values.items() if k not in tensors}, **to_host(tensors), "epoch": self.pos.epoch}
        self.metrics.update(host)
        if self.main:
            for logger in self.loggers:
                logger.log_metrics(host, self.pos.step)

    def emit(self, hook: Callable[[Callback, Context], Signal | None], stage: str = "train",
             extra: Mapping[str, float] | None = None, *, state: Any = None,
             batch_metrics: Mapping[str, torch.Tensor] | None = None, eval_ok: bool = False) -> Any:
        """Call ``hook`` on every callback in order, applying each one's signal before the
        next runs (logged values and a new state are what later callbacks see); checkpoints
        are written after all ran. ``state``: what ``ctx.state`` shows (default: the train
        state). Returns the ``eval_state`` asked for (only allowed with ``eval_ok``), or None."""
        saves, deletes, eval_state = [], [], None
        ctx: Context | None = None
        for i, cb in enumerate(self.callbacks):
            if ctx is None:  # rebuilt only after a signal changed what it shows
                ctx = self.context(stage, extra, state=state, batch_metrics=batch_metrics)
                versions = Versions(ctx.state)
            signal = hook(cb, ctx)
            who = f"callback {type(cb).__name__} (callbacks[{i}])"
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
                eval_state, ctx = checked_state(self.state, signal.eval_state, who, "eval_state"), None
            if signal.log:
                self.log(dict(signal.log))
                ctx = None
            if signal.state is not None:
                self.state, ctx = checked_state(self.state, signal.state, who), None
            if signal.stop:
                self.pos.stop_requested, self.stop_reason = True, signal.reason or f"{type(cb).__name__} asked to stop"
            saves += signal.save
            deletes += signal.delete
        for path in dict.fromkeys(saves):  # two ModelCheckpoints may share one last.safetensors
            self.save(path)
        for path in deletes:
            if self.writes and path not in saves:
                self.spread.delete(path)  # rank 0 only
        return eval_state

    def context(self, stage: str, extra: Mapping[str, float] | None = None, *, state: Any = None,
                batch_metrics: Mapping[str, torch.Tensor] | None = None) -> Context:
        pos = self.pos
        return Context(state=self.state if state is None else state, step=pos.step, epoch=pos.epoch,
                       batch_idx=pos.batch, stage=stage, metrics={**self.metrics, **(extra or {})}, is_main=self.main,
                       elapsed=self.shared_elapsed(), loggers=tuple(self.loggers) if self.main else (),
                       batch_metrics=dict(batch_metrics or {}))

    def save(self, path: str | os.PathLike[str], agreed: bool = True) -> None:
        """Write a checkpoint; ``agreed``: every rank saves this path now (see Spread.save).
        Each callback's ``on_save_checkpoint`` sees it first and may add metadata."""
        if not self.writes:
            return
        names = self.train.acc_names
        packed = pack(self.state, self.pos, self.acc, names, self.callbacks, data_seed(self.train_data),
                      self.elapsed(), self.metrics)
        metadata = dict(self.metadata)
        view, ctx = types.MappingProxyType(packed), self.context("train")
        versions = Versions(ctx.state)
        for i, cb in enumerate(self.callbacks):
            signal = cb.on_save_checkpoint(ctx, Path(path), view)
            who = f"callback {type(cb).__name__} (callbacks[{i}])"
            versions.check(who)
            if signal is None:
                continue
            if not isinstance(signal, Signal) or (signal.stop or signal.log or signal.save or signal.delete
                                                  or signal.state is not None or signal.eval_state is not None):
                raise FitError(f"{who}.on_save_checkpoint returned {signal!r}; it may return None or "
                               "Signal(metadata={...}) only (it runs while a checkpoint is written)")
            clash = sorted(set(signal.metadata) & set(self.metadata))
            if clash:
                raise FitError(f"{who}.on_save_checkpoint added metadata {clash[0]!r}, which fit writes itself; rename it")
            metadata.update(signal.metadata)
        self.spread.save(path, packed, agreed=agreed, metadata=metadata)

    def preempt(self) -> Any:
        path = None if self.ckpt_dir is None or not self.writes else self.ckpt_dir / "last.safetensors"
        if path is not None:
            self.save(path)
        _log.warning("SIGTERM at epoch %d, step %d: %s", self.pos.epoch, self.pos.step,
                     f"saved {path}; resume with resume_from='last'" if path else "nothing saved (no ckpt_dir)")
        raise Preempted(path)  # callbacks then get on_exception, as for any interruption

    def on_exception(self, error: BaseException) -> None:
        ctx = self.context("train")
        for cb in self.callbacks:
            try:
                signal = cb.on_exception(ctx, error)
                for path in signal.save if isinstance(signal, Signal) else ():
                    self.save(path, agreed=False)
            except Exception as e:  # noqa: BLE001 - the original error is the one to raise
                _log.error("callback %s failed in on_exception: %s", type(cb).__name__, e)

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def shared_elapsed(self) -> float:
        """The elapsed time decisions are taken on: the ranks' shared clock when they vote,
        else this process's own."""
        return self.elapsed() if self.clock is None else self.clock

    def to_device(self, batch: Any) -> Any:
        return move_batch(batch, self.device, self.batch_dtype)


# ----------------------------------------------------------------------------- setup helpers


def _with_progress(callbacks: list[Callback], progress: bool | None, total: int | None,
                   max_epochs: int | None) -> list[Callback]:
    """Add the default progress display unless the caller gave one: a live bar on a
    terminal (or with ``progress=True``), plain lines elsewhere, nothing with ``False``."""
    if progress is False or any(isinstance(cb, (ProgressBar, ProgressLog)) for cb in callbacks):
        return callbacks
    if progress or sys.stdout.isatty():
        callbacks.append(ProgressBar(total=total))
    else:
        callbacks.append(ProgressLog(max_epochs=max_epochs))
    return callbacks


def _check_state_keys(callbacks: list[Callback]) -> None:
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


def _set_what(name: str | None) -> str:
    return "val_data" if name is None else f"val_data[{name!r}]"


def _resume_path(resume_from: str | os.PathLike[str], ckpt_dir: Path | None) -> Path:
    if resume_from == "last":
        if ckpt_dir is None:
            raise FitError('resume_from="last" needs a ModelCheckpoint callback (its dirpath) or ckpt_dir=')
        return ckpt_dir / "last.safetensors"
    return Path(resume_from)


def _copy_to(state: Any, device: torch.device) -> Any:
    """A copy of ``state`` on ``device`` (the compiled step donates it, never the caller's)."""
    return tree.map(lambda x: x.detach().to(device, copy=True) if isinstance(x, torch.Tensor) else x, state)


def _single_lr(state: Any) -> torch.Tensor | None:
    if not isinstance(state, TrainState):
        return None
    rates = optim.learning_rates(state.opt_state)
    return next(iter(rates.values())) if len(rates) == 1 else None
