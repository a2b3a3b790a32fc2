"""The process mesh: torchrun's environment turned into a process group and a device mesh.

``init()`` is the one entry point. Launched by ``torchrun`` it reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``, picks NCCL when CUDA is
available (gloo otherwise), pins the local GPU, creates the process group with a timeout and
a 1-D mesh over all ranks. Run as a plain ``python script.py``
it returns a one-process :class:`Mesh`, so the same script works on a laptop and a cluster.

>>> mesh = init()                      # doctest: +SKIP
>>> mesh.rank, mesh.world_size, mesh.is_main
(0, 1, True)

What runs between steps on the host side (:func:`~lightfn.distributed.host.barrier`,
``broadcast``, ``check_same_structure``, ``all_agree``, ``guard``) lives in
:mod:`lightfn.distributed.host`; collectives inside a compiled step in
:mod:`lightfn.distributed.collectives`.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import tempfile
from typing import Any

import torch
import torch.distributed as dist

from .._device import resolve_device
from .._diagnostics import first_line
from ..errors import DistributedError
from ._lifetime import adopt, before_init

__all__ = [
    "Mesh",
    "init",
    "launched",
    "require_launched",
    "single_process_mesh",
    "rank",
    "world_size",
    "is_main",
    "LAUNCH_HINT",
]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_HINT = (
    "launch the script with torchrun, one process per device, e.g. "
    "`torchrun --nproc_per_node=2 script.py` (add --nnodes=N --rdzv-backend=c10d "
    "--rdzv-endpoint=HOST:PORT for several machines)"
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Mesh:
    """The processes a step is mapped over (one per device), as seen from this process.

    Fields:
        rank: this process's index in ``[0, world_size)``.
        world_size: the number of processes.
        local_rank: the index on this machine (picks the GPU).
        device: this process's device (``cuda:<local_rank>`` or ``cpu``).
        backend: ``"nccl"``, ``"gloo"``, or ``None`` for a single process.
        timeout: seconds a collective waits for the other ranks before failing.
        group_name: the process group's name: the (plain string) form in which functional
            collectives inside a compiled step refer to the group.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    timeout: float = 300.0
    group_name: str | None = None

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that logs, prints and writes unsharded checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1

    @property
    def group(self) -> Any:
        """The process group of the mesh (``None`` for a single process): the default group,
        as lightfn's mesh spans every rank."""
        return dist.group.WORLD if self.distributed and dist.is_initialized() else None

    @property
    def device_mesh(self) -> Any:
        """The 1-D ``torch.distributed.device_mesh.DeviceMesh`` over all ranks, built on demand
        (``None`` for a single process).

        Not stored in the mesh on purpose: a DeviceMesh keeps its process group alive, and a
        group still alive when the interpreter tears down aborts the process in its C++
        destructors (``terminate called without an active exception``) after all its work
        is done. Hold the returned object only as long as you need it.
        """
        if not (self.distributed and dist.is_initialized()):
            return None
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.device.type, (self.world_size,))



def launched() -> bool:
    """True when this process was started by torchrun (or an equivalent launcher):
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` are all set."""
    return all(os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def require_launched(what: str) -> None:
    """Raise :class:`DistributedError` telling how to launch when not under torchrun."""
    if not launched():
        missing = [k for k in _ENV if not os.environ.get(k)]
        raise DistributedError(
            f"{what} needs several processes, but this one was not started by torchrun "
            f"({', '.join(missing)} not set): {LAUNCH_HINT}"
        )


def single_process_mesh(device: torch.device | str | None = None) -> Mesh:
    """The mesh of a plain ``python script.py`` run: rank 0 of 1, no process group.

    ``device`` as fit reads it (``None`` or ``"auto"``: CUDA, else MPS, else the CPU)."""
    return Mesh(device=resolve_device(device, error=DistributedError))


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer; {LAUNCH_HINT}") from None


def _per_rank_cache_dir(rank_: int) -> None:
    # A compile cache shared by ranks can hand one rank the graph another rank compiled
    # (measured: a DTensor step trained silently wrong). Each rank gets its own folder,
    # unless the user already points this rank somewhere of its own.
    base = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    leaf = f"rank{rank_}"
    if base and os.path.basename(os.path.normpath(base)) == leaf:
        return
    if not base:
        user = os.environ.get("USER", "user")
        base = os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, leaf)


