"""Fully sharded data parallelism (ZeRO-3 / FSDP style) as a rewrite of the pure step.

Every param is flattened and all are concatenated into one flat vector, padded to a
multiple of the world size (:mod:`lightfn.distributed.shard_layout`); rank ``r`` keeps only
slice ``r`` of it (a :class:`ShardedParams`) and the optimizer state of that slice. So params + optimizer state per rank fall to about
``1/world_size`` of a replica.

Inside the step (one traced function, one compiled graph):

1. all-gather the shards into the full flat vector and view it as the params pytree;
2. run the user's ``lf.train_step`` on it (loss, ``torch.func`` gradients, precision,
   RNG, metrics: unchanged), giving full-size local gradients;
3. its optimizer is wrapped to reduce-scatter (sum) the flattened gradients, divide by the
   world size, and update this rank's shard and shard-sized optimizer state; the step keeps
   its own slice of the new params.

(The gather is not differentiated through: an ``autograd.Function`` whose backward is the
reduce-scatter works eagerly, but torch 2.14's dynamo ignores custom backwards under
``torch.func.grad`` and silently returned zero gradients.)

>>> mesh = lf.distributed.init()                                   # doctest: +SKIP
>>> step = lf.distributed.fully_sharded(lf.train_step(loss_fn, opt), mesh)
>>> state = lf.distributed.shard_state(state, mesh)               # params and moments sharded
>>> state, metrics = step(state, batch_shard)
>>> params = lf.distributed.gather_params(state, mesh)            # the full pytree again

Limits: all params must share one floating dtype; optimizer transforms must be elementwise
(adam, sgd, adamw without a mask...). Transforms that look at the params tree's structure
(masks, ``multi_transform``) or at a global quantity (``clip_by_global_norm``) would see only
the local shard. ``"16-mixed"`` is refused: each rank would judge finiteness on its own slice.

Over ~300 lines: the sharded train step, its state layout walks and its optimizer wrapper
are one transformation; the layout arithmetic itself lives in :mod:`.shard_layout`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from ..errors import DistributedError
from ..state import TrainState
from ..step import TrainStep
from ..optim import GradientTransformation
from .collectives import all_gather_flat, reduce_scatter_sum
from .data_parallel import RankFoldedLoss, check_mesh
from .host import broadcast, check_same_structure, guard
from .mesh import Mesh
from .shard_layout import ShardLayout, layout_of

__all__ = [
    "ShardLayout",
    "ShardedParams",
    "is_sharded",
    "sharded_nodes",
    "map_sharded",
    "fully_sharded",
    "FullyShardedStep",
    "gather_in_step",
    "shard_state",
    "cut_state",
    "unshard_state",
    "unshard_tree",
    "gather_params",
    "shard_bytes",
]


@tree.pytree_dataclass
class ShardedParams:
    """This rank's flat shard of a params pytree (a pytree node: ``shard`` is its one leaf;
    ``layout`` is static structure, so optimizers, ``lf.tree.map`` and checkpoints treat a
    sharded state like any other).

    It stays in this module: checkpoint files name its type by module path
    (``lightfn.distributed.fully_sharded.ShardedParams``)."""

    shard: torch.Tensor
    layout: ShardLayout = tree.static_field()


def is_sharded(x: Any) -> bool:
    """True for a :class:`ShardedParams` node (the ``is_leaf`` of every walk over them)."""
    return isinstance(x, ShardedParams)


def sharded_nodes(tree_: Any) -> list[tuple[str, ShardedParams]]:
    """``[(keystr path, node), ...]`` of every :class:`ShardedParams` in ``tree_``, in
    flatten order."""
    return [(tree.keystr(p), x) for p, x in tree.leaves_with_path(tree_, is_leaf=is_sharded) if is_sharded(x)]


def map_sharded(
    fn: Callable[..., Any], tree_: Any, *rest: Any, otherwise: Callable[..., Any] | None = None, with_path: bool = False
) -> Any:
    """``tree_`` with every :class:`ShardedParams` ``x`` replaced by ``fn(x, *rest_leaves)``
    (``fn(keystr path, x, ...)`` with ``with_path``); every other leaf by
    ``otherwise(leaf, *rest_leaves)``, by default kept as it is. ``rest`` are trees of
    ``tree_``'s structure down to its sharded nodes (a full subtree may stand where
    ``tree_`` has a ShardedParams)."""

    def one(path: Any, x: Any, *others: Any) -> Any:
        if is_sharded(x):
            return fn(tree.keystr(path), x, *others) if with_path else fn(x, *others)
        return x if otherwise is None else otherwise(x, *others)

    return tree.map_with_path(one, tree_, *rest, is_leaf=is_sharded)


def _like_params(layout: ShardLayout) -> Callable[[Any], bool]:
    """is_leaf: a subtree with the params' structure and shapes (params, Adam moments...)."""

    def check(x: Any) -> bool:
        if isinstance(x, ShardedParams):
            return True
        if tree.structure(x) != layout.treedef:
            return False
        lvs = tree.leaves(x)
        return all(isinstance(v, torch.Tensor) and tuple(v.shape) == s for v, s in zip(lvs, layout.shapes))

    return check


