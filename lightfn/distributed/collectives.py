"""Collectives that trace into a compiled step: flat-bucket gradient averaging, gather, scatter.

Everything here calls the functional collective ops (``torch.ops._c10d_functional``) and
waits on the result explicitly. These are the ops both the older
(``all_gather_tensor``/``reduce_scatter_tensor``, deprecated in torch 2.14) and the newer
(``all_gather_single``/``reduce_scatter_single``) Python wrappers call, so the same code
runs on every torch version lightfn supports, and dynamo records them in the step's one
graph. The group is passed by name (a plain string captured when the step is wrapped), so
tracing never walks into the process group object.

Gradients are averaged in as few collectives as possible: all leaves of one dtype are
concatenated into one flat bucket, summed across ranks (gloo has no average), divided by
the world size, and split back. One bucket was ~3x faster than one collective per leaf.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import tree
from .host import host_all_reduce
from .mesh import Mesh

__all__ = [
    "all_reduce_sum",
    "all_gather_flat",
    "reduce_scatter_sum",
    "all_reduce_mean",
    "bucketed_mean",
    "sum_in_buckets",
    "sum_over_ranks",
]

_ops = torch.ops._c10d_functional

# gloo reduces float32/float64/float16 but not bfloat16: such buckets are summed in float32.
_GLOO_UPCAST = (torch.bfloat16,)


def all_reduce_sum(x: torch.Tensor, group_name: str) -> torch.Tensor:
    """``x`` summed over every rank of the group (a new tensor; traceable)."""
    return _ops.wait_tensor(_ops.all_reduce(x, "sum", group_name))


def all_gather_flat(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """Every rank's 1-D ``x`` concatenated in rank order (traceable)."""
    return _ops.wait_tensor(_ops.all_gather_into_tensor(x.contiguous(), world_size, group_name))


def reduce_scatter_sum(x: torch.Tensor, world_size: int, group_name: str) -> torch.Tensor:
    """Sum ``x`` (1-D, length a multiple of ``world_size``) over ranks and keep this rank's
    ``1/world_size`` slice (traceable)."""
    return _ops.wait_tensor(_ops.reduce_scatter_tensor(x.contiguous(), "sum", world_size, group_name))


def _in_buckets(values: Any, reduce_flat: Callable[[torch.Tensor], torch.Tensor], upcast_bf16: bool) -> Any:
    """``values`` with its tensor leaves concatenated into one flat buffer per (dtype,
    device), each buffer replaced by ``reduce_flat(buffer)`` and split back into the leaves'
    shapes and dtypes (bfloat16 buffers in float32 with ``upcast_bf16``: gloo has no
    bfloat16 sum). Non-tensor leaves pass through."""
    leaves, treedef = tree.flatten(values)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, torch.Tensor):
            groups.setdefault((x.dtype, x.device), []).append(i)
    out = list(leaves)
    for (dtype, _), idx in groups.items():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        if upcast_bf16 and dtype in _GLOO_UPCAST:
            flat = flat.float()
        flat = reduce_flat(flat).to(dtype)
        for i, piece in zip(idx, torch.split(flat, [leaves[i].numel() for i in idx])):
            out[i] = piece.view(leaves[i].shape)
    return tree.unflatten(treedef, out)


def bucketed_mean(grads: Any, world_size: int, group_name: str, upcast_bf16: bool) -> Any:
    """The mean over ranks of every tensor leaf of ``grads``: one collective per dtype.

    Leaves are flattened into one buffer per (dtype, device), all-reduced with a sum,
    divided by ``world_size`` and split back into the original shapes. Non-tensor leaves
    pass through unchanged.
    """
    return _in_buckets(grads, lambda flat: all_reduce_sum(flat, group_name) / world_size, upcast_bf16)


def sum_in_buckets(values: Any, all_reduce_: Callable[[torch.Tensor], Any], *, upcast_bf16: bool = False) -> Any:
    """A copy of the pytree ``values`` summed over ranks by ``all_reduce_`` (an in-place
    sum of one flat tensor, e.g. ``dist.all_reduce``): one call per dtype and device.

    Host-side (fit's metric accumulators at log points); each dtype keeps its own
    precision, so int64 counts stay exact. ``upcast_bf16``: sum bfloat16 leaves in
    float32 (gloo has no bfloat16 sum). Non-tensor leaves pass through.
    """

    def reduce_flat(flat: torch.Tensor) -> torch.Tensor:
        flat = flat.detach()  # the concatenation is a new tensor: the inputs stay as they are
        all_reduce_(flat)
        return flat

    return _in_buckets(values, reduce_flat, upcast_bf16)


def sum_over_ranks(values: Any, mesh: Mesh, what: str = "reducing metrics") -> Any:
    """A copy of the pytree ``values`` summed over the ranks of ``mesh`` (``values``
    itself on one process): :func:`sum_in_buckets` with
    :func:`~lightfn.distributed.host.host_all_reduce`, bfloat16 summed in float32 on gloo.
    Host-side: at log points (fit's metric accumulators)."""
    if not mesh.distributed:
        return values
    return sum_in_buckets(values, lambda flat: host_all_reduce(flat, mesh, what), upcast_bf16=mesh.backend == "gloo")


def all_reduce_mean(grads: Any, mesh: Mesh) -> Any:
    """Average a pytree of tensors (gradients) over the ranks of ``mesh``; traceable.

    This is what :func:`lightfn.distributed.data_parallel` inserts into an ``lf.train_step``.
    A hand-written step function, which lightfn cannot rewrite, calls it itself between
    differentiation and the optimizer update::

        loss, grads = lf.value_and_grad(loss_fn)(state.params, batch)
        grads = lf.distributed.all_reduce_mean(grads, mesh)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)

    A no-op returning ``grads`` on a single-process mesh.
    """
    if not mesh.distributed:
        return grads
    return bucketed_mean(grads, mesh.world_size, mesh.group_name, mesh.backend == "gloo")
