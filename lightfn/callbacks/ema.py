"""EMA: an exponential moving average of the params, validated and checkpointed.

After every train step the average moves toward the current params,
``avg = avg + (1 - decay) * (params - avg)`` (one fused ``lerp`` over all leaves, on the
device, outside the step's graph: the compiled step is unchanged). With
``validate_with_ema`` every validation evaluates the averaged params (the state's other
parts, e.g. BatchNorm buffers, as they are), so ``val/<name>`` and a ``ModelCheckpoint``
monitoring it judge the average. The average is in every checkpoint fit writes (under
the callback's state), so a resumed run continues it bit for bit.

>>> import lightfn as lf
>>> ema = lf.callbacks.EMA(decay=0.999)
>>> # state = lf.fit(step, state, data, val_data=val, eval_step=ev, callbacks=[ema])
>>> # ema.params: the averaged params, the same tree as state.params

Other "callbacks that act" are a few lines on ``Signal(state=...)``, which replaces the
state training continues from (same structure, shapes and dtypes; never change
``ctx.state`` in place, and hand over tensors you don't keep: a compiled step overwrites
them).

Stochastic weight averaging (an equal-weight average of the params at each epoch end from
``start`` on, put in place when training ends; recompute BatchNorm statistics afterwards
if the model has any)::

    class SWA(lf.callbacks.Callback):
        def __init__(self, start: int):
            self.start, self.n, self.avg = start, 0, None

        def on_epoch_end(self, ctx):
            if ctx.epoch >= self.start:
                p, self.n = ctx.state.params, self.n + 1
                self.avg = (lf.tree.map(torch.clone, p) if self.avg is None
                            else lf.tree.map(lambda a, x: a + (x - a) / self.n, self.avg, p))

        def on_fit_end(self, ctx):
            if self.avg is not None:
                return lf.callbacks.Signal(state=ctx.state.replace(params=self.avg))

Unfreezing a backbone after ``n`` epochs: give the backbone its own learning rate held in
the optimizer state (``lf.optim.inject_hyperparams``), 0 at first, and raise it when epoch
``n`` starts (the step stays the same compiled graph: only a state value changes)::

    backbone = lf.optim.inject_hyperparams(lf.optim.adam)(lr=0.0)
    opt = lf.optim.multi_transform({"backbone": backbone, "head": lf.optim.adam(1e-3)},
                                   {"backbone": "backbone", "head": "head"})

    class Unfreeze(lf.callbacks.Callback):
        def __init__(self, n: int, lr: float):
            self.n, self.lr = n, lr

        def on_train_epoch_start(self, ctx):
            if ctx.epoch != self.n:
                return None
            def set_lr(path, x):  # the backbone's injected learning rate: a 0-d tensor
                key = lf.tree.keystr(path)
                return torch.full_like(x, self.lr) if "'backbone'" in key and key.endswith("['lr']") else x
            opt_state = lf.tree.map_with_path(set_lr, ctx.state.opt_state)
            return lf.callbacks.Signal(state=ctx.state.replace(opt_state=opt_state))
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .. import tree
from ..errors import MisconfigurationError
from ..state import TrainState
from .base import Callback, Context, Signal

__all__ = ["EMA"]


class EMA(Callback):
    """Keep an exponential moving average of the params; validate and checkpoint it.

    Args:
        decay: weight of the old average at each update, in ``[0, 1]`` (0.999: an average
            over roughly the last 1000 steps).
        validate_with_ema: validations (sanity included) evaluate the averaged params, so
            the ``val/`` metrics, and callbacks monitoring them, reflect the average.
            Training always continues from its own params.
        start_step: until this many train steps are done the average just follows the
            params (a copy after each step); it averages from the next step on.

    The state must be an ``lf.TrainState`` (or a dict with a ``"params"`` entry). The
    average has the params' dtypes (floating leaves are averaged; others are copied).
    With ``accumulate_grad_batches=k`` it still updates after every step (call of the step).

    Attributes:
        params: the averaged params after (or during) fit, the same tree as
            ``state.params``; raises before fit started.
    """

    def __init__(self, decay: float = 0.999, *, validate_with_ema: bool = True, start_step: int = 0) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay <= 1.0:
            raise MisconfigurationError(f"EMA: decay must be a number in [0, 1], got {decay!r}")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise MisconfigurationError(f"EMA: start_step must be an int >= 0, got {start_step!r}")
        self.decay = float(decay)
        self.validate_with_ema = validate_with_ema
        self.start_step = start_step
        self._avg: list[torch.Tensor] | None = None
        self._paths: list[str] = []
        self._treedef: Any = None
        self._loaded: Mapping[str, torch.Tensor] | None = None  # from a checkpoint, until on_fit_start

    @property
    def state_key(self) -> str:
        return f"EMA[decay={self.decay!r}]"

    @property
    def params(self) -> Any:
        if self._avg is None:
            raise MisconfigurationError("EMA.params: no average yet; it starts when fit starts")
        return tree.unflatten(self._treedef, self._avg)

    # -- hooks ------------------------------------------------------------------------------

    def on_fit_start(self, ctx: Context) -> Signal | None:
        pairs = tree.leaves_with_path(_params(ctx.state))
        self._treedef = tree.structure(_params(ctx.state))
        self._paths = [tree.keystr(p) for p, _ in pairs]
        current = [x for _, x in pairs]
        if self._loaded is None:
            self._avg = [x.detach().clone() for x in current]
            return None
        loaded, self._loaded = self._loaded, None
        if sorted(loaded) != sorted(self._paths):
            missing = sorted(set(self._paths) - set(loaded)) or sorted(set(loaded) - set(self._paths))
            raise MisconfigurationError(
                f"EMA: the checkpoint's average does not match the params (first differing path: {missing[0]}); "
                "resume with the model that wrote it"
            )
        for path, x in zip(self._paths, current):
            y = loaded[path]
            if y.shape != x.shape or y.dtype != x.dtype:
                raise MisconfigurationError(
                    f"EMA: the checkpoint's average at {path} is {y.dtype} {tuple(y.shape)}, the params' is "
                    f"{x.dtype} {tuple(x.shape)}; resume with the model that wrote it"
                )
        self._avg = [loaded[p].to(x.device) for p, x in zip(self._paths, current)]
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        assert self._avg is not None
        current = tree.leaves(_params(ctx.state))
        with torch.no_grad():
            if ctx.step <= self.start_step:
                for a, x in zip(self._avg, current):
                    a.copy_(x)
                return None
            floats = [(a, x) for a, x in zip(self._avg, current) if a.is_floating_point()]
            if floats:
                torch._foreach_lerp_([a for a, _ in floats], [x for _, x in floats], 1.0 - self.decay)
            for a, x in zip(self._avg, current):
                if not a.is_floating_point():
                    a.copy_(x)
        return None

    def on_validation_start(self, ctx: Context) -> Signal | None:
        if not self.validate_with_ema or self._avg is None:
            return None
        return Signal(eval_state=_with_params(ctx.state, self.params))

    # -- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self._avg is None:
            return {}
        return {"decay": self.decay, "start_step": self.start_step, "params": dict(zip(self._paths, self._avg))}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("decay") != self.decay or state.get("start_step") != self.start_step:
            raise MisconfigurationError(
                f"EMA(decay={self.decay}, start_step={self.start_step}) cannot resume the average of "
                f"EMA(decay={state.get('decay')}, start_step={state.get('start_step')}); resume with the same arguments"
            )
        self._loaded = dict(state["params"])


def _params(state: Any) -> Any:
    if isinstance(state, TrainState):
        return state.params
    if isinstance(state, Mapping) and "params" in state:
        return state["params"]
    raise MisconfigurationError(
        f"EMA averages state.params: the state must be an lf.TrainState or a dict with a 'params' entry, "
        f"got {type(state).__name__}"
    )


def _with_params(state: Any, params: Any) -> Any:
    if isinstance(state, TrainState):
        return state.replace(params=params)
    return {**state, "params": params}
