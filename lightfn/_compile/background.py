"""Build AOT artifacts in a child process while the parent goes on (issue 15, item 2).

A cold compile costs 10-35 s on a small CPU; a short run is over before that. ``fit`` in
background mode therefore trains eagerly from its first step and hands the compilation to a
:class:`Builder`: a forked child captures, exports and compiles each submitted
:class:`~lightfn._compile.jit.Jitted` into the AOT cache (:mod:`lightfn._compile.aot`) and
reports each result on a pipe. The parent polls the pipe (a non-blocking read, about a
microsecond) and loads an artifact once it is reported ready.

Why a forked child and not a thread: FX tracing patches ``nn.Module.__call__`` process-wide,
so tracing beside a running eager step crashes it; and nothing about a step can be sent to
a fresh interpreter without pickling user code. A fork has the step, its closures and the
example inputs already (only their shapes and dtypes matter to the build). One case needs
help: after some compiled autograd work (an earlier ``torch.compile`` of a gradient) torch
refuses autograd in every forked child. A probe fork detects it; the parent then captures
and exports the step itself (about 2 s, training pauses) and the child only compiles.

The child is detached (its own session, reparented to init by a double fork), runs at a
lower priority (``nice`` 10) on one thread, and its stdout/stderr go to ``/dev/null``: it
never writes into the parent's output or holds a pipe the parent's caller waits on. When
the parent ends first, the child finishes the build and exits, so the next run finds the
artifact; builds in one cache folder take turns (:func:`~lightfn._compile.store.build_lock`),
so at most one build per folder runs at a time. ``fork`` after CUDA is initialized is not
safe: callers use this for CPU work only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import tree
from .._diagnostics import first_line, fn_name
from .cache import cache_dir, write_text_atomic

__all__ = ["Builder", "Switching", "wait_requested", "build_seconds", "worth_building", "DEFAULT_BUILD_SECONDS",
           "PAYOFF"]

#: The build time assumed before one was recorded on this machine: a small step's first
#: build on a 2-core CPU took 18-45 s, the other examples' 40-210 s (benchmarks/short_jobs.py):
#: without a record, only a run with minutes of eager work left starts a build beside it.
DEFAULT_BUILD_SECONDS = 60.0
#: Start a build only with this many build-times of eager work left: while it builds the
#: child slows a small machine's steps a little, and the compiled steps after the switch
#: must win that back (about 2x faster on the seed model).
PAYOFF = 1.5


def worth_building(*, eager_left: float | None, build_seconds: float) -> bool:
    """Whether a build started now pays for itself: ``eager_left`` is the estimated eager
    time left (None: unbounded)."""
    return eager_left is None or eager_left >= PAYOFF * build_seconds


_TIMES = ".build-seconds.json"  # in the AOT folder (a dotfile: not a manifest): seconds per job name


def build_seconds(name: str) -> float | None:
    """How long the last background build of a job called ``name`` took on this machine
    (from lightfn's cache folder), or None if none was recorded: what fit weighs against
    the time a run has left before it starts a build (:mod:`lightfn.fit._background`)."""
    try:
        value = json.loads((cache_dir() / "aot" / _TIMES).read_text()).get(name)
    except (OSError, ValueError, AttributeError):
        return None
    return float(value) if isinstance(value, (int, float)) and value > 0 else None


def _record_seconds(name: str, seconds: float) -> None:
    path = cache_dir() / "aot" / _TIMES
    try:
        times = json.loads(path.read_text())
        times = times if isinstance(times, dict) else {}
    except (OSError, ValueError):
        times = {}
    times[name] = round(seconds, 2)
    try:
        write_text_atomic(path, json.dumps(times, sort_keys=True))
    except OSError:
        pass  # a cache that cannot be written only loses the estimate


def wait_requested() -> bool:
    """True when ``LIGHTFN_BACKGROUND_WAIT=1``: fit then waits for the background build at
    the end of the first epoch, so the switch step does not depend on timing (tests,
    benchmarks, bit-for-bit comparisons of two fresh runs)."""
    return os.environ.get("LIGHTFN_BACKGROUND_WAIT", "").strip().lower() in ("1", "true", "yes")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Job:
    name: str
    store: Callable[[], None]  # builds the artifact into the cache (runs in the child)
    # Captures and exports in this process, returning the rest of store (compile and
    # package, no autograd) for the child: used when a forked child cannot run autograd.
    prepare: Callable[[], Callable[[], None]] | None = None


class Builder:
    """Builds submitted jobs in one background child at a time; the parent polls.

    ``submit(name, store)`` queues ``store()`` (a function that builds one artifact into
    the cache); ``start()`` forks a child for everything queued if none is running;
    ``poll()`` collects the results (and, once a first child was started, starts the next
    for jobs queued meanwhile); ``status(name)`` is ``"queued"``, ``"building"``,
    ``"ready"`` or ``"failed: <reason>"``.
    """

    def __init__(self) -> None:
        self._queued: list[_Job] = []
        self._running: list[str] = []  # the names the running child builds
        self._fd: int | None = None
        self._buffer = b""
        self._status: dict[str, str] = {}
        self.pid: int | None = None  # the running child's pid (after its first report)
        self.started: float | None = None  # time.monotonic() when the first child started

    def submit(self, name: str, store: Callable[[], None], *, prepare: Callable[[], Callable[[], None]] | None = None,
               first: bool = False) -> None:
        """Queue ``store`` under ``name`` (``first``: before the jobs already queued).
        ``prepare``: see :class:`_Job`."""
        job = _Job(name=name, store=store, prepare=prepare)
        if first:
            self._queued.insert(0, job)
        else:
            self._queued.append(job)
        self._status[name] = "queued"

    def submit_jitted(self, name: str, jitted: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, *,
                      first: bool = False) -> None:
        """Queue building ``jitted``'s artifact (a :class:`~lightfn._compile.jit.Jitted`
        with the AOT cache on) for arguments like ``args``, in this call's grad mode (it is
        part of the artifact's key)."""
        kwargs = kwargs or {}
        grad = torch.is_grad_enabled()

        def store() -> None:
            with torch.set_grad_enabled(grad):
                jitted.store(*args, **kwargs)

        def prepare() -> Callable[[], None]:
            with torch.set_grad_enabled(grad):
                return jitted.prepare(*args, **kwargs)

        self.submit(name, store, prepare=prepare, first=first)

    def status(self, name: str) -> str | None:
        return self._status.get(name)

    @property
    def busy(self) -> bool:
        """A child is building, or jobs wait for one."""
        return self._fd is not None or bool(self._queued)

    @property
    def building(self) -> bool:
        """A child is building (started and not yet done)."""
        return self._fd is not None

    def start(self) -> bool:
        """Fork a child for the queued jobs, unless one is running; True if one was forked.
        When this process's forks cannot run autograd, the jobs' capture runs here first
        (seconds)."""
        if self._fd is not None or not self._queued:
            return False
        jobs, self._queued = self._queued, []
        if not _autograd_survives_fork():
            jobs = self._prepared(jobs)
            if not jobs:
                return False
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the intermediate process: detach, fork the builder, leave
            try:
                os.close(read)
                os.setsid()
                if os.fork() == 0:
                    _build(write, jobs)  # never returns
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        os.set_blocking(read, False)
        self._fd, self._buffer = read, b""
        self._running = [job.name for job in jobs]
        for job in jobs:
            self._status[job.name] = "building"
        if self.started is None:
            self.started = time.monotonic()
        return True

    def _prepared(self, jobs: list[_Job]) -> list[_Job]:
        """The jobs with their autograd half done here (a failure is their result)."""
        out = []
        for job in jobs:
            try:
                if job.prepare is None:
                    raise RuntimeError("this process ran compiled autograd before: a forked build cannot trace")
                out.append(_Job(name=job.name, store=job.prepare()))
            except Exception as e:  # noqa: BLE001 - the job's result, as a child would report it
                self._status[job.name] = f"failed: {type(e).__name__}: {first_line(e)}"
        return out

    def poll(self, wait: bool = False) -> None:
        """Read the results the child reported; with ``wait``, until it is done. Starts
        the next child when jobs are queued and none runs."""
        while self._fd is not None:
            if wait:
                select.select([self._fd], [], [])
            try:
                chunk = os.read(self._fd, 65536)
            except BlockingIOError:
                break
            if not chunk:  # the child exited: whatever it did not report failed
                os.close(self._fd)
                self._fd = None
                for name in self._running:
                    if self._status.get(name) == "building":
                        self._status[name] = "failed: the build process ended without a result"
                self._running, self.pid = [], None
                break
            self._buffer += chunk
            *lines, self._buffer = self._buffer.split(b"\n")
            for line in lines:
                self._read(json.loads(line))
        if self._fd is None and self._queued and self.started is not None:
            self.start()
            if wait:
                self.poll(wait=True)

    def _read(self, report: dict[str, Any]) -> None:
        if "pid" in report:
            self.pid = int(report["pid"])
        elif "error" in report:
            self._status[report["job"]] = f"failed: {report['error']}"
        else:
            self._status[report["job"]] = "ready"

    def close(self) -> None:
        """Stop listening (the child, if still building, finishes on its own)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._queued = []


def _autograd_survives_fork() -> bool:
    """Whether a forked child of this process can run autograd.

    Once a process has run some autograd work (e.g. a ``torch.compile``-d gradient), torch
    marks its forked children unable to use autograd at all. Asked with a real fork (a few
    ms): there is no API to read that mark."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            x = torch.ones((), requires_grad=True)
            torch.autograd.grad(x * 2, x)
            code = 0
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1] == 0


