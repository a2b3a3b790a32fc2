"""How metrics with a member axis are accumulated and named (``lf.ensemble`` under ``lf.fit``).

An ensemble step (:mod:`lightfn.ensemble`) returns each metric with a leading axis of size
K, one value per member. fit keeps one accumulator slot per member, so an epoch or
validation mean stays weighted by rows for every member exactly as it would for that member
trained alone, and logs each metric twice over:

- ``<name>``: the mean over the members (what a dashboard or ``EarlyStopping`` on the
  whole ensemble wants);
- ``<name>/member_<i>``: member ``i``'s own value (monitor one member, or compare them).

The slots of a ``(K,)`` metric ``loss`` are named ``loss/member_0`` ... ``loss/member_<K-1>``
in the accumulator (and in checkpoints); the mean is derived from them when read, so it is
never stored twice. A metric with one element (any shape) is a plain scalar, as before,
which means a one-member ensemble logs no ``member_0`` names. A 1-d metric is taken as
per-member only when its length is K, the leading size of every tensor leaf of the state
(a stacked state); anything else, e.g. a per-sample vector, is refused as before. Names ending in
``/member_<i>`` are reserved for this, so a step may not return one itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from . import tree

__all__ = ["member_name", "flat_names", "flatten", "expand", "group_means", "collapse_equal", "is_member_name",
           "with_suffix", "state_members"]

_MEMBER = re.compile(r"^(.*)/member_(\d+)$")


def member_name(name: str, i: int) -> str:
    """The name member ``i``'s value of metric ``name`` is logged under."""
    return f"{name}/member_{i}"


def is_member_name(name: str) -> bool:
    """Whether ``name`` has the reserved ``.../member_<i>`` form."""
    return _MEMBER.match(name) is not None


def state_members(state: Any) -> int | None:
    """K when every tensor leaf of ``state`` has the same leading size K (a stacked
    ensemble state), else None. Reads shapes only."""
    sizes = {x.shape[0] if x.dim() else None for x in tree.leaves(state) if isinstance(x, torch.Tensor)}
    return next(iter(sizes)) if len(sizes) == 1 and None not in sizes else None


def with_suffix(name: str, suffix: str) -> str:
    """``name + suffix``, the suffix going on the metric's name, not its member part:
    ``loss/member_0`` -> ``loss_epoch/member_0``."""
    match = _MEMBER.match(name)
    return name + suffix if match is None else member_name(match.group(1) + suffix, int(match.group(2)))


def _members(value: torch.Tensor) -> int | None:
    """K for a per-member metric (a 1-d tensor of more than one element), else None."""
    return value.shape[0] if value.dim() == 1 and value.shape[0] > 1 else None


def flat_names(metrics: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """The accumulator's slot names for ``metrics`` (a (K,) metric takes K slots)."""
    out: list[str] = []
    for name, value in metrics.items():
        k = _members(value)
        out.extend([name] if k is None else [member_name(name, i) for i in range(k)])
    return tuple(out)


def flatten(metrics: Mapping[str, torch.Tensor], keys: tuple[str, ...], dtype: torch.dtype) -> torch.Tensor:
    """The values of ``metrics[keys]`` as one 1-d tensor, in :func:`flat_names` order."""
    return torch.cat([metrics[k].detach().reshape(-1).to(dtype) for k in keys])


def expand(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Scalar tensors to log: a (K,) value becomes its mean and one entry per member."""
    out: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        k = _members(value)
        if k is None:
            out[name] = value.reshape(())
            continue
        out[name] = value.mean()
        out.update({member_name(name, i): value[i] for i in range(k)})
    return out


def group_means(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``values`` (per slot) with each member group's mean inserted before its members.

    Every member's value is already a row-weighted mean, so their plain mean is the
    ensemble's mean (all members see the same rows).
    """
    groups: dict[str, list[torch.Tensor]] = {}
    for name, value in values.items():
        match = _MEMBER.match(name)
        if match is not None:
            groups.setdefault(match.group(1), []).append(value)
    out: dict[str, torch.Tensor] = {}
    for name, value in values.items():
        match = _MEMBER.match(name)
        if match is not None and match.group(1) not in out:
            out[match.group(1)] = torch.stack(groups[match.group(1)]).mean()
        out[name] = value
    return out


def collapse_equal(host: Mapping[str, float], name: str) -> dict[str, float]:
    """``host`` without ``name``'s member entries when all members agree (one shared value).

    Used for learning rates: an ensemble trained with one rate logs just ``lr``; a sweep
    over injected rates logs ``lr`` (the mean) and ``lr/member_<i>``.
    """
    members = [k for k in host if (m := _MEMBER.match(k)) is not None and m.group(1) == name]
    if not members or len({host[k] for k in members}) > 1:
        return dict(host)
    return {k: v for k, v in host.items() if k not in members}
