"""Epoch-level metrics that are not batch means: metric *states* summed over an epoch.

A step's metrics are averaged over batches (weighted by rows). That is right for a loss or
an accuracy, and wrong for F1, AUROC, precision/recall or perplexity: the F1 of an epoch is
not the mean of its batches' F1s. Those metrics are functions of *sufficient statistics*
(a confusion matrix, a histogram of scores per class, a summed NLL and a token count) that
add up exactly over batches and over ranks. So a step may return such a state, marked with
:class:`Sum`, and a pure function turns the epoch's total into values:

- ``lf.metrics.Sum(tree)`` in a step's metrics dict (or in ``loss_fn``'s metrics, which
  ``lf.train_step`` / ``lf.eval_step`` pass on) marks ``tree`` (any pytree of tensors, any
  shapes) as a state to **sum** over the batches of the epoch or validation run, and over
  ranks, instead of averaging it. It is summed as it is, not weighted by rows.
- ``compute_metrics(totals) -> {name: value}`` (an argument of ``lf.fit``, ``lf.validate``
  and ``lf.test``) gets ``{name: summed tree}`` for every Sum entry and returns scalar
  values. They are logged like any metric: ``val/<name>`` after validation,
  ``train/<name>_epoch`` at an epoch's end, so ``ModelCheckpoint`` / ``EarlyStopping`` can
  monitor them. Without ``compute_metrics`` a scalar state logs its total; a non-scalar one
  is refused. The same function serves training and validation (each gets the totals of
  its own step's Sum entries).

A state's shape must not depend on the data when the step is compiled (``torch.bincount``
does: build counts from comparisons with ``torch.arange`` as below).

A Sum entry is not logged per step (``train/<name>``): a state is not a value, and one
batch's F1 is not what anyone monitors. Totals accumulate on the device inside the step's
compiled graph (no host sync), in the state's dtype, widened where summing needs it
(bool and integers: int64, exact; float16/bfloat16: float32). A float32 sum is exact to
float32 rounding in batch order; return float64 states for very long epochs where the
device supports it. Mid-epoch totals are part of fit checkpoints, so a resumed run's epoch
values are those of a run never interrupted.

Perplexity and macro F1::

    def loss_fn(params, batch):
        x, y = batch
        logits = apply(params, x)
        nll = F.cross_entropy(logits, y, reduction="none")
        classes = torch.arange(logits.shape[-1], device=y.device)
        hit_y, hit_pred = y[:, None] == classes, logits.argmax(-1)[:, None] == classes
        confusion = (hit_y[:, :, None] & hit_pred[:, None, :]).sum(0)   # (k, k) int64 counts
        return nll.mean(), {"ppl": lf.metrics.Sum({"nll": nll.sum(), "n": torch.tensor(nll.numel())}),
                            "confusion": lf.metrics.Sum(confusion)}

    def compute_metrics(totals):
        cm = totals["confusion"].double()          # rows: target, columns: prediction
        tp = cm.diagonal()
        f1 = 2 * tp / (cm.sum(0) + cm.sum(1)).clamp(min=1)
        ppl = torch.exp(totals["ppl"]["nll"] / totals["ppl"]["n"])
        return {"f1": f1.mean(), "ppl": ppl}

    lf.fit(step, state, train, val_data=val, eval_step=lf.eval_step(loss_fn),
           compute_metrics=compute_metrics,
           callbacks=[lf.callbacks.ModelCheckpoint("ckpts", monitor="val/f1", mode="max")])

With torchmetrics: its *functional* API computes a batch's state, which is what a Sum
holds; lightfn does not depend on it. E.g.
``torchmetrics.functional.classification.multiclass_confusion_matrix(preds, target,
num_classes=k)`` is a batch's confusion matrix: return it as ``lf.metrics.Sum(...)`` and
derive F1, precision, recall or Cohen's kappa from the total in ``compute_metrics``. For
AUROC, sum a per-class histogram of scores over fixed bins (``torch.histc`` of the
positives and of the negatives) and integrate the ROC curve of the totals; an exact AUROC
needs every score, which is not a sum: compute it after ``lf.predict``. Calling a
torchmetrics *stateful* module inside a step keeps state outside the state pytree, which
breaks compilation, ranks and resume: use the functional form.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import tree
from ._diagnostics import describe
from .errors import FitError, StepError

__all__ = ["Sum", "ComputeFn"]  # the rest: helpers for the runner and the steps

ComputeFn = Callable[[dict[str, Any]], Mapping[str, Any]]


@tree.pytree_dataclass
@dataclasses.dataclass(frozen=True, eq=False)  # identity equality: see lf.tree.pytree_dataclass
class Sum:
    """A metric state to sum over batches and ranks (see the module docstring).

    ``value`` is any pytree of real tensors, e.g. a confusion matrix or
    ``{"nll": nll.sum(), "n": count}``. A pytree node itself, so it passes through
    ``torch.func`` (a train step's aux) and ``torch.compile`` like the tensors it holds.
    """

    value: Any


def split(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(means, states)``: the entries to average, and the values of the :class:`Sum` entries."""
    means = {k: v for k, v in metrics.items() if not isinstance(v, Sum)}
    states = {k: v.value for k, v in metrics.items() if isinstance(v, Sum)}
    return means, states


def check_states(states: Mapping[str, Any], who: str) -> None:
    """Refuse a Sum whose leaves are not real tensors, naming the metric and the leaf."""
    for name, value in states.items():
        leaves = tree.leaves_with_path(value)
        if not leaves:
            raise StepError(f"metric {name!r} of the {who} is a Sum of {describe(value)}, which holds no tensor")
        for path, x in leaves:
            where = f"metric {name!r}{tree.keystr(path)} of the {who}"
            if not isinstance(x, torch.Tensor):
                raise StepError(f"{where} is {describe(x)}; a Sum holds tensors only (wrap numbers in torch.tensor)")
            if x.is_complex():
                raise StepError(f"{where} is {describe(x)}; a Sum holds real or integer tensors")


def _total_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a state's total is kept in: exact for counts, never below float32."""
    if dtype == torch.bool or not (dtype.is_floating_point or dtype.is_complex):
        return torch.int64
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return dtype


def zeros(states: Mapping[str, Any]) -> dict[str, Any]:
    """Zero totals for ``states`` (same structure and shapes, the totals' dtypes)."""
    return {k: tree.map(lambda x: torch.zeros(x.shape, dtype=_total_dtype(x.dtype), device=x.device), v)
            for k, v in states.items()}


def add(totals: dict[str, Any], states: Mapping[str, Any]) -> dict[str, Any]:
    """``totals + states`` leaf by leaf (pure; traced into the step's graph)."""
    return {k: tree.map(lambda t, s: t + s.detach().to(t.dtype), v, states[k]) for k, v in totals.items()}


def add_(totals: dict[str, Any], states: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`add` in place (the eager path: no new tensors per step)."""
    for k, v in totals.items():
        tree.map(lambda t, s: t.add_(s.detach().to(t.dtype)), v, states[k])
    return totals


def values(totals: Mapping[str, Any], compute_metrics: ComputeFn | None, taken: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The values to log for summed ``totals``: ``compute_metrics(totals)``, or without one
    each scalar total itself. ``taken``: the averaged metrics' names, which a computed
    name may not reuse."""
    if not totals:
        return {}
    if compute_metrics is None:
        out = {}
        for name, total in totals.items():
            if not isinstance(total, torch.Tensor) or total.numel() != 1:
                raise FitError(
                    f"metric {name!r} is a Sum of {describe(total)}, not one scalar, so it has no value to log by "
                    "itself; pass compute_metrics=fn, where fn({name: total, ...}) returns {name: scalar}"
                )
            out[name] = total.reshape(())
        return out
    with torch.no_grad():
        computed = compute_metrics(dict(totals))
    if not isinstance(computed, Mapping):
        raise FitError(f"compute_metrics must return a dict {{name: scalar}}, got {describe(computed)}")
    out = {}
    for name, value in computed.items():
        if not isinstance(name, str):
            raise FitError(f"compute_metrics returned a value named {name!r}; names must be strings")
        if name in taken:
            raise FitError(f"compute_metrics returned {name!r}, which is also a metric the step averages; rename one")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = torch.tensor(float(value))
        if not isinstance(value, torch.Tensor) or value.numel() != 1 or value.is_complex():
            raise FitError(f"compute_metrics returned {describe(value)} for {name!r}; each value must be a real scalar")
        out[name] = value.detach().reshape(())
    return out