def _build(fd: int, jobs: list[_Job]) -> None:
    """The child: build each job, report each result as one JSON line, exit."""
    code = 1
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        # Python's own streams too: they may not write to fds 1 and 2 (a capturing harness).
        sys.stdout = sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives until os._exit
        try:
            os.nice(10)  # the parent's training comes first
        except OSError:
            pass
        torch.set_num_threads(1)
        # Compile in this process: a worker pool the parent started (an earlier
        # torch.compile) did not survive the fork, and a new one would compete with training.
        from torch._inductor import config as inductor_config

        inductor_config.compile_threads = 1
        _report(fd, {"pid": os.getpid()})
        for job in jobs:
            began = time.monotonic()
            try:
                job.store()
            except BaseException as e:  # noqa: BLE001 - reported to the parent, who decides
                _report(fd, {"job": job.name, "error": f"{type(e).__name__}: {first_line(e)}"})
            else:
                took = time.monotonic() - began
                if took > 1.0:  # not an artifact another process had just built
                    _record_seconds(job.name, took)
                _report(fd, {"job": job.name, "ok": True})
        code = 0
    finally:
        os._exit(code)  # no atexit handlers, no flushing of buffers copied from the parent


def _report(fd: int, report: dict[str, Any]) -> None:
    try:
        os.write(fd, (json.dumps(report) + "\n").encode())
    except OSError:
        pass  # the parent has stopped listening; the build still lands in the cache


