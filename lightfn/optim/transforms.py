"""Basic transforms: scaling, the learning rate, weight decay, momentum, freezing.

Each returns a :class:`~lightfn.optim.base.GradientTransformation` whose state is its own
NamedTuple (or :class:`EmptyState`). The sign convention follows optax: transforms turn a
gradient into a *descent direction*; :func:`scale_by_learning_rate` multiplies by ``-lr``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import tree as _tree
from .._eager import aligned_leaves, plain_eager
from ..errors import OptimizerConfigError, StepError
from ._checks import (check_learning_rate, check_match, check_params, check_state, once_per_step, scalar_dtype,
                      tensor_hyperparam, zero_count)
from .base import EmptyState, GradientTransformation, PyTree

__all__ = [
    "ScalarOrSchedule",
    "ScaleByLearningRateState",
    "TraceState",
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "add_decayed_weights",
    "trace",
    "set_to_zero",
]

Schedule = Callable[[torch.Tensor], "torch.Tensor | float"]
ScalarOrSchedule = float | torch.Tensor | Schedule


class ScaleByLearningRateState(NamedTuple):
    """``count``: updates made so far; ``learning_rate``: the rate used by the last update
    (before any update: the one the first update will use), readable with ``current_lr``."""

    count: torch.Tensor
    learning_rate: torch.Tensor


class TraceState(NamedTuple):
    """Momentum buffer ``trace`` (shaped like params) and the update ``count``."""

    count: torch.Tensor
    trace: PyTree


def _check_nonneg(name: str, value: Any, transform: str) -> None:
    if tensor_hyperparam(value, transform, name):
        return
    if isinstance(value, (int, float)) and value < 0:
        raise OptimizerConfigError(f"{transform}: {name} must be >= 0, got {value}")


def scale(step_size: float) -> GradientTransformation:
    """Multiply updates by the constant ``step_size``."""

    def init(params: PyTree) -> EmptyState:
        check_params(params, "scale", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "scale")
        return _tree.map(lambda g: g * step_size, updates), state

    return GradientTransformation(init, update)


def _value_at(value: ScalarOrSchedule, count: torch.Tensor) -> float | torch.Tensor:
    return value(count) if callable(value) else value


def _as_scalar(value: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    dtype = scalar_dtype(device)
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule, *, flip_sign: bool = True) -> GradientTransformation:
    """Multiply updates by ``-learning_rate`` (``+`` with ``flip_sign=False``).

    ``learning_rate`` is a float, a 0-d tensor or a schedule ``count -> lr`` evaluated at
    the number of updates made so far (0 for the first). The state records the rate each
    update used, so ``current_lr(opt_state)`` reads it without recomputing the schedule.
    """
    check_learning_rate(learning_rate, "scale_by_learning_rate", "learning_rate")
    _check_nonneg("learning_rate", learning_rate, "scale_by_learning_rate")
    sign = -1.0 if flip_sign else 1.0

    def init(params: PyTree) -> ScaleByLearningRateState:
        check_params(params, "scale_by_learning_rate", floating=False)
        count = zero_count(params)
        return ScaleByLearningRateState(count, _as_scalar(_value_at(learning_rate, count), count.device))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByLearningRateState]:
        state = check_state(state, ScaleByLearningRateState, "scale_by_learning_rate")
        if callable(learning_rate) or isinstance(learning_rate, torch.Tensor):
            rate = _as_scalar(_value_at(learning_rate, state.count), state.count.device)
            (lr,) = once_per_step(rate)
            factor: float | torch.Tensor = lr * sign
            # Stored in the incoming state's dtype, so the state's dtypes never drift. A copy
            # of ``rate``: ``lr`` is, under vmap + compile, a strided view into
            # once_per_step's buffer, and ``rate`` may be another state leaf itself
            # (inject_hyperparams); a strided or shared state leaf recompiles the next call.
            recorded = rate.to(state.learning_rate.dtype, copy=True)
        else:
            # A Python float multiplies exactly like torch.optim's ``param.add_(d_p, alpha=-lr)``.
            factor = sign * float(learning_rate)
            recorded = torch.full_like(state.learning_rate, float(learning_rate))
        flat = aligned_leaves(updates) if plain_eager() else None
        if flat is not None:  # one call for all leaves, the same kernels (lightfn/_eager.py)
            new_updates = _tree.unflatten(flat[0], torch._foreach_mul(flat[1][0], factor))
        else:
            new_updates = _tree.map(lambda g: g * factor, updates)
        return new_updates, ScaleByLearningRateState(state.count + 1, recorded)

    return GradientTransformation(init, update)


def scale_by_schedule(step_size_fn: Schedule) -> GradientTransformation:
    """Multiply updates by ``step_size_fn(count)`` (no sign flip): optax's name for
    ``scale_by_learning_rate(step_size_fn, flip_sign=False)``."""
    return scale_by_learning_rate(step_size_fn, flip_sign=False)


def add_decayed_weights(weight_decay: float | torch.Tensor = 0.0, mask: Any = None) -> GradientTransformation:
    """Add ``weight_decay * param`` to each update.

    Placed before an adaptive transform this is L2 regularization (torch ``Adam``'s
    ``weight_decay``); placed after it and before the learning rate it is decoupled weight
    decay (torch ``AdamW``). ``mask`` (a bool pytree or ``params -> mask``) limits it to
    some leaves, e.g. not biases or norms.
    """
    _check_nonneg("weight_decay", weight_decay, "add_decayed_weights")
    if mask is not None:
        from .masking import masked

        return masked(add_decayed_weights(weight_decay), mask)

    def init(params: PyTree) -> EmptyState:
        check_params(params, "add_decayed_weights", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "add_decayed_weights")
        if params is None:
            raise StepError("add_decayed_weights needs the params: call opt.update(grads, opt_state, params)")
        check_match(params, updates, what="add_decayed_weights: updates vs params")
        return _tree.map(lambda g, p: g + weight_decay * p, updates, params), state

    return GradientTransformation(init, update)


def trace(decay: float | torch.Tensor, nesterov: bool = False, dampening: float | torch.Tensor = 0.0) -> GradientTransformation:
    """Momentum: ``trace = decay * trace + (1 - dampening) * g``; output ``trace``, or
    ``g + decay * trace`` with ``nesterov``.

    Like torch's SGD, the very first update sets ``trace = g`` (dampening does not apply
    to it); with ``dampening=0`` that is what the formula gives anyway.

    ``decay`` and ``dampening`` are floats or 0-d tensors (injectable); a tensor
    ``dampening`` always takes the first-step ``where``, which gives the same numbers as
    the float path when it is 0.
    """
    _check_nonneg("decay", decay, "trace")
    damped = tensor_hyperparam(dampening, "trace", "dampening") or dampening != 0.0

    def init(params: PyTree) -> TraceState:
        check_params(params, "trace")
        return TraceState(zero_count(params), _tree.zeros_like(params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, TraceState]:
        state = check_state(state, TraceState, "trace")
        check_match(state.trace, updates, what="trace: updates vs momentum buffer (shaped like params)")
        if not damped:
            new_trace = _tree.map(lambda g, t: g + decay * t, updates, state.trace)
        else:
            first = state.count == 0
            new_trace = _tree.map(
                lambda g, t: torch.where(first, g, decay * t + (1.0 - dampening) * g), updates, state.trace
            )
        if nesterov:
            out = _tree.map(lambda g, t: g + decay * t, updates, new_trace)
        else:
            out = new_trace
        return out, TraceState(state.count + 1, new_trace)

    return GradientTransformation(init, update)


def set_to_zero() -> GradientTransformation:
    """Replace every update with zeros: the params it sees stay frozen (use inside
    :func:`~lightfn.optim.masking.multi_transform`)."""

    def init(params: PyTree) -> EmptyState:
        check_params(params, "set_to_zero", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "set_to_zero")
        return _tree.zeros_like(updates), state

    return GradientTransformation(init, update)
