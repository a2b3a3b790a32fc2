"""TrainState: everything a training run needs, as one pytree.

Params, optimizer state, the step counter, the RNG key, model buffers (BatchNorm
statistics), the loss scale for fp16 and any extra user state (an EMA of the params) live
in one frozen dataclass registered as a pytree node. A train step maps it to a new one; a
checkpoint saves it whole; ``lf.tree.map`` moves or casts it in one call.

>>> import torch, lightfn as lf
>>> params = {"w": torch.zeros(3)}
>>> state = lf.TrainState.create(params=params, optimizer=lf.optim.sgd(0.1), seed=0)
>>> int(state.step), sorted(state.params)
(0, ['w'])
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from . import random as lf_random
from . import tree
from .errors import StepError
from .optim import GradientTransformation
from .freezing import partition

__all__ = ["TrainState", "LossScale"]


@tree.pytree_dataclass
class LossScale:
    """Dynamic loss scaling for ``"16-mixed"`` precision, kept as pure state.

    ``scale`` multiplies the loss before backward; after ``growth_interval`` consecutive
    finite steps it grows by ``growth_factor``; a step with inf/NaN grads is skipped and
    the scale backs off by ``backoff_factor``. Same defaults as ``torch.amp.GradScaler``.
    """

    scale: torch.Tensor
    good_steps: torch.Tensor
    growth_factor: float = tree.static_field(default=2.0)
    backoff_factor: float = tree.static_field(default=0.5)
    growth_interval: int = tree.static_field(default=2000)

    @classmethod
    def create(cls, init_scale: float = 2.0**16, *, device: torch.device | str | None = None, **kw: Any) -> "LossScale":
        return cls(
            scale=torch.tensor(init_scale, dtype=torch.float32, device=device),
            good_steps=torch.zeros((), dtype=torch.int64, device=device),
            **kw,
        )


@tree.pytree_dataclass
class TrainState:
    """The whole state of a training run (a pytree; frozen; use ``.replace``).

    Fields:
        step: 0-d int64 tensor, the number of train-step calls (one per batch; with
            gradient accumulation the optimizer updates every k of them).
        params: the trainable parameters (a pytree of tensors).
        opt_state: the optimizer's state (``optimizer.init(params)``).
        rng: a key from :mod:`lightfn.random`; each step derives its own key from it and
            ``step``, so randomness is reproducible across a resume.
        buffers: non-trainable model state (e.g. BatchNorm running stats); ``{}`` if none.
        loss_scale: a :class:`LossScale` for ``"16-mixed"``, else ``None``.
        extra: a dict of any further user state (EMA params, counters...).
    """

    step: torch.Tensor
    params: Any
    opt_state: Any
    rng: torch.Tensor
    buffers: Any = dataclasses.field(default_factory=dict)
    loss_scale: LossScale | None = None
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def create(
        cls,
        *,
        params: Any,
        optimizer: GradientTransformation,
        seed: int = 0,
        buffers: Any = None,
        loss_scale: LossScale | None = None,
        extra: dict[str, Any] | None = None,
        trainable: Any = None,
    ) -> "TrainState":
        """A fresh state: step 0, ``optimizer.init(params)``, an RNG key from ``seed``.

        Tensors are put on the device of the first parameter. With ``trainable`` (the
        same value given to ``lf.train_step(..., trainable=...)``), the optimizer state is
        ``optimizer.init`` of the trainable params only: frozen params get no moments.
        """
        bad = [(p, x) for p, x in tree.leaves_with_path(params) if not isinstance(x, torch.Tensor)]
        if bad:
            p, x = bad[0]
            raise StepError(
                f"params{tree.keystr(p)} is a {type(x).__name__}, not a tensor: params must be a pytree of tensors "
                "(use lf.functionalize(module) to get one from an nn.Module)"
            )
        if not isinstance(optimizer, GradientTransformation):
            raise StepError(
                f"optimizer must be an lf.optim GradientTransformation (e.g. lf.optim.adam(1e-3)), got {type(optimizer).__name__}"
            )
        first = tree.leaves(params)
        device = first[0].device if first else None
        return cls(
            step=torch.zeros((), dtype=torch.int64, device=device),
            params=params,
            opt_state=optimizer.init(params if trainable is None else partition(params, trainable)[0]),
            rng=lf_random.key(seed, device=device),
            buffers={} if buffers is None else buffers,
            loss_scale=loss_scale,
            extra={} if extra is None else extra,
        )
