"""Adaptive scalings: Adam, RMS (RMSprop), stddev (centered RMSprop), RSS (Adagrad), Lion.

The arithmetic follows torch.optim's single-tensor implementations operation by operation
(``lerp`` for first moments, ``addcmul`` for second moments, ``eps`` added outside the
square root), so a float64 run tracks torch.optim to rounding. Moments have each param's
dtype; scalar math (bias corrections) runs in float64 on the params' device.

Every hyperparameter (betas, ``decay``, ``eps``, ``eps_root``, initial values) is a Python
float or a 0-d tensor (what :func:`~lightfn.optim.inject.inject_hyperparams` passes). A
float takes exactly the path it always took; a tensor takes the same arithmetic written
with tensor operands (``addcmul``'s ``value=`` only takes a number, so the tensor factor
multiplies an operand instead), never read on the host, so it vmaps and compiles.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import tree as _tree
from .._eager import aligned_leaves, plain_eager
from ..errors import OptimizerConfigError, StateMismatchError
from ._checks import check_match, check_params, check_state, once_per_step, scalar_dtype, tensor_hyperparam, zero_count
from .base import GradientTransformation, PyTree

__all__ = [
    "ScaleByAdamState",
    "ScaleByRmsState",
    "ScaleByStddevState",
    "ScaleByRssState",
    "ScaleByLionState",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_stddev",
    "scale_by_rss",
    "scale_by_lion",
]


class ScaleByAdamState(NamedTuple):
    """``mu``/``nu``: first/second moments; ``nu_max``: running max of ``nu`` (AMSGrad
    only, else ``None``); ``count``: updates made so far."""

    count: torch.Tensor
    mu: PyTree
    nu: PyTree
    nu_max: PyTree | None


class ScaleByRmsState(NamedTuple):
    """``nu``: running average of squared gradients."""

    nu: PyTree


class ScaleByStddevState(NamedTuple):
    """``mu``: running average of gradients; ``nu``: of squared gradients."""

    mu: PyTree
    nu: PyTree


class ScaleByRssState(NamedTuple):
    """``sum_of_squares``: the accumulated squared gradients (Adagrad)."""

    sum_of_squares: PyTree


class ScaleByLionState(NamedTuple):
    """``mu``: momentum (Lion's slow average); ``count``: updates made so far."""

    count: torch.Tensor
    mu: PyTree


Scalar = float | torch.Tensor


def _check_beta(name: str, value: Scalar, transform: str) -> None:
    if not tensor_hyperparam(value, transform, name) and not 0.0 <= value < 1.0:
        raise OptimizerConfigError(f"{transform}: {name} must be in [0, 1), got {value}")


def _check_eps(value: Scalar, transform: str, name: str = "eps") -> None:
    if not tensor_hyperparam(value, transform, name) and value < 0.0:
        raise OptimizerConfigError(f"{transform}: {name} must be >= 0, got {value}")


def _decay_square(v: torch.Tensor, g: torch.Tensor, decay: Scalar) -> torch.Tensor:
    """``decay * v + (1 - decay) * g * g`` as torch.optim writes it (``addcmul``)."""
    if isinstance(decay, torch.Tensor):
        # (1 - decay) * g, then * g: the product addcmul forms from value=, same rounding.
        return torch.addcmul(v * decay, g * (1.0 - decay), g)
    return torch.addcmul(v * decay, g, g, value=1.0 - decay)


def _full_like(p: torch.Tensor, value: Scalar) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(p) + value.to(p.dtype)
    return torch.full_like(p, value)


def scale_by_adam(
    b1: Scalar = 0.9, b2: Scalar = 0.999, eps: Scalar = 1e-8, eps_root: Scalar = 0.0, amsgrad: bool = False
) -> GradientTransformation:
    """Adam's direction ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with bias-corrected moments.

    ``amsgrad=True`` uses the running maximum of the raw second moment, bias-corrected at
    the current step, as torch.optim.Adam does.
    """
    _check_beta("b1", b1, "scale_by_adam")
    _check_beta("b2", b2, "scale_by_adam")
    _check_eps(eps, "scale_by_adam")
    tensor_hyperparam(eps_root, "scale_by_adam", "eps_root")

    def init(params: PyTree) -> ScaleByAdamState:
        check_params(params, "scale_by_adam")
        zeros = _tree.zeros_like
        return ScaleByAdamState(zero_count(params), zeros(params), zeros(params), zeros(params) if amsgrad else None)

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByAdamState]:
        state = check_state(state, ScaleByAdamState, "scale_by_adam")
        if (state.nu_max is not None) != amsgrad:
            raise StateMismatchError(
                f"scale_by_adam(amsgrad={amsgrad}) got a state made with amsgrad={not amsgrad}: "
                "create the state with this optimizer's init(params)."
            )
        check_match(state.mu, updates, what="scale_by_adam: updates vs first moment (shaped like params)")
        count = state.count + 1
        step = count.to(scalar_dtype(count.device))
        bc1, bc2 = 1.0 - torch.pow(b1, step), 1.0 - torch.pow(b2, step)
        bc1, bc2, bc2_sqrt = once_per_step(bc1, bc2, torch.sqrt(bc2))
        flat = aligned_leaves(updates, state.mu, state.nu, *([state.nu_max] if amsgrad else [])) if plain_eager() else None
        if flat is not None:
            return _adam_foreach(flat, count, bc1, bc2, bc2_sqrt)
        mu = _tree.map(lambda g, m: torch.lerp(m, g, 1.0 - b1), updates, state.mu)
        nu = _tree.map(lambda g, v: _decay_square(v, g, b2), updates, state.nu)
        nu_max = _tree.map(torch.maximum, state.nu_max, nu) if amsgrad else None
        second = nu_max if amsgrad else nu
        if not isinstance(eps_root, torch.Tensor) and eps_root == 0.0:
            out = _tree.map(lambda m, v: (m / bc1) / (torch.sqrt(v) / bc2_sqrt + eps), mu, second)
        else:
            out = _tree.map(lambda m, v: (m / bc1) / (torch.sqrt(v / bc2 + eps_root) + eps), mu, second)
        return out, ScaleByAdamState(count, mu, nu, nu_max)

    def _adam_foreach(flat: Any, count: torch.Tensor, bc1: torch.Tensor, bc2: torch.Tensor, bc2_sqrt: torch.Tensor) -> tuple[PyTree, ScaleByAdamState]:
        # The leaf-by-leaf arithmetic above, op for op, as one _foreach call per op (plain
        # eager only: lightfn/_eager.py). On CPU these run the same per-tensor kernels, so
        # results are bitwise the same; what goes is a Python call per op and leaf. The
        # in-place ops write only into tensors made here (a third less memory traffic).
        treedef, (g, m, v, *v_max) = flat
        mu = torch._foreach_lerp(m, g, 1.0 - b1)
        nu = torch._foreach_mul(v, b2)
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
        nu_max = torch._foreach_maximum(v_max[0], nu) if amsgrad else None
        second = nu_max if amsgrad else nu
        if eps_root == 0.0:
            denom = torch._foreach_sqrt(second)
            torch._foreach_div_(denom, bc2_sqrt)
        else:
            denom = torch._foreach_div(second, bc2)
            torch._foreach_add_(denom, eps_root)
            torch._foreach_sqrt_(denom)
        torch._foreach_add_(denom, eps)
        out = torch._foreach_div(mu, bc1)
        torch._foreach_div_(out, denom)
        tree = lambda leaves: _tree.unflatten(treedef, leaves)  # noqa: E731
        return tree(out), ScaleByAdamState(count, tree(mu), tree(nu), tree(nu_max) if amsgrad else None)

    return GradientTransformation(init, update)


