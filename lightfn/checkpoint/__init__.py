"""Checkpoints: any lightfn pytree saved as one safetensors file, and loaded back safely.

Example::

    lf.save("ckpt.safetensors", state, metadata={"lr": 3e-4})
    state = lf.load("ckpt.safetensors", like=state)        # same structure, dtypes, devices
    params = lf.load("ckpt.safetensors")["params"]         # nested dicts of tensors
    enc = lf.load("ckpt.safetensors", subtree=("params", "encoder"))   # reads only that part

Why safetensors: a checkpoint must never be able to run code when opened (a pickle can), and
any tool should read it. Tensors are stored under keys that encode their pytree path as
JSON (``["params","enc.0.weight"]``); the tree's structure, its Python scalars and strings,
per-tensor CRC32s and the user's metadata live as JSON in the safetensors metadata. The
exact layout is described in :mod:`lightfn._ckpt_format`.

Writes are atomic: the file is written under a hidden ``.<name>.<pid>.<hex>.tmp`` name in
the same folder, fsynced, then renamed over the target, so a crash (even ``kill -9``) leaves
either the old checkpoint or the new one, never a half-written file.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import re
import secrets
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import optree
import torch

from .. import _ckpt_format as fmt
from .. import tree as _tree
from ..errors import CheckpointError
from ..tree import NAMESPACE, KeyPath, PyTree, keystr

__all__ = ["save", "load", "read_metadata", "CheckpointError"]


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
    structure, tensors = _pack(target, tree)
    meta = {
        fmt.META_FORMAT: str(fmt.FORMAT_VERSION),
        fmt.META_LIGHTFN: _lightfn_version(),
        fmt.META_TORCH: torch.__version__,
        fmt.META_USER: user,
        fmt.META_STRUCTURE: json.dumps(structure, ensure_ascii=False, separators=(",", ":")),
    }
    meta[fmt.META_CRC] = str(fmt.metadata_crc(meta))
    _write_atomic(target, tensors, meta)
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
        # Imported here, not at the top: lightfn.distributed imports this module (to save
        # each rank's file), so a top-level import would be a cycle; and a plain
        # single-process load should not pay for importing the distributed package.
        from ..distributed.sharded_folder import load_folder

        return load_folder(path, like, device=device, prefix=prefix, verify=verify)
    with fmt.open_checkpoint(path) as f:
        header = fmt.read_header(path, f)
        meta = fmt.parse_lightfn_meta(path, header.metadata, verify=verify)
        fetch = _fetcher(path, f, header, verify=verify, default=torch.device(device or "cpu"))
        if meta is None:
            return _load_foreign(path, header, prefix, like, fetch)
        fmt.check_structure(path, meta.structure, header)
        return load_described(path, meta.structure, meta.user, prefix, like, fetch)


def _is_sharded_folder(path: Path) -> bool:
    return path.is_dir() and (path / fmt.SHARDED_INDEX).is_file()


def load_described(
    path: Path,
    structure: dict[str, Any],
    user: Mapping[str, Any],
    prefix: KeyPath,
    like: PyTree | None,
    fetch: Callable[..., torch.Tensor],
) -> PyTree:
    """The part of :func:`load` after the file is opened: the tree described by a checked
    ``structure`` (see :mod:`lightfn._ckpt_format`) with user metadata ``user``, below
    ``prefix``, rebuilt or fitted into ``like``; tensors come from ``fetch(node, where, device)``.

    Shared with the reader of sharded folders (:mod:`lightfn.distributed.sharded_folder`),
    which describes the reassembled tree the same way, so both loads behave identically.
    """
    node = _descend(path, structure, prefix)
    if like is None:
        return _rebuild(node, prefix, fetch)
    found = dict(_described_leaves(node, ()))
    if not prefix and user.get(fmt.FIT_WRITER_KEY) == fmt.FIT_WRITER:
        found = _without_run_bookkeeping(found, like)
    return _restore(path, like, prefix, found, fetch)


def describe_structure(tree: PyTree) -> dict[str, Any]:
    """The JSON structure description (as stored in a checkpoint) of a tree without tensors,
    e.g. a params skeleton whose leaves are leaf indices (a sharded checkpoint's index keeps
    one per sharded subtree so a plain process can rebuild the params' containers)."""
    structure, tensors = _pack(Path("<structure>"), tree)
    if tensors:
        raise CheckpointError("describe_structure takes a tree without tensors")
    return structure


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
    with fmt.open_checkpoint(path) as f:
        header = fmt.read_header(path, f)
    meta = fmt.parse_lightfn_meta(path, header.metadata, verify=True)
    if meta is None:
        return {"metadata": dict(header.metadata), "hparams": None, "format_version": None, "lightfn_version": None,
                "torch_version": None}
    return {
        "metadata": meta.user,
        "hparams": meta.user.get(fmt.HPARAMS_KEY),
        "format_version": meta.format_version,
        "lightfn_version": meta.lightfn_version,
        "torch_version": meta.torch_version,
    }


# ----------------------------------------------------------------------------- walking trees


def _walk(file: Path, tree: PyTree, path: KeyPath, leaf: Callable[[KeyPath, Any], Any]) -> dict[str, Any]:
    """Describe ``tree`` as a JSON-able node (see _ckpt_format), calling ``leaf`` on each leaf.

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


def _pack(file: Path, tree: PyTree) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[int, dict[str, Any]] = {}  # id(tensor) -> its node, so a tied tensor is stored once

    def leaf(path: KeyPath, x: Any) -> dict[str, Any]:
        if isinstance(x, torch.Tensor):
            if id(x) not in seen:
                t = _storable(file, path, x)
                key = fmt.encode_key(path)
                tensors[key] = t
                seen[id(x)] = {"kind": "tensor", "key": key, "dtype": fmt.dtype_name(t.dtype), "shape": list(t.shape), "crc32": fmt.tensor_crc(t)}
            return seen[id(x)]
        kind = _scalar_kind(x)
        if kind is None:
            raise CheckpointError(
                f"{file}: cannot save the leaf at {keystr(path)} of type {type(x).__qualname__}; checkpoint leaves are "
                "tensors, int, float, bool or str. Convert it, or register its class with lf.tree.pytree_dataclass."
            )
        value = fmt.encode_float(float(x)) if kind == "float" else fmt.SCALARS[kind](x)
        return {"kind": kind, "value": value}

    return _walk(file, tree, (), leaf), tensors


def _storable(file: Path, path: KeyPath, x: torch.Tensor) -> torch.Tensor:
    """A dense, contiguous CPU copy or view of ``x`` whose bytes can be written as they are."""
    t = x.detach()
    where = f"{file}: the tensor at {keystr(path)}"
    if type(t) is not torch.Tensor:
        raise CheckpointError(f"{where} is a {type(t).__qualname__}; gather it into a plain tensor before saving.")
    if t.layout != torch.strided or t.device.type == "meta":
        raise CheckpointError(f"{where} is {t.layout} on {t.device}; only dense tensors with data can be saved.")
    if t.dtype not in fmt.DTYPE_CODES:
        raise CheckpointError(f"{where} has dtype {t.dtype}, which safetensors cannot store.")
    return t.cpu().resolve_conj().resolve_neg().contiguous()


# ----------------------------------------------------------------------------- atomic writes


def _write_atomic(target: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    if sys.byteorder != "little":
        raise CheckpointError(f"{target}: lightfn writes safetensors (little-endian) only on little-endian machines.")
    head, ordered = fmt.encode_header(tensors, meta)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise CheckpointError(f"{target}: is a directory; give a file path to save to.")

    def write(f: BinaryIO) -> None:
        f.write(head)
        for t in ordered:
            f.write(fmt.tensor_bytes(t))

    write_atomic(target, write)


def write_atomic(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through ``write(file)`` so that a crash at any moment leaves either
    the previous file or the complete new one: a temporary in the same folder, fsync,
    rename, fsync of the folder. Temporaries of earlier saves whose process died are removed.
    (Checkpoints and the index of a sharded checkpoint are both written this way.)"""
    _remove_stale_temporaries(target)
    # Hidden and ending in .tmp, so no glob for checkpoints (*.safetensors) ever matches it.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of earlier saves to ``target`` whose process is gone (killed mid-save)."""
    if os.name != "posix":
        return
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]+\.tmp")
    with os.scandir(target.parent) as it:
        for entry in it:
            m = pattern.fullmatch(entry.name)
            if m and int(m[1]) != os.getpid() and not _process_alive(int(m[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True


def _lightfn_version() -> str:
    try:
        return importlib.metadata.version("lightfn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ----------------------------------------------------------------------------- loading


def _fetcher(path: Path, f: BinaryIO, header: fmt.Header, *, verify: bool, default: torch.device) -> Callable[..., torch.Tensor]:
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
                t = fmt.read_tensor(path, f, header.tensors[key])
                if verify and node["crc32"] is not None and fmt.tensor_crc(t) != node["crc32"]:
                    raise CheckpointError(
                        f"{path}: checksum mismatch in tensor {keystr(where)} (key {key!r}): the file is corrupted. "
                        "Load an older checkpoint, or pass verify=False to read it anyway."
                    )
                cache[(key, cpu)] = t
            cache[(key, device)] = cache[(key, cpu)].to(device)
        return cache[(key, device)]

    return fetch


def _as_key_path(subtree: Any) -> KeyPath:
    if subtree is None:
        return ()
    if isinstance(subtree, (str, int)):
        return (subtree,)
    if isinstance(subtree, (tuple, list)):
        return tuple(subtree)
    raise TypeError(f"subtree must be a key, a tuple of keys or None, not {type(subtree).__qualname__}")


def _descend(path: Path, node: dict[str, Any], prefix: KeyPath) -> dict[str, Any]:
    for i, entry in enumerate(prefix):
        if node["kind"] not in fmt.CONTAINERS:
            raise CheckpointError(f"{path}: no subtree {keystr(prefix)}: {keystr(prefix[:i])} is a leaf.")
        children = dict(fmt.node_children(node))
        if entry not in children:
            keys = ", ".join(repr(k) for k in list(children)[:20])
            raise CheckpointError(f"{path}: no subtree {keystr(prefix)}: {keystr(prefix[:i])} has keys {keys}.")
        node = children[entry]
    return node


def _described_leaves(node: dict[str, Any], where: KeyPath) -> Iterator[tuple[KeyPath, dict[str, Any]]]:
    if node["kind"] in fmt.CONTAINERS:
        for entry, child in fmt.node_children(node):
            yield from _described_leaves(child, where + (entry,))
    elif node["kind"] != "none":
        yield where, node


def _without_run_bookkeeping(found: dict[KeyPath, dict[str, Any]], like: PyTree) -> dict[KeyPath, dict[str, Any]]:
    """A fit checkpoint's leaves less its loop/callback bookkeeping, unless ``like`` has those keys."""
    if optree.tree_is_leaf(like, namespace=NAMESPACE):
        return found
    top = set(optree.tree_flatten_one_level(like, namespace=NAMESPACE).entries)
    skip = {k for k in fmt.FIT_RUN_KEYS if k not in top}
    return {p: node for p, node in found.items() if not (p and p[0] in skip)}


def _rebuild(node: dict[str, Any], where: KeyPath, fetch: Callable[..., torch.Tensor]) -> Any:
    kind = node["kind"]
    if kind == "tensor":
        return fetch(node, where)
    if kind in fmt.SCALARS:
        return fmt.scalar_value(node)
    if kind == "none":
        return None
    kids = [(e, _rebuild(c, where + (e,), fetch)) for e, c in fmt.node_children(node)]
    if kind == "list":
        return [v for _, v in kids]
    if kind == "tuple":
        return tuple(v for _, v in kids)
    return dict(kids)


def _describe_node(node: dict[str, Any]) -> str:
    if node["kind"] == "tensor":
        return f"tensor{tuple(node['shape'])} {node['dtype']}"
    return f"{node['kind']} {fmt.scalar_value(node)!r}"


def _describe_leaf(x: Any) -> str:
    return fmt.describe_tensor(x) if isinstance(x, torch.Tensor) else f"{type(x).__name__} {x!r}"[:80]


def _restore(path: Path, like: PyTree, prefix: KeyPath, found: dict[KeyPath, dict[str, Any]], fetch: Callable[..., torch.Tensor]) -> PyTree:
    """Fill ``like``'s structure with the file's leaves (``found``, keyed by path below ``prefix``)."""
    template: list[tuple[KeyPath, Any]] = []
    _walk(path, like, (), lambda p, x: template.append((p, x)) or {})
    problems = []
    for p, x in template:
        node = found.get(p)
        if node is None:
            problems.append(f"  {keystr(prefix + p)}: missing from the file (expected {_describe_leaf(x)})")
        elif isinstance(x, torch.Tensor):
            if node["kind"] != "tensor" or node["shape"] != list(x.shape) or node["dtype"] != fmt.dtype_name(x.dtype):
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
            values.append(fmt.scalar_value(node))
            continue
        t = fetch(node, prefix + p, x.device)
        values.append(t.requires_grad_() if x.requires_grad and not t.requires_grad else t)
    treedef = _tree.structure(like)
    return _tree.unflatten(treedef, values)


def _load_foreign(path: Path, header: fmt.Header, prefix: KeyPath, like: PyTree | None, fetch: Callable[..., torch.Tensor]) -> PyTree:
    """A safetensors file without lightfn's metadata: a flat ``{key: tensor}`` dict.

    ``subtree`` selects the keys under the dotted prefix (``("encoder",)`` -> ``encoder.*``,
    returned with the prefix removed). With ``like``, each template leaf is looked up under
    lightfn's JSON key of its path, then under its dotted name (``enc.0.weight``).
    No checksums are stored in such files, so none are verified.
    """
    nodes = {
        k: {"kind": "tensor", "key": k, "dtype": fmt.dtype_name(e.dtype), "shape": list(e.shape), "crc32": None}
        for k, e in sorted(header.tensors.items())
    }
    dotted = ".".join(str(e) for e in prefix)
    if prefix:
        if dotted in nodes and like is None:
            return fetch(nodes[dotted], prefix)
        nodes = {k[len(dotted) + 1 :]: v for k, v in nodes.items() if k.startswith(dotted + ".")}
        if not nodes:
            raise CheckpointError(f"{path}: no tensor key is {dotted!r} or starts with {dotted + '.'!r}.")
    if like is None:
        return {k: fetch(v, (k,)) for k, v in nodes.items()}
    found: dict[KeyPath, dict[str, Any]] = {}
    template: list[KeyPath] = []
    _walk(path, like, (), lambda p, x: template.append(p) or {})
    for p in template:
        for candidate in (fmt.encode_key(p), ".".join(str(e) for e in p)):
            if candidate in nodes:
                found[p] = nodes.pop(candidate)
                break
    found.update({(k,): v for k, v in nodes.items()})  # unmatched keys: reported as extras
    return _restore(path, like, prefix, found, fetch)
