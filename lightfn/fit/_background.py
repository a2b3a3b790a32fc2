"""fit's background compile: train eagerly at once, switch to the compiled step when built.

With ``jit="background"`` (fit's default on one CPU process) a fused step does not compile
before its first call. Its first call runs eagerly, and the fused function (step plus
metric accumulation, :mod:`lightfn.fit._accumulate`) is handed to a
:class:`~lightfn._compile.background.Builder`, which builds its AOT artifact in a child
process. Each step keeps a :class:`Deferred`: eager until its artifact is reported ready,
then the loaded artifact. If the cache already holds the artifact (a warm start), the first
call loads it: compiled from the first step.

When the build starts: a compile only pays for itself in a run long enough to use it. After
a few eager steps, :class:`Background` estimates the eager time the run has left (steps left
times the measured seconds per step, or what ``max_time`` leaves) and compares it with how
long this machine took to build the step last time (recorded in lightfn's cache; 60 s
before the first). With at least 1.5 times the build time left it starts the build at once.
Otherwise the run trains eagerly to its end undisturbed (on a small machine the build's
process would slow it) and the build starts as fit returns, detached, so the next run loads
it: a short run never ends later than ``jit=False`` would, and a long one switches. (One
exception: in a process whose forks cannot run autograd, see
:mod:`lightfn._compile.background`, the capture runs in this process first, about 2 s.)
With ``LIGHTFN_BACKGROUND_WAIT=1`` the build starts at once.

The switch and what it means for resume:

- :class:`Background` polls after every train step and switches a step as soon as its
  artifact is ready (the next step, or the next evaluation, is the first compiled one). With
  ``LIGHTFN_BACKGROUND_WAIT=1`` it waits for the builds at the end of the first epoch
  instead, so the switch step of a cold run does not depend on timing.
- The run records the step at which each graph switched (``Run.compiled``:
  ``{"train": step, "eval": step}``), and checkpoints keep it. A run resumed from a
  checkpoint written after a switch runs that graph compiled from its first step (loaded
  from the cache, or built before the first step if the cache lost it), exactly as the
  interrupted run did; one written before the switch resumes eagerly and switches when
  its own build is ready. So a resumed run is bit-identical to the uninterrupted run
  whenever both switched at the same step: always when the checkpoint came after the
  switch. Eager and compiled steps agree only to float rounding, so two runs that
  switched at different steps differ at that rounding level; ``jit="sync"`` compiles
  before the first step (every step compiled), and ``jit=False`` never compiles.
- When fit ends before a build is done, the builder finishes it on its own and the next
  run with the same step loads it (a short run never waits for a compile it did not use).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

import torch

from .._compile.background import DEFAULT_BUILD_SECONDS, Builder, build_seconds, wait_requested, worth_building
from .._compile.jit import Jitted

__all__ = ["Deferred", "Background"]


class Deferred:
    """One fused step compiled in the background: eager until its artifact is ready."""

    def __init__(self, name: str, builder: Builder) -> None:
        self.name = name
        self.builder = builder
        self.jitted: Jitted | None = None
        self.example: Any = None  # the first batch: a lookup needs arguments like the calls'
        self.switched = False
        self.must_compile = False  # resumed after a switch: compiled from the first call
        self.failed: str | None = None
        self.grad = True  # the grad mode of its calls (part of the artifact's key)
        self.on_switch: Callable[[str], None] = lambda name: None

    def warm(self, jitted: Jitted, *args: Any) -> Callable[[], Any] | None:
        """At the first call: the artifact applied to ``args`` if the cache holds it (then
        switched from this call on), or built now when ``must_compile``; else None."""
        self.jitted, self.example, self.grad = jitted, args[-1], torch.is_grad_enabled()
        run = jitted.cached(*args)
        if run is None and self.must_compile:
            run = functools.partial(jitted, *args)  # builds (or compiles) before this call
        if run is not None:
            self._switch()
        return run

    def defer(self, jitted: Jitted, *args: Any, first: bool = False) -> None:
        """Have the builder build ``jitted`` for arguments like ``args`` (the grad mode of
        this call included)."""
        self.jitted, self.example, self.grad = jitted, args[-1], torch.is_grad_enabled()
        self.builder.submit_jitted(self.name, jitted, args, first=first)

    def call(self, *args: Any) -> Callable[[], Any] | None:
        """The compiled step applied to ``args`` once switched (None for a shape the
        artifact does not cover: that call runs eagerly)."""
        if not self.switched:
            return None
        assert self.jitted is not None
        return self.jitted.cached(*args)

    def try_switch(self, *args: Any) -> bool:
        """Switch if the build is reported ready (``args``: the call's arguments but the
        batch). False while building; a failure is kept in ``failed``."""
        if self.switched or self.jitted is None or self.failed is not None:
            return False
        status = self.builder.status(self.name) or ""
        if status == "ready":
            with torch.set_grad_enabled(self.grad):
                found = self.jitted.cached(*args, self.example)
            if found is not None:
                self._switch()
                return True
            self.failed = "the artifact built in the background could not be loaded"
        elif status.startswith("failed: "):
            self.failed = status[len("failed: "):]
        return False

    @property
    def settled(self) -> bool:
        """Nothing more will change: switched, failed, or never asked to build."""
        return self.switched or self.failed is not None or self.jitted is None

    def _switch(self) -> None:
        self.switched = True
        self.on_switch(self.name)


class Background:
    """The loop's side: decide when to build, poll the builder, switch the steps, say what
    happened.

    ``announce(text)`` prints a progress line; ``record(name)`` notes the switch step in
    the run; ``left()`` is ``(steps, seconds, known)``: the train steps and the time the
    run has left (each None when that limit is absent), ``known`` False while the number
    of steps cannot be told yet (a loader without ``len`` in its first epoch).
    """

    def __init__(self, builder: Builder, steps: list[Deferred], *, announce: Callable[[str], Any],
                 record: Callable[[str], None], left: Callable[[], tuple[int | None, float | None, bool]]) -> None:
        self.builder = builder
        self.steps = steps
        self.announce = announce
        self.wait = wait_requested()
        self.said_building = False
        self.record = record
        self.left = left
        # None until decided; then whether the build runs during this fit (else at its end).
        self.now: bool | None = True if self.wait else None
        self._ticks = 0
        self._since: float | None = None  # when the last unmeasured step ended
        for step in steps:
            step.on_switch = self._switched

    def _decide(self) -> None:
        """After a few eager steps: start the build now if the run is long enough to use it."""
        self._ticks += 1
        if self._ticks <= 2:  # the first steps pay one-off costs (first call, allocations)
            self._since = time.monotonic()
            return
        assert self._since is not None
        span, measured = time.monotonic() - self._since, self._ticks - 2
        if span < 0.25 and measured < 50:
            return
        steps, seconds, known = self.left()
        if not known:
            return  # asked again once an epoch showed how many steps it has
        estimates = [x for x in (None if steps is None else steps * span / measured, seconds) if x is not None]
        eager_left = min(estimates) if estimates else None
        build = build_seconds("train") or DEFAULT_BUILD_SECONDS
        self.now = worth_building(eager_left=eager_left, build_seconds=build)
        if not self.now:
            self.announce(f"training eagerly: about {eager_left:.0f} s left, too short to use a compile (about "
                          f"{build:.0f} s here); it builds in the background when this run ends")

    def _switched(self, name: str) -> None:
        self.record(name)
        if self.builder.started is None:  # at its first call: the artifact was in the cache
            self.announce(f"the {name} step runs compiled (loaded from the cache)")

    @property
    def settled(self) -> bool:
        return all(step.settled for step in self.steps) and not self.builder.busy

    def tick(self, state: Any, train_acc: Any, eval_acc: Any, *, epoch_end: bool = False) -> None:
        """After a train step (``epoch_end``: at the end of an epoch): poll, and switch
        every step whose artifact is ready."""
        if self.settled or self.now is False:  # (held for the end of the run: nothing to poll)
            return
        if self.now is None and not epoch_end:
            self._decide()
        if self.now:
            self.builder.start()
        if not self.said_building and self.builder.building:
            self.said_building = True
            self.announce("compiling in background (training eagerly meanwhile)")
        self.builder.poll(wait=self.wait and epoch_end)
        switched = []
        for step in self.steps:
            acc = train_acc if step.name == "train" else eval_acc
            if acc is not None and step.try_switch(state, acc):
                switched.append(step.name)
            elif step.failed is not None and step.jitted is not None:
                self.announce(f"background compile of the {step.name} step failed ({step.failed}); "
                              "it runs eagerly")
                step.jitted = None  # said once
        if switched and self.builder.started is not None:
            took = time.monotonic() - self.builder.started
            steps = " and ".join(switched) + (" steps now run" if len(switched) > 1 else " step now runs")
            self.announce(f"compiled ({took:.1f} s): the {steps} compiled")

    def finish(self) -> None:
        """fit is ending: stop listening; a build still running finishes on its own, and
        one held back (a short run) starts now, for the next run."""
        self.builder.poll()
        if self.builder.building:
            self.announce("the compiled step is still building in the background; a later run with this "
                          "step loads it")
        elif self.builder.busy and self.builder.start():
            self.announce("the compiled step builds in the background now; a later run with this step loads it")
        self.builder.close()
