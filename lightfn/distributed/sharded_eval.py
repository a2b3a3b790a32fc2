"""Evaluation of a fully sharded state: the eval step on the full params, gathered in the step.

A :func:`~lightfn.distributed.fully_sharded` run keeps only a flat slice of the params on
each rank (a :class:`~lightfn.distributed.ShardedParams`), but an eval step is written for
the full params pytree. :func:`fully_sharded_eval` wraps it: inside the traced function it
all-gathers the shards into the full flat vector, views it as the params pytree and calls
the eval step on the state with those params, so ``lf.jit`` still compiles one graph
(collective included) and nothing is gathered on the host.

>>> mesh = lf.distributed.init()                                   # doctest: +SKIP
>>> state = lf.distributed.shard_state(state, mesh)
>>> evaluate = lf.distributed.fully_sharded_eval(lf.eval_step(loss_fn), mesh)
>>> metrics = evaluate(state, lf.distributed.shard_batch(batch, mesh))   # this rank's rows
>>> metrics = lf.distributed.reduce_metrics(metrics, mesh)             # the global means

Each rank evaluates its own rows; :func:`~lightfn.distributed.reduce_metrics` averages
them at log points. The eval step draws the same random numbers on every rank; for
per-rank dropout wrap an ``lf.eval_step`` with :func:`~lightfn.distributed.data_parallel`
first (``lf.fit`` does).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from ..errors import DistributedError
from .fully_sharded import gather_in_step
from .mesh import Mesh

__all__ = ["fully_sharded_eval", "FullyShardedEval"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullyShardedEval:
    """An eval step ``(sharded_state, batch) -> metrics`` for states made by
    :func:`~lightfn.distributed.shard_state`: ``eval_step`` called on the state with its
    params all-gathered (traceable). Build it with :func:`fully_sharded_eval`."""

    eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]]
    world_size: int
    group_name: str | None

    def __call__(self, state: Any, batch: Any) -> Mapping[str, torch.Tensor]:
        full = gather_in_step(state.params, self.world_size, self.group_name, "eval step")
        return self.eval_step(state.replace(params=state.params.layout.unflatten(full)), batch)


def fully_sharded_eval(eval_step: Callable[[Any, Any], Mapping[str, torch.Tensor]], mesh: Mesh) -> FullyShardedEval:
    """The version of ``eval_step`` (an ``lf.eval_step`` or any ``(state, batch) ->
    metrics`` function written for full params) that takes the sharded states of
    :func:`~lightfn.distributed.fully_sharded` on ``mesh``; see the module docstring.

    Unlike the train step it also runs on a single-process mesh (one shard holding
    everything), to evaluate a sharded state in a plain process.
    """
    if not isinstance(mesh, Mesh):
        raise DistributedError(f"fully_sharded_eval needs the Mesh returned by lf.distributed.init(), got {type(mesh).__name__}")
    if isinstance(eval_step, FullyShardedEval):
        raise DistributedError("this eval step is already fully sharded: wrap the original eval step once")
    return FullyShardedEval(eval_step=eval_step, world_size=mesh.world_size, group_name=mesh.group_name)