def shard_state(state: TrainState, mesh: Mesh) -> TrainState:
    """The sharded form of a (replicated) ``state`` for :func:`fully_sharded` on ``mesh``.

    Checks that all ranks built the same params tree (naming the first differing path),
    takes rank 0's values, and replaces ``params`` and every subtree of ``opt_state`` /
    ``extra`` shaped like the params (Adam's moments, an EMA) with this rank's slice.
    Works on a single-process mesh too (one shard holding everything).
    """
    if not isinstance(state, TrainState):
        raise DistributedError(f"shard_state takes a TrainState, got {type(state).__name__}")
    if isinstance(state.params, ShardedParams):
        raise DistributedError("this state is already sharded")
    if mesh.distributed:
        check_same_structure(state, mesh, what="state")
        state = broadcast(state, mesh, src=0)
    return cut_state(state, mesh.rank, mesh.world_size)


def cut_state(state: TrainState, rank: int, world_size: int) -> TrainState:
    """Rank ``rank`` of ``world_size``'s sharded form of ``state``, without any collective:
    what :func:`shard_state` gives on that rank once all ranks agree on the state (also
    how tests build every rank's part in one process)."""
    layout = layout_of(state.params, world_size)

    def cut(x: Any) -> Any:
        if not _like_params(layout)(x):
            return x
        return ShardedParams(shard=layout.cut(layout.flatten([v.to(layout.dtype) for v in tree.leaves(x)]), rank), layout=layout)

    is_leaf = _like_params(layout)
    return state.replace(
        params=cut(state.params),
        opt_state=tree.map(cut, state.opt_state, is_leaf=is_leaf),
        extra=tree.map(cut, state.extra, is_leaf=is_leaf),
    )


def _gather_flat(sp: ShardedParams, mesh: Mesh) -> torch.Tensor:
    """The full flat vector of a ShardedParams, on every rank (host-side collective)."""
    if not mesh.distributed:
        return sp.shard
    if sp.layout.world_size != mesh.world_size:
        raise DistributedError(f"this state was sharded for {sp.layout.world_size} ranks, the mesh has {mesh.world_size}")
    mine = sp.shard.detach().to(mesh.device).contiguous()
    parts = [torch.empty_like(mine) for _ in range(mesh.world_size)]
    with guard(mesh, "gathering shards"):
        # list all_gather: all_gather_into_tensor is deprecated in torch 2.14 and its
        # replacement does not exist in 2.11.
        dist.all_gather(parts, mine, group=mesh.group)
    return torch.cat(parts).to(sp.shard.device)


def unshard_state(state: TrainState, mesh: Mesh) -> TrainState:
    """The replicated state again: every :class:`ShardedParams` gathered into its full pytree
    (a collective: call it on every rank). For inference, export, or an ordinary checkpoint."""
    return state.replace(
        params=unshard_tree(state.params, mesh),
        opt_state=unshard_tree(state.opt_state, mesh),
        extra=unshard_tree(state.extra, mesh),
    )


def unshard_tree(tree_: Any, mesh: Mesh) -> Any:
    """Any pytree with every :class:`ShardedParams` in it gathered into its full params
    pytree (a collective: call it on every rank). :func:`unshard_state` for a TrainState;
    this for a larger tree holding one (e.g. a fit checkpoint's contents)."""
    return map_sharded(lambda x: _unflatten_copy(x, mesh), tree_)


def _unflatten_copy(sp: ShardedParams, mesh: Mesh) -> Any:
    # Separate tensors per leaf (views of one flat buffer would save as one storage).
    return tree.map(lambda v: v.clone(), sp.layout.unflatten(_gather_flat(sp, mesh)))


def gather_params(state: TrainState, mesh: Mesh) -> Any:
    """The full params pytree of a sharded state, on every rank (a collective)."""
    if not isinstance(state.params, ShardedParams):
        return state.params
    return _unflatten_copy(state.params, mesh)


def shard_bytes(state: TrainState) -> dict[str, int]:
    """Bytes this rank holds for params and for optimizer state (for memory reports)."""

    def nbytes(t: Any) -> int:
        return sum(x.numel() * x.element_size() for x in tree.leaves(t) if isinstance(x, torch.Tensor))

    return {"params": nbytes(state.params), "opt_state": nbytes(state.opt_state)}


@tree.pytree_dataclass
class _Gathered:
    """The full params inside a fully sharded step: transient, never part of a returned state.

    Holds the leaves as a tuple (in flatten order), not the params tree: under dynamo,
    ``lf.tree.map`` over a registered node that contains a dict fails when the function
    returns None (as the optimizers' structure check does). Differentiating with respect
    to it gives full-size gradients; ``layout`` tells the sharded optimizer how to cut them.
    """

    leaves: tuple[torch.Tensor, ...]
    layout: ShardLayout = tree.static_field()


@dataclasses.dataclass(frozen=True)
class _OnGathered:
    """The user's loss, called on the params pytree rebuilt from :class:`_Gathered`."""

    loss_fn: Callable[..., Any]

    def __call__(self, params: _Gathered, *rest: Any, **kwargs: Any) -> Any:
        return self.loss_fn(params.layout.build(params.leaves), *rest, **kwargs)


