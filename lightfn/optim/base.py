"""The optimizer contract: a GradientTransformation is a pair of pure functions.

``init(params) -> state`` builds the optimizer state (a pytree of tensors);
``update(updates, state, params=None) -> (updates, new_state)`` turns gradients into
parameter updates. Neither mutates its inputs, so the whole update traces into one
``torch.compile`` graph, and the state is an ordinary pytree that checkpoints as
safetensors. Optimizers are built by chaining small transforms:

>>> import torch
>>> from lightfn.optim import chain, clip_by_global_norm, scale_by_adam, scale_by_learning_rate, apply_updates
>>> opt = chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))
>>> params = {"w": torch.ones(3)}
>>> state = opt.init(params)
>>> updates, state = opt.update({"w": torch.ones(3)}, state, params)
>>> params = apply_updates(params, updates)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .. import tree as _tree
from .._eager import aligned_leaves, plain_eager
from .._diagnostics import describe
from ..errors import StateMismatchError, StepError
from ._checks import check_match, check_params, check_state

__all__ = [
    "PyTree",
    "GradientTransformation",
    "EmptyState",
    "identity",
    "chain",
    "apply_updates",
    "call_inner",
]

PyTree = Any
OptState = Any


class GradientTransformation(NamedTuple):
    """An optimizer (or a piece of one): ``init(params) -> state`` and
    ``update(updates, state, params=None) -> (updates, new_state)``, both pure."""

    init: Callable[[PyTree], OptState]
    update: Callable[..., tuple[PyTree, OptState]]


class EmptyState(NamedTuple):
    """The state of a stateless transform (no leaves)."""


def call_inner(
    inner: GradientTransformation, updates: PyTree, state: OptState, params: PyTree | None, *path: Any
) -> tuple[PyTree, OptState]:
    """Run ``inner.update``; if its state is the wrong kind, say where it sits (``path``)."""
    try:
        return inner.update(updates, state, params)
    except StateMismatchError as e:
        raise e.prefixed(*path) from None


def identity() -> GradientTransformation:
    """Pass updates through unchanged."""

    def init(params: PyTree) -> EmptyState:
        check_params(params, "identity", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: OptState, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "identity")
        return updates, state

    return GradientTransformation(init, update)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` one after another; the state is the tuple of their states.

    ``chain(clip_by_global_norm(1.0), scale_by_adam(), scale_by_learning_rate(1e-3))`` is
    Adam with gradient clipping.
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise StepError(
                f"chain: argument {i} is a {type(t).__name__}, expected a GradientTransformation "
                "(e.g. lf.optim.scale_by_adam())"
            )

    def init(params: PyTree) -> tuple[OptState, ...]:
        check_params(params, "chain", floating=False)
        return tuple(t.init(params) for t in transforms)

    def update(updates: PyTree, state: OptState, params: PyTree | None = None) -> tuple[PyTree, tuple[OptState, ...]]:
        if type(state) is not tuple or len(state) != len(transforms):
            raise StateMismatchError(
                f"chain of {len(transforms)} transforms expected a tuple of {len(transforms)} states, got "
                f"{describe(state)}. This optimizer state was made by a different optimizer: create it with "
                "this optimizer's init(params)."
            )
        if params is not None:
            check_match(params, updates, what="updates (grads) vs params")
        new_states = []
        for i, (t, s) in enumerate(zip(transforms, state)):
            updates, s = call_inner(t, updates, s, params, i)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, keeping each param's dtype.

    Updates may come in a wider dtype (e.g. float32 updates for bf16 params); the sum is
    cast back so the params pytree never changes dtype under training.
    """
    check_match(params, updates, what="apply_updates: updates vs params")
    flat = aligned_leaves(params, updates) if plain_eager() else None
    # one call for all leaves (lightfn/_eager.py); with equal dtypes the cast is a no-op
    if flat is not None and all(p.dtype == u.dtype for p, u in zip(*flat[1])):
        return _tree.unflatten(flat[0], torch._foreach_add(*flat[1]))
    return _tree.map(lambda p, u: (p + u).to(p.dtype), params, updates)
