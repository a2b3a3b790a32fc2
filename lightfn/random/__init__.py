"""Explicit, splittable random keys: reproducible eager, compiled, and across resume.

A key is a small int64 tensor (two 32-bit words). Random numbers are a pure function of
(key, position): a keyed integer hash of each element's index, written in plain tensor ops.
So the same key gives the same bits eagerly, under ``torch.compile``, on any device, and
after a checkpoint round trip: nothing depends on torch's global generator.

Models written with ``nn.Dropout`` or ``torch.rand`` keep working: inside
:func:`rng_scope`, torch's random functions draw from the scope's key instead of the global
generator (a ``TorchFunctionMode``, which dynamo traces into one graph). ``lf.train_step``
opens a scope keyed by ``fold_in(state.rng, state.step)`` around the loss, so every step
draws fresh numbers that a resumed run draws again.

>>> import torch, lightfn as lf
>>> k = lf.random.key(0)
>>> a = lf.random.uniform(k, (3,))
>>> torch.equal(a, lf.random.uniform(k, (3,)))
True
>>> with lf.random.rng_scope(k):
...     y = torch.nn.functional.dropout(torch.ones(4), 0.5)
"""

from __future__ import annotations

from ._keys import bernoulli, bits, dropout, fold_in, key, normal, randint, split, uniform
from ._scope import rng_scope

__all__ = ["key", "fold_in", "split", "bits", "uniform", "normal", "bernoulli", "randint", "dropout", "rng_scope"]
