"""lightfn.optim: optax-style pure optimizers with torch.optim's defaults and arithmetic.

An optimizer is a :class:`GradientTransformation` ``(init, update)`` of pure functions;
its state is a pytree of NamedTuples of tensors (checkpointable, compilable):

>>> import torch, lightfn as lf
>>> params = {"w": torch.ones(3)}
>>> opt = lf.optim.chain(lf.optim.clip_by_global_norm(1.0), lf.optim.adamw(lf.optim.cosine_decay(3e-4, 10_000)))
>>> opt_state = opt.init(params)
>>> updates, opt_state = opt.update({"w": torch.ones(3)}, opt_state, params)
>>> params = lf.optim.apply_updates(params, updates)
>>> float(lf.optim.current_lr(opt_state))
0.0003

Modules: ``base`` (the contract, chain), ``transforms`` (scale, learning rate, weight
decay, momentum, freezing), ``adaptive`` (Adam/RMS/RSS/Lion scalings), ``clipping``,
``masking`` (masked, multi_transform), ``multi_steps`` (gradient accumulation),
``schedules``, ``alias`` (sgd, adam, adamw, rmsprop, adagrad, lion), ``readers``,
``inject`` (inject_hyperparams: hyperparameters as state tensors, for sweeps).
"""

from __future__ import annotations

from ..errors import OptimizerConfigError, StateMismatchError
from .adaptive import (
    ScaleByAdamState,
    ScaleByLionState,
    ScaleByRmsState,
    ScaleByRssState,
    ScaleByStddevState,
    scale_by_adam,
    scale_by_lion,
    scale_by_rms,
    scale_by_rss,
    scale_by_stddev,
)
from .alias import adagrad, adam, adamw, lion, rmsprop, sgd
from .base import EmptyState, GradientTransformation, apply_updates, chain, identity
from .clipping import clip, clip_by_global_norm
from .inject import InjectHyperparamsState, inject_hyperparams
from .masking import MaskedState, MultiTransformState, masked, multi_transform
from .multi_steps import MultiStepsState, multi_steps
from .readers import current_lr, learning_rates
from . import schedules
from .schedules import *  # noqa: F403 (every schedule, listed once in schedules.__all__)
from .transforms import (
    ScalarOrSchedule,
    ScaleByLearningRateState,
    TraceState,
    add_decayed_weights,
    scale,
    scale_by_learning_rate,
    scale_by_schedule,
    set_to_zero,
    trace,
)

__all__ = [
    # contract
    "GradientTransformation",
    "EmptyState",
    "chain",
    "identity",
    "apply_updates",
    # optimizers (torch.optim names and defaults)
    "sgd",
    "adam",
    "adamw",
    "rmsprop",
    "adagrad",
    "lion",
    # transforms
    "scale",
    "scale_by_learning_rate",
    "scale_by_schedule",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_rss",
    "scale_by_lion",
    "trace",
    "add_decayed_weights",
    "clip_by_global_norm",
    "clip",
    "set_to_zero",
    "masked",
    "multi_transform",
    "multi_steps",
    "inject_hyperparams",
    # states
    "ScaleByLearningRateState",
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByStddevState",
    "ScaleByRssState",
    "ScaleByLionState",
    "TraceState",
    "MaskedState",
    "MultiTransformState",
    "MultiStepsState",
    "InjectHyperparamsState",
    # readers
    "current_lr",
    "learning_rates",
    # schedules
    "ScalarOrSchedule",
    *schedules.__all__,
    # errors
    "StateMismatchError",
    "OptimizerConfigError",
]
