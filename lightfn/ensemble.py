"""lf.ensemble: run one step over K stacked models at once (``torch.func.vmap``).

A lightfn step is a pure function ``(state, batch) -> (state, metrics)``, so an ensemble
is not a new kind of model: it is the same step vectorized over a leading *member* axis of
the state. Stack K states with :func:`lightfn.tree.stack`, wrap the step, and every call
trains all K members in one batched computation (one graph under ``lf.jit``):

>>> import torch, lightfn as lf
>>> def loss_fn(p, batch):
...     x, y = batch
...     return ((x @ p["w"] - y) ** 2).mean()
>>> opt = lf.optim.sgd(0.1)
>>> members = [lf.TrainState.create(params={"w": torch.full((3,), float(i))}, optimizer=opt, seed=i) for i in range(4)]
>>> step = lf.ensemble(lf.train_step(loss_fn, opt))
>>> state, metrics = step(lf.tree.stack(members), (torch.eye(3), torch.ones(3)))
>>> tuple(metrics["loss"].shape)
(4,)
>>> first = lf.tree.unstack(state)[0]   # member 0, exactly as if trained alone

Batches: by default every member sees the same batch. ``batch_axis=0`` gives member ``i``
the slice ``batch[i]`` of a batch stacked on a leading axis of size K (bootstrap
ensembles, or K data orders).

Randomness: each member draws from its *own* key. ``lf.train_step`` derives the step's key
from ``state.rng`` and ``state.step``, which are stacked per member, and lightfn's random
numbers are a hash of (key, position) written in tensor ops, so under ``vmap`` member ``i``
draws exactly what it would draw trained alone: members created with different seeds get
different dropout masks, and the same seed reproduces a single run bit for bit.

Metrics come back with a leading axis of size K (``metrics["loss"].shape == (K,)``).
Anything in the state that is not a tensor (static dataclass fields, Python numbers in
``extra``) is shared by all members and passed through unchanged; it must be equal across
members, which :func:`lightfn.tree.stack` checks.

``lf.fit`` trains an ensemble step as it is: it logs each ``(K,)`` metric as its mean
under the usual name and per member as ``<name>/member_<i>`` (``val/loss/member_3``), and
its checkpoints hold the stacked state (see :mod:`lightfn._members`).

The wrapped step may be an ``lf.train_step``, an ``lf.eval_step`` (``(state, batch) ->
metrics``) or any hand-written pure step; it must not be an ``lf.jit``-compiled function
(compile the ensemble instead: ``lf.jit(lf.ensemble(step))``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.func

from . import tree
from .errors import StepError
from ._compile.jit import Jitted

__all__ = ["Ensemble", "ensemble", "num_members"]


def num_members(state: Any) -> int:
    """K: the leading size of the stacked state's tensor leaves (checked to agree)."""
    sizes = {(x.shape[0] if x.dim() else None) for x in tree.leaves(state) if isinstance(x, torch.Tensor)}
    if len(sizes) != 1 or None in sizes:
        for path, x in tree.leaves_with_path(state):
            if isinstance(x, torch.Tensor) and x.dim() == 0:
                raise StepError(
                    f"lf.ensemble: state{tree.keystr(path)} is a 0-d tensor; an ensemble step takes a state "
                    "stacked with lf.tree.stack([member_0, member_1, ...]) (every tensor leaf gets a member axis)"
                )
        raise StepError(f"lf.ensemble: the state's tensor leaves disagree on the member count {sorted(sizes)}")
    return sizes.pop()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Ensemble:
    """``step`` vectorized over the member axis of a stacked state (see module docs).

    ``batch_axis``: ``None`` broadcasts the batch to every member; ``0`` maps member ``i``
    to ``batch[i]`` for every tensor leaf of the batch.
    """

    step: Callable[..., Any]
    batch_axis: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.step, Jitted):
            raise StepError(
                "lf.ensemble got an lf.jit-compiled step: vmap cannot see inside a compiled function. "
                "Wrap the plain step and compile the ensemble: lf.jit(lf.ensemble(step))"
            )
        if self.batch_axis not in (None, 0):
            raise StepError(f"lf.ensemble: batch_axis must be None (shared batch) or 0 (one slice per member), got {self.batch_axis!r}")

    def replace(self, **changes: Any) -> "Ensemble":
        return dataclasses.replace(self, **changes)

    def __call__(self, state: Any, batch: Any) -> Any:
        k = num_members(state)
        if self.batch_axis is not None:
            for path, x in tree.leaves_with_path(batch):
                if isinstance(x, torch.Tensor) and (x.dim() == 0 or x.shape[0] != k):
                    raise StepError(
                        f"lf.ensemble(batch_axis=0): batch{tree.keystr(path)} has shape {tuple(x.shape)}; with "
                        f"{k} members its leading axis must be {k} (one slice per member)"
                    )
        # vmap maps tensors only: non-tensor leaves (static config, Python numbers) are
        # shared by all members and put back around the mapped function.
        leaves, treedef = tree.flatten(state)
        is_tensor = [isinstance(x, torch.Tensor) for x in leaves]
        tensors = [x for x, t in zip(leaves, is_tensor) if t]
        out_spec: dict[str, Any] = {}

        def member(member_tensors: list[torch.Tensor], member_batch: Any) -> Any:
            it = iter(member_tensors)
            member_state = tree.unflatten(treedef, [next(it) if t else x for x, t in zip(leaves, is_tensor)])
            out = self.step(member_state, member_batch)
            if isinstance(out, tuple) and len(out) == 2 and tree.structure(out[0]) == tree.structure(state):
                new_leaves, new_def = tree.flatten(out[0])
                out_spec["state"] = (new_def, new_leaves)
                return [x for x in new_leaves if isinstance(x, torch.Tensor)], out[1]
            out_spec.pop("state", None)
            return out

        mapped = torch.func.vmap(member, in_dims=(0, self.batch_axis), randomness="error")(tensors, batch)
        if "state" not in out_spec:
            return mapped
        new_def, new_leaves = out_spec["state"]
        new_tensors, metrics = mapped
        it = iter(new_tensors)
        rebuilt = [next(it) if isinstance(x, torch.Tensor) else x for x in new_leaves]
        return tree.unflatten(new_def, rebuilt), metrics


def ensemble(step: Callable[..., Any], batch_axis: int | None = None) -> Ensemble:
    """Make ``step`` run over a stacked state of K members in one call (see module docs).

    ``step`` is ``(state, batch) -> (state, metrics)`` (train) or ``-> metrics`` (eval);
    the result takes ``lf.tree.stack([...])`` of K such states and returns the stacked new
    state and metrics with a leading axis of size K.
    """
    if not callable(step):
        raise StepError(f"lf.ensemble expects a step function (state, batch) -> ..., got {type(step).__name__}")
    return Ensemble(step=step, batch_axis=batch_axis)
