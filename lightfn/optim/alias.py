"""Ready-made optimizers with torch.optim's names, defaults and arithmetic.

Each is a :func:`~lightfn.optim.base.chain` of transforms, so its state is a tuple of
small NamedTuples. Arguments keep torch.optim's names and positional order
(``adam(1e-3, (0.9, 0.999), 1e-8, 0.0, False)``); ``betas`` may also be given as optax's
``b1``/``b2``. ``lr`` is a float, a 0-d tensor or a schedule ``count -> lr`` everywhere.

Weight decay follows torch: ``sgd``/``adam``/``rmsprop``/``adagrad`` add
``weight_decay * param`` to the gradient (L2), ``adamw``/``lion`` decay the weights
directly (decoupled, scaled by the learning rate).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import OptimizerConfigError
from ._checks import check_learning_rate, scalar_dtype
from .adaptive import scale_by_adam, scale_by_lion, scale_by_rms, scale_by_rss, scale_by_stddev
from .base import GradientTransformation, chain
from .transforms import ScalarOrSchedule, add_decayed_weights, scale_by_learning_rate, trace

__all__ = ["sgd", "adam", "adamw", "rmsprop", "adagrad", "lion"]


def _check_lr(lr: ScalarOrSchedule, name: str) -> None:
    check_learning_rate(lr, name)
    if isinstance(lr, (int, float)) and lr < 0:
        raise OptimizerConfigError(f"{name}: invalid learning rate {lr} (must be >= 0)")


def _check_range(name: str, value: float, optimizer: str, *, upper: float | None = None) -> None:
    if value < 0 or (upper is not None and value >= upper):
        bound = f"[0, {upper})" if upper is not None else ">= 0"
        raise OptimizerConfigError(f"{optimizer}: invalid {name} {value} (must be {bound})")


def _betas(betas: tuple[float, float], b1: float | None, b2: float | None, optimizer: str) -> tuple[float, float]:
    if len(betas) != 2:
        raise OptimizerConfigError(f"{optimizer}: betas must be a pair (b1, b2), got {betas!r}")
    out = (betas[0] if b1 is None else b1, betas[1] if b2 is None else b2)
    _check_range("beta parameter at index 0", out[0], optimizer, upper=1.0)
    _check_range("beta parameter at index 1", out[1], optimizer, upper=1.0)
    return out


def _maybe(condition: bool, transform: GradientTransformation) -> tuple[GradientTransformation, ...]:
    return (transform,) if condition else ()


def sgd(
    lr: ScalarOrSchedule = 1e-3,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
) -> GradientTransformation:
    """torch.optim.SGD: ``d = g + wd * p``; momentum ``buf = momentum * buf + (1 - dampening) * d``
    (``buf = d`` on the first step); ``p -= lr * buf`` (``lr * (d + momentum * buf)`` with nesterov)."""
    _check_lr(lr, "sgd")
    _check_range("momentum value", momentum, "sgd")
    _check_range("weight_decay value", weight_decay, "sgd")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise OptimizerConfigError("sgd: Nesterov momentum requires a momentum > 0 and zero dampening")
    return chain(
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay)),
        *_maybe(momentum != 0, trace(momentum, nesterov=nesterov, dampening=dampening)),
        scale_by_learning_rate(lr),
    )


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    *,
    b1: float | None = None,
    b2: float | None = None,
    eps_root: float = 0.0,
) -> GradientTransformation:
    """torch.optim.Adam, with ``weight_decay`` as L2 (added to the gradient before the moments)."""
    _check_lr(lr, "adam")
    b1, b2 = _betas(betas, b1, b2, "adam")
    _check_range("epsilon value", eps, "adam")
    _check_range("weight_decay value", weight_decay, "adam")
    return chain(
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay)),
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        scale_by_learning_rate(lr),
    )


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    amsgrad: bool = False,
    *,
    b1: float | None = None,
    b2: float | None = None,
    eps_root: float = 0.0,
    mask: Any = None,
) -> GradientTransformation:
    """torch.optim.AdamW: Adam plus decoupled weight decay ``p -= lr * weight_decay * p``.

    ``mask`` (bool pytree or ``params -> mask``) limits the decay to some leaves.
    """
    _check_lr(lr, "adamw")
    b1, b2 = _betas(betas, b1, b2, "adamw")
    _check_range("epsilon value", eps, "adamw")
    _check_range("weight_decay value", weight_decay, "adamw")
    return chain(
        scale_by_adam(b1, b2, eps, eps_root, amsgrad),
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
) -> GradientTransformation:
    """torch.optim.RMSprop: ``g / (sqrt(avg g**2) + eps)`` (centered: minus the squared mean
    gradient under the root), momentum on that, then ``-lr``; ``weight_decay`` is L2."""
    _check_lr(lr, "rmsprop")
    _check_range("alpha value", alpha, "rmsprop", upper=1.0)
    _check_range("epsilon value", eps, "rmsprop")
    _check_range("weight_decay value", weight_decay, "rmsprop")
    _check_range("momentum value", momentum, "rmsprop")
    scaling = scale_by_stddev(alpha, eps) if centered else scale_by_rms(alpha, eps)
    return chain(
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay)),
        scaling,
        *_maybe(momentum > 0, trace(momentum)),
        scale_by_learning_rate(lr),
    )


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
) -> GradientTransformation:
    """torch.optim.Adagrad: ``p -= lr / (1 + (step - 1) * lr_decay) * g / (sqrt(sum g**2) + eps)``;
    ``weight_decay`` is L2. The decayed rate is what ``current_lr`` reports."""
    _check_lr(lr, "adagrad")
    _check_range("lr_decay value", lr_decay, "adagrad")
    _check_range("weight_decay value", weight_decay, "adagrad")
    _check_range("initial_accumulator_value", initial_accumulator_value, "adagrad")
    _check_range("epsilon value", eps, "adagrad")
    return chain(
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay)),
        scale_by_rss(initial_accumulator_value, eps),
        scale_by_learning_rate(_with_lr_decay(lr, lr_decay) if lr_decay != 0 else lr),
    )


def _with_lr_decay(lr: ScalarOrSchedule, lr_decay: float) -> Any:
    def schedule(count: int | torch.Tensor) -> float | torch.Tensor:
        # ``count`` is the number of earlier updates, i.e. torch's ``step - 1``.
        c = count.to(scalar_dtype(count.device)) if isinstance(count, torch.Tensor) else float(count)
        base = lr(count) if callable(lr) else lr
        return base / (1.0 + c * lr_decay)

    return schedule


def lion(
    lr: ScalarOrSchedule = 1e-4,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    *,
    b1: float | None = None,
    b2: float | None = None,
    mask: Any = None,
) -> GradientTransformation:
    """Lion (Chen et al., 2023): ``p -= lr * (sign(b1 * m + (1 - b1) * g) + weight_decay * p)``,
    then ``m = b2 * m + (1 - b2) * g``. Use a learning rate 3-10x smaller than AdamW's."""
    _check_lr(lr, "lion")
    b1, b2 = _betas(betas, b1, b2, "lion")
    _check_range("weight_decay value", weight_decay, "lion")
    return chain(
        scale_by_lion(b1, b2),
        *_maybe(weight_decay != 0, add_decayed_weights(weight_decay, mask)),
        scale_by_learning_rate(lr),
    )
