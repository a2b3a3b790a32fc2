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
from .collectives import all_gather_flat
from .fully_sharded import ShardedParams
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
        sp = state.params
        if not isinstance(sp, ShardedParams):
            raise DistributedError(
                f"a fully_sharded_eval step got params of type {type(sp).__name__}, not a sharded state: evaluate "
                "the state made by lf.distributed.shard_state (or call the eval step itself on an unsharded state)"
            )
        if sp.layout.world_size != self.world_size:
            raise DistributedError(
                f"this state was sharded for {sp.layout.world_size} ranks but the eval step runs on {self.world_size}; "
                "reshard it with lf.distributed.load_sharded (or shard_state(unshard_state(...)))"
            )
        full = all_gather_flat(sp.shard, self.world_size, self.group_name) if self.world_size > 1 else sp.shard
        return self.eval_step(state.replace(params=sp.layout.unflatten(full)), batch)


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
