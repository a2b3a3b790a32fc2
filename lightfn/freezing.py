"""Trainable / frozen partitions of params: what ``train_step(..., trainable=...)`` uses.

``trainable`` says which params a step trains. It is either

- a pytree of Python bools with the params' structure or a prefix of it (one value for a
  whole subtree), e.g. ``{"backbone": False, "head": True}``; or
- a predicate ``trainable(path, leaf) -> bool`` called once per param leaf, where ``path``
  is the leaf's key path as :func:`lightfn.tree.leaves_with_path` gives it (a tuple of dict
  keys, attribute names and indices; ``lf.tree.keystr(path)`` renders it as
  ``"['head']['fc.weight']"``). For a functionalized module the keys are its dotted
  parameter names: ``lambda path, x: path[-1].startswith("fc.")``.

:func:`partition` splits params into ``(trainable, frozen)``: two trees of the params'
structure with ``None`` where a leaf belongs to the other part (``None`` is an empty node,
so each part's leaves are only its own); :func:`combine` joins them back. A step
differentiates with respect to the trainable part only and closes over the frozen part as
constants, so autograd computes no gradient for a frozen leaf (nor, for a frozen backbone
under a trainable head, any backward through the backbone at all), and the optimizer's
state is ``optimizer.init(trainable_part)``: it has no leaves for frozen params.

>>> import torch, lightfn as lf
>>> params = {"backbone": {"w": torch.ones(2)}, "head": {"w": torch.zeros(2)}}
>>> train, frozen = lf.partition(params, {"backbone": False, "head": True})
>>> train["backbone"], frozen["head"]
({'w': None}, {'w': None})
>>> lf.combine(train, frozen)["backbone"]["w"] is params["backbone"]["w"]
True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Union

from . import tree
from .errors import StepError, TreeError

__all__ = ["Trainable", "trainable_mask", "partition", "combine", "split_leaves"]

Trainable = Union[Any, Callable[[tree.KeyPath, Any], bool]]


def _check_bool(path: tree.KeyPath, value: Any, what: str) -> None:
    if not isinstance(value, bool):
        raise StepError(
            f"trainable: {what} for params{tree.keystr(path)} must be a Python bool, got {type(value).__name__} "
            "(which params train is decided once, statically; tensors are not allowed)"
        )


def trainable_mask(params: tree.PyTree, trainable: Trainable) -> tree.PyTree:
    """A tree of Python bools with ``params``' structure: ``True`` for each trainable leaf.

    Raises :class:`~lightfn.errors.StepError` when ``trainable`` does not fit ``params``
    (naming each path that differs), when a value is not a bool, or when no leaf is
    trainable (a step with nothing to train is a mistake, not a no-op).
    """
    if callable(trainable):

        def ask(path: tree.KeyPath, leaf: Any) -> bool:
            value = trainable(path, leaf)
            _check_bool(path, value, "the predicate's answer")
            return value

        mask = tree.map_with_path(ask, params)
    else:
        # The same prefix broadcast (and path-naming errors) as lf.optim.masked's mask.
        from .optim.masking import _broadcast

        try:
            mask = _broadcast(trainable, params, what="trainable", check=lambda p, v: _check_bool(p, v, "the value"))
        except TreeError as e:
            raise StepError(str(e)) from None
    if not any(tree.leaves(mask)):
        raise StepError(
            f"trainable marks none of the {len(tree.leaves(params))} params as trainable: there is nothing to "
            "train. Mark at least one leaf True (e.g. {'head': True, 'backbone': False}), or evaluate with "
            "lf.eval_step instead."
        )
    return mask


def partition(params: tree.PyTree, trainable: Trainable) -> tuple[tree.PyTree, tree.PyTree]:
    """``(trainable_part, frozen_part)``: ``params`` with ``None`` for the other part's leaves."""
    mask = trainable_mask(params, trainable)
    return (
        tree.map(lambda keep, x: x if keep else None, mask, params),
        tree.map(lambda keep, x: None if keep else x, mask, params),
    )


def split_leaves(params: tree.PyTree, trainable: Trainable) -> tuple[list[Any], Callable[[list[Any]], Any], Callable[[list[Any]], Any]]:
    """The trainable leaves as a flat list, plus two ways back from such a list.

    Returns ``(leaves, to_params, to_part)``: ``to_params(new_leaves)`` is the whole params
    tree with ``new_leaves`` in the trainable slots and the original frozen tensors in the
    others; ``to_part(new_leaves)`` is the trainable part (``None`` at frozen leaves).
    ``torch.func`` differentiates with respect to the list: it takes ``None`` for a leaf,
    so the ``None``-holed part cannot be handed to it directly.
    """
    # Flatten the trainable part itself, not the mask: under torch.compile the bool mask
    # can only be flattened by torch's pytree, whose dict order may differ from optree's.
    # Eagerly None is an empty node; under compile it is a leaf, skipped here.
    train_part, frozen_part = partition(params, trainable)
    flat, treedef = tree.flatten(train_part)

    def to_part(new: list[Any]) -> Any:
        it = iter(new)
        return tree.unflatten(treedef, [None if x is None else next(it) for x in flat])

    return [x for x in flat if x is not None], lambda new: combine(to_part(new), frozen_part), to_part


def combine(trainable_part: tree.PyTree, frozen_part: tree.PyTree) -> tree.PyTree:
    """Join the parts from :func:`partition` back into one params tree (leaves are reused)."""
    return tree.map(lambda a, b: b if a is None else a, trainable_part, frozen_part, is_leaf=lambda x: x is None)
