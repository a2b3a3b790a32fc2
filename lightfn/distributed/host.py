"""Host-side collectives between steps: agreeing, broadcasting, checking, guarding.

:func:`barrier`, :func:`broadcast`, :func:`check_same_structure`, :func:`all_agree` and
:func:`host_all_reduce` run *between* steps, on the host side (collectives inside a compiled
step live in :mod:`lightfn.distributed.collectives`). :func:`guard` makes a dead or stuck
rank raise :class:`DistributedError` after ``mesh.timeout`` seconds instead of hanging
forever.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from .. import tree
from .._diagnostics import diff_by_path, dtype_name, first_line
from ..errors import DistributedError
from .mesh import Mesh

__all__ = ["guard", "host_all_reduce", "barrier", "broadcast", "all_agree", "any_rank", "check_same_structure"]


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
