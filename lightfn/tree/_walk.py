"""Walking pytrees: map, leaves with paths, flatten, and the tensor-tree helpers built on
them (cast, device moves, global norm, structure checks). See :mod:`lightfn.tree`."""


from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import optree
import torch
import torch.utils._pytree as torch_pytree

from .._diagnostics import diff_by_path, keystr
from ..errors import TreeError

__all__ = ["NAMESPACE", "PyTree", "KeyPath", "map", "map_with_path", "leaves", "leaves_with_path", "flatten",
           "unflatten", "structure", "keystr", "global_norm", "zeros_like", "ones_like", "cast", "to_device",
           "device_of", "size", "where", "assert_same_structure"]

NAMESPACE = "lightfn"

PyTree = Any
KeyPath = tuple[Any, ...]


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
