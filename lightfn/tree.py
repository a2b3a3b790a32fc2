"""Pytree utilities on optree.

A pytree is any nesting of dicts, lists, tuples, NamedTuples, ``None`` and lightfn's
registered dataclasses (``TrainState``, optimizer states) whose leaves are tensors (or
Python scalars). Everything in lightfn (params, optimizer state, the whole train state,
batches, metrics) is a pytree, and these helpers are the only way lightfn walks them.

lightfn registers its own node types in the optree namespace :data:`NAMESPACE`; every
function here passes it, so call these (not bare optree) when a tree holds lightfn types.

>>> import torch, lightfn as lf
>>> params = {"w": torch.ones(2, 2), "b": torch.zeros(2)}
>>> lf.tree.map(lambda x: x * 2, params)["w"].sum().item()
8.0
>>> [lf.tree.keystr(p) for p, _ in lf.tree.leaves_with_path(params)]
["['b']", "['w']"]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import optree
import torch
import torch.utils._pytree as torch_pytree

from ._diagnostics import describe, diff_by_path, dtype_name, keystr
from .errors import TreeError

__all__ = [
    "NAMESPACE",
    "PyTree",
    "KeyPath",
    "map",
    "map_with_path",
    "leaves",
    "leaves_with_path",
    "flatten",
    "unflatten",
    "structure",
    "keystr",
    "global_norm",
    "zeros_like",
    "ones_like",
    "cast",
    "to_device",
    "device_of",
    "size",
    "where",
    "assert_same_structure",
    "pytree_dataclass",
    "static_field",
    "stack",
    "unstack",
]

NAMESPACE = "lightfn"

PyTree = Any
KeyPath = tuple[Any, ...]
T = TypeVar("T")


def map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """Apply ``fn`` to every leaf (and the matching leaves of ``rest``); keep the structure."""
    try:
        return optree.tree_map(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)
    except ValueError:
        if rest and any(structure(r) != structure(tree) for r in rest):
            raise TreeError(_structure_mismatch_message(tree, rest)) from None
        raise


def map_with_path(fn: Callable[..., Any], tree: PyTree, *rest: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> PyTree:
    """Like :func:`map`, but ``fn(path, leaf, *rest_leaves)`` also gets the leaf's key path."""
    if _compiling():
        # dynamo traces this through torch's pytree, whose paths hold key-entry objects
        # (MappingKey('w')); give fn the plain keys it gets eagerly, so a predicate on the
        # path (train_step's trainable=) decides the same way compiled and eager.
        def plain(path: Any, *leaves: Any) -> Any:
            return fn(tuple(_plain_key(k) for k in path), *leaves)

        return torch_pytree.tree_map_with_path(plain, tree, *rest, is_leaf=is_leaf)
    return optree.tree_map_with_path(fn, tree, *rest, is_leaf=is_leaf, namespace=NAMESPACE)


def _plain_key(k: Any) -> Any:
    if isinstance(k, torch_pytree.MappingKey):
        return k.key
    if isinstance(k, torch_pytree.SequenceKey):
        return k.idx
    if isinstance(k, torch_pytree.GetAttrKey):
        return k.name
    return k


def _compiling() -> bool:
    return torch.compiler.is_compiling()


# Under torch.compile, dynamo's optree polyfill cannot flatten some trees (a dict whose
# values are all None or constants); torch's own pytree traces them, and lightfn's node
# types are registered with both. Within one trace the two are never mixed, so the leaf
# order (sorted dict keys in optree, insertion order in torch) stays consistent. torch's
# pytree keeps None as a leaf: leaves() drops it to match optree; flatten() keeps it.


