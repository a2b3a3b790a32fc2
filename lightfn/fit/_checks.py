"""The checks fit runs on a step's first outputs, and the abstract first call.

A wrong step fails at its first call with the offending path or metric named, not deep
inside the loop: :func:`check_train_output` (a ``(state, metrics)`` pair, the state's
structure, shapes and dtypes unchanged), :func:`check_metrics` (every metric a real scalar,
a per-member ``(K,)`` vector for an ensemble, or an ``lf.metrics.Sum`` state),
:func:`check_acc` (a restored accumulator holds the same metrics). :func:`abstract_eval`
runs a step on fake tensors (shapes and dtypes only), so the accumulator's layout is known
before the fused graph's first call; when tracing fails it tells whether the step itself
is broken or only its compilation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import metrics as lf_metrics
from .. import tree
from .._diagnostics import first_line
from .._members import is_member_name, state_members
from .._compile.jit import eager_failure
from ..errors import CompileError, LightfnError, StepError, TreeError
from ..step import describe

__all__ = ["check_metrics", "check_train_output", "check_acc", "abstract_eval"]

Acc = dict[str, Any]  # {"mean": [sum_1..sum_M, n], "sum": {name: total}}



def check_metrics(metrics: Any, who: str, members: int | None = None) -> tuple[str, ...]:
    """The names of the averaged metrics, after checking ``metrics`` is a dict of real
    tensors and ``lf.metrics.Sum`` states. An averaged metric is a scalar (one element) or,
    when the state is stacked over ``members`` (K, see
    :func:`lightfn._members.state_members`), a per-member vector of shape ``(K,)`` (an
    ``lf.ensemble`` step)."""
    if not isinstance(metrics, Mapping):
        raise StepError(f"the {who} must return its metrics as a dict of scalar tensors, got {describe(metrics)}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise StepError(f"the {who} returned a metric named {name!r}; metric names must be strings")
        if isinstance(value, lf_metrics.Sum):
            lf_metrics.check_states({name: value.value}, who)
            continue
        if not isinstance(value, torch.Tensor):
            raise StepError(
                f"metric {name!r} of the {who} is {describe(value)}, not a tensor; return a 0-d tensor "
                "(a Python number would force a host sync or be baked into the compiled graph)"
            )
        per_member = members is not None and value.dim() == 1 and value.shape[0] == members
        if not (value.numel() == 1 or per_member) or value.is_complex():
            k = "" if members is None else f"; this state is stacked over {members} members, so ({members},) is allowed too"
            raise StepError(
                f"metric {name!r} of the {who} is {describe(value)}; metrics must be real scalars (or of shape "
                f"(K,) from an lf.ensemble step over a state of K stacked members{k}): reduce it (e.g. .mean()) "
                "before returning it, or return it as lf.metrics.Sum(...) to sum it over the epoch"
            )
        if is_member_name(name):
            raise StepError(
                f"the {who} returned a metric named {name!r}; names ending in '/member_<i>' are reserved for the "
                "members of an lf.ensemble step's (K,) metrics: rename it"
            )
    return tuple(k for k, v in metrics.items() if not isinstance(v, lf_metrics.Sum))


def check_train_output(out: Any, state: Any) -> tuple[Any, tuple[str, ...]]:
    """``(new_state, names)`` after checking a train step's return value against ``state``."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise StepError(f"the train step must return (new_state, metrics_dict), got {describe(out)}")
    new_state, metrics = out
    try:
        tree.assert_same_structure(state, new_state, what="the state returned by the train step", check_shapes=True)
    except TreeError as e:
        raise StepError(
            f"{e}\nA train step must return a state with the same structure, shapes and dtypes as the one it got "
            "(use state.replace(...) to change values)."
        ) from None
    return new_state, check_metrics(metrics, "train step", state_members(state))


def abstract_eval(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on fake tensors: output shapes and dtypes, no computation or side effect."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    # Real tensors captured by the step (constants, masks) are allowed as they are.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fake = tree.map(lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x, args)
    try:
        with mode:
            return fn(*fake)
    except LightfnError:
        raise
    except Exception as e:  # noqa: BLE001 - reported with what to do about it
        raise _trace_failure(fn, e, args) from e


def _trace_failure(fn: Callable[..., Any], error: Exception, args: tuple[Any, ...]) -> Exception:
    """The error to show when ``fn`` could not be traced: ``jit=False`` is suggested only
    when ``fn`` runs eagerly on the same inputs; otherwise the step itself is broken and its
    eager error is the one to fix."""
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    eager_error = eager_failure(fn, args)
    if isinstance(eager_error, LightfnError):
        return eager_error
    if eager_error is not None:
        return StepError(
            f"{name} fails when run eagerly too, so compilation is not the cause (jit=False would not help): "
            f"{type(eager_error).__name__}: {first_line(eager_error)}"
        )
    return CompileError(
        f"fit could not trace {name} to compile it: {type(error).__name__}: {first_line(error)}\n"
        "  A compiled step must be pure tensor code (no .item(), no Python branching on tensor values, no "
        "data-dependent shapes). The step does run eagerly: pass jit=False to fit to train without compiling."
    )


def check_acc(acc: Acc | None, names: tuple[str, ...], expected: tuple[str, ...] | None, metrics: Mapping[str, Any],
               device: torch.device) -> Acc:
    """``acc``, or a new zero one for ``metrics`` (a step's first output); a restored one
    must hold the sums of the same metrics and states."""
    if expected is not None and names != expected:
        raise StepError(
            f"the checkpoint's metric sums are for metrics {list(expected)}, but this train step returns "
            f"{list(names)}; resume with the step that wrote the checkpoint"
        )
    totals = lf_metrics.zeros(lf_metrics.split(metrics)[1])
    if acc is None:
        return {"mean": torch.zeros(len(names) + 1, dtype=torch.float32, device=device), "sum": totals}
    try:
        tree.assert_same_structure(totals, acc["sum"], what="the checkpoint's summed metric states", check_shapes=True)
    except TreeError as e:
        raise StepError(f"{e}\nThe step's lf.metrics.Sum states differ from those the checkpoint holds; resume with "
                        "the step that wrote the checkpoint") from None
    return acc
