"""The metric layout of a fused step, remembered beside its AOT artifact.

Before the fused graph's first call, fit must know the step's metric names (the
accumulator's slots are part of the graph). It learns them by running the step abstractly
under ``FakeTensorMode``, whose first use imports ``torch._dynamo`` (about 1 s). When the
step comes from the ahead-of-time cache (fit's background compile, or ``LIGHTFN_AOT=1``) the
compiled graph itself loads in a fraction of that, so the names are remembered too (callers
use this module only then): a small JSON file under lightfn's cache folder, keyed
by the step's artifact key (its code, closures, inputs, versions: see
:mod:`lightfn._compile.aot`). A later process reads them instead of tracing. Only steps
without ``lf.metrics.Sum`` states are remembered (their totals' shapes would need the
trace); anything unreadable is ignored and traced again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._compile import aot
from .._compile.cache import cache_dir, write_text_atomic

__all__ = ["recall", "remember"]

_VERSION = 1


def _path(kind: str, step: Callable[..., Any], state: Any, batch: Any) -> Path | None:
    try:
        key = aot.artifact_key(step, (state, batch), dynamic_argnums=(1,))
    except aot.Unsupported:
        return None
    return cache_dir() / "layouts" / f"{kind}-{key}.json"


def recall(kind: str, step: Callable[..., Any], state: Any, batch: Any) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """``(keys, names)`` remembered for ``step`` on inputs like these, or None."""
    path = _path(kind, step, state, batch)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _VERSION:
            return None
        return tuple(str(k) for k in data["keys"]), tuple(str(n) for n in data["names"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remember(kind: str, step: Callable[..., Any], state: Any, batch: Any, keys: tuple[str, ...],
             names: tuple[str, ...], has_sums: bool) -> None:
    """Keep ``(keys, names)`` for a later process (not for steps with Sum states)."""
    if has_sums:
        return
    path = _path(kind, step, state, batch)
    if path is None:
        return
    try:
        write_text_atomic(path, json.dumps({"version": _VERSION, "keys": list(keys), "names": list(names)}))
    except OSError:
        pass  # a read-only cache: the next process traces again
