"""The :class:`ArrayLoader`: batches as slices of in-memory tensors, in an order that is a
pure function of ``(seed, epoch)`` (see :mod:`lightfn.data`).

One concept, and more than ~300 lines because it is one: its validation, the chunked
shuffled gather (see ``_CHUNK_BYTES``), Poisson sampling with fixed-shape masked batches,
and per-rank sharding all serve the same resumable order and share its state.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch

from .. import tree as _tree
from .._diagnostics import not_a_tensor
from .._poisson import OVERFLOW_PROBABILITY, poisson_capacity, poisson_rows
from ..errors import DataError

__all__ = ["ArrayLoader", "MaskedBatch", "rank_span", "check_int"]

# A shuffled epoch gathers rows in chunks of about this many bytes and yields batches as
# views into each chunk: one index_select per leaf per chunk amortizes the per-call cost,
# while a whole-epoch gather (a second copy of the dataset) was slower on CPU (page faults
# on the fresh allocation) and doubles peak memory on an accelerator.
_CHUNK_BYTES = 2 << 20

# Mixes (seed, epoch) into one 64-bit generator seed (splitmix64 constants), so nearby
# seeds and epochs give unrelated permutations.
_MASK64 = (1 << 64) - 1


@_tree.pytree_dataclass
class MaskedBatch:
    """A fixed-capacity batch whose rows are real only where ``mask`` is True.

    ``data`` has the structure of the loader's data (every tensor leaf has ``capacity``
    rows); ``mask`` is a bool tensor of shape ``(capacity,)`` on the data's device. Rows
    where it is False are padding: their values are real rows of the dataset (so a loss
    stays finite on them) but they must not count. :func:`lightfn.privacy.dp_train_step`
    and :func:`lightfn.per_sample_grad` honour the mask (such rows get zero gradient); a
    hand-written loss reads ``batch.data`` and weights rows by ``batch.mask``. A pytree, so
    it passes through ``lf.jit`` and ``lf.fit`` like any batch, and its shape never changes.
    """

    data: Any
    mask: torch.Tensor


def _mix_seed(seed: int, epoch: int) -> int:
    z = (seed * 0x9E3779B97F4A7C15 + (epoch + 1) * 0xD1B54A32D192ED03) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & ((1 << 63) - 1)


def check_int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DataError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise DataError(f"{name} must be >= {minimum}, got {value}")
    return value


def rank_span(rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank ``rank``'s ``[lo, hi)`` rows of a global batch of ``rows`` rows split over
    ``world_size`` ranks: as evenly as possible (the first ``rows % world_size`` ranks get
    one row more), which for a divisible batch is exactly ``[r*b/w, (r+1)*b/w)``."""
    q, rem = divmod(rows, world_size)
    lo = rank * q + min(rank, rem)
    return lo, lo + q + (1 if rank < rem else 0)


