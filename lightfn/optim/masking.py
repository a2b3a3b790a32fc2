"""Per-leaf routing: apply a transform to some leaves only, or a different one per subtree.

``masked(inner, mask)`` runs ``inner`` on the leaves whose mask is ``True`` and passes the
others through; ``multi_transform({label: transform}, labels)`` gives every leaf the
transform of its label: different learning rates per subtree, no weight decay on biases,
frozen layers (``set_to_zero()``):

>>> import torch
>>> from lightfn.optim import adamw, multi_transform, set_to_zero
>>> params = {"backbone": {"w": torch.ones(2)}, "head": {"w": torch.ones(2), "b": torch.zeros(2)}}
>>> opt = multi_transform({"frozen": set_to_zero(), "train": adamw(1e-3)},
...                       {"backbone": "frozen", "head": "train"})
>>> state = opt.init(params)

Masks and labels are pytrees with the params' structure or a prefix of it (one value for a
whole subtree), or callables ``params -> tree``. They are Python values decided once per
structure, so the inner transform's state only holds the leaves it owns.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

from .. import tree as _tree
from ..errors import StateMismatchError, TreeError
from ._checks import check_match, check_state
from .base import GradientTransformation, PyTree, call_inner

__all__ = ["MaskedState", "MultiTransformState", "masked", "multi_transform"]


class MaskedState(NamedTuple):
    """The inner transform's state; it has ``None`` where the mask is ``False``."""

    inner_state: Any


class MultiTransformState(NamedTuple):
    """One inner state per label (each a :class:`MaskedState`)."""

    inner_states: dict[Hashable, Any]


def _broadcast(prefix: PyTree, full: PyTree, *, what: str, check: Callable[[Any, Any], None]) -> PyTree:
    """``prefix``'s leaves copied over the matching subtrees of ``full`` (same structure as ``full``)."""

    def spread(path: Any, value: Any, subtree: Any) -> Any:
        check(path, value)
        return _tree.map(lambda _: value, subtree)

    try:
        return _tree.map_with_path(spread, prefix, full)
    except ValueError as e:
        if isinstance(e, TreeError):
            raise
        problems = _prefix_problems(prefix, full, ())
        detail = "\n".join(f"  {p}" for p in problems) if problems else f"  {str(e).split('; dict:')[0]}"
        raise TreeError(
            f"{what} does not fit the params:\n{detail}\nIt must have the params' structure, or a prefix of it that "
            "gives one value per subtree (e.g. {'encoder': ..., 'head': ...})."
        ) from None


def _prefix_problems(prefix: Any, full: Any, path: tuple[Any, ...]) -> list[str]:
    """Where ``prefix`` is not a prefix of ``full``, as readable lines naming each path."""
    here = _tree.keystr(path)
    if isinstance(prefix, dict):
        if not isinstance(full, dict):
            return [f"{here}: a dict here, but the params have a {type(full).__name__}"]
        out = [f"{_tree.keystr(path + (k,))}: not in the params" for k in sorted(prefix.keys() - full.keys(), key=repr)]
        out += [f"{_tree.keystr(path + (k,))}: missing (the params have it)" for k in sorted(full.keys() - prefix.keys(), key=repr)]
        for k in sorted(prefix.keys() & full.keys(), key=repr):
            out += _prefix_problems(prefix[k], full[k], path + (k,))
        return out
    if isinstance(prefix, (list, tuple)):
        if type(prefix) is not type(full) or len(prefix) != len(full):
            return [f"{here}: a {type(prefix).__name__} of {len(prefix)}, but the params have {_brief(full)}"]
        return [p for i, (a, b) in enumerate(zip(prefix, full)) for p in _prefix_problems(a, b, path + (i,))]
    return []


def _brief(x: Any) -> str:
    if isinstance(x, (list, tuple, dict)):
        return f"a {type(x).__name__} of {len(x)}"
    return f"a {type(x).__name__}"


def _mask_tree(mask: Any, tree: PyTree) -> PyTree:
    m = mask(tree) if callable(mask) else mask

    def check(path: Any, value: Any) -> None:
        if not isinstance(value, bool):
            raise TreeError(
                f"masked: mask leaf {_tree.keystr(path)} is a {type(value).__name__}, expected a Python bool "
                "(the mask decides statically which leaves the inner transform sees; tensors are not allowed)."
            )

    return _broadcast(m, tree, what="masked: the mask", check=check)


