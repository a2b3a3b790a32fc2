"""A data source's batches cut to this rank's rows, for a fit over several processes.

fit shards an :class:`~lightfn.data.ArrayLoader` itself (``loader.shard``) and uses a
DataLoader with a ``DistributedSampler`` as it is; any other re-iterable of global batches
goes through :class:`RankBatches`. Which rows a rank gets is
:func:`lightfn.data.rank_span` everywhere (:func:`rank_rows`; ``shard_batch`` too).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from .. import tree
from ..data import num_batches, rank_span
from ..errors import DistributedError

__all__ = ["RankBatches", "has_distributed_sampler", "batch_rows", "rank_rows"]


def _batched(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dim() > 0


def batch_rows(batch: Any, what: str) -> int:
    """The number of rows of ``batch`` (``what``, e.g. "a batch of train_data"): the leading
    size its tensor leaves share (0-d tensors and non-tensors are not split)."""
    sizes = {(tree.keystr(p), x.shape[0]) for p, x in tree.leaves_with_path(batch) if _batched(x)}
    rows = {n for _, n in sizes}
    if not rows:
        raise DistributedError(f"{what} has no tensor with a batch dimension to split over the ranks")
    if len(rows) != 1:
        raise DistributedError(f"{what} has tensor leaves with different leading sizes: {sorted(sizes)}")
    return rows.pop()


def rank_rows(batch: Any, rows: int, rank: int, world: int) -> Any:
    """Rank ``rank`` of ``world``'s rows of a batch of ``rows`` rows: the rows
    :func:`lightfn.data.rank_span` gives it, as ``ArrayLoader.shard`` has them."""
    lo, hi = rank_span(rows, rank, world)
    return tree.map(lambda x: x.narrow(0, lo, hi - lo) if _batched(x) else x, batch)


def _split_rows(batch: Any, rank: int, world: int, what: str) -> Any:
    """This rank's rows of a global batch, split as evenly as ``ArrayLoader.shard`` does."""
    n = batch_rows(batch, f"a batch of {what}")
    if n < world:
        raise DistributedError(
            f"a batch of {what} has {n} rows, fewer than the {world} ranks, so a rank would get none; use "
            "drop_last=True or a batch size that is a multiple of the world size"
        )
    return rank_rows(batch, n, rank, world)


class RankBatches:
    """``data`` (a DataLoader or any re-iterable of global batches) cut to this rank's rows.

    Every rank loads the whole global batch and keeps its rows: the simplest exact sharding
    of an arbitrary source. The source must yield the same batches on every rank (no
    shuffle, or a generator seeded the same way on every rank); for large datasets give
    the DataLoader a ``DistributedSampler`` instead, which fit then uses as it is.
    """

    def __init__(self, data: Any, rank: int, world_size: int, what: str) -> None:
        self.data, self.rank, self.world_size, self.what = data, rank, world_size, what

    def __len__(self) -> int:
        n = num_batches(self.data)
        if n is None:
            raise TypeError(f"{type(self.data).__name__} has no len()")
        return n

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            yield _split_rows(batch, self.rank, self.world_size, self.what)


def has_distributed_sampler(data: DataLoader) -> bool:
    samplers = [data.sampler, data.batch_sampler.sampler if isinstance(data.batch_sampler, BatchSampler) else None]
    return any(isinstance(s, DistributedSampler) for s in samplers)
