"""train_step / eval_step: pure step functions built from a loss function and an optimizer.

``lf.train_step(loss_fn, optimizer)`` returns a :class:`TrainStep`, a callable
``(state, batch) -> (new_state, metrics)`` that differentiates ``loss_fn`` with
``torch.func``, updates params and optimizer state functionally, advances the step and
keeps everything on the device. It is one traceable function: ``lf.jit`` compiles it
whole, and the sharding layer rebuilds it with ``.replace(grad_transform=...)`` to put
gradient collectives between grad and update inside the same graph. Called plain eager
(``fit(..., jit=False)``, debugging), the same numbers come from cheaper means: plain
``torch.autograd`` for the gradients and ``_foreach`` ops in the optimizer
(:mod:`lightfn._eager`).

``loss_fn(params, batch)`` returns a scalar loss or ``(loss, {"name": scalar, ...})``
(a value may also be an ``lf.metrics.Sum`` state, summed over the epoch by fit: see
:mod:`lightfn.metrics`);
with ``with_state=True`` it is ``loss_fn(params, buffers, batch) -> (loss, metrics,
new_buffers)`` for models with BatchNorm-like state. Randomness inside ``loss_fn``
(``nn.Dropout``, ``torch.rand``) is drawn from ``fold_in(state.rng, state.step)``, so a
resumed run draws the same numbers, eagerly and compiled alike.

Precision uses Lightning's names: ``"32-true"`` (default), ``"bf16-mixed"`` and
``"16-mixed"`` (autocast inside the step; 16-mixed adds dynamic loss scaling kept in
``state.loss_scale``: a step with non-finite grads is skipped and the scale backs off),
``"bf16-true"``/``"16-true"``/``"64-true"`` (params stored in that dtype; see
:meth:`TrainStep.prepare_state`).

``trainable=`` trains a subset of the params (fine-tuning a head on a frozen backbone): a
bool pytree prefix of the params or a predicate ``(key_path, leaf) -> bool`` (see
:mod:`lightfn.freezing`). Gradients are taken with respect to the trainable leaves only;
frozen leaves enter ``loss_fn`` as constants and come back as the very same tensors, and
the optimizer state covers the trainable leaves only, so build the state with the same
``trainable=``: ``lf.TrainState.create(params=..., optimizer=opt, trainable=...)``.
Frozen BatchNorm layers keep updating their running statistics in training mode; to keep
them in eval mode, functionalize with ``lf.functionalize(model, eval_modules=["backbone"])``.

>>> import torch, lightfn as lf
>>> def loss_fn(params, batch):
...     x, y = batch
...     err = x @ params["w"] - y
...     return (err ** 2).mean(), {"mae": err.abs().mean()}
>>> opt = lf.optim.sgd(0.1)
>>> state = lf.TrainState.create(params={"w": torch.zeros(3)}, optimizer=opt)
>>> step = lf.train_step(loss_fn, opt)
>>> state, metrics = step(state, (torch.eye(3), torch.ones(3)))
>>> int(state.step), sorted(metrics)
(1, ['loss', 'mae'])

A little over ~300 lines: the train step's one concept includes its precision modes, loss
scaling, trainable subsets and the eager fast path (the precision table is in
:mod:`lightfn._precision`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from . import random as lf_random
from . import tree
from ._diagnostics import describe
from .errors import StateMismatchError, StepError, TreeError
from .metrics import Sum, check_states
from .optim import GradientTransformation, apply_updates
from .optim._checks import with_types_of
from .freezing import partition, split_leaves
from .state import LossScale, TrainState
from ._eager import global_rng_state, plain_eager, same_rng_state, set_global_rng_state
from .transforms import autograd_value_and_grad, value_and_grad
from ._precision import PRECISIONS, TRUE_DTYPES, autocast_for, batch_dtype_of, check_precision, update_loss_scale

__all__ = ["TrainStep", "EvalStep", "train_step", "eval_step", "PRECISIONS"]

_NO_SCOPE = contextlib.nullcontext()


def _split_output(out: Any, with_state: bool) -> tuple[Any, dict[str, Any], Any]:
    """Normalize loss_fn's return value to (loss, metrics, new_buffers), checking its form."""
    if with_state:
        if not (isinstance(out, tuple) and len(out) == 3):
            raise StepError(
                "with with_state=True, loss_fn(params, buffers, batch) must return (loss, metrics, new_buffers), "
                f"got {describe(out)}"
            )
        loss, metrics, new_buffers = out
    elif isinstance(out, tuple):
        if len(out) != 2:
            raise StepError(f"loss_fn must return a scalar loss or (loss, metrics_dict), got a tuple of {len(out)}")
        (loss, metrics), new_buffers = out, None
    else:
        loss, metrics, new_buffers = out, {}, None
    if not isinstance(loss, torch.Tensor):
        raise StepError(f"loss_fn must return a scalar loss tensor (or (loss, metrics)), got {describe(loss)}")
    if loss.numel() != 1:
        raise StepError(f"loss_fn returned a loss of shape {tuple(loss.shape)}; it must be a scalar: reduce it (e.g. .mean())")
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, Mapping):
        raise StepError(f"loss_fn's metrics must be a dict of scalars, got {describe(metrics)}")
    for name, value in metrics.items():
        if not isinstance(name, str):
            raise StepError(f"metric names must be strings, got {name!r}")
        if isinstance(value, Sum):
            check_states({name: value.value}, "loss_fn")
            continue
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            raise StepError(f"metric {name!r} must be a scalar tensor, got {describe(value)}")
    return loss, dict(metrics), new_buffers


