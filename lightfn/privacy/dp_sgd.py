"""DP-SGD as a pure train step: per-sample clipping and Gaussian noise inside the graph.

``dp_train_step(loss_fn, optimizer, l2_norm_clip=C, noise_multiplier=sigma)`` is an
``lf.train_step`` whose gradient is the one of Abadi et al. (2016), as Opacus computes it:

1. the gradient of ``loss_fn`` for every row of the batch on its own
   (:func:`lightfn.per_sample_grad`);
2. each row's gradient scaled by ``min(1, C / ||g_i||)``, where ``||g_i||`` is the L2 norm
   over *all* its leaves together, so no row moves the sum by more than ``C``;
3. the clipped gradients summed (rows a :class:`~lightfn.data.MaskedBatch` masks out add
   exactly zero, whatever their values);
4. Gaussian noise of standard deviation ``sigma * C`` added to every coordinate;
5. the result divided by ``expected_batch_size``, then handed to the optimizer.

Everything else is the ordinary :class:`~lightfn.step.TrainStep` (optimizer update, step
counter, precision, ``lf.jit``, ``lf.fit``): DP-SGD plugs in as its ``grad_fn``.

The noise is a pure function of the step's key ``k = fold_in(state.rng, state.step)``: the
leaf ``j`` of the gradient gets ``lf.random.normal(fold_in(fold_in(k, NOISE_STREAM), j),
leaf.shape)``, leaves numbered in ``torch.utils._pytree`` order (dicts in insertion
order: build params the same way when resuming, as ``lf.load(..., like=state)`` does). It lives in the
state, so a resumed run adds exactly the noise the uninterrupted run would have, eagerly
and compiled alike. Randomness inside ``loss_fn`` (dropout) is drawn per row, row ``i``
from ``fold_in(fold_in(k, ROW_STREAM), i)``.

The divisor: ``expected_batch_size`` when given, else the batch's row count (for a
:class:`~lightfn.data.MaskedBatch`, the number of rows its mask keeps). With Poisson
sampling, pass ``expected_batch_size=loader.expected_batch_size`` (``q * N``) as Opacus
does: a divisor that depends on how many rows were drawn is not covered by the analysis.

Limits: one process (under ``lf.distributed`` each rank would add its own noise);
``precision="16-mixed"`` is refused (its loss scaling would be clipped too); BatchNorm
has no per-sample gradient (use GroupNorm). Noise comes from lightfn's counter-based
normal sampler in floating point, like Opacus' default (non-"secure") mode: it is not
hardened against floating-point attacks on the Gaussian mechanism.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as torch_pytree

from .. import random as lf_random
from .. import tree
from ..data import MaskedBatch
from ..errors import PrivacyError, StepError
from ..metrics import Sum
from ..optim import GradientTransformation
from ..per_sample import map_rows, num_rows
from ..step import TrainStep, train_step
from ..transforms import value_and_grad

__all__ = ["DPGradient", "dp_train_step", "ROW_STREAM", "NOISE_STREAM"]

# Stream tags folded into the step key: the noise and the per-row keys must not reuse the
# key that rng_scope(k) would derive draws from (fold_in(k, 1), fold_in(k, 2), ...).
ROW_STREAM = 0x0D9_5A1E
NOISE_STREAM = 0x0D9_0153


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PrivacyError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise PrivacyError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {value!r}")
    return float(value)


def _rows_view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.view(-1, *([1] * (like.dim() - 1)))


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPGradient:
    """The DP-SGD gradient as a :class:`~lightfn.step.TrainStep` ``grad_fn`` (see module docs).

    Fields: ``l2_norm_clip`` (C), ``noise_multiplier`` (sigma; the noise std is
    ``sigma * C``), ``expected_batch_size`` (the divisor; ``None``: the batch's real row
    count), ``chunk_size`` (rows per vectorized chunk; bounds memory, see
    :func:`lightfn.per_sample_grad`).
    """

    l2_norm_clip: float
    noise_multiplier: float
    expected_batch_size: float | None = None
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        _positive("l2_norm_clip", self.l2_norm_clip)
        _positive("noise_multiplier", self.noise_multiplier, allow_zero=True)
        if self.expected_batch_size is not None:
            _positive("expected_batch_size", self.expected_batch_size)
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise PrivacyError(f"chunk_size must be a positive int or None, got {self.chunk_size!r}")

    def __call__(self, objective: Callable[..., Any], params: Any, batch: Any, key: torch.Tensor) -> tuple[tuple[Any, ...], Any]:
        data, mask = (batch.data, batch.mask) if isinstance(batch, MaskedBatch) else (batch, None)
        n = num_rows(data)
        if mask is not None and (tuple(mask.shape) != (n,) or mask.dtype != torch.bool):
            raise StepError(
                f"batch.mask is {mask.dtype} of shape {tuple(mask.shape)}; expected torch.bool of shape ({n},), "
                "one flag per row of batch.data"
            )
        row_keys = lf_random.fold_in(lf_random.fold_in(key, ROW_STREAM), torch.arange(n, device=key.device))

        def row(p: Any, row_batch: Any, row_key: torch.Tensor) -> tuple[Any, ...]:
            (_, (loss, metrics, _)), g = value_and_grad(objective, has_aux=True)(p, row_batch, row_key)
            return loss, metrics, g

        losses, metrics, grads = map_rows(row, params, data, row_keys, chunk_size=self.chunk_size)

        # ||g_i|| over all leaves of row i, accumulated in float32 at least.
        sq = [g.reshape(n, -1).to(torch.promote_types(g.dtype, torch.float32)).square().sum(1) for g in tree.leaves(grads)]
        norms = torch.stack(sq).sum(0).sqrt()
        clip = self.l2_norm_clip
        # min(1, C / ||g||) written as C / max(||g||, C): exact, and 1 for a zero gradient.
        factor = clip / torch.clamp(norms, min=clip)

        def clipped_sum(g: torch.Tensor) -> torch.Tensor:
            scaled = g * _rows_view(factor.to(g.dtype), g)
            if mask is not None:
                # where, not a multiply: a padding row with a non-finite gradient adds 0, not NaN.
                scaled = torch.where(_rows_view(mask, g), scaled, torch.zeros_like(scaled))
            return scaled.sum(0)

        summed = tree.map(clipped_sum, grads)
        if self.noise_multiplier > 0:
            std = self.noise_multiplier * clip
            noise_key = lf_random.fold_in(key, NOISE_STREAM)
            # Leaves are numbered in torch's pytree order (dicts in insertion order), which is
            # the order eagerly and under dynamo alike; optree's sorted order is not kept by
            # dynamo's tree_map polyfill, so numbering by it would change the noise when compiled.
            leaves, spec = torch_pytree.tree_flatten(summed)
            leaves = [
                s + std * lf_random.normal(lf_random.fold_in(noise_key, j), s.shape, s.dtype, s.device)
                if isinstance(s, torch.Tensor) else s
                for j, s in enumerate(leaves)
            ]
            summed = torch_pytree.tree_unflatten(leaves, spec)

        if mask is None:
            count: Any = n
            real = None
        else:
            real = mask
            count = mask.sum().clamp(min=1)
        divisor = self.expected_batch_size if self.expected_batch_size is not None else count
        grads = tree.map(lambda s: s / (divisor.to(s.dtype) if isinstance(divisor, torch.Tensor) else divisor), summed)

        def row_mean(v: torch.Tensor) -> torch.Tensor:
            v = v.reshape(n).to(torch.promote_types(v.dtype, torch.float32))
            if real is None:
                return v.mean()
            return torch.where(real, v, torch.zeros_like(v)).sum() / count.to(v.dtype)

        def row_sum(v: torch.Tensor) -> torch.Tensor:
            # an lf.metrics.Sum state: the batch's state is the sum of its real rows' states
            if real is None:
                return v.sum(0)
            return torch.where(real.reshape(n, *([1] * (v.dim() - 1))), v, torch.zeros_like(v)).sum(0)

        reduced = {k: Sum(tree.map(row_sum, v.value)) if isinstance(v, Sum) else row_mean(v) for k, v in metrics.items()}
        return (row_mean(losses), reduced, {}), grads


def dp_train_step(
    loss_fn: Callable[..., Any],
    optimizer: GradientTransformation,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    expected_batch_size: float | None = None,
    chunk_size: int | None = None,
    precision: str = "32-true",
) -> TrainStep:
    """A pure DP-SGD step ``(state, batch) -> (new_state, metrics)`` (see module docs).

    Args:
        loss_fn: ``loss_fn(params, batch) -> loss`` or ``(loss, metrics)``; it is called
            on one row at a time (a batch of one), so it must not mix rows (no BatchNorm).
        optimizer: any ``lf.optim`` optimizer; it receives the private gradient.
        l2_norm_clip: C, the bound on each row's gradient norm (over all leaves).
        noise_multiplier: sigma; the noise std is ``sigma * C`` (0: clipping only, no
            privacy).
        expected_batch_size: the divisor of the noised sum; default the batch's real row
            count. Pass ``q * N`` with Poisson-sampled batches.
        chunk_size: per-sample gradients for this many rows at a time (memory bound).
        precision: as for ``lf.train_step``, except ``"16-mixed"``.

    Metrics are ``loss`` and ``loss_fn``'s metrics averaged over the batch's real rows.
    """
    dp = DPGradient(
        l2_norm_clip=l2_norm_clip, noise_multiplier=noise_multiplier,
        expected_batch_size=expected_batch_size, chunk_size=chunk_size,
    )
    return train_step(loss_fn, optimizer, precision=precision, grad_fn=dp)