class Switching:
    """``lf.jit(fn, background=True)``: eager calls at once, compiled calls once built.

    The first call looks for ``fn``'s artifact in the AOT cache (a warm start loads it and
    every call is compiled). Otherwise it runs ``fn`` eagerly and queues the build. A loop's
    length is not known here, so the build starts once the eager calls have taken
    :data:`PAYOFF` times the build time this machine recorded (a loop that has run that long
    likely runs as long again; a shorter one is never slowed by a build beside it), or at
    once with ``LIGHTFN_BACKGROUND_WAIT=1``. A loop that ends sooner leaves no artifact behind
    (use ``lf.jit(fn, cache=True)`` once, or ``fit``, to build one): a build cannot start at
    interpreter exit (compiling registers ``atexit`` work, refused then), and a child
    forked earlier and held idle makes every page the loop writes a copy-on-write fault
    (measured: 1.2x a short loop's time). Each call polls the running
    build (a non-blocking read) and runs eagerly until the artifact is ready, then loads it:
    from that call on, ``fn`` runs compiled. Which call switched is ``switched_at`` (a count
    of calls). Eager and compiled results agree to float rounding; a loop that needs one
    numeric path throughout uses plain ``lf.jit``.
    """

    def __init__(self, jitted: Any) -> None:
        self.jitted = jitted  # a lightfn._compile.jit.Jitted with the AOT cache on
        self.builder = Builder()
        self.calls = 0
        self.switched_at: int | None = None
        self.failed: str | None = None
        self.eager_seconds = 0.0  # spent in eager calls so far
        self._budget = 0.0  # eager seconds before the build starts (set at the first call)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        jitted, first = self.jitted, self.calls == 0
        self.calls += 1
        if self.switched_at is not None or first:
            run = jitted.cached(*args, **kwargs)
            if run is not None:
                if self.switched_at is None:
                    self.switched_at = self.calls - 1
                return run()
        if first:
            if any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in tree.leaves((args, kwargs))):
                # fork after CUDA is initialized is unsafe: build here, now, as cache=True does
                jitted.background = None
                return jitted(*args, **kwargs)
            out = self._eager(args, kwargs)
            self.builder.submit_jitted("fn", jitted, args, kwargs)
            self._budget = 0.0 if wait_requested() else PAYOFF * (build_seconds("fn") or DEFAULT_BUILD_SECONDS)
            if self.eager_seconds >= self._budget:
                self.builder.start()
            return out
        if self.switched_at is None and self.failed is None:
            if self.eager_seconds >= self._budget:
                self.builder.start()
            self.builder.poll()
            status = self.builder.status("fn") or ""
            if status == "ready":
                run = jitted.cached(*args, **kwargs)
                if run is not None:
                    self.switched_at = self.calls - 1
                    return run()
                status = "failed: the artifact built in the background could not be loaded"
            if status.startswith("failed: "):
                self.failed = status[len("failed: "):]
                warnings.warn(f"lf.jit: the background compile of {fn_name(jitted.fn)} failed ({self.failed}); "
                              "it runs eagerly", stacklevel=3)
        return self._eager(args, kwargs)

    def _eager(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        began = time.monotonic()
        out = self.jitted.eager(*args, **kwargs)
        self.eager_seconds += time.monotonic() - began
        return out
