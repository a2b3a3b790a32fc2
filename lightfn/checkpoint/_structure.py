"""A pytree's structure as JSON, both ways: the description a checkpoint stores, and the tree rebuilt from it.

Each tensor is stored under the JSON list of its pytree path, e.g. ``["params","enc.0.weight"]``:
parameter names contain dots, so joining with "." would be ambiguous, and JSON keeps dict
keys (strings) apart from list indices (integers). NamedTuple and dataclass fields are
named by their field name. The structure description is a tree of JSON objects, each
with a "kind"::

    {"kind": "dict" | "namedtuple" | "node", "keys": [...], "children": [...], "type": "..."}
    {"kind": "list" | "tuple", "children": [...]}          {"kind": "none"}
    {"kind": "tensor", "key": K, "dtype": "float32", "shape": [...], "crc32": int}
    {"kind": "int" | "float" | "bool" | "str", "value": v}   (non-finite floats as "nan", "inf", "-inf")

A tensor stored once but reachable at several paths (tied weights) has the same "key" at
each. Decoding never imports a class named by "type": without a template, NamedTuples and
pytree dataclasses come back as dicts of their fields; with one (``like``), the template
gives the types and every leaf is checked against it.

A little over ~300 lines because encode and decode of the structure live together (the
format is described once, beside both directions that must agree on it).
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import optree
import torch

from .. import tree as _tree
from ..errors import CheckpointError
from ..tree import NAMESPACE, KeyPath, PyTree, keystr
from ._bytes import DTYPE_CODES, Header, dtype_name, is_int, tensor_crc

CONTAINERS = ("dict", "namedtuple", "node", "list", "tuple")
SCALARS = {"int": int, "float": float, "bool": bool, "str": str}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}

# fetch(tensor node, its path, device or None) -> the tensor (lightfn.checkpoint._io reads it).
Fetch = Callable[..., torch.Tensor]


# ----------------------------------------------------------------------------- encoding


def encode_key(path: tuple[Any, ...]) -> str:
    """The safetensors key of the leaf at ``path``: the compact JSON list of its entries."""
    return json.dumps(list(path), ensure_ascii=False, separators=(",", ":"))


def tensor_node(key: str, dtype: torch.dtype, shape: Any, crc32: int | None) -> dict[str, Any]:
    """The node of the tensor stored under ``key`` (``crc32`` None where the file has none)."""
    return {"kind": "tensor", "key": key, "dtype": dtype_name(dtype), "shape": list(shape), "crc32": crc32}


def pack(file: Path, tree: PyTree) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(structure description, {key: contiguous CPU tensor})`` of ``tree``, to be saved as ``file``."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, dict[str, Any]] = {}  # id(tensor) -> its node, so a tied tensor is stored once

    def leaf(path: KeyPath, x: Any) -> dict[str, Any]:
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                t = _storable(file, path, x)
                key = encode_key(path)
                tensors[key] = t
                seen[id(x)] = tensor_node(key, t.dtype, t.shape, tensor_crc(t))
            return seen[id(x)]
        kind = _scalar_kind(x)
        if kind is None:
            raise CheckpointError(
                f"{file}: cannot save the leaf at {keystr(path)} of type {type(x).__qualname__}; checkpoint leaves are "
                "tensors, int, float, bool or str. Convert it, or register its class with lf.tree.pytree_dataclass."
            )
        value = _encode_float(float(x)) if kind == "float" else SCALARS[kind](x)
        return {"kind": kind, "value": value}

    return _walk(file, tree, (), leaf), tensors


def describe_structure(tree: PyTree) -> dict[str, Any]:
    """The JSON structure description (as stored in a checkpoint) of a tree without tensors,
    e.g. a params skeleton whose leaves are leaf indices (a sharded checkpoint's index keeps
    one per sharded subtree so a plain process can rebuild the params' containers)."""
    structure, tensors = pack(Path("<structure>"), tree)
    if tensors:
        raise CheckpointError("describe_structure takes a tree without tensors")
    return structure


def template_leaves(file: Path, like: PyTree) -> list[tuple[KeyPath, Any]]:
    """``[(path, leaf), ...]`` of a template, with the paths a checkpoint of it would have."""
    found: list[tuple[KeyPath, Any]] = []
    _walk(file, like, (), lambda p, x: found.append((p, x)) or {})
    return found


def _walk(file: Path, tree: PyTree, path: KeyPath, leaf: Callable[[KeyPath, Any], Any]) -> dict[str, Any]:
    """Describe ``tree`` as a JSON-able node, calling ``leaf`` on each leaf.

    Paths are optree's key paths, except that NamedTuple fields are named, not indexed.
    """
    if tree is None:
        return {"kind": "none"}
    if optree.tree_is_leaf(tree, namespace=NAMESPACE):
        return leaf(path, tree)
    one = optree.tree_flatten_one_level(tree, namespace=NAMESPACE)
    entries: tuple[Any, ...] = tuple(one.entries)
    if optree.is_namedtuple(tree):
        kind, entries = "namedtuple", tuple(tree._fields)
    elif isinstance(tree, dict):
        kind = "dict"
    elif isinstance(tree, tuple):
        kind = "tuple"
    elif isinstance(tree, (list, deque)):
        kind = "list"
    else:
        kind = "node"
    bad = [e for e in entries if not isinstance(e, (str, int))]
    if bad:
        raise CheckpointError(f"{file}: key {bad[0]!r} at {keystr(path)} is neither a str nor an int; checkpoint keys must be.")
    node: dict[str, Any] = {"kind": kind, "children": [_walk(file, c, path + (e,), leaf) for e, c in zip(entries, one.children)]}
    if kind in ("dict", "namedtuple", "node"):
        node["keys"] = list(entries)
    if kind in ("namedtuple", "node"):
        node["type"] = f"{type(tree).__module__}.{type(tree).__qualname__}"
    return node


def _scalar_kind(x: Any) -> str | None:
    for kind, typ in (("bool", bool), ("int", int), ("float", float), ("str", str)):
        if isinstance(x, typ):
            return kind
    return None


def _encode_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)