def _sharded_optimizer(
    inner: GradientTransformation, rank: int, world_size: int, group_name: str | None, then: Callable[[Any], Any] | None
) -> GradientTransformation:
    """``inner`` run on this rank's shard: full local grads are reduce-scattered (summed),
    averaged, optionally transformed by ``then``, and applied to the shard's state. The
    updates come back full size (zero outside the shard) so ``apply_updates`` sees the
    params' structure; the step keeps only its own slice of the result."""

    def init(params: Any) -> Any:
        return inner.init(params)

    def update(grads: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        layout: ShardLayout = grads.layout
        lo, hi = layout.bounds(rank)
        flat = layout.flatten(grads.leaves)
        if world_size > 1:
            flat = reduce_scatter_sum(flat, world_size, group_name) / world_size
        g = ShardedParams(shard=flat, layout=layout)
        if then is not None:
            g = then(g)
        p = ShardedParams(shard=layout.slice(params.leaves, lo, hi), layout=layout)
        updates, state = inner.update(g, state, p)
        full = torch.nn.functional.pad(updates.shard, (lo, layout.padded - hi))
        return _Gathered(leaves=layout.split(full), layout=layout), state

    return GradientTransformation(init, update)


def gather_in_step(params: Any, world_size: int, group_name: str | None, what: str) -> torch.Tensor:
    """The full padded flat vector of a state's sharded ``params``, all-gathered inside a
    traced step (the fully sharded train ``what="step"`` and eval ``"eval step"``); refuses
    an unsharded tree or a state sharded for another world size."""
    if not isinstance(params, ShardedParams):
        raise DistributedError(
            f"a fully_sharded {what} got params of type {type(params).__name__}, not a sharded state: call "
            "state = lf.distributed.shard_state(state, mesh) before the first step"
        )
    if params.layout.world_size != world_size:
        raise DistributedError(
            f"this state was sharded for {params.layout.world_size} ranks but the {what} runs on {world_size}; "
            "reshard it with lf.distributed.load_sharded (or shard_state(unshard_state(...)))"
        )
    return all_gather_flat(params.shard, world_size, group_name) if world_size > 1 else params.shard


@dataclasses.dataclass(frozen=True, kw_only=True)
class FullyShardedStep:
    """A ZeRO-3 train step ``(sharded_state, batch) -> (sharded_state, metrics)``.

    ``step`` is the user's ``lf.train_step`` with its loss called on the gathered params and
    its optimizer run on the shard; it does differentiation, precision, RNG and metrics
    exactly as for one process. Compile it whole with ``lf.jit``.
    """

    step: TrainStep
    rank: int
    world_size: int
    group_name: str | None

    def replace(self, **changes: Any) -> "FullyShardedStep":
        return dataclasses.replace(self, **changes)

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        full = gather_in_step(state.params, self.world_size, self.group_name, "step")
        layout = state.params.layout
        gathered = _Gathered(leaves=layout.split(full), layout=layout)
        new_state, metrics = self.step(state.replace(params=gathered), batch)
        shard = layout.slice(new_state.params.leaves, *layout.bounds(self.rank))
        return new_state.replace(params=ShardedParams(shard=shard, layout=layout)), metrics


def fully_sharded(step: TrainStep, mesh: Mesh, *, fold_rank_into_rng: bool = True) -> FullyShardedStep:
    """The ZeRO-3 version of ``step``: it takes and returns states made by :func:`shard_state`.

    Numerically it is full-batch training: each rank's loss is the mean over its batch
    shard and the sharded gradients are averaged over ranks. ``fold_rank_into_rng`` gives
    each rank its own dropout masks, as in :func:`data_parallel`. A ``grad_transform`` the
    step already has runs on the averaged gradient *shard* (so it must be elementwise).
    For ``*-true`` precisions call ``step.prepare_state`` before :func:`shard_state`.
    """
    check_mesh(mesh, "fully_sharded")
    if isinstance(step, FullyShardedStep):
        raise DistributedError("this step is already fully sharded: wrap the original lf.train_step once")
    if not isinstance(step, TrainStep):
        raise DistributedError(f"fully_sharded rewrites an lf.train_step, got {type(step).__name__}")
    if step.precision == "16-mixed":
        raise DistributedError(
            'fully_sharded does not support precision="16-mixed" (ranks would skip steps independently); '
            'use "bf16-mixed", or data_parallel'
        )
    loss_fn: Callable[..., Any] = step.loss_fn
    if fold_rank_into_rng and mesh.world_size > 1:
        loss_fn = RankFoldedLoss(loss_fn, mesh.rank)
    inner = step.replace(
        loss_fn=_OnGathered(loss_fn),
        optimizer=_sharded_optimizer(step.optimizer, mesh.rank, mesh.world_size, mesh.group_name, step.grad_transform),
        grad_transform=None,
    )
    return FullyShardedStep(step=inner, rank=mesh.rank, world_size=mesh.world_size, group_name=mesh.group_name)
