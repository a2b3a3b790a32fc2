"""``Strategy``: how ``lf.fit`` maps its step over the processes torchrun started.

A frozen config and nothing else; what fit does with it (wrapping the step and state,
splitting the data, reducing metrics, voting, checkpoints) is fit's multi-process policy
in :mod:`lightfn.fit._processes`, so the sharding layer holds primitives only.
"""

from __future__ import annotations

import dataclasses

from ..errors import FitError

__all__ = ["Strategy", "NAMES"]

NAMES = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Strategy:
    """How ``lf.fit`` maps the step over the processes torchrun started.

    Fields:
        name: ``"ddp"`` (replicated params, gradients averaged) or ``"fsdp"`` (ZeRO-3
            shards of params and optimizer state).
        gather_checkpoints: fsdp only: write each checkpoint as one ordinary fit checkpoint
            file from rank 0 (all-gathered; for small models, or to load it in one process)
            instead of a folder of per-rank files.
        timeout: seconds a collective waits for the other ranks before fit fails with a
            :class:`~lightfn.errors.DistributedError` (a rank died or stalled).

    ``fit(strategy="fsdp")`` is ``fit(strategy=Strategy(name="fsdp"))``.
    """

    name: str
    gather_checkpoints: bool = False
    timeout: float = 300.0

    def __post_init__(self) -> None:
        if self.name not in NAMES:
            raise FitError(f"strategy name must be one of {NAMES}, got {self.name!r}")
        if self.gather_checkpoints and self.name != "fsdp":
            raise FitError("gather_checkpoints applies to strategy 'fsdp' (ddp checkpoints are always one file)")
