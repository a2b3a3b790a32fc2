"""Input checks shared by every transform: they turn a wrong tree into an error naming the leaf.

All checks look only at Python-level facts (types, tree structure, static shapes), so under
``torch.compile`` they cost nothing after tracing and never break the graph.
"""

from __future__ import annotations

import inspect
from typing import Any

import optree
import torch

from .. import tree as _tree
from .._diagnostics import describe, describe_type, diff_by_path
from ..errors import OptimizerConfigError, StateMismatchError, TreeError

__all__ = [
    "check_state",
    "with_types_of",
    "check_params",
    "check_match",
    "tensor_leaves",
    "scalar_dtype",
    "zero_count",
    "check_learning_rate",
    "tensor_hyperparam",
]


def check_state(state: Any, expected: type, transform: str) -> Any:
    """``state`` as an ``expected`` (a NamedTuple state type); :class:`StateMismatchError` if it is not one.

    A dict with exactly ``expected``'s fields is taken as that state: it is what a
    checkpoint loaded without a template (``lf.load(path)``) holds, since lightfn never
    rebuilds a class named in a file. So an optimizer state read back that way steps like
    the original (the state it returns is of the real type). Callers use the result.
    """
    if type(state) is expected:
        return state
    if type(state) is dict and set(state) == set(expected._fields):
        return expected(**state)
    got = f"a tuple of {len(state)} states" if type(state) is tuple else describe_type(type(state))
    raise StateMismatchError(
        f"{transform} expected its state to be {describe_type(expected)}, got {got}. "
        "This optimizer state was made by a different optimizer (or a differently configured one): "
        "create it with this optimizer's init(params)."
    )


def with_types_of(template: Any, state: Any) -> Any:
    """``state`` with ``template``'s NamedTuple types wherever it holds their dict form.

    An update that blends the state it got with the one it made (``tree.where`` in
    ``multi_steps``, a skipped fp16 step) needs both in one structure; the state it got may
    be the dict form :func:`check_state` accepts, the state it made never is.
    """
    if optree.is_namedtuple(template):
        if type(state) is dict and set(state) == set(template._fields):
            return type(template)(**{f: with_types_of(getattr(template, f), state[f]) for f in template._fields})
        if type(state) is type(template):
            return type(template)(*(with_types_of(t, x) for t, x in zip(template, state)))
        return state
    if type(template) in (tuple, list) and type(state) is type(template) and len(state) == len(template):
        return type(template)(with_types_of(t, x) for t, x in zip(template, state))
    if type(template) is dict and type(state) is dict and set(state) == set(template):
        return {k: with_types_of(template[k], x) for k, x in state.items()}
    return state


def check_params(params: Any, transform: str, *, floating: bool = True) -> None:
    """Every leaf of ``params`` must be a tensor (a floating one when ``floating``)."""
    for path, leaf in _tree.leaves_with_path(params):
        if not isinstance(leaf, torch.Tensor):
            raise TreeError(
                f"{transform}.init: params{_tree.keystr(path, root='')} is a {type(leaf).__name__} ({leaf!r:.40}), "
                "expected a torch.Tensor. Optimizers work on pytrees of tensors: convert it with torch.tensor(...) "
                "or keep it out of params."
            )
        if floating and not leaf.is_floating_point():
            raise TreeError(
                f"{transform}.init: params{_tree.keystr(path, root='')} is a {leaf.dtype} tensor, expected a real "
                "floating point tensor (integer and complex leaves are not supported by this transform). Keep it "
                "out of params, or freeze it with multi_transform(..., set_to_zero())."
            )


def check_match(expected: Any, actual: Any, *, what: str) -> None:
    """``actual`` must have ``expected``'s structure and, leaf by leaf, its shape.

    Walks both trees with ``map`` only: under ``torch.compile``, flattening a tree that has
    a subtree of constants only (e.g. a dict of ``None``, which masking produces) is not
    supported by dynamo, while ``map`` is. The detailed message, naming each differing
    path, is only built once a mismatch is found.
    """
    bad: list[tuple[Any, Any]] = []

    def visit(e: Any, a: Any) -> None:
        if isinstance(e, torch.Tensor) != isinstance(a, torch.Tensor):
            bad.append((e, a))
        elif isinstance(e, torch.Tensor) and e.shape != a.shape:
            bad.append((e, a))

    try:
        _tree.map(visit, expected, actual)
    except ValueError:
        bad.append((None, None))
    if bad:
        _raise_mismatch(expected, actual, what)


def _raise_mismatch(expected: Any, actual: Any, what: str) -> None:
    _tree.assert_same_structure(expected, actual, what=what)
    problems = diff_by_path(
        dict(_tree.leaves_with_path(expected)),
        dict(_tree.leaves_with_path(actual)),
        same=_same_shape,
        show=lambda x: str(tuple(x.shape)) if isinstance(x, torch.Tensor) else describe(x),
        show_actual=lambda x: f"of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else describe(x),
        differs="is {a}, expected {e}",
    )
    if not problems:
        raise TreeError(f"{what} does not match the expected structure")
    raise TreeError(f"{what}: leaves differ from the matching params (their shapes must be the params'):\n" + "\n".join(problems))


