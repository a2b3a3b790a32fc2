"""How a multi-process run ends: every rank meets, then the process groups lightfn made go.

Left to the interpreter's exit, a gloo or NCCL process group is torn down by C++
destructors during the interpreter's final teardown, while its worker threads
(``pt_gloo_runloop``, ``gloo_tcp_loop``) are still joinable; the process then dies with
``terminate called without an active exception`` (SIGABRT, exit -6) after all its work is
done, and torchrun reports the whole job as failed (and, under ``--max-restarts``, restarts
it for nothing). Measured here: 1 run in 8 of a 2-rank script that saves a sharded
checkpoint, 3 in 10 of one that does a single all_reduce. Destroying the group is not enough
while anything still references it: the ``DeviceMesh`` that :class:`~lightfn.distributed.Mesh`
used to hold kept the group and its threads alive past ``destroy_process_group`` (5 aborts
in 20 runs even with the barrier and destroy below). The mesh no longer holds one. The other
holder is torch itself: ``torch.distributed.nn.functional`` binds ``group=group.WORLD`` as
default arguments when it is first imported, and ``torch.func``/``torch.compile`` import it
(through dynamo). Imported after the group exists, those defaults keep the group alive
forever, so destroying it only shuts it down and the abort comes back at exit (measured:
threads alive after ``shutdown`` in every run, and 3 of 4 two-rank fit runs aborting).
:func:`before_init` imports it while no group exists, so the defaults are ``None``; then the
threads are gone once :func:`shutdown` returns.

So :func:`~lightfn.distributed.init` registers :func:`shutdown` to run at interpreter exit
when it created the process group itself, and a script may call it earlier. It is a
collective (every rank calls it), waits at most ``timeout`` seconds for the others, and
is skipped when the groups are already gone (the user destroyed them, or shutdown ran).

The record of what lightfn created is module state on purpose: the process group it
describes is process-global state in ``torch.distributed`` itself.
"""

from __future__ import annotations

import atexit
import datetime
import sys

import torch
import torch.distributed as dist

from .._diagnostics import first_line

__all__ = ["shutdown", "adopt", "before_init"]

# Set by ``init`` when it created the default process group: the seconds a collective waits.
_created: dict[str, float] = {}


def before_init() -> None:
    """Import, while no process group exists, the torch modules that capture the default
    group in default arguments at import time (see the module docstring).

    ``torch.distributed.optim.zero_redundancy_optimizer`` and
    ``torch.distributed.fsdp.sharded_grad_scaler`` do the same, but nothing lightfn runs
    imports them and each costs 0.5 s; a script that imports them itself should do so before
    ``lf.distributed.init``.
    """
    import torch.distributed.nn  # noqa: F401  (2 ms)


def adopt(timeout: float) -> None:
    """Record that lightfn created the default process group, and end it at interpreter exit."""
    _created["timeout"] = float(timeout)
    atexit.unregister(_at_exit)
    atexit.register(_at_exit)


def shutdown(timeout: float | None = None) -> bool:
    """Meet the other ranks, then destroy the process groups lightfn created.

    Call it on every rank at the end of a script (a collective), or let interpreter exit do
    it: :func:`~lightfn.distributed.init` registers it with ``atexit``. It destroys the
    default group and with it every subgroup (fit's gloo control group included). Groups
    the user created without ``lf.distributed.init`` are left alone, and so is a group the
    user already destroyed.

    Args:
        timeout: seconds to wait for the other ranks at the barrier; default the timeout
            given to ``init``. A rank that died makes the barrier fail at once (its sockets
            closed) or after this bound; then the group is left to the process's exit and
            one line on stderr says so.

    Returns:
        True when the groups were destroyed by this call.
    """
    if "timeout" not in _created:
        return False
    wait = _created.pop("timeout") if timeout is None else float(timeout)
    _created.clear()
    atexit.unregister(_at_exit)
    if not dist.is_initialized():
        return False
    rank = dist.get_rank()
    try:
        _barrier(wait)
    except Exception as e:  # a failed barrier must not mask the run's result: say it, move on
        first = first_line(e, 200)
        print(
            f"lightfn: rank {rank}: the other ranks did not reach the end of the run within {wait:g} s "
            f"(one probably died); leaving the process group to the process exit ({first})",
            file=sys.stderr,
            flush=True,
        )
        return False
    dist.destroy_process_group()
    return True


def _barrier(timeout: float) -> None:
    # An all_reduce with a bounded wait: dist.barrier() waits the group's whole timeout and
    # on NCCL needs a device guess; the default group's device is the backend's own.
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    flag = torch.zeros(1, device=device)
    work = dist.all_reduce(flag, async_op=True)
    if not work.wait(timeout=datetime.timedelta(seconds=timeout)):
        raise TimeoutError(f"barrier not reached by every rank in {timeout:g} s")
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _at_exit() -> None:
    shutdown()
