"""``stack`` / ``unstack``: K same-structure pytrees <-> one tree with a leading member
axis (what ``lf.ensemble`` vmaps over), with errors naming the first differing path."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .._diagnostics import describe, dtype_name, keystr
from ..errors import TreeError
from ._walk import PyTree, flatten, leaves_with_path, structure, unflatten

__all__ = ["stack", "unstack"]

# Ensembles (lf.ensemble) vmap one step over K members: their states become ONE tree whose
# tensor leaves carry a leading member axis. Static parts (treedef, dataclass static fields,
# non-tensor leaves) must agree across members, since a single trace serves them all.


def _first_difference(ref: PyTree, other: PyTree, index: int) -> str:
    """Where tree ``index`` first departs from tree 0: a path plus expected vs actual."""
    ref_leaves = leaves_with_path(ref)
    other_leaves = leaves_with_path(other)
    ref_paths = [p for p, _ in ref_leaves]
    other_paths = [p for p, _ in other_leaves]
    if ref_paths != other_paths or structure(ref) != structure(other):
        for (pa, _), (pb, _) in zip(ref_leaves, other_leaves):
            if pa != pb:
                return (
                    f"trees[{index}] has a different structure from trees[0]: first difference at "
                    f"{keystr(pa)} (trees[0]) vs {keystr(pb)} (trees[{index}])"
                )
        if len(ref_paths) != len(other_paths):
            longer, which = (ref_paths, 0) if len(ref_paths) > len(other_paths) else (other_paths, index)
            return (
                f"trees[{index}] has {len(other_paths)} leaves, trees[0] has {len(ref_paths)}: "
                f"{keystr(longer[min(len(ref_paths), len(other_paths))])} exists only in trees[{which}]"
            )
        return (
            f"trees[{index}] has a different structure from trees[0] (same leaf paths, different node "
            f"types or static fields):\n    trees[0]: {structure(ref)}\n    trees[{index}]: {structure(other)}"
        )
    for (path, a), b in zip(ref_leaves, (x for _, x in other_leaves)):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"{keystr(path)}: trees[0] has {describe(a)}, trees[{index}] has {describe(b)}"
        if isinstance(a, torch.Tensor):
            if a.shape != b.shape:
                return f"{keystr(path)}: shape {tuple(b.shape)} in trees[{index}], {tuple(a.shape)} in trees[0]"
            if a.dtype != b.dtype:
                return f"{keystr(path)}: dtype {dtype_name(b.dtype)} in trees[{index}], {dtype_name(a.dtype)} in trees[0]"
            if a.device != b.device:
                return f"{keystr(path)}: device {b.device} in trees[{index}], {a.device} in trees[0]"
        elif a is not b and a != b:
            return f"{keystr(path)}: the non-tensor leaf is {b!r:.40} in trees[{index}], {a!r:.40} in trees[0]"
    return ""


def stack(trees: Iterable[PyTree]) -> PyTree:
    """One tree whose tensor leaves stack the matching leaves of ``trees`` on a new axis 0.

    The inverse of :func:`unstack`. Every tree must have the same structure, static
    fields, leaf shapes, dtypes and devices (e.g. ``TrainState``s made by the same
    ``TrainState.create`` call with different seeds or params); non-tensor leaves must be
    equal and are kept once. Otherwise :class:`TreeError` names the first differing path.

    >>> import torch, lightfn as lf
    >>> s = lf.tree.stack([{"w": torch.zeros(3)}, {"w": torch.ones(3)}])
    >>> tuple(s["w"].shape)
    (2, 3)
    """
    trees = list(trees)
    if not trees:
        raise TreeError("lf.tree.stack needs at least one tree, got an empty list")
    ref = trees[0]
    for i, other in enumerate(trees[1:], start=1):
        problem = _first_difference(ref, other, i)
        if problem:
            raise TreeError(f"lf.tree.stack: the trees differ: {problem}. Stacked trees must match leaf for leaf.")
    flat = [flatten(t)[0] for t in trees]
    treedef = flatten(ref)[1]
    out = [torch.stack([f[j] for f in flat]) if isinstance(x, torch.Tensor) else x for j, x in enumerate(flat[0])]
    return unflatten(treedef, out)


def unstack(tree: PyTree) -> list[PyTree]:
    """Split a stacked tree (every tensor leaf with the same leading size ``K``) into the
    list of ``K`` trees :func:`stack` made it from. Leaves come back as views.

    >>> import torch, lightfn as lf
    >>> [t["w"].tolist() for t in lf.tree.unstack({"w": torch.arange(2.0)})]
    [0.0, 1.0]
    """
    with_paths = leaves_with_path(tree)
    tensors = [(p, x) for p, x in with_paths if isinstance(x, torch.Tensor)]
    if not tensors:
        raise TreeError("lf.tree.unstack: the tree has no tensor leaves, so there is no member axis to split")
    first_path, first = tensors[0]
    for path, x in tensors:
        if x.dim() == 0:
            raise TreeError(
                f"lf.tree.unstack: {keystr(path)} is a 0-d tensor; every tensor leaf needs a leading member "
                "axis (was the tree made by lf.tree.stack?)"
            )
        if x.shape[0] != first.shape[0]:
            raise TreeError(
                f"lf.tree.unstack: leading sizes differ: {keystr(first_path)} has {first.shape[0]} members "
                f"(shape {tuple(first.shape)}) but {keystr(path)} has {x.shape[0]} (shape {tuple(x.shape)})"
            )
    k = first.shape[0]
    flat, treedef = flatten(tree)
    return [unflatten(treedef, [x[i] if isinstance(x, torch.Tensor) else x for x in flat]) for i in range(k)]