def _same_shape(e: Any, a: Any) -> bool:
    if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
        return e.shape == a.shape
    return isinstance(e, torch.Tensor) == isinstance(a, torch.Tensor)


def tensor_leaves(tree: Any) -> list[torch.Tensor]:
    """The tensor leaves of ``tree``, collected with ``map`` (see :func:`check_match` for why)."""
    out: list[torch.Tensor] = []
    _tree.map(lambda x: out.append(x) if isinstance(x, torch.Tensor) else None, tree)
    return out


def scalar_dtype(device: torch.device) -> torch.dtype:
    """dtype for scalar hyperparameter math (bias corrections, schedules): float64 keeps
    float64 training bit-close to torch.optim's Python-float math; MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def once_per_step(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 0-d step-dependent factors (bias corrections, a scheduled rate), computed once.

    Under ``torch.compile`` inductor inlines a 0-d expression into every element-wise
    kernel that reads it, so ``1 - b1 ** t`` was re-evaluated (a float64 ``pow``) for every
    vector of every parameter: Adam's update of a 7.4M-parameter model ran ~4x slower than
    torch's fused Adam. Stacking the values (at least two: a one-element stack is a view)
    makes them one small buffer that the kernels load. Eager code gets them unchanged.
    """
    if not torch.compiler.is_compiling():
        return scalars
    parts = [s.reshape(()) for s in scalars]
    if len(parts) == 1:
        parts.append(parts[0].new_zeros(()))
    stacked = torch.stack(parts)
    return tuple(stacked[i] for i in range(len(scalars)))


def zero_count(params: Any) -> torch.Tensor:
    """A fresh step counter: a 0-d int64 tensor on the params' device."""
    return torch.zeros((), dtype=torch.int64, device=_tree.device_of(params))


def tensor_hyperparam(value: Any, who: str, name: str) -> bool:
    """Whether hyperparameter ``name`` is a tensor (then a 0-d real floating one, checked here).

    Every numeric hyperparameter may be a 0-d tensor instead of a Python number: that is
    how :func:`~lightfn.optim.inject.inject_hyperparams` passes the values it keeps in the
    optimizer state, one per ensemble member under ``vmap``. A tensor's *value* is never
    read here (that would be a host sync, and data-dependent under ``vmap``/compile); its
    range was checked when the optimizer was built from Python numbers. Callers range-check
    Python numbers themselves when this returns False.
    """
    if not isinstance(value, torch.Tensor):
        return False
    if value.dim() != 0 or not value.is_floating_point():
        raise OptimizerConfigError(
            f"{who}: {name} must be a number or a 0-d floating tensor (one value per optimizer), got a "
            f"{value.dtype} tensor of shape {tuple(value.shape)}. To train several values at once, build one "
            "optimizer state per value (lf.optim.inject_hyperparams), stack the states with lf.tree.stack and "
            "run the step under lf.ensemble."
        )
    return True


def _named(value: Any) -> str:
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    return describe(value)


def check_learning_rate(value: Any, who: str, name: str = "lr") -> None:
    """Refuse, when the optimizer is built, what is not a learning rate.

    A learning rate is a number, a 0-d real tensor, or a schedule: a function of one
    argument, the step count (updates made so far), returning the rate. Anything else
    (notably a ``torch.optim.lr_scheduler`` class or object, which is callable or not but
    drives a torch optimizer) would only fail at the first step, deep inside ``update``.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not (value.dtype == torch.bool or value.is_complex()):
        return
    problem = ""
    if callable(value) and not isinstance(value, (type, torch.Tensor)):
        if torch.compiler.is_compiling():  # built inside a traced step (inject_hyperparams): checked eagerly before
            return
        try:
            signature = inspect.signature(value)
        except (TypeError, ValueError):  # a builtin without a signature: let its first call tell
            return
        try:
            signature.bind(0)
            return
        except TypeError:
            problem = f", whose signature {signature} does not take the step count as its only argument"
    lr_scheduler = torch.optim.lr_scheduler.LRScheduler
    torch_hint = ""
    if isinstance(value, lr_scheduler) or (isinstance(value, type) and issubclass(value, lr_scheduler)):
        torch_hint = (
            "\n  torch.optim.lr_scheduler classes step a torch.optim optimizer; they are not lightfn schedules. "
            "Use lf.optim.onecycle(...), lf.optim.linear_warmup_cosine_decay(...), another lf.optim schedule, "
            "or your own function (e.g. lambda step: 1e-3 * 0.95 ** step)."
        )
    raise OptimizerConfigError(
        f"{who}: {name} must be a float, a 0-d tensor or a schedule (a function step -> lr, e.g. "
        f"lf.optim.cosine_decay(3e-4, 10_000)); got {_named(value)}{problem}{torch_hint}"
    )
