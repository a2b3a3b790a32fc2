"""The forms evaluation data may take, and the names its metrics are logged under.

fit's ``val_data`` (and the ``data`` of ``lf.validate`` / ``lf.test``) is one of:

- **one loader**: an ``lf.data.ArrayLoader``, a ``torch.utils.data.DataLoader``, or any
  iterable of batches (a list of ``(x, y)`` tuples...). Metrics: ``val/<name>``.
- **a dict of name -> loader**: ``{"clean": a, "noisy": b}``. Metrics:
  ``val/clean/<name>``, ``val/noisy/<name>``.
- **a list or tuple of loaders**: ``[a, b]``. Metrics: ``val/0/<name>``, ``val/1/<name>``.

A list is a list of loaders only when each element is itself a loader: an ArrayLoader, a
DataLoader, an iterable that is not a list, tuple or dict (a custom loader), or a list or
tuple *of batches* (one with no tensor among its own items, each item a batch). An element
with a tensor among its items (``(x, y)``), a tensor, or a dict is a batch, so a list of
those is one loader, as it always was. A list mixing the two, a dict whose values are
batches (``{"x": x, "y": y}``) and a list element that is neither are refused, with what to
pass: the meaning of the data is never guessed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from ._diagnostics import describe
from .data import ArrayLoader
from .errors import FitError

__all__ = ["named_sets", "prefix"]

_FORMS = ("pass one loader (an lf.data.ArrayLoader, a DataLoader or a list of batches), a dict of name -> loader "
          "({'clean': a, 'noisy': b}), or a list of loaders ([a, b])")


def named_sets(data: Any, what: str = "val_data") -> dict[str | None, Any]:
    """``{None: data}`` for one loader, else ``{name: loader}`` (list positions as ``"0"``, ``"1"``...)."""
    if isinstance(data, Mapping):
        if not data:
            raise FitError(f"{what} is an empty dict; {_FORMS}")
        for name, loader in data.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise FitError(f"{what} has the key {name!r}; validation set names must be non-empty strings without '/'")
            if _kind(loader) != "loader":
                raise FitError(
                    f"{what}[{name!r}] is {describe(loader)}, not a loader: each value of a dict is one validation set. "
                    f"For one batch write {what}=[batch]; otherwise {_FORMS}"
                )
        return dict(data)
    if isinstance(data, (list, tuple)) and data:
        kinds = [_kind(x) for x in data]
        if "unclear" in kinds:
            i = kinds.index("unclear")
            raise FitError(
                f"{what}[{i}] is {describe(data[i])}, neither a batch (with tensors among its items) nor a loader of such "
                f"batches; {_FORMS}"
            )
        if all(k == "loader" for k in kinds):
            return {str(i): loader for i, loader in enumerate(data)}
        if "loader" in kinds:
            i, j = kinds.index("batch"), kinds.index("loader")
            raise FitError(
                f"{what} mixes batches ({what}[{i}] is {describe(data[i])}) and loaders ({what}[{j}] is {describe(data[j])}); "
                f"{_FORMS}"
            )
    return {None: data}


def prefix(stage: str, name: str | None) -> str:
    """The metric name prefix of a set: ``val/`` for the only one, else ``val/<name>/``."""
    return f"{stage}/" if name is None else f"{stage}/{name}/"


def _kind(x: Any) -> str:
    """``"loader"``, ``"batch"`` or ``"unclear"``, by the rules in the module docstring."""
    if isinstance(x, (ArrayLoader, DataLoader)):
        return "loader"
    if isinstance(x, (str, bytes)):  # iterable, but of characters
        return "unclear"
    if isinstance(x, (torch.Tensor, Mapping)):
        return "batch"
    if isinstance(x, (list, tuple)):
        if any(isinstance(item, torch.Tensor) for item in x):
            return "batch"
        if x and all(_kind(item) == "batch" for item in x):
            return "loader"
        return "unclear"
    return "loader" if isinstance(x, Iterable) else "batch"

