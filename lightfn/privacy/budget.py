"""PrivacyBudget: a callback that logs the epsilon spent and stops fit at a target.

The accountant counts train steps: every call of a DP step adds noise once, so fit's step
count (``ctx.step``, restored on resume) is the number of mechanism invocations.

>>> import lightfn as lf
>>> budget = lf.privacy.PrivacyBudget(noise_multiplier=1.1, sample_rate=0.01, delta=1e-5, target_epsilon=2.0)
"""

from __future__ import annotations

from typing import Literal

from ..callbacks.base import Callback, Context, Signal
from ..errors import PrivacyError
from .accountant import _check, epsilon, max_steps

__all__ = ["PrivacyBudget"]


class PrivacyBudget(Callback):
    """Log ``privacy/epsilon`` at every epoch end; stop fit before exceeding a target.

    Args:
        noise_multiplier, sample_rate, delta: as for :func:`lightfn.privacy.epsilon`
            (``sample_rate`` is the loader's ``poisson_rate``).
        target_epsilon: if given, the largest step count whose epsilon is at most this is
            computed once at fit start, and fit is asked to stop as soon as it is reached
            (after that step's batch, mid-epoch if need be), so the run never spends more.
            ``fit``'s ``min_epochs``/``min_steps`` still override a stop: leave them unset.
        accountant: ``"rdp"`` (default) or ``"pld"``.

    Attributes:
        max_steps: the step budget (``None`` until fit starts, or without a target).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        delta: float,
        target_epsilon: float | None = None,
        accountant: Literal["rdp", "pld"] = "rdp",
    ) -> None:
        _check(noise_multiplier, sample_rate, delta, accountant)
        if target_epsilon is not None and not target_epsilon > 0:
            raise PrivacyError(f"target_epsilon must be > 0 or None, got {target_epsilon!r}")
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.delta = delta
        self.target_epsilon = target_epsilon
        self.accountant = accountant
        self.max_steps: int | None = None

    def epsilon(self, steps: int) -> float:
        """Epsilon after ``steps`` steps with this callback's settings."""
        return epsilon(
            noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, steps=steps,
            delta=self.delta, accountant=self.accountant,
        )

    def _stop_if_spent(self, ctx: Context) -> Signal | None:
        if self.max_steps is None or ctx.step < self.max_steps:
            return None
        eps = self.epsilon(ctx.step)
        return Signal(
            stop=True,
            reason=f"privacy budget spent: epsilon {eps:.4g} after {ctx.step} steps "
            f"(target {self.target_epsilon:g} at delta {self.delta:g})",
            log={"privacy/epsilon": eps},
        )

    def on_fit_start(self, ctx: Context) -> Signal | None:
        if self.target_epsilon is not None:
            self.max_steps = max_steps(
                noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate, delta=self.delta,
                target_epsilon=self.target_epsilon, accountant=self.accountant,
            )
        return self._stop_if_spent(ctx)

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        return self._stop_if_spent(ctx)

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        eps = self.epsilon(ctx.step)
        stop = self.max_steps is not None and ctx.step >= self.max_steps
        return Signal(
            log={"privacy/epsilon": eps},
            stop=stop,
            reason=f"privacy budget spent: epsilon {eps:.4g}" if stop else "",
        )