def _select(mask: PyTree, tree: PyTree) -> PyTree:
    # ``None`` is an empty node for optree, so the inner transform never sees masked-out leaves.
    return _tree.map(lambda keep, x: x if keep else None, mask, tree)


def masked(inner: GradientTransformation, mask: PyTree | Callable[[PyTree], PyTree]) -> GradientTransformation:
    """Apply ``inner`` to the leaves where ``mask`` is ``True``; pass the others through.

    ``mask`` is a pytree of Python bools (the params' structure or a prefix of it) or a
    callable ``params -> mask``, e.g. ``lambda p: lf.tree.map(lambda x: x.ndim > 1, p)``
    to exempt biases and norms from weight decay.
    """

    def init(params: PyTree) -> MaskedState:
        full = _mask_tree(mask, params)
        return MaskedState(inner.init(_select(full, params)))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, MaskedState]:
        state = check_state(state, MaskedState, "masked")
        if params is not None:
            check_match(params, updates, what="masked: updates vs params")
        # The mask is a tree of Python bools: it is walked with map only (computing its
        # treedef inside torch.compile is not supported for constant leaves).
        full = _mask_tree(mask, params if params is not None else updates)
        inner_params = _select(full, params) if params is not None else None
        new_inner_updates, inner_state = call_inner(inner, _select(full, updates), state.inner_state, inner_params, 0)
        merged = _tree.map(lambda keep, u, n: n if keep else u, full, updates, new_inner_updates)
        return merged, MaskedState(inner_state)

    return GradientTransformation(init, update)


def _labels(labels: Mapping[Hashable, Any]) -> str:
    return "[" + ", ".join(sorted(map(repr, labels))) + "]"


def multi_transform(
    transforms: Mapping[Hashable, GradientTransformation], param_labels: PyTree | Callable[[PyTree], PyTree]
) -> GradientTransformation:
    """Give each leaf the transform of its label.

    ``param_labels`` is a pytree of labels (the params' structure or a prefix of it) or a
    callable ``params -> labels``; every label must be a key of ``transforms``. Each
    transform sees only its own leaves, so its state (moments, counters, learning rate)
    covers only them.
    """
    transforms = dict(transforms)
    for label, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TreeError(f"multi_transform: transforms[{label!r}] is a {type(t).__name__}, expected a GradientTransformation")

    def labels_for(tree: PyTree) -> PyTree:
        labels = param_labels(tree) if callable(param_labels) else param_labels

        def check(path: Any, value: Any) -> None:
            if not isinstance(value, Hashable) or value not in transforms:
                raise TreeError(
                    f"multi_transform: label {value!r} at {_tree.keystr(path)} has no transform; "
                    f"the transforms are for labels {_labels(transforms)}."
                )

        return _broadcast(labels, tree, what="multi_transform: the labels", check=check)

    def mask_for(label: Hashable) -> Callable[[PyTree], PyTree]:
        return lambda tree: _tree.map(lambda lab: lab == label, labels_for(tree))

    inner = {label: masked(t, mask_for(label)) for label, t in transforms.items()}

    def init(params: PyTree) -> MultiTransformState:
        labels_for(params)  # fail early, naming the leaf with a bad label
        return MultiTransformState({label: t.init(params) for label, t in inner.items()})

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, MultiTransformState]:
        state = check_state(state, MultiTransformState, "multi_transform")
        if not isinstance(state.inner_states, dict) or set(state.inner_states) != set(inner):
            got = _labels(state.inner_states) if isinstance(state.inner_states, dict) else repr(state.inner_states)
            raise StateMismatchError(
                f"multi_transform has transforms for labels {_labels(inner)} but the state has {got}: "
                "create the state with this optimizer's init(params)."
            )
        new_states = {}
        for label, t in inner.items():
            updates, new_states[label] = call_inner(t, updates, state.inner_states[label], params, 0, label)
        return updates, MultiTransformState(new_states)

    return GradientTransformation(init, update)
