"""Poisson sampling into fixed-capacity batches (the sampling DP-SGD's accountants assume).

Each row of an ``N``-row dataset joins a batch independently with probability ``q``, so a
batch's size is ``Binomial(N, q)``: a dynamic shape, which would recompile a compiled step
for every new size. Instead a batch has a fixed *capacity* and a row mask (see
:class:`lightfn.data.MaskedBatch`). The capacity is the smallest ``c`` with
``P[Binomial(N, q) > c] <= 1e-6``, so about one batch in a million overflows (for large
``q*N`` that is about ``q*N + 4.75 * sqrt(q*N*(1-q))``).
"""

from __future__ import annotations

import math

import torch

__all__ = ["poisson_capacity", "poisson_rows", "OVERFLOW_PROBABILITY"]

OVERFLOW_PROBABILITY = 1e-6


def poisson_capacity(num_samples: int, rate: float, overflow: float = OVERFLOW_PROBABILITY) -> int:
    """The smallest ``c`` with ``P[Binomial(num_samples, rate) > c] <= overflow`` (at least 1)."""
    n, q = num_samples, rate
    if q >= 1.0:
        return n
    mean, sd = n * q, math.sqrt(n * q * (1.0 - q))
    # The binomial mass beyond mean + 12 sd + 40 is far below any overflow we use.
    hi = min(n, math.ceil(mean + 12.0 * sd + 40.0))
    j = torch.arange(hi + 1, dtype=torch.float64)
    log_pmf = (
        math.lgamma(n + 1) - torch.lgamma(j + 1) - torch.lgamma(n - j + 1) + j * math.log(q) + (n - j) * math.log1p(-q)
    )
    # at_least[c] = P[X >= c], summed from the small tail end for accuracy.
    at_least = torch.flip(torch.cumsum(torch.flip(torch.exp(log_pmf), (0,)), 0), (0,))
    above = torch.cat([at_least[1:], torch.zeros(1, dtype=torch.float64)])  # above[c] = P[X > c]
    ok = torch.nonzero(above <= overflow)
    c = int(ok[0]) if len(ok) else hi
    return max(1, min(n, c))


def poisson_rows(num_samples: int, rate: float, capacity: int, generator: torch.Generator) -> tuple[torch.Tensor, int, bool]:
    """One Poisson draw: ``(indices, rows, overflowed)``.

    ``indices`` has ``capacity`` entries: the ``rows`` sampled row indices (ascending),
    then padding (row 0). When more than ``capacity`` rows were drawn, ``capacity`` of
    them are kept uniformly at random and ``overflowed`` is True.
    """
    picked = torch.nonzero(torch.rand(num_samples, generator=generator) < rate).squeeze(1)
    overflowed = picked.numel() > capacity
    if overflowed:
        keep = torch.randperm(picked.numel(), generator=generator)[:capacity]
        picked = picked[keep.sort().values]
    rows = picked.numel()
    indices = torch.zeros(capacity, dtype=torch.int64)
    indices[:rows] = picked
    return indices, rows, overflowed
