"""Ready-made optimizers with torch.optim's names, defaults and arithmetic.

Each is a :func:`~lightfn.optim.base.chain` of transforms, so its state is a tuple of
small NamedTuples. Arguments keep torch.optim's names and positional order
(``adam(1e-3, (0.9, 0.999), 1e-8, 0.0, False)``); ``betas`` may also be given as optax's
``b1``/``b2``, and ``lr`` as optax's ``learning_rate=``. ``lr`` is a float, a 0-d tensor or a schedule ``count -> lr`` everywhere; every other
numeric argument (betas, ``eps``, ``weight_decay``, ``momentum``, ...) is a float or a 0-d
tensor. Tensors are what :func:`~lightfn.optim.inject.inject_hyperparams` passes, so each
of them can be injected (and swept under ``lf.ensemble``, or scheduled). A tensor is used
as data: its value is not range-checked (reading it would sync the host) and a transform
switched on by a nonzero value (weight decay, momentum) is always kept, which computes
the same numbers when the value is 0.

Weight decay follows torch: ``sgd``/``adam``/``rmsprop``/``adagrad`` add
``weight_decay * param`` to the gradient (L2), ``adamw``/``lion`` decay the weights
directly (decoupled, scaled by the learning rate).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptimizerConfigError
from ._checks import check_learning_rate, scalar_dtype, tensor_hyperparam
from .adaptive import scale_by_adam, scale_by_lion, scale_by_rms, scale_by_rss, scale_by_stddev
from .base import GradientTransformation, chain
from .transforms import ScalarOrSchedule, add_decayed_weights, scale_by_learning_rate, trace

Scalar = float | torch.Tensor

__all__ = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "lion"]


def _rate(lr: ScalarOrSchedule, learning_rate: ScalarOrSchedule | None, name: str, default: float) -> ScalarOrSchedule:
    """The learning rate given as torch's ``lr`` or as optax's ``learning_rate=`` (so
    ``inject_hyperparams(adam)(learning_rate=1e-3)`` reads as in optax); not both."""
    if learning_rate is None:
        return lr
    if not (isinstance(lr, float) and lr == default):
        raise OptimizerConfigError(f"{name}: pass the learning rate once, as lr or as learning_rate=, not both")
    return learning_rate


def _check_lr(lr: ScalarOrSchedule, name: str) -> None:
    check_learning_rate(lr, name)
    if isinstance(lr, (int, float)) and lr < 0:
        raise OptimizerConfigError(f"{name}: invalid learning rate {lr} (must be >= 0)")


def _check_range(
    name: str, value: Scalar, optimizer: str, *, upper: float | None = None, arg: str | None = None
) -> None:
    """Range-check a Python number (torch.optim's message); check a tensor's shape only,
    naming the argument ``arg`` (default: ``name`` without " value")."""
    if tensor_hyperparam(value, optimizer, arg or name.removesuffix(" value")):
        return
    if value < 0 or (upper is not None and value >= upper):
        bound = f"[0, {upper})" if upper is not None else ">= 0"
        raise OptimizerConfigError(f"{optimizer}: invalid {name} {value} (must be {bound})")


def _betas(betas: tuple[Scalar, Scalar], b1: Scalar | None, b2: Scalar | None, optimizer: str) -> tuple[Scalar, Scalar]:
    if len(betas) != 2:
        raise OptimizerConfigError(f"{optimizer}: betas must be a pair (b1, b2), got {betas!r}")
    out = (betas[0] if b1 is None else b1, betas[1] if b2 is None else b2)
    _check_range("beta parameter at index 0", out[0], optimizer, upper=1.0, arg="b1 (betas[0])")
    _check_range("beta parameter at index 1", out[1], optimizer, upper=1.0, arg="b2 (betas[1])")
    return out


def _adam_args(name: str, lr: ScalarOrSchedule, learning_rate: ScalarOrSchedule | None,
               betas: tuple[Scalar, Scalar], b1: Scalar | None, b2: Scalar | None, eps: Scalar,
               weight_decay: Scalar) -> tuple[ScalarOrSchedule, Scalar, Scalar]:
    """``(lr, b1, b2)`` of adam/adamw after checking their shared arguments."""
    lr = _rate(lr, learning_rate, name, 1e-3)
    _check_lr(lr, name)
    b1, b2 = _betas(betas, b1, b2, name)
    _check_range("epsilon value", eps, name, arg="eps")
    _check_range("weight_decay value", weight_decay, name)
    return lr, b1, b2


def _maybe(condition: bool, transform: GradientTransformation) -> tuple[GradientTransformation, ...]:
    return (transform,) if condition else ()


def _nonzero(value: float | torch.Tensor) -> bool:
    """Whether a transform switched on by ``value`` is needed: always for a tensor, whose
    value is data (and the transform with 0 computes what leaving it out does)."""
    return isinstance(value, torch.Tensor) or value != 0


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: Scalar = 0.0,
    dampening: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    nesterov: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """torch.optim.SGD: ``d = g + wd * p``; momentum ``buf = momentum * buf + (1 - dampening) * d``
    (``buf = d`` on the first step); ``p -= lr * buf`` (``lr * (d + momentum * buf)`` with nesterov)."""
    lr = _rate(lr, learning_rate, "sgd", 1e-3)
    _check_lr(lr, "sgd")
    _check_range("momentum value", momentum, "sgd")
    _check_range("weight_decay value", weight_decay, "sgd")
    tensor_hyperparam(dampening, "sgd", "dampening")
    numbers = not isinstance(momentum, torch.Tensor) and not isinstance(dampening, torch.Tensor)
    if nesterov and numbers and (momentum <= 0 or dampening != 0):
        raise OptimizerConfigError("sgd: Nesterov momentum requires a momentum > 0 and zero dampening")
    return chain(
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay)),
        *_maybe(_nonzero(momentum), trace(momentum, nesterov=nesterov, dampening=dampening)),
        scale_by_learning_rate(lr),
    )


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    amsgrad: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    b1: Scalar | None = None,
    b2: Scalar | None = None,
    eps_root: Scalar = 0.0,
) -> GradientTransformation:
    """torch.optim.Adam, with ``weight_decay`` as L2 (added to the gradient before the moments)."""
    lr, b1, b2 = _adam_args("adam", lr, learning_rate, betas, b1, b2, eps, weight_decay)
    return chain(
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay)),
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        scale_by_learning_rate(lr),
    )


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    amsgrad: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    b1: Scalar | None = None,
    b2: Scalar | None = None,
    eps_root: Scalar = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """torch.optim.AdamW: Adam plus decoupled weight decay ``p -= lr * weight_decay * p``.

    ``mask`` (bool pytree or ``params -> mask``) limits the decay to some leaves.
    """
    lr, b1, b2 = _adam_args("adamw", lr, learning_rate, betas, b1, b2, eps, weight_decay)
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: Scalar = 0.99,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum: Scalar = 0.0,
    centered: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """torch.optim.RMSprop: ``g / (sqrt(avg g**2) + eps)`` (centered: minus the squared mean
    gradient under the root), momentum on that, then ``-lr``; ``weight_decay`` is L2."""
    lr = _rate(lr, learning_rate, "rmsprop", 1e-2)
    _check_lr(lr, "rmsprop")
    _check_range("alpha value", alpha, "rmsprop", upper=1.0)
    _check_range("epsilon value", eps, "rmsprop", arg="eps")
    _check_range("weight_decay value", weight_decay, "rmsprop")
    _check_range("momentum value", momentum, "rmsprop")
    scaling = scale_by_stddev(alpha, eps) if centered else scale_by_rms(alpha, eps)
    return chain(
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay)),
        scaling,
        *_maybe(_nonzero(momentum), trace(momentum)),
        scale_by_learning_rate(lr),
    )


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: Scalar = 0.0,
    weight_decay: Scalar = 0.0,
    initial_accumulator_value: Scalar = 0.0,
    eps: Scalar = 1e-10,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """torch.optim.Adagrad: ``p -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum g**2) + eps)``;
    ``weight_decay`` is L2. The decayed rate is what ``current_lr`` reports."""
    lr = _rate(lr, learning_rate, "adagrad", 1e-2)
    _check_lr(lr, "adagrad")
    _check_range("lr_decay value", lr_decay, "adagrad")
    _check_range("weight_decay value", weight_decay, "adagrad")
    _check_range("initial_accumulator_value", initial_accumulator_value, "adagrad")
    _check_range("epsilon value", eps, "adagrad", arg="eps")
    return chain(
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay)),
        scale_by_rss(initial_accumulator_value, eps),
        scale_by_learning_rate(_with_lr_decay(lr, lr_decay) if _nonzero(lr_decay) else lr),
    )


def _with_lr_decay(lr: ScalarOrSchedule, lr_decay: Scalar) -> Any:
    def schedule(count: int | torch.Tensor) -> float | torch.Tensor:
        # ``count`` is the number of earlier updates, i.e. torch's ``step - 1``.
        c = count.to(scalar_dtype(count.device)) if isinstance(count, torch.Tensor) else float(count)
        base = lr(count) if callable(lr) else lr
        return base / (1.0 + c * lr_decay)

    return schedule


def lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[Scalar, Scalar] = (0.9, 0.99),
    weight_decay: Scalar = 0.0,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    b1: Scalar | None = None,
    b2: Scalar | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``p -= lr * (sign(b1 * m + (1 - b1) * g) + weight_decay * p)``,
    then ``m = b2 * m + (1 - b2) * g``. Use a learning rate 3-10x smaller than AdamW's."""
    lr = _rate(lr, learning_rate, "lion", 1e-4)
    _check_lr(lr, "lion")
    b1, b2 = _betas(betas, b1, b2, "lion")
    _check_range("weight_decay value", weight_decay, "lion")
    return chain(
        scale_by_lion(b1, b2),
        *_maybe(_nonzero(weight_decay), add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )
