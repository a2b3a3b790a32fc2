"""Learning-rate schedules: pure functions of the step count.

A schedule maps the number of updates made so far to a value. Given a tensor count (what
optimizers pass) it returns a 0-d float64 tensor on the count's device, computed with
tensor ops only (no ``.item()``, no Python ``if`` on values), so it traces into a
``torch.compile`` graph. Given a Python int it returns a float, for plotting and tests.

>>> from lightfn.optim import warmup_cosine_decay_schedule
>>> lr = warmup_cosine_decay_schedule(0.0, 1e-3, warmup_steps=100, decay_steps=1000)
>>> round(lr(50), 6), round(lr(100), 6), lr(1000)
(0.0005, 0.001, 0.0)

Pass one wherever a learning rate goes: ``lf.optim.adamw(lr)``. ``torch.optim.lr_scheduler``
classes are not schedules (they step a torch optimizer): :func:`onecycle` and
:func:`linear_warmup_cosine_decay` give their numbers as functions, and any
``lambda step: ...`` is a schedule too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Union

import torch

from ..errors import OptimizerConfigError
from ._checks import scalar_dtype

__all__ = [
    "Schedule",
    "constant_schedule",
    "polynomial_schedule",
    "linear_schedule",
    "cosine_decay_schedule",
    "cosine_decay",
    "exponential_decay",
    "piecewise_constant_schedule",
    "join_schedules",
    "warmup_cosine_decay_schedule",
    "linear_warmup_cosine_decay",
    "onecycle",
]

Count = Union[int, torch.Tensor]
Schedule = Callable[[Count], Union[float, torch.Tensor]]


def _schedule(fn: Callable[[torch.Tensor], torch.Tensor]) -> Schedule:
    """Lift ``fn`` (float tensor count -> tensor value) to accept ints and int tensors."""

    def schedule(count: Count) -> float | torch.Tensor:
        if isinstance(count, torch.Tensor):
            return fn(count.to(scalar_dtype(count.device)))
        # A Python count: nothing is traced, so reading the value back is free of syncs.
        return float(fn(torch.tensor(float(count), dtype=torch.float64)))

    return schedule


def constant_schedule(value: float) -> Schedule:
    """Always ``value``."""
    return _schedule(lambda c: torch.full_like(c, value))


def polynomial_schedule(
    init_value: float, end_value: float, power: float, transition_steps: int, transition_begin: int = 0
) -> Schedule:
    """From ``init_value`` to ``end_value`` over ``transition_steps`` steps starting at
    ``transition_begin``, along ``(init - end) * (1 - t)**power + end``; constant outside."""
    if transition_steps <= 0:
        return constant_schedule(init_value)
    if transition_begin < 0:
        raise OptimizerConfigError(f"polynomial_schedule: transition_begin must be >= 0, got {transition_begin}")

    def fn(c: torch.Tensor) -> torch.Tensor:
        done = torch.clamp(c - transition_begin, 0, transition_steps)
        frac = 1.0 - done / transition_steps
        return (init_value - end_value) * frac**power + end_value

    return _schedule(fn)


def linear_schedule(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    """Linear interpolation from ``init_value`` to ``end_value`` over ``transition_steps``."""
    return polynomial_schedule(init_value, end_value, 1.0, transition_steps, transition_begin)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Half a cosine from ``init_value`` down to ``alpha * init_value`` over ``decay_steps``,
    then constant: ``init * ((1 - alpha) * (0.5 * (1 + cos(pi * t / decay_steps)))**exponent + alpha)``."""
    if decay_steps <= 0:
        raise OptimizerConfigError(f"cosine_decay_schedule: decay_steps must be > 0, got {decay_steps}")

    def fn(c: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(c, 0, decay_steps)
        cosine = 0.5 * (1.0 + torch.cos(math.pi * t / decay_steps))
        return init_value * ((1.0 - alpha) * cosine**exponent + alpha)

    return _schedule(fn)


cosine_decay = cosine_decay_schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """``init_value * decay_rate ** ((count - transition_begin) / transition_steps)`` (the
    exponent floored with ``staircase``), ``init_value`` before ``transition_begin``, and
    bounded by ``end_value`` (a floor when decaying, a ceiling when growing)."""
    if transition_steps <= 0:
        return constant_schedule(init_value)
    if decay_rate <= 0:
        raise OptimizerConfigError(f"exponential_decay: decay_rate must be > 0, got {decay_rate}")

    def fn(c: torch.Tensor) -> torch.Tensor:
        elapsed = torch.clamp(c - transition_begin, min=0)
        p = elapsed / transition_steps
        if staircase:
            p = torch.floor(p)
        value = init_value * torch.pow(torch.full_like(p, decay_rate), p)
        if end_value is not None:
            value = torch.clamp(value, min=end_value) if decay_rate < 1 else torch.clamp(value, max=end_value)
        return value

    return _schedule(fn)


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: Mapping[int, float] | None = None) -> Schedule:
    """Start at ``init_value``; at each step ``b`` of ``boundaries_and_scales`` (from ``b``
    on) multiply by its scale: ``{1000: 0.1, 2000: 0.1}`` is step decay by 10x twice."""
    items = sorted((boundaries_and_scales or {}).items())
    for b, s in items:
        if s < 0:
            raise OptimizerConfigError(f"piecewise_constant_schedule: scale at {b} must be >= 0, got {s}")

    def fn(c: torch.Tensor) -> torch.Tensor:
        value = torch.full_like(c, init_value)
        for boundary, s in items:
            value = torch.where(c >= boundary, value * s, value)
        return value

    return _schedule(fn)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``schedules[0]`` until ``boundaries[0]``, then ``schedules[1]`` (restarted at count 0)
    until ``boundaries[1]``, and so on."""
    if len(boundaries) != len(schedules) - 1:
        raise OptimizerConfigError(
            f"join_schedules: needs len(schedules) - 1 boundaries, got {len(schedules)} schedules "
            f"and {len(boundaries)} boundaries"
        )
    if list(boundaries) != sorted(boundaries):
        raise OptimizerConfigError(f"join_schedules: boundaries must be increasing, got {list(boundaries)}")

    def fn(c: torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(schedules[0](c), dtype=c.dtype, device=c.device)
        for boundary, sched in zip(boundaries, schedules[1:]):
            later = torch.as_tensor(sched(c - boundary), dtype=c.dtype, device=c.device)
            value = torch.where(c < boundary, value, later)
        return value

    return _schedule(fn)


def warmup_cosine_decay_schedule(
    init_value: float,
    peak_value: float,
    warmup_steps: int,
    decay_steps: int,
    end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """Linear warmup from ``init_value`` to ``peak_value`` over ``warmup_steps``, then cosine
    decay to ``end_value``, reached at step ``decay_steps`` (which counts the warmup)."""
    if decay_steps <= warmup_steps:
        raise OptimizerConfigError(
            f"warmup_cosine_decay_schedule: decay_steps ({decay_steps}) must exceed warmup_steps ({warmup_steps}); "
            "decay_steps is the total length including warmup"
        )
    alpha = 0.0 if peak_value == 0.0 else end_value / peak_value
    return join_schedules(
        [
            linear_schedule(init_value, peak_value, warmup_steps),
            cosine_decay_schedule(peak_value, decay_steps - warmup_steps, alpha, exponent),
        ],
        [warmup_steps],
    )


def linear_warmup_cosine_decay(
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    *,
    start_factor: float = 1.0 / 3.0,
    end_lr: float = 0.0,
) -> Schedule:
    """torch's ``SequentialLR([LinearLR(start_factor, 1.0, warmup_steps),
    CosineAnnealingLR(total_steps - warmup_steps, end_lr)], milestones=[warmup_steps])``
    on an optimizer with ``lr=peak_lr``, as a function of the step count.

    Linear warmup from ``start_factor * peak_lr`` to ``peak_lr`` over ``warmup_steps``, then
    half a cosine down to ``end_lr``, reached at ``total_steps``, and held there (torch's
    cosine would rise again). ``start_factor`` defaults to LinearLR's 1/3; 0 is allowed here
    (torch requires > 0), though the first update then does nothing.
    """
    if not 0.0 <= start_factor <= 1.0:
        raise OptimizerConfigError(f"linear_warmup_cosine_decay: start_factor must be in [0, 1], got {start_factor}")
    if not 0 <= warmup_steps < total_steps:
        raise OptimizerConfigError(
            f"linear_warmup_cosine_decay: need 0 <= warmup_steps < total_steps, got warmup_steps={warmup_steps}, "
            f"total_steps={total_steps} (total_steps counts the warmup)"
        )
    if peak_lr < 0 or end_lr < 0:
        raise OptimizerConfigError(f"linear_warmup_cosine_decay: learning rates must be >= 0, got peak_lr={peak_lr}, end_lr={end_lr}")
    return warmup_cosine_decay_schedule(start_factor * peak_lr, peak_lr, warmup_steps, total_steps, end_value=end_lr)


def onecycle(
    max_lr: float,
    total_steps: int,
    *,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """torch's ``OneCycleLR`` learning rate as a function of the step count (arguments and
    defaults are torch's; momentum cycling is not a learning rate and is not included).

    From ``max_lr / div_factor`` up to ``max_lr`` over the first ``pct_start`` of
    ``total_steps``, then down to ``max_lr / div_factor / final_div_factor`` at the last
    step; with ``three_phase`` back down to the start value symmetrically first, then to
    the minimum. ``anneal_strategy`` is ``"cos"`` or ``"linear"``. After ``total_steps``
    steps it holds the last step's value (torch raises).
    """
    if not (isinstance(total_steps, int) and total_steps > 0):
        raise OptimizerConfigError(f"onecycle: total_steps must be a positive int, got {total_steps!r}")
    if not 0.0 <= pct_start <= 1.0:
        raise OptimizerConfigError(f"onecycle: pct_start must be in [0, 1], got {pct_start}")
    if anneal_strategy not in ("cos", "linear"):
        raise OptimizerConfigError(f"onecycle: anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    if max_lr < 0 or div_factor <= 0 or final_div_factor <= 0:
        raise OptimizerConfigError(
            f"onecycle: need max_lr >= 0 and positive div factors, got max_lr={max_lr}, div_factor={div_factor}, "
            f"final_div_factor={final_div_factor}"
        )
    initial = max_lr / div_factor
    minimum = initial / final_div_factor
    rise = float(pct_start * total_steps) - 1
    # (last step of the phase, value at its start, value at its end), as torch lays them out
    if three_phase:
        phases = [(rise, initial, max_lr), (2 * rise, max_lr, initial), (total_steps - 1.0, initial, minimum)]
    else:
        phases = [(rise, initial, max_lr), (total_steps - 1.0, max_lr, minimum)]
    starts = [0.0] + [end for end, _, _ in phases[:-1]]
    for i, ((end, _, _), start) in enumerate(zip(phases, starts)):
        if end == start:
            raise OptimizerConfigError(
                f"onecycle: phase {i + 1} of total_steps={total_steps}, pct_start={pct_start} has no length "
                "(torch divides by zero there); change pct_start or total_steps"
            )

    def anneal(start: float, end: float, pct: torch.Tensor) -> torch.Tensor:
        if anneal_strategy == "cos":
            return end + (start - end) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def fn(c: torch.Tensor) -> torch.Tensor:
        c = torch.clamp(c, 0, total_steps - 1)
        (end, lo, hi), start = phases[-1], starts[-1]
        value = anneal(lo, hi, (c - start) / (end - start))
        # torch takes the first phase whose last step is >= c
        for (end, lo, hi), start in reversed(list(zip(phases[:-1], starts[:-1]))):
            value = torch.where(c <= end, anneal(lo, hi, (c - start) / (end - start)), value)
        return value

    return _schedule(fn)