def _attempt_store(world: int, timeout: float) -> dict[str, Any]:
    """The store for init_process_group when torchrun restarts workers on a shared store.

    With ``--rdzv-backend=c10d`` torchrun keeps one TCPStore alive across restarts
    (``TORCHELASTIC_USE_AGENT_STORE=True``) and torch's env:// rendezvous adds no per-attempt
    prefix, so after ``--max-restarts`` a rank can read a dead peer's gloo address left by the
    previous attempt and fail with "Connection refused". Scoping the keys by
    ``TORCHELASTIC_RESTART_COUNT`` makes every attempt start from a clean namespace.
    Returns ``{}`` (torch's own env:// rendezvous) when torchrun does not share its store.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        host_name=os.environ["MASTER_ADDR"],
        port=_env_int("MASTER_PORT"),
        world_size=world,
        is_master=False,
        timeout=datetime.timedelta(seconds=timeout),
    )
    return {"store": dist.PrefixStore(f"lightfn/attempt_{attempt}", client)}


def init(
    backend: str | None = None,
    *,
    timeout: float = 300.0,
    per_rank_compile_cache: bool = True,
) -> Mesh:
    """Join the process group torchrun set up and return this process's :class:`Mesh`.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, else gloo.
        timeout: seconds any collective (and the initial rendezvous) waits for the other
            ranks; after that the survivors raise :class:`DistributedError` rather than
            hang on a rank that died or stalled.
        per_rank_compile_cache: point ``TORCHINDUCTOR_CACHE_DIR`` at ``<dir>/rank{RANK}``
            (``<dir>`` = the variable's current value or torch's default) so ranks never
            load each other's compiled graphs. Skipped when it already ends in ``rank{RANK}``.

    Without torchrun's environment this is a no-op returning :func:`single_process_mesh`.
    Calling it again in a process that already joined returns the same mesh.

    When it creates the process group, the run ends through :func:`shutdown` at interpreter
    exit (ranks meet at a bounded barrier, then the groups are destroyed), so a finished
    job exits 0 instead of aborting in a C++ destructor.
    """
    if not launched():
        return single_process_mesh()
    rank_, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local = _env_int("LOCAL_RANK") if os.environ.get("LOCAL_RANK") else 0
    if world < 1 or not 0 <= rank_ < world:
        raise DistributedError(f"RANK={rank_} and WORLD_SIZE={world} are inconsistent; {LAUNCH_HINT}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise DistributedError(f"backend={backend!r}: lightfn supports 'nccl' (GPUs) and 'gloo' (CPUs)")
    if backend == "nccl" and not torch.cuda.is_available():
        raise DistributedError("backend='nccl' needs CUDA, which is not available here; use backend='gloo' on CPUs")
    if timeout <= 0:
        raise DistributedError(f"timeout must be a positive number of seconds, got {timeout}")
    if per_rank_compile_cache:
        _per_rank_cache_dir(rank_)
    if backend == "nccl":
        if local >= torch.cuda.device_count():
            raise DistributedError(
                f"LOCAL_RANK={local} but this machine has {torch.cuda.device_count()} GPU(s): "
                "use --nproc_per_node at most the number of GPUs"
            )
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        addr = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
        before_init()
        try:
            dist.init_process_group(
                backend=backend,
                rank=rank_,
                world_size=world,
                timeout=datetime.timedelta(seconds=timeout),
                **_attempt_store(world, timeout),
                **({"device_id": device} if backend == "nccl" else {}),
            )
        except (RuntimeError, ValueError, TimeoutError) as e:
            raise DistributedError(
                f"rank {rank_} of {world} could not join the process group at {addr} within {timeout:g} s "
                f"({type(e).__name__}: {first_line(e, fallback='')}). Are all "
                f"{world} ranks running, and can they reach MASTER_ADDR? {LAUNCH_HINT}"
            ) from e
        adopt(timeout)  # lightfn made the group, so lightfn ends it (at exit, or lf.distributed.shutdown())
    return Mesh(
        rank=rank_, world_size=world, local_rank=local, device=device, backend=backend, timeout=float(timeout),
        group_name=dist.group.WORLD.group_name,
    )


def rank(mesh: Mesh | None = None) -> int:
    """This process's rank (0 when not distributed)."""
    if mesh is not None:
        return mesh.rank
    return dist.get_rank() if dist.is_initialized() else 0


def world_size(mesh: Mesh | None = None) -> int:
    """The number of processes (1 when not distributed)."""
    if mesh is not None:
        return mesh.world_size
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main(mesh: Mesh | None = None) -> bool:
    """True on rank 0: the process that logs, shows progress and writes checkpoints."""
    return rank(mesh) == 0