def leaves(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[Any]:
    """The leaves of ``tree`` in a fixed order (dict keys sorted)."""
    if _compiling():
        return [x for x in torch_pytree.tree_leaves(tree, is_leaf=is_leaf) if x is not None]
    return optree.tree_leaves(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def leaves_with_path(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> list[tuple[KeyPath, Any]]:
    """``[(path, leaf), ...]``: each path is a tuple of dict keys, attribute names and indices."""
    paths, lvs, _ = optree.tree_flatten_with_path(tree, is_leaf=is_leaf, namespace=NAMESPACE)
    return list(zip(paths, lvs))


def flatten(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> tuple[list[Any], optree.PyTreeSpec]:
    """``(leaves, treedef)``; :func:`unflatten` inverts it (under torch.compile, ``None``
    nodes come back as leaves)."""
    if _compiling():
        return torch_pytree.tree_flatten(tree, is_leaf=is_leaf)
    return optree.tree_flatten(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def unflatten(treedef: Any, leaves: Iterable[Any]) -> PyTree:
    """Rebuild a tree of ``treedef``'s structure from ``leaves``."""
    if isinstance(treedef, torch_pytree.TreeSpec):
        return torch_pytree.tree_unflatten(list(leaves), treedef)
    return optree.tree_unflatten(treedef, leaves)


def structure(tree: PyTree, is_leaf: Callable[[Any], bool] | None = None) -> Any:
    """The tree's structure (a treedef) without its leaves; equal structures compare equal."""
    if _compiling():
        return torch_pytree.tree_structure(tree, is_leaf=is_leaf)
    return optree.tree_structure(tree, is_leaf=is_leaf, namespace=NAMESPACE)


def size(tree: PyTree) -> int:
    """Total number of elements over all tensor leaves."""
    return sum(x.numel() for x in leaves(tree) if isinstance(x, torch.Tensor))


def global_norm(tree: PyTree) -> torch.Tensor:
    """The L2 norm of all tensor leaves taken together, as a 0-d tensor (no host sync).

    Accumulates in float32 at least, so bf16/fp16 grads do not overflow the sum of squares.
    """
    lvs = [x for x in leaves(tree) if isinstance(x, torch.Tensor)]
    if not lvs:
        return torch.zeros(())
    sq = [torch.sum(torch.square(x.to(torch.promote_types(x.dtype, torch.float32)))) for x in lvs]
    return torch.sqrt(torch.stack(sq).sum()) if len(sq) > 1 else torch.sqrt(sq[0])


def zeros_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of zero tensors shaped like ``tree``'s leaves."""
    return map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def ones_like(tree: PyTree, dtype: torch.dtype | None = None) -> PyTree:
    """A tree of one tensors shaped like ``tree``'s leaves."""
    return map(lambda x: torch.ones_like(x, dtype=dtype), tree)


def cast(tree: PyTree, dtype: torch.dtype, *, floating_only: bool = True) -> PyTree:
    """Cast tensor leaves to ``dtype``; by default only floating-point leaves change
    (step counters and RNG keys stay integers)."""

    def f(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        if floating_only and not x.is_floating_point():
            return x
        return x.to(dtype)

    return map(f, tree)


def to_device(tree: PyTree, device: torch.device | str | None, *, non_blocking: bool = True) -> PyTree:
    """Move every tensor leaf to ``device`` (``None`` leaves the tree as it is).

    ``non_blocking=True`` lets host-to-GPU copies of pinned memory overlap compute, so a
    loop moving batches never waits on the copy.
    """
    if device is None:
        return tree
    device = torch.device(device)
    return map(lambda x: x.to(device, non_blocking=non_blocking) if isinstance(x, torch.Tensor) else x, tree)


def device_of(tree: PyTree) -> torch.device:
    """The device of the first tensor leaf (CPU when there is none): where state that lives
    beside ``tree`` (step counters, metric sums) belongs."""
    for leaf in leaves(tree):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def where(cond: torch.Tensor, on_true: PyTree, on_false: PyTree) -> PyTree:
    """Leafwise ``torch.where(cond, a, b)`` over two trees of the same structure.

    The pure way to take a branch inside a compiled step (e.g. skip an update when
    gradients are not finite) without a host sync.
    """
    return map(lambda a, b: torch.where(cond, a, b), on_true, on_false)


def assert_same_structure(expected: PyTree, actual: PyTree, *, what: str = "tree", check_shapes: bool = False) -> None:
    """Raise :class:`TreeError` naming each differing path when two trees differ.

    With ``check_shapes=True`` the shapes and dtypes of tensor leaves must match too.
    """
    exp, act = dict(leaves_with_path(expected)), dict(leaves_with_path(actual))
    problems = diff_by_path(exp, act, same=_same_leaf) if check_shapes else diff_by_path(exp, act)
    if not problems and structure(expected) != structure(actual):
        problems.append(f"  structure differs:\n    expected {structure(expected)}\n    got      {structure(actual)}")
    if problems:
        problems.sort()
        raise TreeError(f"{what} does not match the expected structure:\n" + "\n".join(problems))


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype
    return isinstance(a, torch.Tensor) == isinstance(b, torch.Tensor)


def _structure_mismatch_message(tree: PyTree, rest: tuple[PyTree, ...]) -> str:
    try:
        for other in rest:
            assert_same_structure(tree, other)
    except TreeError as e:
        return str(e)
    return "trees passed to lf.tree.map have different structures"


# ----------------------------------------------------------------------------- dataclasses


def static_field(**kwargs: Any) -> Any:
    """A dataclass field kept in the treedef (hashable metadata), not a leaf."""
    return dataclasses.field(metadata={"lightfn_static": True}, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, keyword-only dataclass registered as a pytree node.

    Its fields are children (paths name them as attributes) unless declared with
    :func:`static_field`. Registered both with optree (namespace :data:`NAMESPACE`) and
    with ``torch.utils._pytree`` so ``torch.export`` and ``torch.func`` see through it.
    Adds ``.replace(**changes)``.
    """
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        cls = dataclasses.dataclass(frozen=True, kw_only=True)(cls)
    fields = dataclasses.fields(cls)
    children = tuple(f.name for f in fields if not f.metadata.get("lightfn_static"))
    statics = tuple(f.name for f in fields if f.metadata.get("lightfn_static"))

    def flat(obj: Any) -> tuple[list[Any], tuple[Any, ...], tuple[str, ...]]:
        return [getattr(obj, n) for n in children], tuple(getattr(obj, n) for n in statics), children

    def unflat(meta: tuple[Any, ...], kids: Iterable[Any]) -> Any:
        return cls(**dict(zip(children, kids)), **dict(zip(statics, meta)))

    optree.register_pytree_node(cls, flat, unflat, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE)
    _register_with_torch(cls, flat, unflat)

    def replace(self: Any, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)

    if "replace" not in cls.__dict__:
        cls.replace = replace  # type: ignore[attr-defined]
    return cls


def _register_with_torch(cls: type, flat: Callable[[Any], Any], unflat: Callable[[Any, Any], Any]) -> None:
    def flatten_with_keys(obj: Any) -> tuple[list[tuple[Any, Any]], Any]:
        kids, meta, names = flat(obj)
        return [(torch_pytree.GetAttrKey(n), k) for n, k in zip(names, kids)], meta

    torch_pytree.register_pytree_node(
        cls,
        lambda obj: flat(obj)[:2],
        lambda kids, meta: unflat(meta, kids),
        serialized_type_name=f"{cls.__module__}.{cls.__qualname__}",
        flatten_with_keys_fn=flatten_with_keys,
    )


# ------------------------------------------------------------------------- stack / unstack
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