def _storable(file: Path, path: KeyPath, x: torch.Tensor) -> torch.Tensor:
    """A dense, contiguous CPU copy or view of ``x`` whose bytes can be written as they are."""
    t = x.detach()
    where = f"{file}: the tensor at {keystr(path)}"
    if type(t) is not torch.Tensor:
        raise CheckpointError(f"{where} is a {type(t).__qualname__}; gather it into a plain tensor before saving.")
    if t.layout != torch.strided or t.device.type == "meta":
        raise CheckpointError(f"{where} is {t.layout} on {t.device}; only dense tensors with data can be saved.")
    if t.dtype not in DTYPE_CODES:
        raise CheckpointError(f"{where} has dtype {t.dtype}, which safetensors cannot store.")
    return t.cpu().resolve_conj().resolve_neg().contiguous()


# ----------------------------------------------------------------------------- checking


def check_structure(path: Path, node: Any, header: Header, where: tuple[Any, ...] = ()) -> None:
    """Validate a structure description against the header; raise CheckpointError on anything odd.

    After this passes, :func:`node_children` and :func:`scalar_value` cannot fail on it, and
    each tensor node names a header key with the same dtype and shape.
    """
    try:
        used: set[str] = set()
        _check_node(node, header, where, used)
    except RecursionError:
        raise CheckpointError(f"{path}: the structure description is nested too deeply; the file is damaged.") from None
    except _Malformed as e:
        raise CheckpointError(f"{path}: the structure description is malformed at {keystr(e.args[1])}: {e.args[0]}; the file is damaged.") from None
    unused = header.tensors.keys() - used
    if unused:
        raise CheckpointError(f"{path}: tensors {sorted(unused)[:5]} are in the file but not in its structure description; the file is damaged.")


class _Malformed(Exception):
    pass


def _check_node(node: Any, header: Header, where: tuple[Any, ...], used: set[str]) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise _Malformed(msg, where)

    need(isinstance(node, dict) and isinstance(node.get("kind"), str), "a node is not an object with a 'kind'")
    kind = node["kind"]
    if kind in CONTAINERS:
        kids = node.get("children")
        need(isinstance(kids, list), "'children' is not a list")
        if kind not in ("list", "tuple"):
            keys = node.get("keys")
            need(isinstance(keys, list) and len(keys) == len(kids), "'keys' do not match 'children'")
            need(all(isinstance(k, (str, int)) for k in keys), "a key is neither a string nor an integer")
            need(len(set(keys)) == len(keys), "duplicate keys")
        for entry, child in node_children(node):
            _check_node(child, header, where + (entry,), used)
    elif kind == "tensor":
        key = node.get("key")
        entry = header.tensors.get(key) if isinstance(key, str) else None
        need(isinstance(key, str) and entry is not None, f"tensor key {key!r} is not in the file")
        need(node.get("dtype") == dtype_name(entry.dtype), f"dtype {node.get('dtype')!r} differs from the header's")
        need(node.get("shape") == list(entry.shape), f"shape {node.get('shape')!r} differs from the header's")
        need(is_int(node.get("crc32")), "missing crc32")
        used.add(key)
    elif kind in SCALARS:
        v = node.get("value")
        ok = type(v) is SCALARS[kind] or (kind == "float" and (is_int(v) or (isinstance(v, str) and v in _NONFINITE)))
        need(ok, f"{kind} value {v!r} has the wrong type")
    else:
        need(kind == "none", f"unknown node kind {kind!r}")


