"""Data parallelism: the same step on every rank, each on its slice of the global batch.

``data_parallel(step, mesh)`` takes an ``lf.train_step`` and returns the same step with two
changes, both inside the one traced function (so ``lf.jit`` compiles forward, backward, the
gradient all-reduce and the optimizer update into one graph):

- ``grad_transform``: gradients are averaged over ranks in one flat bucket per dtype
  (:func:`~lightfn.distributed.collectives.all_reduce_mean`). Each rank's loss is the mean
  over its own shard, so with equal shards the average is exactly the full-batch gradient,
  and every rank applies the same update to the same replicated params and optimizer state.
- ``loss_fn``: randomness inside the loss (dropout) draws from the step's key folded with
  the rank, so ranks drop different units instead of repeating one mask over different
  samples. (A single process is unchanged: nothing is folded when ``world_size == 1``.)

Start every rank from the same state with :func:`replicate_state` (checks that all ranks
built the same params tree, then broadcasts rank 0's values). Metrics are per-rank until
:func:`reduce_metrics` averages them, which is a host round trip: call it at log points only.

>>> mesh = lf.distributed.init()                                   # doctest: +SKIP
>>> step = lf.distributed.data_parallel(lf.train_step(loss_fn, opt), mesh)
>>> state = lf.distributed.replicate_state(state, mesh)
>>> loader = lf.data.ArrayLoader(data, batch_size=256).shard(mesh.rank, mesh.world_size)
>>> for batch in loader:
...     state, metrics = step(state, batch)

A hand-written step function cannot be rewritten: call
``lf.distributed.all_reduce_mean(grads, mesh)`` between ``lf.value_and_grad`` and the
optimizer update in it instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .. import random as lf_random
from ..errors import DistributedError
from ..state import TrainState
from ..step import EvalStep, TrainStep
from .collectives import bucketed_mean
from .host import broadcast, check_same_structure, host_all_reduce
from .mesh import LAUNCH_HINT, Mesh, launched
from .rank_data import batch_rows, rank_rows

__all__ = ["data_parallel", "replicate_state", "reduce_metrics", "shard_batch", "check_mesh"]


def check_mesh(mesh: Any, what: str) -> Mesh:
    """Refuse a mesh that is not a :class:`Mesh`, or a one-process mesh outside torchrun."""
    if not isinstance(mesh, Mesh):
        raise DistributedError(f"{what} needs the Mesh returned by lf.distributed.init(), got {type(mesh).__name__}")
    if not mesh.distributed and not launched():
        raise DistributedError(f"{what} was asked for, but this process was not started by torchrun: {LAUNCH_HINT}")
    return mesh


@dataclasses.dataclass(frozen=True)
class _AverageGrads:
    """grad_transform of a data-parallel step: the flat-bucket mean over ranks, then the
    step's own grad_transform (if any), which so sees the global gradient."""

    world_size: int
    group_name: str | None
    upcast_bf16: bool
    then: Callable[[Any], Any] | None = None

    def __call__(self, grads: Any) -> Any:
        if self.world_size > 1:
            grads = bucketed_mean(grads, self.world_size, self.group_name, self.upcast_bf16)
        return grads if self.then is None else self.then(grads)


@dataclasses.dataclass(frozen=True)
class RankFoldedLoss:
    """``loss_fn`` whose random draws come from the step's key folded with ``rank``.

    Inside a step, torch's random functions draw from the step's key (an ``rng_scope``);
    this draws one fresh key there, folds the rank into it and opens a nested scope, so
    every rank gets its own, still reproducible, random stream.
    """

    loss_fn: Callable[..., Any]
    rank: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # The randint is served by the enclosing step's rng_scope: a pure function of its key.
        words = torch.randint(0, 1 << 32, (2,), dtype=torch.int64)
        with lf_random.rng_scope(lf_random.fold_in(words, self.rank)):
            return self.loss_fn(*args, **kwargs)


