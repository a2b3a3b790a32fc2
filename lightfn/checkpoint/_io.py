"""save / load / read_metadata: a pytree to one safetensors file and back, whole or in part.

The layers below do the work: :mod:`._structure` turns the tree into a JSON description
and tensors (and back), :mod:`._format` puts that description and the user's metadata into
the file's ``__metadata__``, :mod:`._bytes` writes and reads the safetensors bytes. This
module opens files, reads only the tensors asked for, and routes a sharded checkpoint
folder to :mod:`lightfn.distributed.sharded_folder`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import optree
import torch

from ..errors import CheckpointError
from ..tree import NAMESPACE, KeyPath, PyTree, keystr
from ._bytes import Header, open_checkpoint, read_header, read_tensor, tensor_crc, write_safetensors
from ._format import FIT_RUN_KEYS, FIT_WRITER, FIT_WRITER_KEY, HPARAMS_KEY, SHARDED_INDEX, encode_meta, parse_lightfn_meta
from ._structure import (
    Fetch,
    check_structure,
    descend,
    described_leaves,
    encode_key,
    pack,
    rebuild,
    restore,
    template_leaves,
    tensor_node,
)


def save(path: str | os.PathLike[str], tree: PyTree, metadata: Mapping[str, Any] | None = None) -> Path:
    """Save ``tree`` to ``path`` as a safetensors file, atomically; return the path.

    ``tree`` is any lightfn pytree (dicts, lists, tuples, NamedTuples, None, pytree
    dataclasses such as ``TrainState``) whose leaves are tensors, ``int``, ``float``,
    ``bool`` or ``str``. Tensors on any device are copied to the CPU; the same tensor object
    at several paths (tied weights) is stored once and loads back tied. ``metadata`` is a
    JSON-serializable dict (hyperparameters...), returned by :func:`read_metadata`.
    """
    target = Path(os.fspath(path))
    try:
        user = json.dumps(dict(metadata or {}), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{target}: metadata must be a JSON-serializable dict ({e}).") from None
    structure, tensors = pack(target, tree)
    write_safetensors(target, tensors, encode_meta(user, structure))
    return target


def load(
    path: str | os.PathLike[str],
    like: PyTree | None = None,
    *,
    device: torch.device | str | None = None,
    subtree: Any = None,
    verify: bool = True,
) -> PyTree:
    """Load a checkpoint written by :func:`save` (or any safetensors file).

    Without ``like`` the tree is rebuilt from the stored structure: dicts stay dicts (with
    their int/str keys), lists stay lists, tuples stay tuples, and NamedTuples and pytree
    dataclasses come back as dicts of their fields (lightfn never imports a class named in a
    file). Tensors go to ``device`` (default CPU). A safetensors file lightfn did not write
    loads as a flat ``{key: tensor}`` dict.

    With ``like`` (a template pytree, e.g. a fresh ``TrainState``) the result has exactly
    the template's structure and types; every tensor must match its template leaf's shape
    and dtype and goes to that leaf's device (``device`` for meta leaves). Any mismatch
    raises :class:`CheckpointError` listing every differing path.

    A checkpoint written by ``lf.fit`` holds the state's fields at its top level plus the
    run's bookkeeping (``"loop"``: position and metric sums, ``"callbacks"``: their states;
    see :mod:`lightfn.resume`). A template without those keys (an ``lf.TrainState``, or the
    dict state given to fit) skips them, so ``lf.load(ckpt.best_model_path, like=state)``
    is a TrainState ready to evaluate or train further (Lightning's ``load_from_checkpoint``).

    ``subtree`` (a key path such as ``("params", "encoder")``, or one key ``"params"``)
    loads only that part; the rest of the tensor data is never read. ``like`` is then the
    template of that part. ``verify`` checks the CRC32 of each tensor read and of the
    metadata; turn it off only to save time on a trusted file.

    ``path`` may also be a sharded checkpoint folder (``index.json`` plus one file per rank,
    from ``lf.fit(strategy="fsdp")`` or ``lf.distributed.save_sharded``): it loads in this
    one process, without a process group, as the unsharded tree (each sharded params or
    optimizer-moment subtree reassembled from every rank's file), exactly what
    ``lf.distributed.unshard_state`` gives. ``python -m lightfn.checkpoint consolidate
    FOLDER OUT`` turns such a folder into one ordinary file.
    """
    path = Path(os.fspath(path))
    prefix = _as_key_path(subtree)
    if _is_sharded_folder(path):
        # Imported here, not at the top: lightfn.distributed imports this package (to save
        # each rank's file), so a top-level import would be a cycle; and a plain
        # single-process load should not pay for importing the distributed package.
        from ..distributed.sharded_folder import load_folder

        return load_folder(path, like, device=device, prefix=prefix, verify=verify)
    with open_checkpoint(path) as f:
        header = read_header(path, f)
        meta = parse_lightfn_meta(path, header.metadata, verify=verify)
        fetch = fetcher(path, f, header, verify=verify, default=torch.device(device or "cpu"))
        if meta is None:
            return _load_foreign(path, header, prefix, like, fetch)
        check_structure(path, meta.structure, header)
        return load_described(path, meta.structure, meta.user, prefix, like, fetch)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``{"metadata": <the dict given to save>, "hparams", "format_version", "lightfn_version", "torch_version"}``.

    Reads only the header. ``hparams`` is ``metadata["hparams"]``: the dict given to
    ``lf.fit(..., hparams=...)`` for every checkpoint fit writes (Lightning's
    ``save_hyperparameters``), else ``None``. For a safetensors file lightfn did not write,
    ``metadata`` is its raw string-to-string ``__metadata__`` and the rest is ``None``.
    """
    path = Path(os.fspath(path))
    if _is_sharded_folder(path):
        from ..distributed.sharded_folder import read_folder_metadata  # lazy: see load

        return read_folder_metadata(path)
    with open_checkpoint(path) as f:
        header = read_header(path, f)
    meta = parse_lightfn_meta(path, header.metadata, verify=True)
    if meta is None:
        return {"metadata": dict(header.metadata), "hparams": None, "format_version": None, "lightfn_version": None,
                "torch_version": None}
    return {
        "metadata": meta.user,
        "hparams": meta.user.get(HPARAMS_KEY),
        "format_version": meta.format_version,
        "lightfn_version": meta.lightfn_version,
        "torch_version": meta.torch_version,
    }


def load_described(
    path: Path,
    structure: dict[str, Any],
    user: Mapping[str, Any],
    prefix: KeyPath,
    like: PyTree | None,
    fetch: Fetch,
) -> PyTree:
    """The part of :func:`load` after the file is opened: the tree described by a checked
    ``structure`` (see :mod:`lightfn.checkpoint._structure`) with user metadata ``user``, below
    ``prefix``, rebuilt or fitted into ``like``; tensors come from ``fetch(node, where, device)``.

    Shared with the reader of sharded folders (:mod:`lightfn.distributed.sharded_folder`),
    which describes the reassembled tree the same way, so both loads behave identically.
    """
    node = descend(path, structure, prefix)
    if like is None:
        return rebuild(node, prefix, fetch)
    found = dict(described_leaves(node))
    if not prefix and user.get(FIT_WRITER_KEY) == FIT_WRITER:
        found = _without_run_bookkeeping(found, like)
    return restore(path, like, prefix, found, fetch)


def fetcher(path: Path, f: BinaryIO, header: Header, *, verify: bool, default: torch.device) -> Fetch:
    """``fetch(node, where, device)``: the tensor of a tensor node, read once, checked, moved.

    Results are cached per (key, device), so tied leaves come back as the same object.
    """
    cache: dict[tuple[str, torch.device], torch.Tensor] = {}
    cpu = torch.device("cpu")

    def fetch(node: dict[str, Any], where: KeyPath, device: torch.device | None = None) -> torch.Tensor:
        device = default if device is None or device.type == "meta" else device
        key = node["key"]
        if (key, device) not in cache:
            if (key, cpu) not in cache:
                t = read_tensor(path, f, header.tensors[key])
                if verify and node["crc32"] is not None and tensor_crc(t) != node["crc32"]:
                    raise CheckpointError(
                        f"{path}: checksum mismatch in tensor {keystr(where)} (key {key!r}): the file is corrupted. "
                        "Load an older checkpoint, or pass verify=False to read it anyway."
                    )
                cache[(key, cpu)] = t
            cache[(key, device)] = cache[(key, cpu)].to(device)
        return cache[(key, device)]

    return fetch


def _is_sharded_folder(path: Path) -> bool:
    return path.is_dir() and (path / SHARDED_INDEX).is_file()


def _as_key_path(subtree: Any) -> KeyPath:
    if subtree is None:
        return ()
    if isinstance(subtree, (str, int)):
        return (subtree,)
    if isinstance(subtree, (tuple, list)):
        return tuple(subtree)
    raise TypeError(f"subtree must be a key, a tuple of keys or None, not {type(subtree).__qualname__}")


def _without_run_bookkeeping(found: dict[KeyPath, dict[str, Any]], like: PyTree) -> dict[KeyPath, dict[str, Any]]:
    """A fit checkpoint's leaves less its loop/callback bookkeeping, unless ``like`` has those keys."""
    if optree.tree_is_leaf(like, namespace=NAMESPACE):
        return found
    top = set(optree.tree_flatten_one_level(like, namespace=NAMESPACE).entries)
    skip = {k for k in FIT_RUN_KEYS if k not in top}
    return {p: node for p, node in found.items() if not (p and p[0] in skip)}


def _load_foreign(path: Path, header: Header, prefix: KeyPath, like: PyTree | None, fetch: Fetch) -> PyTree:
    """A safetensors file without lightfn's metadata: a flat ``{key: tensor}`` dict.

    ``subtree`` selects the keys under the dotted prefix (``("encoder",)`` -> ``encoder.*``,
    returned with the prefix removed). With ``like``, each template leaf is looked up under
    lightfn's JSON key of its path, then under its dotted name (``enc.0.weight``).
    No checksums are stored in such files, so none are verified.
    """
    nodes = {k: tensor_node(k, e.dtype, e.shape, None) for k, e in sorted(header.tensors.items())}
    dotted = _dotted(prefix)
    if prefix:
        if dotted in nodes and like is None:
            return fetch(nodes[dotted], prefix)
        nodes = {k[len(dotted) + 1 :]: v for k, v in nodes.items() if k.startswith(dotted + ".")}
        if not nodes:
            raise CheckpointError(f"{path}: no tensor key is {dotted!r} or starts with {dotted + '.'!r}.")
    if like is None:
        return {k: fetch(v, (k,)) for k, v in nodes.items()}
    found: dict[KeyPath, dict[str, Any]] = {}
    for p, _ in template_leaves(path, like):
        for candidate in (encode_key(p), _dotted(p)):
            if candidate in nodes:
                found[p] = nodes.pop(candidate)
                break
    found.update({(k,): v for k, v in nodes.items()})  # unmatched keys: reported as extras
    return restore(path, like, prefix, found, fetch)


def _dotted(path: KeyPath) -> str:
    return ".".join(str(e) for e in path)