# ----------------------------------------------------------------------------- decoding (checked descriptions only)


def node_children(node: dict[str, Any]) -> list[tuple[Any, Any]]:
    """``[(entry, child), ...]`` of a validated container node."""
    kids = node["children"]
    if node["kind"] in ("list", "tuple"):
        return list(enumerate(kids))
    return list(zip(node["keys"], kids))


def scalar_value(node: dict[str, Any]) -> Any:
    v = node["value"]
    if node["kind"] == "float":
        return _NONFINITE[v] if isinstance(v, str) else float(v)
    return v


def descend(path: Path, node: dict[str, Any], prefix: KeyPath) -> dict[str, Any]:
    """The node at key path ``prefix`` below ``node`` (the file ``path`` named in errors)."""
    for i, entry in enumerate(prefix):
        if node["kind"] not in CONTAINERS:
            raise CheckpointError(f"{path}: no subtree {keystr(prefix)}: {keystr(prefix[:i])} is a leaf.")
        children = dict(node_children(node))
        if entry not in children:
            keys = ", ".join(repr(k) for k in list(children)[:20])
            raise CheckpointError(f"{path}: no subtree {keystr(prefix)}: {keystr(prefix[:i])} has keys {keys}.")
        node = children[entry]
    return node


def described_leaves(node: dict[str, Any], where: KeyPath = ()) -> Iterator[tuple[KeyPath, dict[str, Any]]]:
    """``(path, leaf node)`` of every tensor and scalar below ``node`` (``None`` leaves are skipped)."""
    if node["kind"] in CONTAINERS:
        for entry, child in node_children(node):
            yield from described_leaves(child, where + (entry,))
    elif node["kind"] != "none":
        yield where, node


def rebuild(node: dict[str, Any], where: KeyPath, fetch: Fetch) -> Any:
    """The tree ``node`` describes, without a template: dicts, lists, tuples and leaves."""
    kind = node["kind"]
    if kind == "tensor":
        return fetch(node, where)
    if kind in SCALARS:
        return scalar_value(node)
    if kind == "none":
        return None
    kids = [(e, rebuild(c, where + (e,), fetch)) for e, c in node_children(node)]
    if kind == "list":
        return [v for _, v in kids]
    if kind == "tuple":
        return tuple(v for _, v in kids)
    return dict(kids)


def restore(path: Path, like: PyTree, prefix: KeyPath, found: dict[KeyPath, dict[str, Any]], fetch: Fetch) -> PyTree:
    """Fill ``like``'s structure with the file's leaves (``found``, keyed by path below ``prefix``).

    Every difference (missing, extra, other shape/dtype/kind) is collected and raised as one
    CheckpointError, so a user sees them all at once.
    """
    template = template_leaves(path, like)
    problems = []
    for p, x in template:
        node = found.get(p)
        if node is None:
            problems.append(f"  {keystr(prefix + p)}: missing from the file (expected {_describe_leaf(x)})")
        elif isinstance(x, torch.Tensor):
            if node["kind"] != "tensor" or node["shape"] != list(x.shape) or node["dtype"] != dtype_name(x.dtype):
                problems.append(f"  {keystr(prefix + p)}: expected {_describe_leaf(x)}, found {_describe_node(node)}")
        elif node["kind"] != _scalar_kind(x):
            problems.append(f"  {keystr(prefix + p)}: expected {_describe_leaf(x)}, found {_describe_node(node)}")
    for p in found.keys() - {p for p, _ in template}:
        problems.append(f"  {keystr(prefix + p)}: in the file ({_describe_node(found[p])}) but not in the template")
    if problems:
        raise CheckpointError(
            f"{path}: the checkpoint does not fit the template (`like`); {len(problems)} difference(s), expected vs found:\n"
            + "\n".join(problems)
        )
    values = []
    for p, x in template:
        node = found[p]
        if node["kind"] != "tensor":
            values.append(scalar_value(node))
            continue
        t = fetch(node, prefix + p, x.device)
        values.append(t.requires_grad_() if x.requires_grad and not t.requires_grad else t)
    return _tree.unflatten(_tree.structure(like), values)


def _describe_node(node: dict[str, Any]) -> str:
    if node["kind"] == "tensor":
        return f"tensor{tuple(node['shape'])} {node['dtype']}"
    return f"{node['kind']} {scalar_value(node)!r}"


def _describe_leaf(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"tensor{tuple(x.shape)} {dtype_name(x.dtype)}"
    return f"{type(x).__name__} {x!r}"[:80]
