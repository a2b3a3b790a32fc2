"""Gradient clipping: by global norm (torch's ``clip_grad_norm_``) and by value."""

from __future__ import annotations

from typing import Any

import torch

from .. import tree as _tree
from ..errors import OptimizerConfigError
from ._checks import check_params, check_state, tensor_leaves
from .base import EmptyState, GradientTransformation, PyTree

__all__ = ["clip_by_global_norm", "clip"]

# torch.nn.utils.clip_grad_norm_ adds this to the norm; keeping it makes a clipped run
# match a torch loop that clips before ``optimizer.step()``.
_NORM_EPS = 1e-6


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates together so their global L2 norm is at most ``max_norm``.

    Same arithmetic as ``torch.nn.utils.clip_grad_norm_``: the factor is
    ``min(1, max_norm / (norm + 1e-6))``, computed on device without a host sync.
    """
    if max_norm <= 0:
        raise OptimizerConfigError(f"clip_by_global_norm: max_norm must be > 0, got {max_norm}")

    def init(params: PyTree) -> EmptyState:
        check_params(params, "clip_by_global_norm", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "clip_by_global_norm")
        # (a flat list: see tensor_leaves for why not the masked tree itself)
        norm = _tree.global_norm(tensor_leaves(updates))
        factor = torch.clamp(max_norm / (norm + _NORM_EPS), max=1.0)
        return _tree.map(lambda g: g * factor.to(g.device), updates), state

    return GradientTransformation(init, update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every update element to ``[-max_delta, max_delta]`` (torch's ``clip_grad_value_``)."""
    if max_delta <= 0:
        raise OptimizerConfigError(f"clip: max_delta must be > 0, got {max_delta}")

    def init(params: PyTree) -> EmptyState:
        check_params(params, "clip", floating=False)
        return EmptyState()

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, EmptyState]:
        state = check_state(state, EmptyState, "clip")
        return _tree.map(lambda g: torch.clamp(g, -max_delta, max_delta), updates), state

    return GradientTransformation(init, update)
