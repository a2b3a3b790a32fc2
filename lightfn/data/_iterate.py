"""Walking any data source: :func:`iterate` (one epoch's batches from any position) and
:func:`num_batches`, the one way ``lf.fit`` and user loops read an ``ArrayLoader``, a
``DataLoader`` or a list of batches, so both resume the same way."""

from __future__ import annotations

import collections.abc
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from ..errors import DataError
from ._array_loader import ArrayLoader, check_int

__all__ = ["iterate", "num_batches"]


def num_batches(data: Any) -> int | None:
    """Batches per epoch of ``data`` when it knows (``len(data)``), else ``None``."""
    if isinstance(data, collections.abc.Sized):
        try:
            return len(data)
        except TypeError:  # a DataLoader over an IterableDataset has no length
            return None
    return None


def iterate(data: Any, epoch: int = 0, start: int = 0) -> Iterator[Any]:
    """The batches of ``epoch`` of any data source, beginning at batch index ``start``.

    - :class:`ArrayLoader`: ``data.iter_epoch(epoch, start)``. Resume is exact: the order
      is a pure function of ``(seed, epoch)`` and nothing before ``start`` is touched.
    - ``torch.utils.data.DataLoader``: if its sampler (or its batch sampler's sampler) is a
      ``DistributedSampler``, ``set_epoch(epoch)`` is called first; then ``start`` batches
      are drawn and discarded (they are loaded, which costs time). Resume is exact only when
      the loader's order is deterministic per epoch (no shuffle, a ``DistributedSampler``,
      or a generator you re-seed per epoch); a loader shuffled by an unseeded generator
      skips ``start`` batches of a *new* order, so the batches seen before are not the ones
      skipped.
    - Any other re-iterable of batches (a list, a tuple, an object whose ``__iter__`` starts
      over): iterated from the beginning with ``start`` batches skipped; exact when it
      yields the same batches every time. A one-shot iterator (a generator) is consumed by
      the first epoch and yields nothing afterwards.
    """
    check_int("epoch", epoch, minimum=0)
    check_int("start", start, minimum=0)
    if isinstance(data, ArrayLoader):
        return data.iter_epoch(epoch, start)
    if isinstance(data, DataLoader):
        samplers = [data.sampler]
        if isinstance(data.batch_sampler, BatchSampler):
            samplers.append(data.batch_sampler.sampler)
        for sampler in samplers:
            if isinstance(sampler, DistributedSampler):
                sampler.set_epoch(epoch)
    if not isinstance(data, Iterable):
        raise DataError(
            f"cannot iterate over {type(data).__name__}: pass an lf.data.ArrayLoader, a "
            "torch.utils.data.DataLoader or any iterable of batches"
        )
    return itertools.islice(iter(data), start, None)
