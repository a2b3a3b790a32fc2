"""Read hyperparameters back out of an optimizer state (for logging, LR monitors).

The learning rate each update used is stored in the state by
:func:`~lightfn.optim.transforms.scale_by_learning_rate`, so these readers work on any
state pytree (a bare optimizer state, or a whole ``TrainState``) without the schedule.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import tree as _tree
from ..errors import TreeError
from .transforms import ScaleByLearningRateState

__all__ = ["current_lr", "learning_rates"]


def _is_lr_state(x: Any) -> bool:
    return isinstance(x, ScaleByLearningRateState)


def learning_rates(opt_state: Any) -> dict[str, torch.Tensor]:
    """Every learning rate in ``opt_state``, keyed by the ``lf.tree.keystr`` path of its
    ``ScaleByLearningRateState`` (one per label under ``multi_transform``)."""
    return {
        _tree.keystr(path): leaf.learning_rate
        for path, leaf in _tree.leaves_with_path(opt_state, is_leaf=_is_lr_state)
        if _is_lr_state(leaf)
    }


def current_lr(opt_state: Any) -> torch.Tensor | None:
    """The learning rate of the one ``ScaleByLearningRateState`` in ``opt_state`` (a 0-d
    tensor: the rate used by the last update), or ``None`` if there is none.

    Raises :class:`~lightfn.errors.TreeError` when the state holds several (e.g. under
    ``multi_transform``); read them all with :func:`learning_rates`.
    """
    rates = learning_rates(opt_state)
    if not rates:
        return None
    if len(rates) > 1:
        raise TreeError(
            f"current_lr: the optimizer state has {len(rates)} learning rates, at {sorted(rates)}; "
            "use lf.optim.learning_rates(opt_state) to read them all."
        )
    return next(iter(rates.values()))
