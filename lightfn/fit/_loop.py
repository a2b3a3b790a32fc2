"""The training loop itself: epochs of steps, validation, logging, stopping.

Calling a :class:`Loop` (``Loop.__call__``) reads top to bottom as the loop Lightning users know; everything it keeps
between steps is one :class:`~lightfn.fit._run.Run`, the very thing a checkpoint holds.
Callbacks are called and their signals applied in :mod:`lightfn.fit._hooks`; the plan
(:mod:`lightfn.fit._plan`) says what is due; the process policy
(:mod:`lightfn.fit._processes`) reduces metrics and lets ranks agree on stopping.

A little over ~300 lines: the loop and the steps it takes (validate, log, close an epoch,
preempt) read together, top to bottom, and are kept in one place on purpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from .. import optim
from .._members import collapse_equal, expand, with_suffix
from ..callbacks.base import Callback
from ..data import iterate
from ..errors import FitError, Preempted
from ..eval_sets import prefix
from ..loggers.base import Logger
from ..state import TrainState
from . import _hooks as hooks
from ._background import Background
from ._accumulate import AccumulatingEvalStep, AccumulatingTrainStep, evaluate, to_host, zeros_like
from ._plan import Plan
from ._processes import Processes
from ._run import Run
from ._steps import move_batch

__all__ = ["Loop", "preemption_signal"]

_log = logging.getLogger("lightfn.fit")


@dataclasses.dataclass(kw_only=True, eq=False)
class Loop:
    """One fit run: its fixed parts (what fit set up) and its :class:`Run`."""

    plan: Plan
    train: AccumulatingTrainStep
    evaluate: AccumulatingEvalStep | None
    run: Run
    train_data: Any
    val_sets: dict[str | None, Any]
    callbacks: list[Callback]
    loggers: list[Logger]
    device: torch.device
    batch_dtype: torch.dtype | None
    processes: Processes
    writes: bool  # checkpoints are written (not under fast_dev_run)
    ckpt_dir: Path | None
    metadata: Mapping[str, Any]
    log_lr: bool  # fit logs "lr" itself (no callback owns the learning-rate names)
    stop_reason: str = ""
    logger: logging.Logger = _log

    def __post_init__(self) -> None:
        self.t0 = time.monotonic()
        # Announce only the first call of a step that goes through torch.compile: an eager
        # run is never said to compile.
        self.compile_pending = self.train.compiles
        # Graphs compiled in the background (lightfn/fit/_background.py): switched when built.
        deferred = [step.deferred for step in (self.train, self.evaluate) if step is not None and step.deferred]
        self.background = None if not deferred else Background(
            deferred[0].builder, deferred, announce=lambda text: hooks.announce(self, text), record=self._compiled_now,
            left=self.left)
        self.epoch_batches: int | None = None  # the first full epoch's batch count (a loader without len)
        # What callbacks see as elapsed time. Ranks that vote share one clock (the largest at
        # the last vote, 0 before it), so time-based callback decisions agree everywhere.
        self.clock: float | None = 0.0 if self.processes.voting else None
        hooks.check_state_keys(self.callbacks)
        # Called after every step: only the callbacks that do something then.
        self.on_batch_end = hooks.overriding(self.callbacks, lambda c: c.on_train_batch_end)

    @property
    def is_main(self) -> bool:
        """This process logs and writes files (rank 0)."""
        return self.processes.is_main

    def resume(self, path: Path) -> None:
        """Continue the run saved at ``path`` (state, position, sums, logged values, and every
        callback's state)."""
        run = self.processes.restore(path, like=self.run)
        self.run = run
        self.train.expected_names = run.metric_names if run.acc is not None else None
        for cb in self.callbacks:
            if cb.state_key in run.callbacks:
                cb.load_state_dict(run.callbacks[cb.state_key])
        unused = set(run.callbacks) - {cb.state_key for cb in self.callbacks}
        if unused:
            _log.warning("resume: %s holds state of callbacks not passed to this fit: %s", path, sorted(unused))
        pos = run.position
        # A graph the interrupted run had switched to compiled runs compiled from the start.
        for step in (self.train, self.evaluate):
            if step is not None and step.deferred is not None and step.deferred.name in run.compiled:
                step.deferred.must_compile = True
        self.compile_pending = self.train.compiles
        _log.info("resumed from %s at epoch %d, batch %d, step %d", path, pos.epoch, pos.batch, pos.step)

    def snapshot(self) -> Run:
        """The run as a checkpoint holds it now: total elapsed time, metric names and every
        callback's state included."""
        run = self.run
        return run.replace(position=dataclasses.replace(run.position, elapsed=run.position.elapsed + self.elapsed()),
                           metric_names=self.train.acc_names,
                           callbacks={cb.state_key: cb.state_dict() for cb in self.callbacks})

    # -- the loop ----------------------------------------------------------------------------

    def __call__(self, hparams: Mapping[str, Any] | None) -> Any:
        plan, pos = self.plan, self.run.position
        with preemption_signal() as preempted:
            try:
                if hparams and self.is_main:
                    for logger in self.loggers:
                        logger.log_hparams(dict(hparams))
                hooks.emit(self, lambda cb, ctx: cb.on_fit_start(ctx))
                if any(plan.sanity_batches):
                    self.validate("sanity")
                if pos.batch and plan.validate_after_batch(pos) and pos.last_val_step != pos.step:
                    self.validate()  # resumed from a checkpoint written just before a due validation
                while not self.finished():
                    hooks.emit(self, lambda cb, ctx: cb.on_train_epoch_start(ctx))
                    cut = False  # the epoch stopped before its last batch (max_steps, max_time, a stop)
                    for batch in self.batches():
                        metrics = self.train_step(self.to_device(batch))
                        pos.batch, pos.step = pos.batch + 1, pos.step + 1
                        if pos.step % plan.log_every_n_steps == 0:
                            self.log_step(metrics)
                        if self.on_batch_end:
                            hooks.emit(self, lambda cb, ctx: cb.on_train_batch_end(ctx), only=self.on_batch_end)
                        if plan.validate_after_batch(pos):
                            self.validate()
                        now = self.elapsed()
                        (stop, sigterm), self.clock = self.processes.vote((self.should_stop(now), preempted()), now,
                                                                          self.device)
                        if sigterm:
                            return self.preempt()
                        if stop:
                            cut = not plan.epoch_full(pos)
                            break
                    self.end_epoch(cut)
                hooks.emit(self, lambda cb, ctx: cb.on_fit_end(ctx))
            except BaseException as error:  # a Preempted included: training did not end
                hooks.notify_exception(self, error)
                raise
            finally:
                if self.background is not None:
                    self.background.finish()
                for logger in self.loggers if self.is_main else ():
                    logger.flush()
        if self.stop_reason:
            _log.info("fit stopped at epoch %d, step %d: %s", pos.epoch, pos.step, self.stop_reason)
        return self.run.state

    def finished(self) -> bool:
        max_epochs = self.plan.max_epochs
        return (max_epochs is not None and self.run.position.epoch >= max_epochs) or self.should_stop()

    def should_stop(self, elapsed: float | None = None) -> bool:
        """Stop now? ``elapsed`` defaults to :meth:`shared_elapsed` (so voting ranks answer
        alike between votes)."""
        pos = self.run.position
        if elapsed is None:
            elapsed = self.shared_elapsed()
        return (pos.stop_requested and self.plan.may_stop_early(pos)) or self.plan.out_of_budget(pos, elapsed)

    def batches(self) -> Any:
        pos, n = self.run.position, self.plan.train_batches
        data = iterate(self.train_data, pos.epoch, start=pos.batch)
        return data if n is None else itertools.islice(data, max(0, n - pos.batch))

    def train_step(self, batch: Any) -> Mapping[str, torch.Tensor]:
        """One step on the run's state and sums; returns the step's metrics (device)."""
        run = self.run
        if not self.compile_pending:
            run.state, run.acc, metrics = self.train(run.state, run.acc, batch)
            if self.background is not None:
                self.tick()
            return metrics
        # The first call of a compiled step traces and compiles it (seconds to minutes):
        # say so, so a quiet log does not look hung, and how long it took. Host wall time
        # of the call: compilation is synchronous, the step's own kernels are not waited for.
        hooks.announce(self, "compiling the train step (its first call)...")
        start = time.monotonic()
        run.state, run.acc, metrics = self.train(run.state, run.acc, batch)
        self.compile_pending = False
        hooks.announce(self, f"train step compiled in {time.monotonic() - start:.1f} s")
        return metrics

    def tick(self, epoch_end: bool = False) -> None:
        """Switch the graphs compiled in the background whose artifacts are ready."""
        assert self.background is not None
        layout = None if self.evaluate is None else self.evaluate.layout
        self.background.tick(self.run.state, self.run.acc, layout, epoch_end=epoch_end)

    def left(self) -> tuple[int | None, float | None, bool]:
        """``(steps, seconds, known)``: the train steps and seconds the run has left by its
        limits (None: that limit is absent); ``known`` is False while ``max_epochs`` bounds
        the run but the epoch length is not known yet."""
        plan, pos = self.plan, self.run.position
        per_epoch = plan.train_batches if plan.train_batches is not None else self.epoch_batches
        bounds = [] if plan.max_steps is None else [plan.max_steps - pos.step]
        if plan.max_epochs is not None and per_epoch is not None:
            bounds.append((plan.max_epochs - pos.epoch) * per_epoch - pos.batch)
        seconds = None if plan.max_time is None else plan.max_time - pos.elapsed - self.elapsed()
        known = not (plan.max_epochs is not None and per_epoch is None and not bounds and seconds is None)
        return (max(0, min(bounds)) if bounds else None), seconds, known

    def _compiled_now(self, name: str) -> None:
        """Record that graph ``name`` runs compiled from the current step on."""
        self.run.compiled.setdefault(name, self.run.position.step)

    def end_epoch(self, cut: bool = False) -> None:
        """Log the epoch's means, validate if due and call ``on_epoch_end``.

        ``cut``: training stops before the epoch's last batch. The epoch is closed as
        Lightning closes it (means of the batches done, validation, epoch-end hooks and
        checkpoints), but the position stays inside it and its sums are kept, so a run
        resumed from such a checkpoint with a larger ``max_steps`` / ``max_time`` trains
        the rest of the epoch: the same bits as a run never stopped.
        """
        run = self.run
        pos = run.position
        if run.acc is None or (pos.batch == 0 and not pos.epoch_done):
            raise _no_batches(pos.epoch)
        if self.epoch_batches is None and not cut:
            self.epoch_batches = pos.batch
        if self.background is not None:
            self.tick(epoch_end=True)
        self.log({f"train/{with_suffix(k, '_epoch')}": v for k, v in self.train.values(self.processes.sum(run.acc)).items()})
        if self.evaluate is not None and self.plan.validate_at_epoch_end(pos):
            self.validate()
        pos.epoch_done = not cut
        hooks.emit(self, lambda cb, ctx: cb.on_epoch_end(ctx))
        if cut:
            return  # the run ends here; the position and sums stay mid-epoch
        pos.epoch, pos.batch, pos.epoch_done = pos.epoch + 1, 0, False
        run.acc = zeros_like(run.acc)

    def validate(self, stage: str = "validate") -> None:
        assert self.evaluate is not None
        counts = self.plan.sanity_batches if stage == "sanity" else self.plan.val_batches
        eval_state = hooks.emit(self, lambda cb, ctx: cb.on_validation_start(ctx), stage=stage, eval_ok=True)
        state = self.run.state if eval_state is None else eval_state
        on_batch = None
        only = hooks.overriding(self.callbacks, lambda c: c.on_validation_batch_end)
        if only:
            def on_batch(metrics: Mapping[str, torch.Tensor]) -> None:
                hooks.emit(self, lambda cb, ctx: cb.on_validation_batch_end(ctx), stage=stage, state=state,
                           batch_metrics=metrics, only=only)
        values: dict[str, float] = {}
        for (name, data), n in zip(self.val_sets.items(), counts):
            if stage == "sanity" and n == 0:
                continue  # this set's limit leaves no sanity batch; the others still run
            values.update(evaluate(self.evaluate, state, iterate(data, 0), prefix=prefix("val", name), limit=n,
                                   move=self.to_device, reduce=self.processes.sum, what=set_what(name),
                                   on_batch=on_batch))
        if stage == "sanity":  # not logged; callbacks see it only in this hook
            hooks.emit(self, lambda cb, ctx: cb.on_validation_end(ctx), stage=stage, extra=values, state=state)
            return
        self.run.position.last_val_step = self.run.position.step
        self.log(values)
        hooks.emit(self, lambda cb, ctx: cb.on_validation_end(ctx), stage=stage, state=state)

    def log_step(self, metrics: Mapping[str, torch.Tensor]) -> None:
        # An ensemble's (K,) metrics are spelled out (mean and members) before the
        # ranks average them: every value reduced and logged is a scalar.
        values = {f"train/{k}": v for k, v in self.processes.mean(expand(metrics)).items()}
        lr = _single_lr(self.run.state) if self.log_lr else None
        if lr is None:
            self.log(values)
            return
        values.update(expand({"lr": lr}))
        # One transfer for metrics and rates; one rate shared by all members logs as "lr".
        self.log(collapse_equal(to_host(values), "lr"))

    def log(self, values: Mapping[str, Any]) -> None:
        """Copy device values to the host in one transfer, remember and log them."""
        tensors = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
        host = {**{k: float(v) for k, v in values.items() if k not in tensors}, **to_host(tensors),
                "epoch": self.run.position.epoch}
        self.run.logged.update(host)
        if self.is_main:
            for logger in self.loggers:
                logger.log_metrics(host, self.run.position.step)

    def preempt(self) -> Any:
        path = None if self.ckpt_dir is None or not self.writes else self.ckpt_dir / "last.safetensors"
        if path is not None:
            hooks.save(self, path)
        pos = self.run.position
        _log.warning("SIGTERM at epoch %d, step %d: %s", pos.epoch, pos.step,
                     f"saved {path}; resume with resume_from='last'" if path else "nothing saved (no ckpt_dir)")
        raise Preempted(path)  # callbacks then get on_exception, as for any interruption

    def elapsed(self) -> float:
        """Seconds since this fit call started (this process's clock)."""
        return time.monotonic() - self.t0

    def shared_elapsed(self) -> float:
        """The elapsed time decisions are taken on: the ranks' shared clock when they vote,
        else this process's own."""
        return self.elapsed() if self.clock is None else self.clock

    def to_device(self, batch: Any) -> Any:
        return move_batch(batch, self.device, self.batch_dtype)


def set_what(name: str | None) -> str:
    """How a validation set is named in messages."""
    return "val_data" if name is None else f"val_data[{name!r}]"


def _no_batches(epoch: int) -> Exception:
    return FitError(
        f"train_data yielded no batches in epoch {epoch} (an empty dataset, a batch size larger than the "
        "data, or a one-shot iterator already consumed: pass a list, an lf.data.ArrayLoader or a DataLoader)"
    )


def _single_lr(state: Any) -> torch.Tensor | None:
    if not isinstance(state, TrainState):
        return None
    rates = optim.learning_rates(state.opt_state)
    return next(iter(rates.values())) if len(rates) == 1 else None


@contextlib.contextmanager
def preemption_signal() -> Iterator[Callable[[], bool]]:
    """Catch SIGTERM for the duration of the block; yield a function saying if it came.

    The previous handler is restored on exit. Outside the main thread (where Python allows
    no signal handlers) nothing is installed and the function always says False.
    """
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event.is_set
        return
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda signum, frame: event.set())
    try:
        yield event.is_set
    finally:
        signal.signal(signal.SIGTERM, previous)