def data_parallel(step: TrainStep | EvalStep, mesh: Mesh, *, fold_rank_into_rng: bool = True) -> TrainStep | EvalStep:
    """The data-parallel version of ``step`` (see the module docstring).

    Args:
        step: an ``lf.train_step`` (or ``lf.eval_step``, for which only the RNG changes:
            evaluation has no gradients; average its metrics with :func:`reduce_metrics`).
        mesh: from :func:`lightfn.distributed.init`.
        fold_rank_into_rng: give each rank its own dropout masks (default).

    Raises :class:`DistributedError` outside torchrun, for a step that is not an
    ``lf.train_step``/``lf.eval_step``, and for a step that is already data parallel.
    """
    check_mesh(mesh, "data_parallel")
    if not isinstance(step, (TrainStep, EvalStep)):
        raise DistributedError(
            f"data_parallel rewrites an lf.train_step (or lf.eval_step), got {type(step).__name__}. For a hand-written "
            "step function, call lf.distributed.all_reduce_mean(grads, mesh) between lf.value_and_grad and the "
            "optimizer update inside it."
        )
    if isinstance(step.loss_fn, RankFoldedLoss) or (
        isinstance(step, TrainStep) and isinstance(step.grad_transform, _AverageGrads)
    ):
        raise DistributedError("this step is already data parallel: wrap the original lf.train_step once")
    changes: dict[str, Any] = {}
    if fold_rank_into_rng and mesh.world_size > 1:
        changes["loss_fn"] = RankFoldedLoss(step.loss_fn, mesh.rank)
    if isinstance(step, TrainStep):
        changes["grad_transform"] = _AverageGrads(mesh.world_size, mesh.group_name, mesh.backend == "gloo", step.grad_transform)
    return step.replace(**changes)


def replicate_state(state: TrainState, mesh: Mesh) -> TrainState:
    """``state`` with rank 0's values on every rank, after checking all ranks built the
    same tree (structure, shapes, dtypes; a mismatch names the first differing path)."""
    if not mesh.distributed:
        return state
    check_same_structure(state, mesh, what="state")
    return broadcast(state, mesh, src=0)


def reduce_metrics(metrics: Mapping[str, Any], mesh: Mesh) -> dict[str, torch.Tensor]:
    """Every metric averaged over ranks (one all_reduce for all of them).

    The mean of per-rank means is the global mean when shards have equal sizes (as
    ``ArrayLoader.shard`` with ``drop_last=True`` guarantees). A host-side collective: call
    it at log points, not every step.
    """
    names = sorted(metrics)
    values = {k: torch.as_tensor(metrics[k]).detach() for k in names}
    if not mesh.distributed or not names:
        return values
    stacked = torch.stack([values[k].to(mesh.device, torch.float64).reshape(()) for k in names])
    stacked = host_all_reduce(stacked, mesh, "reducing metrics") / mesh.world_size
    return {k: stacked[i].to(values[k].dtype if values[k].is_floating_point() else torch.float32) for i, k in enumerate(names)}


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """This rank's rows of a global batch: rows ``[r*b/w, (r+1)*b/w)`` of every leaf
    (:func:`lightfn.data.rank_span`, the rule ``ArrayLoader.shard`` follows too).

    For hand-written loops whose data is not an ``ArrayLoader`` (use ``loader.shard`` for
    one). Raises :class:`DistributedError` when the world size does not divide the batch.
    """
    if not mesh.distributed:
        return batch
    n = batch_rows(batch, "the global batch")
    if n % mesh.world_size:
        raise DistributedError(
            f"the global batch has {n} rows, which world_size={mesh.world_size} does not divide; use a global batch "
            f"size that is a multiple of {mesh.world_size} (and drop_last=True) so every rank gets the same rows"
        )
    return rank_rows(batch, n, mesh.rank, mesh.world_size)
