"""Gradient accumulation as an optimizer wrapper (optax's MultiSteps semantics).

``multi_steps(opt, every_k=4)`` averages the gradients of 4 consecutive mini-steps; the
first 3 return zero updates and leave ``opt``'s state untouched, the 4th feeds the mean to
``opt`` and returns its update. The branch is a ``torch.where`` over the state, so the
step stays one compiled graph with no host sync (both branches are computed; the inner
update's cost is paid every mini-step).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import tree as _tree
from ..errors import OptimizerConfigError
from ._checks import check_match, check_params, check_state, with_types_of, zero_count
from .base import GradientTransformation, PyTree, call_inner

__all__ = ["MultiStepsState", "multi_steps"]


class MultiStepsState(NamedTuple):
    """``mini_step``: mini-steps since the last real update (0..k-1); ``gradient_step``:
    real updates made; ``inner_state``: the wrapped optimizer's state; ``acc_grads``: the
    mean of this round's gradients so far."""

    mini_step: torch.Tensor
    gradient_step: torch.Tensor
    inner_state: Any
    acc_grads: PyTree


def multi_steps(opt: GradientTransformation, every_k: int) -> GradientTransformation:
    """Accumulate gradients over ``every_k`` calls and update once with their mean.

    Equivalent to one ``opt`` step on the mean gradient of ``every_k`` mini-batches (which
    equals the gradient of a batch ``every_k`` times larger when the loss is a mean).
    """
    if not isinstance(every_k, int) or every_k < 1:
        raise OptimizerConfigError(f"multi_steps: every_k must be an int >= 1, got {every_k!r}")

    def init(params: PyTree) -> MultiStepsState:
        check_params(params, "multi_steps")
        return MultiStepsState(zero_count(params), zero_count(params), opt.init(params), _tree.zeros_like(params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, MultiStepsState]:
        state = check_state(state, MultiStepsState, "multi_steps")
        check_match(state.acc_grads, updates, what="multi_steps: updates vs accumulated grads (shaped like params)")
        # Running mean, so the accumulator never grows with k (safe in low precision).
        # (an int64 0-d divisor keeps each leaf's float dtype and is exact for any k).
        n = state.mini_step + 1
        acc = _tree.map(lambda g, a: a + (g - a) / n, updates, state.acc_grads)
        final = state.mini_step == every_k - 1
        inner_updates, inner_state = call_inner(opt, acc, state.inner_state, params, 2)
        out = _tree.map(lambda u: torch.where(final, u, torch.zeros_like(u)), inner_updates)
        new_state = MultiStepsState(
            mini_step=torch.where(final, torch.zeros_like(state.mini_step), state.mini_step + 1),
            gradient_step=state.gradient_step + final.to(state.gradient_step.dtype),
            inner_state=_tree.where(final, inner_state, with_types_of(inner_state, state.inner_state)),
            acc_grads=_tree.map(lambda a: torch.where(final, torch.zeros_like(a), a), acc),
        )
        return out, new_state

    return GradientTransformation(init, update)
