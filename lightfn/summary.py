"""``lf.summary``: a table of the params by subtree: counts, bytes, dtypes, trainable or not.

Lightning's ``ModelSummary`` lists a module's children; here the model is its params
pytree, so the rows are its top-level subtrees (``depth=2``: one level deeper). The flat
dotted keys of ``lf.functionalize`` (``"0.weight"``) count as nested (``"0"`` then
``"weight"``), so a functionalized ``nn.Sequential`` is summarized by layer.

>>> import torch, lightfn as lf
>>> params = {"encoder": {"w": torch.zeros(4, 3), "b": torch.zeros(3)}, "head": {"w": torch.zeros(3)}}
>>> print(lf.summary(params, trainable={"encoder": False, "head": True}))  # doctest: +NORMALIZE_WHITESPACE
Name     Params  Size   Dtype    Trainable
encoder      15  60 B   float32  no
head          3  12 B   float32  yes
Trainable params: 3
Frozen params: 15
Total params: 18 (72 B)
"""

from __future__ import annotations

from typing import Any

import torch

from . import tree as _tree
from .errors import TreeError
from .optim.masking import _broadcast

__all__ = ["summary"]


def _parts(path: _tree.KeyPath) -> list[str]:
    """The path as names, dotted keys split (``("enc", "0.weight")`` -> enc, 0, weight)."""
    out: list[str] = []
    for key in path:
        out += str(key).split(".") if isinstance(key, str) else [str(key)]
    return out


def _natural(name: str) -> list[tuple[int, Any]]:
    # Layer indices in numeric order (0, 2, 10), as the module lists them; names alphabetical.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def human_bytes(n: int) -> str:
    """``n`` bytes as ``"40 B"``, ``"1.5 KiB"``, ``"2.0 MiB"``..."""
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _trainable_flags(params: Any, trainable: Any, paths: list[_tree.KeyPath]) -> list[bool]:
    if trainable is None:
        return [True] * len(paths)
    if callable(trainable):
        flags = [trainable(path) for path in paths]
        for path, flag in zip(paths, flags):
            if not isinstance(flag, bool):
                raise TreeError(f"summary: trainable{_tree.keystr(path)} returned a {type(flag).__name__}; "
                                "the predicate must return True or False for each key path")
        return flags

    def check(path: Any, value: Any) -> None:
        if not isinstance(value, bool):
            raise TreeError(f"summary: trainable{_tree.keystr(path)} is a {type(value).__name__}, expected True or "
                            "False (one bool per subtree of the params)")

    full = _broadcast(trainable, params, what="summary: trainable", check=check)
    return [flag for _, flag in _tree.leaves_with_path(full)]


def summary(params: Any, *, trainable: Any = None, depth: int = 1) -> str:
    """A table of ``params``' subtrees: parameter count, bytes, dtype(s), trainable or not.

    Args:
        params: a pytree of tensors (a params dict, ``lf.functionalize``'s params, or any
            nesting; non-tensor leaves are skipped).
        trainable: which params train: ``None`` (all), a pytree of bools with the params'
            structure or a prefix of it (``{"backbone": False, "head": True}``), or a
            predicate on each leaf's key path (``lambda path: path[0] != "backbone"``).
        depth: how many levels of keys make a row (dotted keys split into levels).

    Returns:
        The table and totals as text, e.g. for ``print``: rows by name, numeric parts
        (layer indices) in numeric order.
        A row mixing trainable and frozen tensors says ``partly``.
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise ValueError(f"summary: depth must be an int >= 1, got {depth!r}")
    pairs = _tree.leaves_with_path(params)
    flags = _trainable_flags(params, trainable, [path for path, _ in pairs])
    rows: dict[str, dict[str, Any]] = {}
    for (path, leaf), flag in zip(pairs, flags):
        if not isinstance(leaf, torch.Tensor):
            continue
        name = ".".join(_parts(path)[:depth]) or "(params)"
        row = rows.setdefault(name, {"count": 0, "bytes": 0, "dtypes": [], "flags": set()})
        row["count"] += leaf.numel()
        row["bytes"] += leaf.numel() * leaf.element_size()
        dtype = str(leaf.dtype).removeprefix("torch.")
        if dtype not in row["dtypes"]:
            row["dtypes"].append(dtype)
        row["flags"].add(flag)
    table = [("Name", "Params", "Size", "Dtype", "Trainable")]
    for name, row in sorted(rows.items(), key=lambda item: _natural(item[0])):
        mode = "partly" if len(row["flags"]) > 1 else ("yes" if True in row["flags"] else "no")
        table.append((name, f"{row['count']:,}", human_bytes(row["bytes"]), ",".join(row["dtypes"]), mode))
    widths = [max(len(r[i]) for r in table) for i in range(5)]
    right = (False, True, False, False, False)  # counts line up by their last digit
    lines = ["  ".join(cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(row, widths, right)).rstrip()
             for row in table]
    counted = [(leaf.numel(), leaf.numel() * leaf.element_size(), flag)
               for (_, leaf), flag in zip(pairs, flags) if isinstance(leaf, torch.Tensor)]
    total, size = sum(n for n, _, _ in counted), sum(b for _, b, _ in counted)
    train = sum(n for n, _, f in counted if f)
    lines += [f"Trainable params: {train:,}", f"Frozen params: {total - train:,}",
              f"Total params: {total:,} ({human_bytes(size)})"]
    return "\n".join(lines)