def _scalar_metrics(loss: torch.Tensor, metrics: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"loss": loss.detach().reshape(())}
    for name, value in metrics.items():
        # an lf.metrics.Sum state keeps its shapes: fit sums it over the epoch
        out[name] = tree.map(lambda x: x.detach(), value) if isinstance(value, Sum) else value.detach().reshape(())
    return out


def _check_state(state: Any) -> TrainState:
    if not isinstance(state, TrainState):
        hint = ""
        if isinstance(state, dict) and {"params", "opt_state"} <= set(state):
            # lf.load without a template gives the TrainState's fields as a dict
            hint = "; a checkpoint loads as a TrainState with lf.load(path, like=state) (state: a fresh lf.TrainState)"
        raise StepError(f"a lightfn step takes a TrainState as its first argument, got {type(state).__name__}{hint}")
    return state


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainStep:
    """A pure training step ``(state, batch) -> (new_state, metrics)``; see module docs.

    Fields can be swapped with ``.replace(...)``: ``grad_transform(grads) -> grads`` runs
    between differentiation and the optimizer (the sharding layer's all-reduce goes here).

    ``grad_fn`` replaces how gradients are computed (``None``: ``value_and_grad`` of the
    batch loss). It is called as ``grad_fn(objective, params, batch, key)`` and returns
    ``((loss, metrics, new_buffers), grads)``, where ``objective(params, batch, key) ->
    (loss, (loss, metrics, new_buffers))`` runs ``loss_fn`` on any (sub)batch with this
    step's precision and inside ``rng_scope(key)``, and ``key`` is the step's key.
    :func:`lightfn.privacy.dp_train_step` computes clipped, noised per-sample gradients
    here; the optimizer update and the rest of the step are shared.

    ``trainable`` (``None``: all params train) restricts training to a subset; with it,
    ``grad_transform``'s grads and the optimizer's updates and state are the trainable
    part only (the params' structure, ``None`` at frozen leaves), and ``grad_fn`` gets the
    trainable leaves as a flat list (``torch.func`` cannot differentiate a ``None`` leaf).
    """

    loss_fn: Callable[..., Any]
    optimizer: GradientTransformation
    with_state: bool = False
    precision: str = "32-true"
    grad_transform: Callable[[Any], Any] | None = None
    grad_fn: Callable[..., Any] | None = None
    trainable: Any = dataclasses.field(default=None, hash=False)

    def __post_init__(self) -> None:
        # What plain eager calls learned about loss_fn (whether it draws random numbers):
        # outside the fields, so neither equality nor the compile cache's key sees it.
        object.__setattr__(self, "_learned", {})
        check_precision(self.precision)
        if self.grad_fn is not None and self.precision == "16-mixed":
            raise StepError(
                'precision="16-mixed" scales the loss, which a custom grad_fn (e.g. DP-SGD\'s per-sample clipping) '
                'does not undo; use "bf16-mixed" or "32-true"'
            )
        if not isinstance(self.optimizer, GradientTransformation):
            raise StepError(f"optimizer must be an lf.optim GradientTransformation, got {type(self.optimizer).__name__}")

    def replace(self, **changes: Any) -> "TrainStep":
        return dataclasses.replace(self, **changes)

    batch_dtype = property(batch_dtype_of)

    def init_opt_state(self, params: Any) -> Any:
        """``optimizer.init`` of the params this step trains (all of them without ``trainable``)."""
        return self.optimizer.init(params if self.trainable is None else partition(params, self.trainable)[0])

    def prepare_state(self, state: TrainState) -> TrainState:
        """Adapt a fresh state to this step's precision: cast params (and optimizer state)
        for ``*-true`` precisions, add a :class:`LossScale` for ``"16-mixed"``."""
        state = _check_state(state)
        dtype = TRUE_DTYPES.get(self.precision)
        if dtype is not None:
            state = state.replace(params=tree.cast(state.params, dtype), opt_state=tree.cast(state.opt_state, dtype))
        if self.precision == "16-mixed" and state.loss_scale is None:
            state = state.replace(loss_scale=LossScale.create(device=state.step.device))
        return state

    def __call__(self, state: TrainState, batch: Any) -> tuple[TrainState, dict[str, torch.Tensor]]:
        state = _check_state(state)
        scaling = self.precision == "16-mixed"
        if scaling and state.loss_scale is None:
            raise StepError('precision="16-mixed" needs state.loss_scale: call step.prepare_state(state) first')
        # Plain eager with the default gradient: plain autograd (see below), and the step's
        # key is derived only if loss_fn draws a random number (the scope calls this thunk).
        eager = self.grad_fn is None and plain_eager()
        key: Any = (lambda: lf_random.fold_in(state.rng, state.step)) if eager else lf_random.fold_in(state.rng, state.step)
        scale = state.loss_scale.scale if scaling else None

        def objective(params: Any, batch: Any, key: Any) -> tuple[torch.Tensor, tuple[Any, ...]]:
            # Autocast covers the forward only, as with torch's autocast + .backward(): opened
            # around the grad call instead, it would also cast the backward, so a region the
            # user runs with autocast disabled would get bf16 gradients. Attention dropout,
            # whose CPU kernel mixes dtypes under torch.func.grad + autocast, is rewritten by
            # rng_scope as plain ops (lightfn/random/_attention.py).
            with autocast_for(self.precision, params), (lf_random.rng_scope(key) if key is not None else _NO_SCOPE):
                if self.with_state:
                    out = self.loss_fn(params, state.buffers, batch)
                else:
                    out = self.loss_fn(params, batch)
            loss, metrics, new_buffers = _split_output(out, self.with_state)
            loss = loss.reshape(())
            scaled = loss.float() * scale if scale is not None else loss
            # torch.func's aux must be tensors only: no buffers is an empty dict, not None.
            return scaled, (loss, metrics, {} if new_buffers is None else new_buffers)

        if self.trainable is None:
            diff_in, loss_of = state.params, objective
        else:
            # Differentiate w.r.t. the trainable leaves only: frozen leaves are closed over as
            # constants, so autograd never computes (or backpropagates towards) their grads.
            diff_in, to_params, to_part = split_leaves(state.params, self.trainable)
            loss_of = lambda p, b, k: objective(to_params(p), b, k)  # noqa: E731
        # Eagerly, torch.func.grad_and_value costs as much again as the backward; plain
        # autograd computes the same grads. Traced, vmapped or captured steps keep torch.func.
        fast = self._eager_grads(loss_of, diff_in, batch, key) if eager else None
        if fast is not None:
            (_, (loss, metrics, new_buffers)), grads = fast
        elif self.grad_fn is None:
            key = key() if callable(key) else key
            (_, (loss, metrics, new_buffers)), grads = value_and_grad(loss_of, has_aux=True)(diff_in, batch, key)
        else:
            (loss, metrics, new_buffers), grads = self.grad_fn(loss_of, diff_in, batch, key)
        params_in = state.params
        if self.trainable is not None:  # the optimizer sees the trainable part, None at frozen leaves
            params_in, grads = to_part(diff_in), to_part(grads)
        if scale is not None:
            grads = tree.map(lambda g: g / scale.to(g.dtype) if g.is_floating_point() else g, grads)
        if self.grad_transform is not None:
            grads = self.grad_transform(grads)
        updates, opt_state = self._update(grads, state.opt_state, params_in)
        params = apply_updates(params_in, updates)
        if self.trainable is not None:
            params = to_params(tree.leaves(params))
        buffers = new_buffers if self.with_state else state.buffers
        loss_scale = state.loss_scale
        if scaling:
            finite = torch.stack([torch.isfinite(g).all() for g in tree.leaves(grads)]).all()
            params = tree.where(finite, params, state.params)
            opt_state = tree.where(finite, opt_state, with_types_of(opt_state, state.opt_state))
            loss_scale = update_loss_scale(state.loss_scale, finite)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, buffers=buffers, loss_scale=loss_scale)
        out = _scalar_metrics(loss, metrics)
        if scaling:
            out["loss_scale"] = state.loss_scale.scale.detach()
        return new_state, out

    def _eager_grads(self, loss_of: Callable[..., Any], diff_in: Any, batch: Any, key: Any) -> Any:
        """Plain autograd's ``((value, aux), grads)``, or None where torch.func must take them.

        Until the loss has once drawn a random number, it runs without ``rng_scope``, whose
        function mode every torch call in the loss would pass through (about 10 us each).
        A call that did draw left torch's global generators advanced: they are put back and
        the call runs again inside the scope, as does every later call of this step, so
        every draw comes from the step's key as it does compiled. (Not seen: a loss that
        draws only through an explicit ``generator=`` or inside ``torch.random.fork_rng``,
        which leave the global generators as they were. Such draws come from that generator
        eagerly and from the key compiled; draw without them inside a step.)
        """
        grads_of = autograd_value_and_grad(loss_of, has_aux=True)
        if self._learned.get("draws"):
            return grads_of(diff_in, batch, key)
        before = global_rng_state()
        out = grads_of(diff_in, batch, None)
        if out is None or same_rng_state(before, global_rng_state()):
            return out
        set_global_rng_state(before)
        self._learned["draws"] = True
        return grads_of(diff_in, batch, key)

    def _update(self, grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
        if self.trainable is None or torch.compiler.is_compiling():
            return self.optimizer.update(grads, opt_state, params)
        try:
            return self.optimizer.update(grads, opt_state, params)
        except (TreeError, StateMismatchError) as e:
            raise StepError(
                f"{e}\nThis step trains a subset of the params (trainable=...), so its optimizer state must cover "
                "that subset only: create the state with lf.TrainState.create(params=..., optimizer=opt, "
                "trainable=<the step's trainable>) (or opt_state=step.init_opt_state(params))."
            ) from e


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalStep:
    """A pure evaluation step ``(state, batch) -> metrics`` (no gradients).

    Metrics are ``{"loss": ..., **loss_fn's metrics}``. To evaluate in eval mode, give it a
    loss function that calls ``apply(..., train=False)``.
    """

    loss_fn: Callable[..., Any]
    with_state: bool = False
    precision: str = "32-true"

    def __post_init__(self) -> None:
        check_precision(self.precision)

    def replace(self, **changes: Any) -> "EvalStep":
        return dataclasses.replace(self, **changes)

    batch_dtype = property(batch_dtype_of)

    def __call__(self, state: TrainState, batch: Any) -> dict[str, torch.Tensor]:
        state = _check_state(state)
        key = lf_random.fold_in(lf_random.fold_in(state.rng, state.step), 0x5EED)
        with torch.no_grad(), autocast_for(self.precision, state.params), lf_random.rng_scope(key):
            if self.with_state:
                out = self.loss_fn(state.params, state.buffers, batch)
            else:
                out = self.loss_fn(state.params, batch)
        loss, metrics, _ = _split_output(out, self.with_state)
        return _scalar_metrics(loss.float(), metrics)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: GradientTransformation,
    *,
    with_state: bool = False,
    precision: str = "32-true",
    grad_transform: Callable[[Any], Any] | None = None,
    grad_fn: Callable[..., Any] | None = None,
    trainable: Any = None,
) -> TrainStep:
    """Build the pure step ``(state, batch) -> (new_state, metrics)`` for ``loss_fn``.

    See the module docstring for the forms ``loss_fn`` may take and what precision means,
    and :class:`TrainStep` for ``grad_transform`` and ``grad_fn``.

    ``trainable`` trains only part of the params: a pytree of Python bools with the params'
    structure or a prefix of it (``{"backbone": False, "head": True}``), or a predicate
    ``trainable(key_path, leaf) -> bool`` with ``key_path`` as in
    :func:`lightfn.tree.leaves_with_path`. Frozen params stay bit-identical, get no
    gradient and no optimizer state; create the state with the same ``trainable=``.
    """
    return TrainStep(
        loss_fn=loss_fn, optimizer=optimizer, with_state=with_state, precision=precision,
        grad_transform=grad_transform, grad_fn=grad_fn, trainable=trainable,
    )


def eval_step(loss_fn: Callable[..., Any], *, with_state: bool = False, precision: str = "32-true") -> EvalStep:
    """Build the pure evaluation step ``(state, batch) -> metrics`` for ``loss_fn``."""
    return EvalStep(loss_fn=loss_fn, with_state=with_state, precision=precision)