class ArrayLoader:
    """Batches of a pytree of tensors that share their leading dimension ``N``.

    Args:
        data: a tensor, or a pytree (dict, tuple, list, NamedTuple...) of tensors whose
            first dimensions are all ``N``. Batches have the same structure.
        batch_size: rows per batch (the global batch size, also after :meth:`shard`).
        shuffle: visit rows in a permutation that depends only on ``(seed, epoch)``;
            otherwise in storage order.
        drop_last: drop the last batch when ``N`` is not a multiple of ``batch_size``
            (every batch then has the same shape, so a compiled step never recompiles).
        seed: the shuffle seed.
        device: move the data there once, now; batches then come from device memory
            without a host-to-device copy per step.
        poisson_rate: ``q`` in (0, 1]: Poisson sampling instead of a partition of the
            data. Each of the ``round(1/q)`` batches of an epoch includes every row
            independently with probability ``q``, drawn from a generator seeded by
            ``(seed, epoch, batch index)`` (so resuming mid-epoch is exact). A batch is a
            :class:`MaskedBatch` ``(data, mask)``: ``data`` has the data's structure with
            ``batch_size`` rows, the drawn rows first (in storage order) then padding
            (copies of row 0), and ``mask[i]`` says whether row ``i`` was drawn.
            ``batch_size`` is then the capacity, by default :func:`poisson_capacity`
            ``(N, q)`` (overflow probability 1e-6 per batch); when a draw exceeds it,
            ``batch_size`` of the drawn rows are kept at random and a warning is issued
            (once per loader). ``shuffle`` and ``drop_last`` do not apply, and
            :attr:`expected_batch_size` is ``q * N`` (the divisor DP-SGD wants).
            ``None`` (default): plain batches of ``batch_size`` rows as above.

    Batches are views of (or slices gathered from) the loader's storage: treat them as
    read-only. Iterate one epoch with :meth:`iter_epoch` (``start`` resumes mid-epoch), or
    with ``set_epoch(e)`` and ``iter(loader)`` like a ``DistributedSampler``.
    """

    def __init__(
        self,
        data: Any,
        batch_size: int | None = None,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        device: torch.device | str | None = None,
        poisson_rate: float | None = None,
    ) -> None:
        leaves_with_path = _tree.leaves_with_path(data)
        if not leaves_with_path:
            raise DataError(f"ArrayLoader got no tensors: data is {type(data).__name__} {data!r:.80}")
        for path, leaf in leaves_with_path:
            if not isinstance(leaf, torch.Tensor):
                raise DataError(not_a_tensor(
                    f"ArrayLoader data leaf {_tree.keystr(path)}", leaf, "convert it first (e.g. torch.as_tensor(array))"
                ))
            if leaf.dim() == 0:
                raise DataError(
                    f"ArrayLoader data leaf {_tree.keystr(path)} is a 0-d tensor; every leaf needs a leading "
                    "(sample) dimension"
                )
        first_path, first = leaves_with_path[0]
        n = first.shape[0]
        for path, leaf in leaves_with_path[1:]:
            if leaf.shape[0] != n:
                raise DataError(
                    f"ArrayLoader data leaves disagree on the number of samples: {_tree.keystr(first_path)} has "
                    f"{n} (shape {tuple(first.shape)}) but {_tree.keystr(path)} has {leaf.shape[0]} "
                    f"(shape {tuple(leaf.shape)}); every leaf's first dimension must be the sample count"
                )
        if n == 0:
            raise DataError(f"ArrayLoader got an empty dataset: {_tree.keystr(first_path)} has 0 samples")
        if poisson_rate is not None:
            if isinstance(poisson_rate, bool) or not isinstance(poisson_rate, (int, float)) or not 0 < poisson_rate <= 1:
                raise DataError(f"poisson_rate must be a probability in (0, 1], got {poisson_rate!r}")
            poisson_rate = float(poisson_rate)
            if batch_size is None:
                batch_size = poisson_capacity(n, poisson_rate)
            drop_last = False  # every Poisson batch has the capacity's shape: nothing to drop
        elif batch_size is None:
            raise DataError("ArrayLoader needs a batch_size (or poisson_rate=q for Poisson-sampled batches)")
        check_int("batch_size", batch_size, minimum=1)
        check_int("seed", seed, minimum=-(1 << 63))
        if drop_last and batch_size > n:
            raise DataError(
                f"batch_size={batch_size} is larger than the dataset ({n} samples), so drop_last=True leaves "
                f"zero batches; use a batch_size <= {n} or drop_last=False"
            )
        leaves, self._treedef = _tree.flatten(data)
        if device is not None:
            device = torch.device(device)
            # Copy once here, blocking: the data then stays resident on the device.
            leaves = [x.to(device) for x in leaves]
        self._leaves: list[torch.Tensor] = leaves
        self._is_single_tensor = isinstance(data, torch.Tensor)
        self._n = n
        self._batch_size = batch_size
        self._shuffle = bool(shuffle)
        self._drop_last = bool(drop_last)
        self._seed = seed
        self._rank = 0
        self._world_size = 1
        self._epoch = 0
        self._poisson_rate = poisson_rate
        self._overflow_warned = False
        row_bytes = sum(x[:1].numel() * x.element_size() for x in leaves)
        self._chunk_batches = max(1, _CHUNK_BYTES // max(1, row_bytes * batch_size))

    # ------------------------------------------------------------------ properties

    @property
    def num_samples(self) -> int:
        """``N``: the number of samples in the whole (unsharded) dataset."""
        return self._n

    @property
    def batch_size(self) -> int:
        """The global batch size (each of ``world_size`` shards gets ``batch_size // world_size`` rows)."""
        return self._batch_size

    @property
    def poisson_rate(self) -> float | None:
        """``q`` of Poisson sampling, or ``None`` for plain batches."""
        return self._poisson_rate

    @property
    def expected_batch_size(self) -> float:
        """Rows a batch holds on average: ``q * N`` with Poisson sampling, else ``batch_size``."""
        return self._poisson_rate * self._n if self._poisson_rate is not None else float(self._batch_size)

    @property
    def shuffle(self) -> bool:
        return self._shuffle

    @property
    def drop_last(self) -> bool:
        return self._drop_last

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def rank(self) -> int:
        """This shard's index (0 when not sharded)."""
        return self._rank

    @property
    def world_size(self) -> int:
        """The number of shards (1 when not sharded)."""
        return self._world_size

    @property
    def device(self) -> torch.device:
        """Where the data (and so every batch) lives."""
        return self._leaves[0].device

    def __len__(self) -> int:
        """Batches per epoch (the same on every shard); ``round(1/q)`` with Poisson sampling."""
        if self._poisson_rate is not None:
            return max(1, round(1.0 / self._poisson_rate))
        full, rest = divmod(self._n, self._batch_size)
        return full + (1 if rest and not self._drop_last else 0)

    def __repr__(self) -> str:
        shard = f", rank={self._rank}, world_size={self._world_size}" if self._world_size > 1 else ""
        if self._poisson_rate is not None:
            return (
                f"ArrayLoader(num_samples={self._n}, poisson_rate={self._poisson_rate}, batch_size={self._batch_size}, "
                f"seed={self._seed}, device={self.device})"
            )
        return (
            f"ArrayLoader(num_samples={self._n}, batch_size={self._batch_size}, shuffle={self._shuffle}, "
            f"drop_last={self._drop_last}, seed={self._seed}, device={self.device}{shard})"
        )

    # ------------------------------------------------------------------ order

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of ``epoch``: a CPU int64 permutation of ``range(N)``.

        A pure function of ``(seed, epoch)`` (``arange(N)`` when not shuffling): the same on
        every rank and after any restart.
        """
        check_int("epoch", epoch, minimum=0)
        if self._poisson_rate is not None:
            raise DataError("a Poisson-sampling loader has no epoch order: each batch is drawn independently")
        if not self._shuffle:
            return torch.arange(self._n)
        gen = torch.Generator(device="cpu").manual_seed(_mix_seed(self._seed, epoch))
        return torch.randperm(self._n, generator=gen)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch that ``iter(loader)`` walks (for hand-written loops)."""
        self._epoch = check_int("epoch", epoch, minimum=0)

    def __iter__(self) -> Iterator[Any]:
        return self.iter_epoch(self._epoch)

    def iter_epoch(self, epoch: int, start: int = 0) -> Iterator[Any]:
        """The batches of ``epoch``, beginning at batch index ``start`` (exact resume).

        ``list(loader.iter_epoch(e, start=k)) == list(loader.iter_epoch(e))[k:]``.
        """
        check_int("epoch", epoch, minimum=0)
        check_int("start", start, minimum=0)
        if start > len(self):
            raise DataError(f"start={start} is past the end of the epoch ({len(self)} batches)")
        return self._batches(epoch, start)

    def _local_span(self, global_rows: int) -> tuple[int, int]:
        """This rank's ``[lo, hi)`` rows of a global batch with ``global_rows`` rows."""
        return rank_span(global_rows, self._rank, self._world_size)

    def _poisson_batches(self, epoch: int, start: int) -> Iterator[MaskedBatch]:
        epoch_seed = _mix_seed(self._seed, epoch)
        rate, cap = self._poisson_rate, self._batch_size
        assert rate is not None
        for b in range(start, len(self)):
            gen = torch.Generator(device="cpu").manual_seed(_mix_seed(epoch_seed, b))
            idx, rows, overflowed = poisson_rows(self._n, rate, cap, gen)
            if overflowed and not self._overflow_warned:
                self._overflow_warned = True
                warnings.warn(
                    f"ArrayLoader(poisson_rate={rate}): a batch drew more than its capacity batch_size={cap} rows "
                    f"(epoch {epoch}, batch {b}); kept {cap} of them at random. This happens with probability "
                    f"{OVERFLOW_PROBABILITY:g} per batch at the default capacity; a larger batch_size makes it rarer. "
                    "(Warned once per loader.)",
                    stacklevel=3,
                )
            mask = torch.arange(cap) < rows
            leaves = [x.index_select(0, idx.to(x.device)) for x in self._leaves]
            yield MaskedBatch(data=self._build(leaves), mask=mask.to(self._leaves[0].device))

    def _batches(self, epoch: int, start: int) -> Iterator[Any]:
        if self._poisson_rate is not None:
            yield from self._poisson_batches(epoch, start)
            return
        n_batches = len(self)
        b = self._batch_size
        # (offset into the epoch order, rows) of this rank's part of each remaining batch
        spans = []
        for g in range(start, n_batches):
            lo, hi = self._local_span(min(b, self._n - g * b))
            spans.append((g * b + lo, hi - lo))
        if not spans:
            return
        if not self._shuffle:
            # Storage order: every batch is a plain view, no copy at all.
            for off, rows in spans:
                yield self._build([x.narrow(0, off, rows) for x in self._leaves])
            return
        order = self.order(epoch)
        if self._world_size == 1:
            idx = order[spans[0][0] :]
        else:
            # This rank's columns of every full global batch, then its part of a ragged one.
            full = self._n // b
            lo, hi = self._local_span(b)
            parts = [order[: full * b].view(full, b)[start:, lo:hi].reshape(-1)] if start < full else []
            if n_batches > full:
                off, rows = spans[-1]
                parts.append(order[off : off + rows])
            idx = torch.cat(parts)
        on_device = {x.device: idx.to(x.device) for x in self._leaves}
        pos = 0
        for c in range(0, len(spans), self._chunk_batches):
            chunk = spans[c : c + self._chunk_batches]
            total = sum(rows for _, rows in chunk)
            gathered = [x.index_select(0, on_device[x.device][pos : pos + total]) for x in self._leaves]
            pos += total
            at = 0
            for _, rows in chunk:
                yield self._build([x[at : at + rows] for x in gathered])
                at += rows

    def _build(self, leaves: list[torch.Tensor]) -> Any:
        if self._is_single_tensor:
            return leaves[0]
        return _tree.unflatten(self._treedef, leaves)

    # ------------------------------------------------------------------ sharding

    def shard(self, rank: int, world_size: int) -> ArrayLoader:
        """This rank's view of the loader for data-parallel training.

        Every rank walks the same global order; ``batch_size`` stays the global batch size
        and rank ``r`` gets rows ``[r*b/w, (r+1)*b/w)`` of each global batch, so the ranks'
        batches concatenated in rank order are exactly the unsharded loader's batches, and
        every sample is seen once per epoch across ranks. With ``drop_last=False`` the last,
        ragged global batch of ``m`` rows is split as evenly as possible (the first
        ``m % world_size`` ranks get one row more; a rank may get 0 rows when
        ``m < world_size``), so all ranks still run the same number of steps.
        The data is shared with this loader, not copied.
        """
        check_int("world_size", world_size, minimum=1)
        check_int("rank", rank, minimum=0)
        if rank >= world_size:
            raise DataError(f"rank={rank} must be < world_size={world_size}")
        if self._poisson_rate is not None:
            raise DataError("sharding a Poisson-sampling loader is not supported yet: use one process for DP-SGD")
        if self._world_size != 1:
            raise DataError(f"this loader is already a shard (rank {self._rank} of {self._world_size}); shard the original")
        if self._batch_size % world_size:
            raise DataError(
                f"the global batch_size={self._batch_size} is not divisible by world_size={world_size}; "
                f"use a multiple of {world_size} so every rank gets the same number of rows"
            )
        out = copy.copy(self)
        out._rank, out._world_size = rank, world_size
        return out
