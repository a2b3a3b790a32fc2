"""The process mesh: torchrun's environment turned into a process group and a device mesh.

``init()`` is the one entry point. Launched by ``torchrun`` it reads ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and ``MASTER_ADDR``/``MASTER_PORT``, picks NCCL when CUDA is
available (gloo otherwise), pins the local GPU, creates the process group with a timeout and
a 1-D mesh over all ranks. Run as a plain ``python script.py``
it returns a one-process :class:`Mesh`, so the same script works on a laptop and a cluster.

>>> mesh = init()                      # doctest: +SKIP
>>> mesh.rank, mesh.world_size, mesh.is_main
(0, 1, True)

The helpers here (:func:`barrier`, :func:`broadcast`, :func:`check_same_structure`,
:func:`all_agree`) run *between* steps, on the host side; collectives inside a compiled step
live in :mod:`lightfn.distributed.collectives`. A dead or stuck rank makes them raise
:class:`DistributedError` after ``mesh.timeout`` seconds instead of hanging forever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from .._device import resolve_device
from .._diagnostics import diff_by_path, dtype_name, first_line
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
    "barrier",
    "broadcast",
    "all_agree",
    "any_rank",
    "check_same_structure",
    "guard",
    "host_all_reduce",
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


@contextlib.contextmanager
def guard(mesh: Mesh, what: str = "a collective") -> Iterator[None]:
    """Turn a failed or timed-out collective inside the block into a :class:`DistributedError`.

    Wrap the call of a distributed step (``lf.fit`` does): when a rank dies or stalls, the
    other ranks' collectives fail after ``mesh.timeout`` seconds with a message saying so,
    instead of a backend stack trace.
    """
    if not mesh.distributed:
        yield
        return
    try:
        yield
    except DistributedError:
        raise
    except RuntimeError as e:  # gloo/NCCL report timeouts and lost peers as RuntimeError subclasses
        text = str(e)
        lowered = text.lower()
        if not any(
            s in lowered
            for s in ("timed out", "timeout", "connection", "peer", "closed", "broken pipe", "nccl", "gloo", "store", "socket")
        ):
            raise
        raise DistributedError(
            f"{what} failed on rank {mesh.rank} of {mesh.world_size}: another rank probably died, was killed, or "
            f"stalled for more than the {mesh.timeout:g} s timeout (set it with lf.distributed.init(timeout=...), in "
            "fit with strategy=lf.distributed.Strategy(name=..., timeout=...)); "
            f"check the other ranks' logs for the first error. Backend said: {first_line(text)}"
        ) from e


def host_all_reduce(t: torch.Tensor, mesh: Mesh, what: str, *, op: Any = dist.ReduceOp.SUM, group: Any = None) -> torch.Tensor:
    """``t`` all-reduced in place (``op``, default a sum) over the ranks of ``mesh``, or of
    ``group`` when given (a gloo control group); returns ``t``. A failed or timed-out
    collective raises :class:`DistributedError` saying it was ``what``.

    The host-side all-reduce every decision, vote and metric reduction between steps goes
    through (inside a compiled step, :mod:`~lightfn.distributed.collectives` instead).
    """
    with guard(mesh, what):
        dist.all_reduce(t, op=op, group=mesh.group if group is None else group)
    return t


def barrier(mesh: Mesh) -> None:
    """Wait until every rank reaches this point (a no-op in a single process)."""
    if not mesh.distributed:
        return
    # A tiny all_reduce rather than dist.barrier(): it honours the group timeout on
    # every backend and needs no device guess.
    host_all_reduce(torch.zeros(1, device=mesh.device), mesh, "barrier")


def broadcast(tree_: Any, mesh: Mesh, src: int = 0) -> Any:
    """Rank ``src``'s values of every tensor leaf of ``tree_``, on every rank.

    All ranks pass a tree of the same structure, shapes and dtypes (checked first, naming
    the first differing path). Returns a new tree; the input is not modified.
    Used to start data-parallel training from identical params on every rank.
    """
    if not mesh.distributed:
        return tree_
    check_same_structure(tree_, mesh, what="the broadcast tree")

    def one(x: Any) -> Any:
        if not isinstance(x, torch.Tensor):
            return x
        buf = x.detach().to(mesh.device, copy=True).contiguous()
        dist.broadcast(buf, src=src, group=mesh.group)
        return buf.to(x.device)

    with guard(mesh, "broadcast"):
        return tree.map(one, tree_)


def all_agree(flag: bool, mesh: Mesh) -> bool:
    """True when ``flag`` is True on *every* rank (a logical AND over ranks).

    Use it for decisions each rank takes locally (stop early, save now): all ranks then act
    the same and none waits forever in a collective the others skipped.
    """
    if not mesh.distributed:
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=mesh.device)
    host_all_reduce(t, mesh, "agreeing on a decision", op=dist.ReduceOp.MIN)
    return bool(t.item() > 0.5)


def any_rank(flag: bool, mesh: Mesh) -> bool:
    """True when ``flag`` is True on at least one rank (a logical OR over ranks)."""
    return not all_agree(not flag, mesh)


def _fingerprint(tree_: Any) -> list[list[str]]:
    out = []
    for path, x in tree.leaves_with_path(tree_):
        if isinstance(x, torch.Tensor):
            out.append([tree.keystr(path), f"{tuple(x.shape)} {dtype_name(x.dtype)}"])
        else:
            out.append([tree.keystr(path), type(x).__name__])
    out.append(["<structure>", str(tree.structure(tree_))])
    return out


def _all_gather_bytes(data: bytes, mesh: Mesh) -> list[bytes]:
    # JSON bytes through two tensor all_gathers (lengths, then padded payloads): no
    # all_gather_object, which would pickle.
    n = torch.tensor([len(data)], dtype=torch.int64, device=mesh.device)
    sizes = [torch.zeros_like(n) for _ in range(mesh.world_size)]
    dist.all_gather(sizes, n, group=mesh.group)
    longest = max(int(s.item()) for s in sizes)
    padded = bytearray(data) + bytearray(longest - len(data))
    payload = torch.frombuffer(padded, dtype=torch.uint8).to(mesh.device)
    chunks = [torch.zeros_like(payload) for _ in range(mesh.world_size)]
    dist.all_gather(chunks, payload, group=mesh.group)
    return [bytes(c[: int(s.item())].cpu().tolist()) for c, s in zip(chunks, sizes)]


def check_same_structure(tree_: Any, mesh: Mesh, *, what: str = "params") -> None:
    """Raise :class:`DistributedError` on every rank unless all ranks hold a tree of the
    same structure, leaf shapes and dtypes; the message names the first differing path.

    Catches ranks that built different models (a config read from a rank-local file, a
    branch on the hostname) before the first collective silently mixes unrelated tensors.
    """
    if not mesh.distributed:
        return
    mine = _fingerprint(tree_)
    with guard(mesh, f"comparing {what} across ranks"):
        gathered = _all_gather_bytes(json.dumps(mine).encode(), mesh)
    ref = json.loads(gathered[0])
    for r, raw in enumerate(gathered[1:], start=1):
        other = json.loads(raw)
        if other == ref:
            continue
        differences = diff_by_path(
            dict(map(tuple, ref)),
            dict(map(tuple, other)),
            same=lambda a, b: a == b,
            show=str,
            where=lambda p: "structure differs" if p == "<structure>" else f"{what}{p}",
            missing=f"rank 0 has {{e}}, rank {r} has missing",
            unexpected=f"rank 0 has missing, rank {r} has {{a}}",
            differs=f"rank 0 has {{e}}, rank {r} has {{a}}",
        )
        if differences:
            raise DistributedError(
                f"ranks disagree on {what}: {differences[0].strip()}. Every rank must build the same model and "
                "state (same code, config and seed-independent shapes)."
            )
