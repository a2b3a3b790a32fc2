"""inject_hyperparams: keep an optimizer's hyperparameters in its state, as tensors.

``lf.optim.inject_hyperparams(lf.optim.adam)(lr=1e-3)`` is Adam whose learning rate lives
in the optimizer state (``state.hyperparams["lr"]``, a 0-d tensor) instead of being a
Python constant baked into the step. That makes hyperparameters *data*:

- states built with different values have the same structure, so they stack
  (:func:`lightfn.tree.stack`) and one ``lf.ensemble`` step trains every value at once,
  e.g. 8 learning rates in one compiled step;
- a value can be changed between steps without recompiling (``state._replace``);
- a checkpoint records the values used.

This is optax's ``inject_hyperparams`` (same name, same meaning). Each keyword that is a
number or a 0-d tensor is injected; a callable is a schedule ``count -> value``, evaluated
at the number of updates made so far and its value stored in the state at each update;
anything else (bools, tuples, masks) and the names in ``static_args`` stay fixed
arguments of ``factory``. The factory is called again on every update with the state's
tensors, so what it builds must accept tensors for the injected names.

>>> import torch, lightfn as lf
>>> make = lf.optim.inject_hyperparams(lf.optim.sgd)
>>> params = {"w": torch.ones(2, dtype=torch.float64)}
>>> states = [make(lr=lr).init(params) for lr in (0.1, 0.01)]
>>> stacked = lf.tree.stack(states)
>>> stacked.hyperparams["lr"].tolist()
[0.1, 0.01]

Which hyperparameters accept tensors: every numeric argument of the ``lf.optim`` aliases
(``sgd``'s ``lr``, ``momentum``, ``dampening``, ``weight_decay``; ``adam``/``adamw``'s
``lr``, ``b1``, ``b2``, ``eps``, ``eps_root``, ``weight_decay``; ``rmsprop``'s ``alpha``,
``eps``, ``weight_decay``, ``momentum``; ``adagrad``'s ``lr_decay``, ``weight_decay``,
``initial_accumulator_value``, ``eps``; ``lion``'s betas and ``weight_decay``) and of the
transforms they are built from. Betas are injected one by one: pass ``b1=``/``b2=``
(optax's names); a ``betas=(..., ...)`` tuple stays a fixed argument. The transforms take
the tensors as data (no host sync, no branching on their values), so a float injected
this way gives the plain optimizer's numbers. Bools (``nesterov``, ``amsgrad``,
``centered``) and masks stay fixed. Each value is one number: a tensor of another shape
is refused with an error naming the hyperparameter (a sweep is a stack of states, one
value each). A factory of your own may branch on a value as a Python number; injecting
that value raises a :class:`~lightfn.errors.StepError` naming it when the step runs
vmapped or compiled: keep it fixed with ``static_args``.

``lf.optim.current_lr`` / ``learning_rates`` (and so ``LearningRateMonitor``) keep
finding the rate: the inner optimizer still records it in its
``ScaleByLearningRateState`` under ``inner_state``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from .._diagnostics import first_line
from ..errors import OptimizerConfigError, StateMismatchError, StepError
from ._checks import check_learning_rate, check_params, check_state, scalar_dtype, zero_count
from .base import GradientTransformation, PyTree, call_inner

__all__ = ["InjectHyperparamsState", "inject_hyperparams"]


class InjectHyperparamsState(NamedTuple):
    """``count``: updates made so far; ``hyperparams``: name -> 0-d tensor, the values the
    last update used (before any update: the ones the first will use); ``inner_state``:
    the wrapped optimizer's state."""

    count: torch.Tensor
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def _is_number(x: Any) -> bool:
    if isinstance(x, torch.Tensor):
        return x.is_floating_point()
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_one_value(who: str, name: str, value: torch.Tensor, where: str) -> None:
    """An injected value is one number: its shape is static, so this costs nothing traced."""
    if value.dim() != 0:
        raise OptimizerConfigError(
            f"{who}: hyperparameter {name!r} ({where}) has shape {tuple(value.shape)}, expected a 0-d tensor "
            "(one value per optimizer). To train several values at once, build one optimizer per value, "
            "create one state each, stack them with lf.tree.stack and run the step under lf.ensemble (each "
            "member then sees its own 0-d value); keep a non-scalar argument fixed with static_args=..."
        )