def scale_by_rms(decay: Scalar = 0.9, eps: Scalar = 1e-8, initial_scale: Scalar = 0.0) -> GradientTransformation:
    """RMSprop's scaling ``g / (sqrt(nu) + eps)``, ``nu`` the running mean of ``g**2``.

    ``eps`` is added outside the square root, as in torch.optim.RMSprop.
    """
    _check_beta("decay", decay, "scale_by_rms")
    _check_eps(eps, "scale_by_rms")
    tensor_hyperparam(initial_scale, "scale_by_rms", "initial_scale")

    def init(params: PyTree) -> ScaleByRmsState:
        check_params(params, "scale_by_rms")
        return ScaleByRmsState(_tree.map(lambda p: _full_like(p, initial_scale), params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByRmsState]:
        state = check_state(state, ScaleByRmsState, "scale_by_rms")
        check_match(state.nu, updates, what="scale_by_rms: updates vs second moment (shaped like params)")
        nu = _tree.map(lambda g, v: _decay_square(v, g, decay), updates, state.nu)
        out = _tree.map(lambda g, v: g / (torch.sqrt(v) + eps), updates, nu)
        return out, ScaleByRmsState(nu)

    return GradientTransformation(init, update)


def scale_by_stddev(decay: Scalar = 0.9, eps: Scalar = 1e-8, initial_scale: Scalar = 0.0) -> GradientTransformation:
    """Centered RMSprop's scaling ``g / (sqrt(nu - mu**2) + eps)``."""
    _check_beta("decay", decay, "scale_by_stddev")
    _check_eps(eps, "scale_by_stddev")
    tensor_hyperparam(initial_scale, "scale_by_stddev", "initial_scale")

    def init(params: PyTree) -> ScaleByStddevState:
        check_params(params, "scale_by_stddev")
        return ScaleByStddevState(_tree.zeros_like(params), _tree.map(lambda p: _full_like(p, initial_scale), params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByStddevState]:
        state = check_state(state, ScaleByStddevState, "scale_by_stddev")
        check_match(state.nu, updates, what="scale_by_stddev: updates vs second moment (shaped like params)")
        mu = _tree.map(lambda g, m: torch.lerp(m, g, 1.0 - decay), updates, state.mu)
        nu = _tree.map(lambda g, v: _decay_square(v, g, decay), updates, state.nu)
        out = _tree.map(lambda g, m, v: g / (torch.sqrt(torch.addcmul(v, m, m, value=-1.0)) + eps), updates, mu, nu)
        return out, ScaleByStddevState(mu, nu)

    return GradientTransformation(init, update)


def scale_by_rss(initial_accumulator_value: Scalar = 0.0, eps: Scalar = 1e-10) -> GradientTransformation:
    """Adagrad's scaling ``g / (sqrt(sum of g**2 so far) + eps)``."""
    _check_eps(eps, "scale_by_rss")
    if not tensor_hyperparam(initial_accumulator_value, "scale_by_rss", "initial_accumulator_value") and initial_accumulator_value < 0:
        raise OptimizerConfigError(f"scale_by_rss: initial_accumulator_value must be >= 0, got {initial_accumulator_value}")

    def init(params: PyTree) -> ScaleByRssState:
        check_params(params, "scale_by_rss")
        return ScaleByRssState(_tree.map(lambda p: _full_like(p, initial_accumulator_value), params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByRssState]:
        state = check_state(state, ScaleByRssState, "scale_by_rss")
        check_match(state.sum_of_squares, updates, what="scale_by_rss: updates vs sum of squares (shaped like params)")
        sums = _tree.map(lambda g, s: torch.addcmul(s, g, g), updates, state.sum_of_squares)
        out = _tree.map(lambda g, s: g / (torch.sqrt(s) + eps), updates, sums)
        return out, ScaleByRssState(sums)

    return GradientTransformation(init, update)


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99) -> GradientTransformation:
    """Lion's direction ``sign(b1 * mu + (1 - b1) * g)``; then ``mu = b2 * mu + (1 - b2) * g``."""
    _check_beta("b1", b1, "scale_by_lion")
    _check_beta("b2", b2, "scale_by_lion")

    def init(params: PyTree) -> ScaleByLionState:
        check_params(params, "scale_by_lion")
        return ScaleByLionState(zero_count(params), _tree.zeros_like(params))

    def update(updates: PyTree, state: Any, params: PyTree | None = None) -> tuple[PyTree, ScaleByLionState]:
        state = check_state(state, ScaleByLionState, "scale_by_lion")
        check_match(state.mu, updates, what="scale_by_lion: updates vs momentum (shaped like params)")
        out = _tree.map(lambda g, m: torch.sign(b1 * m + (1.0 - b1) * g), updates, state.mu)
        mu = _tree.map(lambda g, m: b2 * m + (1.0 - b2) * g, updates, state.mu)
        return out, ScaleByLionState(state.count + 1, mu)

    return GradientTransformation(init, update)
