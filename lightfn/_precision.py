"""Precision: the one table of fit/step precisions (Lightning's names) and what each means.

``"*-mixed"``: params stay float32, the forward runs under autocast in that dtype;
``"*-true"``: params (and batches) are cast to that dtype; ``"16-mixed"`` adds dynamic loss
scaling (:func:`update_loss_scale`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from . import tree
from .errors import StepError
from .state import LossScale

__all__ = ["PRECISIONS", "MIXED_DTYPES", "TRUE_DTYPES", "batch_dtype_of", "check_precision", "autocast_for",
           "update_loss_scale"]

PRECISIONS = ("32-true", "32", "64-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true")
MIXED_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
TRUE_DTYPES = {"bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64}


def batch_dtype_of(step: Any) -> torch.dtype | None:
    """The dtype floating batch leaves are cast to before ``step``: that of a ``*-true``
    precision (its params hold that dtype, as in Lightning), else None."""
    return TRUE_DTYPES.get(step.precision)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise StepError(f"precision={precision!r} is not one of {', '.join(PRECISIONS)}")
    return precision


def autocast_for(precision: str, params: Any) -> contextlib.AbstractContextManager[Any]:
    dtype = MIXED_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    first = tree.leaves(params)
    device_type = first[0].device.type if first else "cpu"
    return torch.autocast(device_type=device_type, dtype=dtype)


def update_loss_scale(ls: LossScale, finite: torch.Tensor) -> LossScale:
    good = torch.where(finite, ls.good_steps + 1, torch.zeros_like(ls.good_steps))
    grow = good >= ls.growth_interval
    scale = torch.where(finite, torch.where(grow, ls.scale * ls.growth_factor, ls.scale), ls.scale * ls.backoff_factor)
    good = torch.where(grow, torch.zeros_like(good), good)
    return ls.replace(scale=scale, good_steps=good)
