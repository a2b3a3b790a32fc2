"""Sharded checkpoints: one safetensors file per rank plus a JSON index; reshardable.

``save_sharded(dirpath, state, mesh)`` has every rank write its own part of a
:func:`~lightfn.distributed.shard_state` state (its slice of the params and of the
optimizer moments, plus the small replicated leaves) as an ordinary lightfn checkpoint,
``<tag>-shard-<rank>-of-<world>.safetensors``; then rank 0 writes ``index.json``:

.. code-block:: json

    {"format": "lightfn.sharded", "version": 1, "world_size": 2,
     "files": ["3f9a...-shard-00000-of-00002.safetensors", "..."],
     "sharded": {"['params']": {"paths": [...], "shapes": [...], "dtype": "float32",
                               "total": 50890, "world_size": 2, "shard_size": 25445, "padding": 0,
                               "tree": {"kind": "dict", ...}}},
     "metadata": {...}}

``"sharded"`` names, for each sharded subtree (params, each optimizer moment), the params'
paths and shapes in flatten order and how the flat vector was padded and cut, so
:func:`load_sharded` can rebuild the full flat vectors from the files and cut them again
for a different world size (2 ranks -> 1, 1 -> 2...), exactly. Each rank reads only the
files whose slices overlap its own. ``"tree"`` describes the params' containers (as in a
checkpoint's structure, leaves numbered in flatten order), so ``lf.load(folder)`` can
rebuild the full params in a plain process without a template
(:mod:`lightfn.distributed.sharded_folder`).

Crash safety: every save uses fresh file names (a tag agreed by all ranks) and the index is
replaced atomically only after every rank has written, so a crash mid-save leaves the
previous checkpoint complete. Files no index refers to are then deleted.

``gather=True`` instead writes one ordinary ``lf.save`` file of the unsharded state from
rank 0 (for small models, or to hand the weights to single-process tools).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from ..checkpoint import load, save
from ..checkpoint._atomic import write_atomic
from ..checkpoint._format import SHARDED_INDEX
from ..checkpoint._structure import describe_structure
from ..errors import CheckpointError
from ..state import TrainState
from .fully_sharded import ShardedParams, map_sharded, sharded_nodes, unshard_tree
from .host import barrier, guard
from .mesh import Mesh

__all__ = ["save_sharded", "load_sharded", "read_index", "index_contents", "full_template", "cut_full", "INDEX_NAME"]

INDEX_NAME = SHARDED_INDEX
_FORMAT = "lightfn.sharded"
_VERSION = 1
_SHARD_FILE = re.compile(r"[0-9a-f]+-shard-\d{5}-of-\d{5}\.safetensors")


def _agreed_tag(mesh: Mesh) -> str:
    # Rank 0 draws the tag; the others receive it, so all files of one save share it.
    value = torch.tensor([secrets.randbits(62) if mesh.is_main else 0], dtype=torch.int64, device=mesh.device)
    if mesh.distributed:
        with guard(mesh, "agreeing on checkpoint file names"):
            dist.broadcast(value, src=0, group=mesh.group)
    return f"{int(value.item()):016x}"


def save_sharded(
    dirpath: str | os.PathLike[str],
    state: Any,
    mesh: Mesh,
    *,
    gather: bool = False,
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save a sharded ``state``; call it on every rank (it synchronizes them).

    ``state`` is a :func:`~lightfn.distributed.shard_state` TrainState or any pytree holding
    :class:`ShardedParams` (``lf.fit`` saves its whole loop this way).
    Without ``gather``: ``dirpath`` is a folder receiving one file per rank and
    ``index.json``; returns the index path. With ``gather=True``: the state is unsharded
    (a collective) and rank 0 writes it to the single file ``dirpath`` with ``lf.save``,
    readable by ``lf.load(dirpath, like=unsharded_state)`` anywhere; returns that path.
    """
    target = Path(os.fspath(dirpath))
    if gather:
        full = unshard_tree(state, mesh)
        if mesh.is_main:
            save(target, full, metadata=metadata)
        barrier(mesh)
        return target
    nodes = sharded_nodes(state)
    if not nodes:
        raise CheckpointError(
            "save_sharded got a state without sharded params: shard it with lf.distributed.shard_state(state, mesh), "
            "or write a replicated state with lf.save"
        )
    for key, node in nodes:
        if node.layout.world_size != mesh.world_size:
            raise CheckpointError(f"state{key} is sharded for {node.layout.world_size} ranks but the mesh has {mesh.world_size}")
    tag = _agreed_tag(mesh)
    names = [f"{tag}-shard-{r:05d}-of-{mesh.world_size:05d}.safetensors" for r in range(mesh.world_size)]
    target.mkdir(parents=True, exist_ok=True)
    save(target / names[mesh.rank], state, metadata=metadata)
    barrier(mesh)  # every shard is on disk before the index points at them
    index = target / INDEX_NAME
    if mesh.is_main:
        contents = index_contents(state, names, metadata)
        write_atomic(index, lambda f: f.write(json.dumps(contents, indent=1).encode("utf-8")))
        for entry in os.scandir(target):
            if _SHARD_FILE.fullmatch(entry.name) and entry.name not in names:
                Path(entry.path).unlink(missing_ok=True)
    barrier(mesh)
    return index


