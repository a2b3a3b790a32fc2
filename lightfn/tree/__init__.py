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

from ._dataclass import pytree_dataclass, static_field
from ._stack import stack, unstack
from ._walk import (NAMESPACE, KeyPath, PyTree, assert_same_structure, cast, device_of, flatten, global_norm, keystr,
                    leaves, leaves_with_path, map, map_with_path, ones_like, size, structure, to_device, unflatten, where,
                    zeros_like)

__all__ = [
    "NAMESPACE", "PyTree", "KeyPath", "map", "map_with_path", "leaves", "leaves_with_path", "flatten", "unflatten",
    "structure", "keystr", "global_norm", "zeros_like", "ones_like", "cast", "to_device", "device_of", "size", "where",
    "assert_same_structure", "pytree_dataclass", "static_field", "stack", "unstack",
]
