"""``lf.fit`` and its evaluation passes, ``lf.validate`` / ``lf.test``.

The package holds one run of training, top to bottom:

- ``_fit.py``: :func:`fit` itself: its arguments turned into a :class:`~lightfn.fit._loop.Loop`;
- ``_loop.py``: the loop (epochs, steps, validation, logging, stopping) on two screens;
- ``_run.py``: the typed :class:`~lightfn.fit._run.Run`, everything the loop carries between
  steps, which is exactly what a fit checkpoint holds (``save_run`` / ``load_run``);
- ``_plan.py``: the counting flags (limits, intervals) resolved once into a ``Plan``;
- ``_steps.py``: what fit makes of its step arguments, classified once;
- ``_accumulate.py`` / ``_checks.py``: the step fused with on-device metric sums, and the
  checks on a step's first outputs;
- ``_hooks.py``: calling callbacks and applying the signals they return;
- ``_processes.py``: the multi-process policy (``strategy="ddp"|"fsdp"``) on the primitives
  of :mod:`lightfn.distributed`;
- ``_evaluate.py``: ``lf.validate`` / ``lf.test``, the very pass fit validates with.

Everything fit does is reachable without it: ``lf.jit``, ``lf.data.iterate``, callbacks'
signals and ``lf.save`` are the public pieces it composes.
"""

from __future__ import annotations

from ..errors import FitError, Preempted
from ._evaluate import test, validate
from ._fit import fit

__all__ = ["fit", "validate", "test", "Preempted", "FitError"]
