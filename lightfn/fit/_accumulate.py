"""Run a train or eval step and accumulate its metrics on the device, compiled together.

``lf.fit`` never copies a metric to the host after a step. Each step's metrics are added,
weighted by the batch size, into one small device vector ``acc = [sum_1, ..., sum_M, n]``
(sums of ``metric * batch_size`` and the total number of samples), so an epoch mean over a
ragged last batch is exact; the loop copies values to the host only at log points, all in
one transfer (:func:`to_host`). Metric *states* a step marks with ``lf.metrics.Sum`` (a
confusion matrix, a summed NLL and a token count) are summed as they are beside it, and
``compute_metrics`` turns their totals into values (:mod:`lightfn.metrics`). The whole
accumulator is the pytree ``{"mean": acc, "sum": {name: total}}``.

When fit compiles, the step and the accumulation are ONE graph:
``lf.jit(train_and_accumulate, donate=True)`` with
``train_and_accumulate(state, acc, batch) -> (state, acc, metrics)``. The accumulator's
layout (the metric names) must be known before that graph's first call, so the step is
first evaluated the step *abstractly* under ``FakeTensorMode`` on the first batch: shapes
and dtypes only, no computation, no side effect on the state, and the same tracing
machinery ``torch.compile`` uses next, so a step it accepts compiles. Without compilation
(``jit=False``) or for a step the user already wrapped in ``lf.jit``, the step runs as
given and its metrics are accumulated after it with one fused in-place add.

The first outputs are checked (:mod:`lightfn.fit._checks`), so a wrong step fails at its
first call with the offending path or metric named.

An ``lf.ensemble`` step returns metrics of shape ``(K,)``, one value per member: each
member gets its own accumulator slot (``<name>/member_<i>``) and :func:`means` adds their
mean under ``<name>`` (see :mod:`lightfn._members`).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from .. import metrics as lf_metrics
from .. import tree
from .._members import flat_names, flatten, group_means, state_members
from ..errors import FitError
from .._compile import aot
from .._compile.background import Builder
from .._compile.jit import Jitted, jit, jit_disabled
from ._background import Deferred
from ._checks import Acc, abstract_eval, check_acc, check_metrics, check_train_output
from . import _layouts as layouts
from ._steps import classify

__all__ = ["Acc", "AccumulatingTrainStep", "AccumulatingEvalStep", "evaluate", "batch_size", "means", "epoch_values",
           "zeros_like", "to_host"]


def batch_size(batch: Any) -> int:
    """The leading dimension of the batch's first tensor leaf (1 if it has none).

    A host int from the shape: no device sync. Inside a compiled graph it is the
    (dynamic) batch dimension, so a short last batch reuses the graph.
    """
    for x in tree.leaves(batch):
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            return x.shape[0]
    return 1


def _vector(metrics: Mapping[str, torch.Tensor], keys: tuple[str, ...], acc: torch.Tensor) -> torch.Tensor:
    return torch.cat([flatten(metrics, keys, acc.dtype), acc.new_ones(1)])


def accumulate(acc: torch.Tensor, metrics: Mapping[str, torch.Tensor], keys: tuple[str, ...], n: Any) -> torch.Tensor:
    """``acc + [m_1, ..., m_M, 1] * n`` (pure; traced into the step's graph). ``keys``: the
    step's metric names; a (K,) metric fills K consecutive slots."""
    return acc + _vector(metrics, keys, acc) * n


def means(acc: torch.Tensor, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The weighted means in ``acc`` (slot ``names``), still on the device; each group of
    member slots also gives its mean over the members under the metric's own name."""
    avg = acc[:-1] / acc[-1]
    return group_means({k: avg[i] for i, k in enumerate(names)})


def epoch_values(acc: Acc, names: tuple[str, ...], compute_metrics: lf_metrics.ComputeFn | None) -> dict[str, torch.Tensor]:
    """Everything an accumulator stands for: the weighted means of ``names`` and the values
    ``compute_metrics`` makes of the summed states, on the device."""
    return {**means(acc["mean"], names), **lf_metrics.values(acc["sum"], compute_metrics, names)}


def zeros_like(acc: Acc) -> Acc:
    """A zeroed accumulator of the same layout (a new epoch)."""
    return tree.map(torch.zeros_like, acc)


def _accumulate_all(acc: Acc, metrics: Mapping[str, Any], names: tuple[str, ...], n: Any) -> Acc:
    means_, states = lf_metrics.split(metrics)
    return {"mean": accumulate(acc["mean"], means_, names, n), "sum": lf_metrics.add(acc["sum"], states)}


def _accumulate_all_(acc: Acc, metrics: Mapping[str, Any], names: tuple[str, ...], n: int) -> Acc:
    means_, states = lf_metrics.split(metrics)
    acc["mean"].add_(_vector(means_, names, acc["mean"]), alpha=n)
    lf_metrics.add_(acc["sum"], states)
    return acc


def to_host(values: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Copy scalar tensors to Python floats in ONE device-to-host transfer."""
    if not values:
        return {}
    stacked = torch.stack([v.detach().reshape(()).float().to(next(iter(values.values())).device) for v in values.values()])
    return dict(zip(values.keys(), stacked.tolist()))


# ----------------------------------------------------------------------------- steps with sums


class AccumulatingTrainStep:
    """``(state, acc, batch) -> (state, acc, metrics)``: one train step plus accumulation.

    ``acc`` is ``None`` before the first step of a fresh run (it is created once the metric
    names are known). With ``compile=True`` (and a step not already ``lf.jit``-ed) the step
    and the accumulation run as one donated graph: the state passed in is overwritten.
    The ``metrics`` returned are the averaged ones only (what fit logs per step); the
    ``lf.metrics.Sum`` states go into ``acc["sum"]``. ``compute_metrics`` turns their
    totals into epoch values (:meth:`values`).
    """

    def __init__(self, step: Callable[..., Any], *, compile: bool, expected_names: tuple[str, ...] | None = None,
                 compute_metrics: lf_metrics.ComputeFn | None = None, builder: Builder | None = None) -> None:
        self.step = step
        self.fused = compile and not classify(step).jitted
        self.keys: tuple[str, ...] = ()  # the step's metric names
        self.names: tuple[str, ...] | None = None  # acc's slot names (members spelled out)
        self.expected_names = expected_names
        self.compute_metrics = compute_metrics
        self._compiled: Jitted | None = None
        # With a builder the fused graph compiles in the background (lightfn/fit/_background.py).
        self.deferred = Deferred("train", builder) if self.fused and builder is not None else None

    @property
    def acc_names(self) -> tuple[str, ...] | None:
        """The metric names ``acc`` holds: known after the first step, or from the checkpoint
        a run resumed from (one resumed at an epoch's end may close it before any step)."""
        return self.names if self.names is not None else self.expected_names

    def values(self, acc: Acc) -> dict[str, torch.Tensor]:
        """The epoch's values in ``acc`` (already summed over ranks): means and computed."""
        names = self.acc_names
        assert names is not None, "values() before the first step of a run not resumed"
        return epoch_values(acc, names, self.compute_metrics)

    @property
    def compiles(self) -> bool:
        """Whether calls go through ``torch.compile`` (so the first one compiles): the fused
        graph fit builds, or a step the user wrapped in ``lf.jit``; False when eager or
        when ``LIGHTFN_DISABLE_JIT`` turned jit off."""
        if self._compiled is not None:
            return self._compiled.compiled
        if not self.fused and classify(self.step).jitted:
            return self.step.compiled
        if self.deferred is not None and not self.deferred.must_compile:
            return False  # the first call runs eagerly (or loads the artifact)
        return self.fused and not jit_disabled()

    def __call__(self, state: Any, acc: Acc | None, batch: Any) -> tuple[Any, Acc, dict[str, torch.Tensor]]:
        if self.names is None:
            return self._first(state, acc, batch)
        if self._compiled is not None:
            return self._compiled(state, acc, batch)
        if self.deferred is not None and (run := self.deferred.call(state, acc, batch)) is not None:
            return run()
        new_state, metrics = self.step(state, batch)
        return new_state, _accumulate_all_(acc, metrics, self.keys, batch_size(batch)), lf_metrics.split(metrics)[0]

    def _first(self, state: Any, acc: Acc | None, batch: Any) -> tuple[Any, Acc, dict[str, torch.Tensor]]:
        deferred, jitted = self.deferred, None
        cached = deferred is not None or aot.enabled_by_env()  # layouts live beside AOT artifacts
        known = layouts.recall("train", self.step, state, batch) if self.fused and cached else None
        if self.fused and (deferred is None or deferred.must_compile or known is not None):
            if known is None:
                out = abstract_eval(self.step, state, batch)
                _, keys = check_train_output(out, state)
                names, metrics = flat_names(lf_metrics.split(out[1])[0]), out[1]
                if cached:
                    layouts.remember("train", self.step, state, batch, keys, names,
                                     bool(lf_metrics.split(metrics)[1]))
            else:
                (keys, names), metrics = known, {}  # remembered: a step without Sum states
            acc = check_acc(acc, names, self.expected_names, metrics, tree.device_of(state))
            self._check_computable(acc)
            self.keys, self.names = keys, names
            jitted = self._fused(cache=deferred is not None)
            if deferred is None:
                self._compiled = jitted
            run = _first_compiled_call(deferred, jitted, state, acc, batch)
            if run is not None:
                return run()
            out = self.step(state, batch)  # not in the cache yet: this call runs eagerly
            new_state, _ = check_train_output(out, state)
        else:
            out = self.step(state, batch)
            new_state, keys = check_train_output(out, state)
            names = flat_names(lf_metrics.split(out[1])[0])
            acc = check_acc(acc, names, self.expected_names, out[1], tree.device_of(new_state))
            self._check_computable(acc)
            self.keys, self.names = keys, names
            if deferred is not None:
                layouts.remember("train", self.step, state, batch, keys, names, bool(lf_metrics.split(out[1])[1]))
                jitted = self._fused(cache=True)
        acc = _accumulate_all_(acc, out[1], self.keys, batch_size(batch))
        if deferred is not None and jitted is not None:
            deferred.defer(jitted, new_state, acc, batch, first=True)
        return new_state, acc, lf_metrics.split(out[1])[0]

    def _fused(self, *, cache: bool) -> Jitted:
        """The step and its accumulation as one donated ``lf.jit`` function."""
        return jit(functools.partial(_train_and_accumulate, self.step, self.keys), donate=True,
                   cache=True if cache else None)

    def _check_computable(self, acc: Acc) -> None:
        # Without compute_metrics a non-scalar state cannot be logged: say so now, not at
        # the end of the first epoch.
        if self.compute_metrics is None:
            lf_metrics.values(acc["sum"], None)


def _first_compiled_call(deferred: Deferred | None, jitted: Jitted, *args: Any) -> Callable[[], Any] | None:
    """How a fused step's first call runs compiled: through ``jitted`` at once (compiling
    first) without a background build, else from the cache if it holds the artifact (or
    must: :meth:`Deferred.warm`); None: this call runs eagerly."""
    if deferred is None:
        return functools.partial(jitted, *args)
    return deferred.warm(jitted, *args)


def _train_and_accumulate(step: Callable[..., Any], keys: tuple[str, ...], state: Any, acc: Acc, batch: Any) -> Any:
    new_state, metrics = step(state, batch)
    return new_state, _accumulate_all(acc, metrics, keys, batch_size(batch)), lf_metrics.split(metrics)[0]


class AccumulatingEvalStep:
    """``(state, acc, batch) -> acc``: one eval step plus accumulation, without gradients.

    :meth:`with_metrics` returns the batch's metrics too (the compiled graph outputs them:
    no extra work), for fit's ``on_validation_batch_end``.

    ``compute_metrics`` turns the totals of the step's ``lf.metrics.Sum`` states into
    values (:meth:`values`).
    """

    def __init__(self, step: Callable[..., Any], *, compile: bool, compute_metrics: lf_metrics.ComputeFn | None = None,
                 builder: Builder | None = None) -> None:
        self.step = step
        self.fused = compile and not classify(step).jitted
        self.keys: tuple[str, ...] = ()  # the step's averaged metric names
        self.names: tuple[str, ...] | None = None  # acc's slot names (members spelled out)
        self.compute_metrics = compute_metrics
        self._compiled: Jitted | None = None
        self._layout: Any = None  # a zero accumulator, copied for each new evaluation run
        self.deferred = Deferred("eval", builder) if self.fused and builder is not None else None

    @property
    def layout(self) -> Acc | None:
        """A zeroed accumulator of this step's layout (None before the first batch)."""
        return self._layout

    def values(self, acc: Acc) -> dict[str, torch.Tensor]:
        """The run's values in ``acc`` (already summed over ranks): means and computed."""
        assert self.names is not None, "values() before the first batch"
        return epoch_values(acc, self.names, self.compute_metrics)

    def __call__(self, state: Any, acc: Acc | None, batch: Any) -> Acc:
        return self.with_metrics(state, acc, batch)[0]

    def with_metrics(self, state: Any, acc: Acc | None, batch: Any) -> tuple[Acc, Mapping[str, torch.Tensor]]:
        """``(acc, metrics)``: the updated accumulator and this batch's metrics (device tensors)."""
        with torch.no_grad():
            if self.names is None:
                return self._first(state, acc, batch)
            if acc is None:  # a new validation run
                acc = zeros_like(self._layout)
            if self._compiled is not None:
                return self._compiled(state, acc, batch)
            if self.deferred is not None and (run := self.deferred.call(state, acc, batch)) is not None:
                return run()
            metrics = self.step(state, batch)
            return _accumulate_all_(acc, metrics, self.keys, batch_size(batch)), lf_metrics.split(metrics)[0]

    def _first(self, state: Any, acc: Acc | None, batch: Any) -> tuple[Acc, Mapping[str, torch.Tensor]]:
        deferred, jitted = self.deferred, None
        cached = deferred is not None or aot.enabled_by_env()  # layouts live beside AOT artifacts
        known = layouts.recall("eval", self.step, state, batch) if self.fused and cached else None
        if self.fused and (deferred is None or deferred.must_compile or known is not None):
            if known is None:
                metrics = abstract_eval(self.step, state, batch)
                keys = check_metrics(metrics, "eval step", state_members(state))
                acc = self._start(acc, keys, metrics, state)
                if cached:
                    layouts.remember("eval", self.step, state, batch, keys, self.names,
                                     bool(lf_metrics.split(metrics)[1]))
            else:
                acc = self._start(acc, known[0], {}, state, names=known[1])
            jitted = self._fused(cache=deferred is not None)
            if deferred is None:
                self._compiled = jitted
            run = _first_compiled_call(deferred, jitted, state, acc, batch)
            if run is not None:
                return run()
            metrics = self.step(state, batch)  # not in the cache yet: this call runs eagerly
        else:
            metrics = self.step(state, batch)
            acc = self._start(acc, check_metrics(metrics, "eval step", state_members(state)), metrics, state)
            if deferred is not None:
                layouts.remember("eval", self.step, state, batch, self.keys, self.names,
                                 bool(lf_metrics.split(metrics)[1]))
                jitted = self._fused(cache=True)
        if deferred is not None and jitted is not None:
            deferred.defer(jitted, state, zeros_like(acc), batch)
        return _accumulate_all_(acc, metrics, self.keys, batch_size(batch)), lf_metrics.split(metrics)[0]

    def _fused(self, *, cache: bool) -> Jitted:
        """The eval step and its accumulation as one ``lf.jit`` function."""
        return jit(functools.partial(_eval_and_accumulate, self.step, self.keys), cache=True if cache else None)

    def _start(self, acc: Acc | None, keys: tuple[str, ...], metrics: Mapping[str, Any], state: Any,
               names: tuple[str, ...] | None = None) -> Acc:
        names = flat_names(lf_metrics.split(metrics)[0]) if names is None else names
        acc = check_acc(acc, names, None, metrics, tree.device_of(state))
        if self.compute_metrics is None:
            lf_metrics.values(acc["sum"], None)  # a non-scalar state without compute_metrics: refused now
        self.keys, self.names, self._layout = keys, names, zeros_like(acc)
        return acc


def _eval_and_accumulate(step: Callable[..., Any], keys: tuple[str, ...], state: Any, acc: Acc,
                         batch: Any) -> tuple[Acc, Mapping[str, torch.Tensor]]:
    metrics = step(state, batch)
    return _accumulate_all(acc, metrics, keys, batch_size(batch)), lf_metrics.split(metrics)[0]


def evaluate(
    step: AccumulatingEvalStep,
    state: Any,
    batches: Iterable[Any],
    *,
    prefix: str,
    limit: int | None = None,
    move: Callable[[Any], Any] = lambda batch: batch,
    reduce: Callable[[Acc], Acc] = lambda acc: acc,
    what: str = "val_data",
    on_batch: Callable[[Mapping[str, torch.Tensor]], None] | None = None,
) -> dict[str, float]:
    """One evaluation pass: ``{prefix + name: value}`` over ``batches`` (at most ``limit``).

    Each mean is weighted by rows (the batch size), so a short last batch counts for what
    it holds; ``lf.metrics.Sum`` states are summed and turned into values by the step's
    ``compute_metrics``. ``move`` puts a batch on the device, ``reduce`` sums the
    accumulator over ranks. fit's validation and ``lf.validate`` / ``lf.test`` are this
    same pass. ``on_batch`` gets each batch's metrics as ``{prefix + name: 0-d device tensor}``.
    """
    acc = None
    for batch in batches if limit is None else itertools.islice(batches, limit):
        if on_batch is None:
            acc = step(state, acc, move(batch))
            continue
        acc, metrics = step.with_metrics(state, acc, move(batch))
        on_batch({f"{prefix}{k}": metrics[k] for k in step.keys})
    if acc is None:
        raise FitError(f"{what} yielded no batches (an empty dataset, or a batch size larger than the data?)")
    return to_host({f"{prefix}{k}": v for k, v in step.values(reduce(acc)).items()})
