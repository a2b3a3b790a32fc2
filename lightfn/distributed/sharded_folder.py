"""A sharded checkpoint folder read in one plain process: the full, unsharded tree.

``lf.load(folder)`` dispatches here for a folder holding ``index.json`` (see
:mod:`lightfn.distributed.sharded_checkpoint` for the layout). No process group, mesh or
template is needed: rank 0's file gives the tree's structure and its replicated leaves
(step, RNG key, fit's bookkeeping...), and every :class:`ShardedParams` in it is replaced
by the full params subtree, reassembled from all ranks' slices with the layout the index
stores (padding dropped). The result is bit-identical to
:func:`~lightfn.distributed.unshard_state` of the saved state.

How: the reassembled tree is described exactly like one checkpoint file's structure, with
the sharded subtrees' leaves read on demand, and handed to the same code that loads a file
(:func:`lightfn.checkpoint.load_described`), so ``like=``, ``subtree=``, ``device=`` and
fit's bookkeeping behave as for a file; a ``subtree`` reads only the slices it needs.

:func:`consolidate` (also ``python -m lightfn.checkpoint consolidate FOLDER OUT``) writes
the result as one ordinary checkpoint file with the same metadata.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import read_metadata, save
from ..checkpoint._bytes import DTYPES, Header, dtype_name, open_checkpoint, read_header
from ..checkpoint._format import parse_lightfn_meta
from ..checkpoint._io import fetcher, load_described
from ..checkpoint._structure import CONTAINERS, check_structure, describe_structure, node_children
from ..errors import CheckpointError
from ..tree import KeyPath, PyTree, keystr
from .fully_sharded import ShardedParams, sharded_nodes
from .shard_layout import shard_size_of
from .sharded_checkpoint import INDEX_NAME, read_index

__all__ = ["load_folder", "read_folder_metadata", "consolidate"]

# How a ShardedParams node looks in a file's structure description (a pytree dataclass
# whose one child is the flat shard; the layout is static, so not stored in the file).
_SHARDED_TYPE = f"{ShardedParams.__module__}.{ShardedParams.__qualname__}"
_OF_WORLD = re.compile(r"-of-(\d{5})\.safetensors$")

_Fetch = Callable[..., torch.Tensor]


def load_folder(
    folder: Path,
    like: PyTree | None = None,
    *,
    device: torch.device | str | None = None,
    prefix: KeyPath = (),
    verify: bool = True,
) -> PyTree:
    """``lf.load`` of a sharded checkpoint folder (same arguments; ``subtree`` as a key
    path ``prefix``): the unsharded tree, or ``like`` filled with it."""
    if like is not None and sharded_nodes(like):
        raise CheckpointError(
            f"{folder}: lf.load gives the full (unsharded) state of a sharded checkpoint, but `like` holds "
            "ShardedParams. Pass an unsharded template (the state before shard_state), or restore the "
            "sharded form on a mesh with lf.distributed.load_sharded(folder, like, mesh)."
        )
    with contextlib.ExitStack() as stack:
        structure, user, fetch = _reassembled(folder, stack, verify=verify, default=torch.device(device or "cpu"))
        return load_described(folder, structure, user, prefix, like, fetch)


def read_folder_metadata(folder: Path) -> dict[str, Any]:
    """``lf.read_metadata`` of a sharded checkpoint folder: rank 0's file's (every rank
    writes the same metadata), after checking that the folder is complete."""
    index = read_index(folder)
    files = _rank_files(folder, index)
    return read_metadata(files[0])


def consolidate(folder: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """Write the sharded checkpoint ``folder`` as one ordinary checkpoint file ``out``
    (atomically), keeping its metadata (hparams, fit's mark), so ``lf.load(out, like=...)``
    and ``lf.read_metadata(out)`` work as for a file fit wrote unsharded. Returns ``out``.

    The whole state is held in memory once (full params and optimizer moments). Containers
    that a template-free load returns as dicts (TrainState, optimizer NamedTuples) are
    stored as dicts; loading with ``like`` matches them by field name as usual.
    """
    src = Path(os.fspath(folder))
    if not (src.is_dir() and (src / INDEX_NAME).is_file()):
        raise CheckpointError(f"{src}: not a sharded checkpoint folder (no {INDEX_NAME}); nothing to consolidate.")
    user = read_folder_metadata(src)["metadata"]
    return save(out, load_folder(src), metadata=user)


# ----------------------------------------------------------------------------- the folder


def _rank_files(folder: Path, index: dict[str, Any]) -> list[Path]:
    """Every rank's file, checked to exist and to be named for the index's world size."""
    world = int(index["world_size"])
    files = [folder / name for name in index["files"]]
    for rank, file in enumerate(files):
        m = _OF_WORLD.search(file.name)
        if m is None or int(m[1]) != world:
            raise CheckpointError(
                f"{file}: {INDEX_NAME} says world size {world}, but this file is named for another number of "
                "ranks: the folder mixes saves. Copy the folder again from one save, or load an earlier checkpoint."
            )
        if not file.is_file():
            raise CheckpointError(
                f"{file}: missing; {INDEX_NAME} lists it as rank {rank} of {world}'s file. The folder is incomplete "
                "(copied before every rank's file arrived, or a file was deleted): copy every *-shard-*.safetensors "
                "file of this save next to the index, or load an earlier checkpoint."
            )
    return files


def _optree_key(kind: str, i: int, entry: Any) -> Any:
    # The index names sharded subtrees by optree key paths, where a NamedTuple's fields are
    # positions; a file's structure names them by field.
    return i if kind == "namedtuple" else entry


def _sharded_in(structure: dict[str, Any], where: KeyPath = ()) -> dict[str, dict[str, Any]]:
    """``{optree keystr: node}`` of every ShardedParams node in a file's structure."""
    if structure["kind"] == "node" and structure.get("type") == _SHARDED_TYPE:
        return {keystr(where): structure}
    out: dict[str, dict[str, Any]] = {}
    if structure["kind"] in CONTAINERS:
        for i, (entry, child) in enumerate(node_children(structure)):
            out.update(_sharded_in(child, where + (_optree_key(structure["kind"], i, entry),)))
    return out


def _shard_node(file: Path, key: str, node: dict[str, Any] | None) -> dict[str, Any]:
    if node is None or node.get("keys") != ["shard"] or node["children"][0]["kind"] != "tensor":
        raise CheckpointError(
            f"{file}: {INDEX_NAME} names state{key} as sharded, but this file holds no shard there: "
            "the file belongs to another save. Copy the folder again from one save, or load an earlier checkpoint."
        )
    return node["children"][0]


def _check_description(folder: Path, key: str, desc: Any, world: int) -> None:
    ok = (
        isinstance(desc, dict)
        and isinstance(desc.get("shapes"), list)
        and all(isinstance(s, list) and all(type(d) is int and d >= 0 for d in s) for s in desc["shapes"])
        and desc.get("dtype") in {dtype_name(t) for t in DTYPES.values()}
        and type(desc.get("total")) is int
        and type(desc.get("shard_size")) is int
    )
    if not ok:
        raise CheckpointError(f"{folder / INDEX_NAME}: the description of state{key} is malformed; the index is damaged.")
    if desc.get("world_size") != world:
        raise CheckpointError(
            f"{folder / INDEX_NAME}: state{key} was cut for {desc.get('world_size')} ranks but the index lists "
            f"{world} rank files: the index is damaged. Load an earlier checkpoint."
        )
    total = sum(math.prod(s) for s in desc["shapes"])
    if total != desc["total"] or desc["shard_size"] != shard_size_of(total, world):
        raise CheckpointError(f"{folder / INDEX_NAME}: the sizes recorded for state{key} do not add up; the index is damaged.")


def _params_structure(folder: Path, key: str, desc: dict[str, Any]) -> dict[str, Any]:
    """The structure of the full params subtree ``key``: the index's ``tree`` (containers,
    leaves numbered in flatten order) with each number replaced by a tensor node that
    :func:`_reassembled`'s fetch reads from the slices."""
    n = len(desc["shapes"])
    skeleton = desc.get("tree")
    if skeleton is None:  # an index written before "tree" was stored: nested dicts from the paths
        skeleton = _skeleton_from_paths(folder, key, desc.get("paths"), n)
    seen: list[int] = []

    def fill(node: Any) -> Any:
        if node["kind"] == "int":
            seen.append(node["value"])
            i = node["value"]
            if not 0 <= i < n:
                raise CheckpointError(f"{folder / INDEX_NAME}: the tree of state{key} names leaf {i} of {n}; the index is damaged.")
            return {"kind": "tensor", "key": _leaf_key(key, i), "dtype": desc["dtype"], "shape": desc["shapes"][i], "crc32": None}
        if node["kind"] in CONTAINERS:
            return {**node, "children": [fill(c) for _, c in node_children(node)]}
        raise CheckpointError(f"{folder / INDEX_NAME}: the tree of state{key} has a {node['kind']} leaf; the index is damaged.")

    # Validate the containers (no tensors may appear in it) before walking them.
    check_structure(folder / INDEX_NAME, skeleton, Header(tensors={}, metadata={}))
    out = fill(skeleton)
    if sorted(seen) != list(range(n)):
        raise CheckpointError(f"{folder / INDEX_NAME}: the tree of state{key} does not number its {n} leaves once each; the index is damaged.")
    return out


_PATH_PART = re.compile(r"\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|-?\d+)\]")


def _skeleton_from_paths(folder: Path, key: str, paths: Any, n: int) -> dict[str, Any]:
    """Nested dicts numbered like the params' leaves, from their keystr paths
    (``"['enc']['w']"``): for indexes written before the params tree was stored."""
    root: dict[Any, Any] = {}
    for i, text in enumerate(paths if isinstance(paths, list) and len(paths) == n else []):
        found = list(_PATH_PART.finditer(str(text)))
        if not found or "".join(m[0] for m in found) != text:
            raise CheckpointError(
                f"{folder / INDEX_NAME}: state{key}'s params path {text!r} cannot be rebuilt without a template; "
                "restore it with lf.distributed.load_sharded(folder, like, lf.distributed.single_process_mesh())."
            )
        parts = [ast.literal_eval(m[1]) for m in found]
        d = root
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = i
    return describe_structure(root)


def _leaf_key(key: str, i: int) -> str:
    # Not a JSON list, so it cannot collide with a real tensor key (encoded key paths).
    return f"sharded:{key}:{i}"


def _reassembled(
    folder: Path, stack: contextlib.ExitStack, *, verify: bool, default: torch.device
) -> tuple[dict[str, Any], dict[str, Any], _Fetch]:
    """(structure, user metadata, fetch) of the unsharded tree of ``folder``. Every rank's
    header is read and checked up front; tensor data only when fetched."""
    index = read_index(folder)
    world = int(index["world_size"])
    files = _rank_files(folder, index)
    descs: Mapping[str, Any] = index.get("sharded") if isinstance(index.get("sharded"), dict) else {}
    opened: list[tuple[Path, dict[str, dict[str, Any]], _Fetch]] = []
    structure0: dict[str, Any] = {}
    user0: dict[str, Any] = {}
    for rank, file in enumerate(files):
        f = stack.enter_context(open_checkpoint(file))
        header = read_header(file, f)
        meta = parse_lightfn_meta(file, header.metadata, verify=verify)
        if meta is None:
            raise CheckpointError(f"{file}: not a lightfn checkpoint file, though {INDEX_NAME} lists it as rank {rank}'s.")
        check_structure(file, meta.structure, header)
        nodes = _sharded_in(meta.structure)
        for key, desc in descs.items():
            shard = _shard_node(file, key, nodes.get(key))
            if shard["shape"] != [desc.get("shard_size")] or shard["dtype"] != desc.get("dtype"):
                raise CheckpointError(
                    f"{file}: its slice of state{key} is {shard['dtype']} of shape {tuple(shard['shape'])}, but {INDEX_NAME} "
                    f"(world size {world}) expects {desc.get('dtype')} of shape ({desc.get('shard_size')},): the file is "
                    "from a save with another number of ranks or another model. Copy the folder again from one save, "
                    "or load an earlier checkpoint."
                )
        if rank == 0:
            structure0, user0 = meta.structure, meta.user
            extra = sorted(nodes.keys() - descs.keys())
            if extra:
                raise CheckpointError(f"{file}: holds sharded state{extra[0]}, which {INDEX_NAME} does not describe; the index is damaged.")
        opened.append((file, nodes, fetcher(file, f, header, verify=verify, default=default)))
    for key, desc in descs.items():
        _check_description(folder, key, desc, world)
    params = {key: _params_structure(folder, key, desc) for key, desc in descs.items()}

    def swap(node: dict[str, Any], where: KeyPath) -> dict[str, Any]:
        if node["kind"] == "node" and node.get("type") == _SHARDED_TYPE:
            return params[keystr(where)]
        if node["kind"] not in CONTAINERS:
            return node
        kids = [swap(c, where + (_optree_key(node["kind"], i, e),)) for i, (e, c) in enumerate(node_children(node))]
        return {**node, "children": kids}

    full: dict[str, tuple[torch.Tensor, ...]] = {}
    cache: dict[tuple[str, torch.device], torch.Tensor] = {}
    fetch0 = opened[0][2]

    def leaves_of(key: str) -> tuple[torch.Tensor, ...]:
        if key not in full:
            desc = descs[key]
            parts = [read(nodes[key]["children"][0], (key, "shard"), torch.device("cpu")) for _, nodes, read in opened]
            flat = torch.cat(parts)[: desc["total"]]  # padding dropped
            pieces = torch.split(flat, [math.prod(s) for s in desc["shapes"]])
            # Each leaf its own storage (views of one buffer would save as one tensor).
            full[key] = tuple(p.reshape(s).clone() for p, s in zip(pieces, desc["shapes"]))
        return full[key]

    def fetch(node: dict[str, Any], where: KeyPath, device: torch.device | None = None) -> torch.Tensor:
        if not node["key"].startswith("sharded:"):
            return fetch0(node, where, device)
        device = default if device is None or device.type == "meta" else device
        if (node["key"], device) not in cache:
            key, _, i = node["key"][len("sharded:") :].rpartition(":")
            cache[(node["key"], device)] = leaves_of(key)[int(i)].to(device)
        return cache[(node["key"], device)]

    return swap(structure0, ()), user0, fetch
