"""``pytree_dataclass``: frozen keyword-only dataclasses registered as pytree nodes (with
optree in lightfn's namespace and with ``torch.utils._pytree``, so ``torch.export`` and
``torch.func`` see through them)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import optree
import torch.utils._pytree as torch_pytree

from ._walk import NAMESPACE

__all__ = ["pytree_dataclass", "static_field"]

T = TypeVar("T")


def static_field(**kwargs: Any) -> Any:
    """A dataclass field kept in the treedef (hashable metadata), not a leaf."""
    return dataclasses.field(metadata={"lightfn_static": True}, **kwargs)


def pytree_dataclass(cls: type[T]) -> type[T]:
    """Make ``cls`` a frozen, keyword-only dataclass registered as a pytree node.

    Its fields are children (paths name them as attributes) unless declared with
    :func:`static_field`. Registered both with optree (namespace :data:`NAMESPACE`) and
    with ``torch.utils._pytree`` so ``torch.export`` and ``torch.func`` see through it.
    Adds ``.replace(**changes)``.

    Instances compare by identity (``eq=False``): a field-by-field ``==`` over tensors has no
    single truth value anyway, and a node type that defines ``__eq__`` breaks walks over
    several trees under torch 2.11's ``torch.compile`` (its pytree polyfill compares two
    node types by calling the first one's ``__eq__`` on the class itself). A class that is
    a dataclass already keeps its own ``__eq__``: declare it with ``eq=False`` for torch 2.11.
    """
    if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
        cls = dataclasses.dataclass(frozen=True, kw_only=True, eq=False)(cls)
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
