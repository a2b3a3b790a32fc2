"""Data loaders: a fast, device-resident :class:`ArrayLoader` and :func:`iterate` for any source.

:class:`ArrayLoader` is the path for data that fits in memory (MNIST, tabular data,
embeddings): the whole dataset is a pytree of tensors sharing a leading dimension, batches
are whole slices (no per-sample collate, no worker processes), and with ``device=`` the data
is moved to the accelerator once so every batch comes from device memory.

Its order is a pure function of ``(seed, epoch)``: nothing about the data order lives in the
loader's mutable state, so a run killed mid-epoch and resumed with
``loader.iter_epoch(epoch, start=k)`` sees exactly the batches it would have seen.

>>> import torch
>>> x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
>>> loader = ArrayLoader((x, y), batch_size=4, shuffle=False)
>>> [tuple(b[1].tolist()) for b in loader]
[(0, 1, 2, 3), (4, 5, 6, 7)]
>>> len(ArrayLoader({"x": x}, batch_size=4, drop_last=False))
3

With ``poisson_rate=q`` the loader samples as DP-SGD's privacy accounting assumes: every
row joins each batch independently with probability ``q`` (``round(1/q)`` batches per
epoch). Batches keep one fixed shape, a :class:`MaskedBatch` whose mask marks the rows
drawn, so a compiled step never sees a new size:

>>> pl = ArrayLoader((x, y), poisson_rate=0.3, seed=0)
>>> b = next(iter(pl))
>>> type(b).__name__, tuple(b.mask.shape) == (pl.batch_size,), len(pl)
('MaskedBatch', True, 3)

:func:`iterate` is the one way the training loop walks any data source (an ArrayLoader, a
``torch.utils.data.DataLoader``, or a list of batches), so user loops and ``lf.fit`` resume
the same way.
"""

from __future__ import annotations

from .._poisson import poisson_capacity
from ..errors import DataError
from ._array_loader import ArrayLoader, MaskedBatch, rank_span
from ._iterate import iterate, num_batches

__all__ = ["DataError", "ArrayLoader", "MaskedBatch", "poisson_capacity", "iterate", "num_batches", "rank_span"]