def index_contents(state: Any, names: list[str], metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The JSON of ``index.json`` for rank ``r``'s part of ``state`` saved as ``names[r]``
    (any rank's part: the layouts are the same on all)."""
    return {
        "format": _FORMAT,
        "version": _VERSION,
        "world_size": len(names),
        "files": list(names),
        # "tree": the params' containers (leaves = leaf indices), so a plain process can
        # rebuild full params from the flat slices without a template (lf.load(folder)).
        "sharded": {key: {**node.layout.describe(), "tree": describe_structure(node.layout.skeleton)} for key, node in sharded_nodes(state)},
        "metadata": dict(metadata or {}),
    }


def read_index(folder: Path) -> dict[str, Any]:
    """The checked ``index.json`` of a sharded checkpoint folder."""
    path = folder / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {INDEX_NAME}; not a sharded checkpoint (or its save did not finish)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable index ({e})") from None
    if not isinstance(index, dict) or index.get("format") != _FORMAT or index.get("version") != _VERSION:
        raise CheckpointError(f"{path}: not a lightfn sharded checkpoint index (format {index.get('format')!r})")
    files = index.get("files")
    if not isinstance(files, list) or len(files) != index.get("world_size") or not all(_SHARD_FILE.fullmatch(str(f)) for f in files):
        raise CheckpointError(f"{path}: the index's file list does not match its world size")
    return index


def _check_layout(folder: Path, key: str, saved: Any, node: ShardedParams) -> None:
    want = node.layout.describe()
    if not isinstance(saved, dict):
        raise CheckpointError(f"{folder}: the checkpoint has no sharded subtree state{key}, which the template has")
    if saved.get("dtype") != want["dtype"]:
        raise CheckpointError(f"{folder}: state{key} was saved as {saved.get('dtype')}, the template is {want['dtype']}")
    s_paths, s_shapes = saved.get("paths", []), saved.get("shapes", [])
    for i, (p, s) in enumerate(zip(want["paths"], want["shapes"])):
        if i >= len(s_paths) or s_paths[i] != p:
            got = s_paths[i] if i < len(s_paths) else "nothing"
            raise CheckpointError(f"{folder}: state{key}: leaf {i} is params{got} in the checkpoint but params{p} in the template")
        if s_shapes[i] != s:
            raise CheckpointError(f"{folder}: params{p}: checkpoint shape {tuple(s_shapes[i])}, template shape {tuple(s)}")
    if len(s_paths) != len(want["paths"]):
        raise CheckpointError(f"{folder}: state{key}: the checkpoint has an extra leaf params{s_paths[len(want['paths'])]}")


def load_sharded(
    path: str | os.PathLike[str],
    like: TrainState,
    mesh: Mesh,
    *,
    device: torch.device | str | None = None,
) -> TrainState:
    """Restore a sharded checkpoint for ``mesh``, whatever world size saved it.

    ``like`` is a sharded state for this mesh (``shard_state(fresh_state, mesh)``); it gives
    the structure, the layout and the devices. ``path`` is a folder from
    :func:`save_sharded` or a single file written with ``gather=True``. Every tensor comes
    back bit-exact: the full flat vectors are reassembled from the saved slices and cut for
    this mesh's world size.
    """
    folder = Path(os.fspath(path))
    nodes = sharded_nodes(like)
    if not nodes:
        raise CheckpointError("load_sharded needs a sharded template: like = lf.distributed.shard_state(state, mesh)")
    for key, node in nodes:
        if node.layout.world_size != mesh.world_size:
            raise CheckpointError(f"like{key} is sharded for {node.layout.world_size} ranks but the mesh has {mesh.world_size}")
    if folder.is_file():
        return _load_gathered(folder, like, mesh, device)
    index = read_index(folder)
    old_world = int(index["world_size"])
    for key, node in nodes:
        _check_layout(folder, key, index["sharded"].get(key), node)
    old_like = map_sharded(
        lambda x: ShardedParams(
            shard=torch.empty(x.layout.with_world_size(old_world).shard_size, dtype=x.shard.dtype, device="meta"),
            layout=x.layout.with_world_size(old_world),
        ),
        like,
    )
    # This rank's new slice (padding excluded), and the old files that hold part of it.
    new_layout = nodes[0][1].layout
    old_layout = new_layout.with_world_size(old_world)
    lo, hi = new_layout.bounds(mesh.rank)
    hi = min(hi, new_layout.total)
    wanted = {0} | {i for i in range(old_world) if _overlap((lo, hi), old_layout.bounds(i))}
    out = {key: torch.zeros(new_layout.shard_size, dtype=node.shard.dtype) for key, node in nodes}
    replicated = None
    for i in sorted(wanted):
        part = load(folder / index["files"][i], like=old_like, device="cpu")
        if i == 0:
            replicated = part
        span = _overlap((lo, hi), old_layout.bounds(i))
        if span is None:  # rank 0's file, read for the replicated leaves only
            continue
        (a, b), old_lo = span, old_layout.bounds(i)[0]
        for key, node in sharded_nodes(part):
            out[key][a - lo : b - lo] = node.shard[a - old_lo : b - old_lo]
    assert replicated is not None

    def place(key: str, x: ShardedParams, old: Any) -> ShardedParams:
        return ShardedParams(shard=out[key].to(device if device is not None else x.shard.device), layout=x.layout)

    return map_sharded(place, like, replicated, otherwise=_moved(device), with_path=True)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    """The common part ``[lo, hi)`` of two ranges, or None when they do not meet."""
    lo, hi = max(a[0], b[0]), min(a[1], b[1])
    return (lo, hi) if lo < hi else None


def _moved(device: torch.device | str | None) -> Any:
    """``otherwise`` of a walk from a template leaf ``x`` to a loaded leaf ``got``: tensors
    onto ``device`` (default: the template's), anything else as loaded."""

    def move(x: Any, got: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return got.to(device if device is not None else x.device)
        return got

    return move


def full_template(like: Any) -> Any:
    """``like`` with every :class:`ShardedParams` replaced by a zero params pytree of the
    full shapes: the template to load a gathered (unsharded) checkpoint into."""

    def full(x: ShardedParams) -> Any:
        zeros = torch.zeros(x.layout.padded, dtype=x.shard.dtype, device=x.shard.device)
        return tree.map(lambda v: v.clone(), x.layout.unflatten(zeros))

    return map_sharded(full, like)


def cut_full(full: Any, like: Any, mesh: Mesh, device: torch.device | str | None = None) -> Any:
    """This rank's sharded form of ``full`` (an unsharded tree shaped like
    :func:`full_template` ``(like)``), cut like ``like``; no collective: every rank holds ``full``."""

    def cut(x: ShardedParams, f: Any) -> ShardedParams:
        flat = x.layout.flatten([v.to(x.layout.dtype) for v in tree.leaves(f)])
        shard = x.layout.cut(flat, mesh.rank).to(device if device is not None else x.shard.device)
        return ShardedParams(shard=shard, layout=x.layout)

    return map_sharded(cut, like, full, otherwise=_moved(device))


def _load_gathered(file: Path, like: TrainState, mesh: Mesh, device: torch.device | str | None) -> TrainState:
    """A ``gather=True`` checkpoint: load the full state on every rank, then cut this rank's slice."""
    full = load(file, like=full_template(like), device=device or "cpu")
    return cut_full(full, like, mesh, device)
