"""per_sample_grad: one gradient per row of a batch, in one vectorized call.

``lf.per_sample_grad(loss_fn)(params, batch)`` returns the gradients of ``loss_fn`` with
respect to ``params``, computed separately for each row of ``batch`` as if it were a batch
of one, stacked on a new leading axis: every leaf of the result has shape
``(rows, *param.shape)``. It is ``torch.func.vmap`` over ``torch.func.grad``, so the rows
are computed together (one batched forward and backward), not in a Python loop. Per-sample
gradients are what differentially private training clips (:mod:`lightfn.privacy`), and
what gradient-similarity and influence methods read.

``batch`` is a pytree whose tensor leaves all share a leading row dimension; each row is
handed to ``loss_fn`` with that dimension kept (size 1), so a loss written for batches
(``.mean()`` over rows, ``x.view(x.shape[0], -1)``) works unchanged. Non-tensor leaves are
passed to every row as they are. A :class:`lightfn.data.MaskedBatch` (Poisson-sampled
batches) is unwrapped: ``loss_fn`` sees its ``data``, and the rows its ``mask`` marks
False get an all-zero gradient.

>>> import torch, lightfn as lf
>>> def loss_fn(p, batch):
...     x, y = batch
...     return ((x @ p["w"] - y) ** 2).mean()
>>> x, y = torch.randn(5, 3), torch.randn(5)
>>> g = lf.per_sample_grad(loss_fn)({"w": torch.zeros(3)}, (x, y))
>>> tuple(g["w"].shape)
(5, 3)

Randomness: give the function a key (``fn(params, batch, key=k)``) and row ``i`` runs
``loss_fn`` inside ``lf.random.rng_scope(fold_in(k, i))``, so each row draws its own
dropout mask (without a key, a random op inside ``loss_fn`` is refused by ``vmap``).
Models with BatchNorm mix rows by design and have no per-sample gradient; use GroupNorm
or LayerNorm.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.func

from . import random as lf_random
from . import tree
from .data import MaskedBatch
from .errors import StepError
from .transforms import value_and_grad

__all__ = ["per_sample_grad", "num_rows", "map_rows"]


def num_rows(batch: Any, *, what: str = "batch") -> int:
    """The shared leading dimension of ``batch``'s tensor leaves, checked.

    Raises :class:`StepError` naming the pytree path of a 0-d leaf or of the first leaf
    whose leading dimension differs from the first one's.
    """
    first: tuple[Any, torch.Tensor] | None = None
    for path, x in tree.leaves_with_path(batch):
        if not isinstance(x, torch.Tensor):
            continue
        if x.dim() == 0:
            raise StepError(
                f"{what}{tree.keystr(path)} is a 0-d tensor; per-sample gradients need every tensor leaf of the "
                "batch to have a leading row dimension (make it shape (rows, ...), or close over it in loss_fn)"
            )
        if first is None:
            first = (path, x)
        elif x.shape[0] != first[1].shape[0]:
            raise StepError(
                f"{what} leaves disagree on the number of rows: {what}{tree.keystr(first[0])} has "
                f"{first[1].shape[0]} (shape {tuple(first[1].shape)}) but {what}{tree.keystr(path)} has "
                f"{x.shape[0]} (shape {tuple(x.shape)}); every tensor leaf's first dimension must be the row count"
            )
    if first is None:
        raise StepError(f"{what} has no tensor leaves, so it has no rows to take per-sample gradients over")
    return first[1].shape[0]


def map_rows(
    fn: Callable[..., Any], params: Any, batch: Any, *row_args: torch.Tensor, chunk_size: int | None = None
) -> Any:
    """``fn(params, row_batch, *row_args_i)`` for every row ``i`` of ``batch``, vectorized.

    ``row_batch`` is row ``i`` of every tensor leaf with its leading dimension kept (size
    1); each of ``row_args`` is split along dim 0 the same way but without keeping it.
    ``params`` is shared by all rows. Outputs come back stacked on a leading row axis.
    The batch's shape is not checked here (see :func:`num_rows`).
    """
    leaves, treedef = tree.flatten(batch)
    is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
    tensors = [x for x, t in zip(leaves, is_tensor) if t]

    def one_row(p: Any, row_tensors: list[torch.Tensor], *args: Any) -> Any:
        it = iter(row_tensors)
        # Each row keeps a batch dimension of 1: loss functions are written for batches.
        rebuilt = [next(it).unsqueeze(0) if t else x for x, t in zip(leaves, is_tensor)]
        return fn(p, tree.unflatten(treedef, rebuilt), *args)

    in_dims = (None, [0] * len(tensors), *([0] * len(row_args)))
    return torch.func.vmap(one_row, in_dims=in_dims, chunk_size=chunk_size)(params, tensors, *row_args)


def _loss_only(out: Any) -> Any:
    if isinstance(out, tuple):
        if len(out) != 2:
            raise StepError(f"loss_fn must return a scalar loss or (loss, metrics_dict), got a tuple of {len(out)}")
        return out[0]
    return out


def per_sample_grad(loss_fn: Callable[..., Any], *, chunk_size: int | None = None) -> Callable[..., Any]:
    """``loss_fn(params, batch)`` -> ``fn(params, batch, *, key=None) -> grads`` per row.

    Args:
        loss_fn: returns a scalar loss or ``(loss, metrics)`` (metrics are ignored).
        chunk_size: compute this many rows at a time (``torch.func.vmap``'s
            ``chunk_size``): peak memory scales with it instead of the batch size, at the
            cost of a loop over chunks. ``None`` computes all rows at once.

    Returns:
        A function whose result has ``params``' structure with a leading row axis on every
        leaf: ``grads[leaf][i]`` is the gradient of ``loss_fn(params, row_i)``.
    """
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise StepError(f"chunk_size must be a positive int or None, got {chunk_size!r}")

    def row_grad(params: Any, row: Any, *key: torch.Tensor) -> Any:
        def objective(p: Any) -> torch.Tensor:
            if key:
                with lf_random.rng_scope(key[0]):
                    return _loss_only(loss_fn(p, row))
            return _loss_only(loss_fn(p, row))

        return value_and_grad(objective)(params)[1]

    def per_sample(params: Any, batch: Any, *, key: torch.Tensor | None = None) -> Any:
        data, mask = (batch.data, batch.mask) if isinstance(batch, MaskedBatch) else (batch, None)
        n = num_rows(data)
        if mask is not None and tuple(mask.shape) != (n,):
            raise StepError(f"batch.mask has shape {tuple(mask.shape)}; expected ({n},), one flag per row of batch.data")
        keys = () if key is None else (lf_random.fold_in(key, torch.arange(n, device=key.device)),)
        grads = map_rows(row_grad, params, data, *keys, chunk_size=chunk_size)
        if mask is None:
            return grads
        return tree.map(lambda g: torch.where(mask.view(-1, *([1] * (g.dim() - 1))), g, torch.zeros_like(g)), grads)

    return per_sample
