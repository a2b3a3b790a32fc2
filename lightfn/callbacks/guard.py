"""Checks fit applies to what callbacks do with the state: a returned state must fit the
step, and the state a callback was shown must not have been changed in place.

Why version counters: every in-place op on a tensor bumps its ``_version``, a host integer,
so comparing them before and after a callback costs one attribute read per leaf and no
device work, whereas copying the state for every hook would cost as much as a step.
"""

from __future__ import annotations

from typing import Any

import torch

from .. import tree
from ..errors import FitError, TreeError

__all__ = ["checked_state", "Versions"]


def checked_state(current: Any, new: Any, who: str, field: str = "state") -> Any:
    """``new`` after checking it has ``current``'s tree structure, shapes and dtypes."""
    try:
        tree.assert_same_structure(current, new, what=f"the {field} returned by {who}", check_shapes=True)
    except TreeError as e:
        raise FitError(
            f"{e}\n{who} returned Signal({field}=...) whose tree differs from the current state; the step is built "
            "for that structure: change values only (e.g. state.replace(params=new_params) with the same shapes "
            "and dtypes)"
        ) from None
    for (path, a), b in zip(tree.leaves_with_path(current), tree.leaves(new)):
        if isinstance(a, torch.Tensor) and a.device != b.device:
            raise FitError(f"{who} returned Signal({field}=...) with {tree.keystr(path)} on {b.device}, but the state is on "
                           f"{a.device}; move it there (e.g. torch.Tensor.to(ctx.state's device))")
    return new


def _version(x: torch.Tensor) -> int:
    try:
        return x._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be mutated later)
        return -1


class Versions:
    """The version counters of a state's tensors, to detect in-place changes."""

    def __init__(self, state: Any) -> None:
        self.state = state
        # Plain leaves (no paths) on the hot path: the path is looked up only for an error.
        self.leaves = [x for x in tree.leaves(state) if isinstance(x, torch.Tensor)]
        # Read straight from the tensors (per step, per callback) unless one has no counter.
        self._read = self._plain if not any(x.is_inference() for x in self.leaves) else self._guarded
        self.seen = self._read()

    def _plain(self) -> list[int]:
        return [x._version for x in self.leaves]

    def _guarded(self) -> list[int]:
        return [_version(x) for x in self.leaves]

    def check(self, who: str) -> None:
        """Raise a :class:`FitError` naming ``who`` and the path if a tensor changed in place."""
        now = self._read()
        if now == self.seen:
            return
        paths = [p for p, x in tree.leaves_with_path(self.state) if isinstance(x, torch.Tensor)]
        path = next(p for p, a, b in zip(paths, self.seen, now) if a != b)
        raise FitError(
            f"{who} changed the state tensor at {tree.keystr(path)} in place; ctx.state is the loop's own state, "
            "read-only. Return lf.callbacks.Signal(state=new_state) instead (e.g. "
            "ctx.state.replace(params=new_params)), so the change is checked and every later callback sees it"
        )