def inject_hyperparams(
    factory: Callable[..., GradientTransformation],
    static_args: str | Iterable[str] = (),
    hyperparam_dtype: torch.dtype | None = None,
) -> Callable[..., GradientTransformation]:
    """Wrap ``factory`` so numeric hyperparameters live in the optimizer state (see module docs).

    Args:
        factory: a function returning a :class:`GradientTransformation`
            (``lf.optim.adam``, or your own built with ``lf.optim.chain``).
        static_args: names to keep as fixed Python arguments even if numeric.
        hyperparam_dtype: dtype of the stored values (default float64, the dtype of
            lightfn's scalar optimizer math; float32 on MPS).

    Returns ``make(*args, **kwargs) -> GradientTransformation`` taking ``factory``'s
    arguments (positional ones are bound to their names).
    """
    if not callable(factory):
        raise StepError(f"inject_hyperparams expects an optimizer factory (e.g. lf.optim.adam), got {type(factory).__name__}")
    statics = {static_args} if isinstance(static_args, str) else set(static_args)
    signature = inspect.signature(factory)
    who = f"inject_hyperparams({getattr(factory, '__name__', factory)})"

    def make(*args: Any, **kwargs: Any) -> GradientTransformation:
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as e:
            raise StepError(f"{who}: {e}") from None
        given = dict(bound.arguments)
        fixed = {k: v for k, v in given.items() if k in statics or not (_is_number(v) or callable(v))}
        injected = {k: v for k, v in given.items() if k not in fixed}
        for name, v in injected.items():
            if isinstance(v, torch.Tensor):
                _check_one_value(who, name, v, "as given")
        schedules = {k: v for k, v in injected.items() if callable(v)}
        # Build once with the given Python values: the factory validates them now, at
        # construction, like the plain optimizer would. A schedule enters as its first
        # value: the factory may take only numbers for that argument (weight_decay...).
        for name, v in schedules.items():
            check_learning_rate(v, who, name)  # a function of the step count, not e.g. a torch LRScheduler
        first = {k: v(zero_count(None)) for k, v in schedules.items()}
        for name, v in first.items():
            if isinstance(v, torch.Tensor):
                _check_one_value(who, name, v, "the value its schedule returned")
        factory(**{**given, **first})

        def values(count: torch.Tensor, stored: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
            dtype = hyperparam_dtype or scalar_dtype(count.device)
            out = {}
            for name, v in injected.items():
                if name in schedules:
                    v = v(count)
                    where = "the value its schedule returned"
                elif stored is not None:
                    v = stored[name]
                    where = f"in opt_state.hyperparams[{name!r}]"
                else:
                    where = "as given"
                if isinstance(v, torch.Tensor):
                    _check_one_value(who, name, v, where)
                    out[name] = v.to(device=count.device, dtype=dtype)
                else:
                    out[name] = torch.tensor(v, dtype=dtype, device=count.device)
            return out

        def inner(hyper: dict[str, torch.Tensor]) -> GradientTransformation:
            return factory(**fixed, **hyper)

        def init(params: PyTree) -> InjectHyperparamsState:
            check_params(params, "inject_hyperparams", floating=False)
            count = zero_count(params)
            hyper = values(count, None)
            return InjectHyperparamsState(count, hyper, inner(hyper).init(params))

        def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, InjectHyperparamsState]:
            state = check_state(state, InjectHyperparamsState, "inject_hyperparams")
            if not isinstance(state.hyperparams, dict) or set(state.hyperparams) != set(injected):
                raise StateMismatchError(
                    f"inject_hyperparams expected hyperparams {sorted(injected)} in its state, got "
                    f"{sorted(state.hyperparams) if isinstance(state.hyperparams, dict) else state.hyperparams!r}: "
                    "create the state with this optimizer's init(params)."
                )
            hyper = values(state.count, state.hyperparams)
            try:
                new_updates, inner_state = call_inner(inner(hyper), updates, state.inner_state, params, "inner_state")
            except RuntimeError as e:
                if "data-dependent" not in str(e):
                    raise
                raise StepError(
                    f"{who}: the factory cannot take {sorted(injected)} as tensors ({type(e).__name__}: "
                    f"{first_line(e, 200)}). Keep the ones it treats as Python numbers fixed with "
                    "static_args=..., or build the optimizer from lf.optim transforms (they take tensors)."
                ) from e
            return new_updates, InjectHyperparamsState(state.count + 1, hyper, inner_state)

        return GradientTransformation(init, update)

    make.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    make.__doc__ = f"``{getattr(factory, '__name__', 'factory')}`` with its numeric hyperparameters in the optimizer state."
    return make
