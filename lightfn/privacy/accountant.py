"""The privacy accountant: epsilon spent by DP-SGD, from Google's ``dp-accounting``.

``epsilon(noise_multiplier=sigma, sample_rate=q, steps=T, delta=d)`` is the epsilon of
``T`` steps of the Poisson-subsampled Gaussian mechanism (what :func:`dp_train_step`
with :class:`~lightfn.data.ArrayLoader` ``(poisson_rate=q)`` runs), for a given delta.

Why ``dp-accounting`` (Google's library behind TensorFlow Privacy and JAX privacy work)
rather than Opacus: it is a small, pure-Python accounting library (numpy, scipy, mpmath)
with no PyTorch or training-loop code in it, so lightfn does not pull a second DP
training framework in for one function; and it offers both the Renyi-DP accountant
(``accountant="rdp"``, the default, which matches Opacus' ``RDPAccountant``) and the
tighter privacy-loss-distribution accountant (``accountant="pld"``). It is imported
only when an epsilon is asked for: install it with ``pip install 'lightfn[privacy]'``.

>>> import lightfn as lf
>>> eps = lf.privacy.epsilon(noise_multiplier=1.1, sample_rate=0.01, steps=1000, delta=1e-5)
>>> round(eps, 2)
1.71
"""

from __future__ import annotations

import math
from typing import Any, Literal

from ..errors import PrivacyError

__all__ = ["epsilon", "max_steps", "ACCOUNTANTS"]

ACCOUNTANTS = ("rdp", "pld")


def _dp_accounting() -> Any:
    try:
        import dp_accounting
    except ImportError as e:
        raise PrivacyError(
            "lf.privacy's accountant needs Google's dp-accounting package: pip install 'lightfn[privacy]' "
            "(or pip install dp-accounting)"
        ) from e
    return dp_accounting


def _check(noise_multiplier: float, sample_rate: float, delta: float, accountant: str) -> None:
    def number(name: str, v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise PrivacyError(f"{name} must be a number, got {type(v).__name__} {v!r}")
        return float(v)

    if not number("noise_multiplier", noise_multiplier) >= 0:
        raise PrivacyError(f"noise_multiplier must be >= 0, got {noise_multiplier!r}")
    if not 0 < number("sample_rate", sample_rate) <= 1:
        raise PrivacyError(f"sample_rate must be in (0, 1] (the Poisson rate q = expected batch size / N), got {sample_rate!r}")
    if not 0 < number("delta", delta) < 1:
        raise PrivacyError(f"delta must be in (0, 1) (typically below 1/N), got {delta!r}")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Literal["rdp", "pld"] = "rdp",
) -> float:
    """The epsilon of ``steps`` DP-SGD steps at ``delta`` (``inf`` without noise).

    Args:
        noise_multiplier: sigma, the noise std over the clipping norm.
        sample_rate: q, each row's probability of being in a batch (1: every batch is the
            whole dataset, no subsampling).
        steps: the number of noised steps taken.
        delta: the delta of (epsilon, delta)-DP.
        accountant: ``"rdp"`` (Renyi DP, as Opacus' default) or ``"pld"`` (privacy loss
            distributions: tighter, slower for many steps).
    """
    _check(noise_multiplier, sample_rate, delta, accountant)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise PrivacyError(f"steps must be an int >= 0, got {steps!r}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    dpa = _dp_accounting()
    event: Any = dpa.GaussianDpEvent(noise_multiplier)
    if sample_rate < 1:
        event = dpa.PoissonSampledDpEvent(sample_rate, event)
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    acc.compose(dpa.SelfComposedDpEvent(event, steps))
    return float(acc.get_epsilon(delta))


def max_steps(
    *,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    target_epsilon: float,
    accountant: Literal["rdp", "pld"] = "rdp",
    limit: int = 1 << 40,
) -> int:
    """The largest number of steps whose :func:`epsilon` is at most ``target_epsilon``.

    Found by doubling then bisection (epsilon grows with the steps), so it costs about
    ``2 * log2(steps)`` accountant calls; capped at ``limit``.
    """
    _check(noise_multiplier, sample_rate, delta, accountant)
    if not (isinstance(target_epsilon, (int, float)) and not isinstance(target_epsilon, bool) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon must be > 0, got {target_epsilon!r}")

    def fits(t: int) -> bool:
        return epsilon(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=t, delta=delta, accountant=accountant) <= target_epsilon

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi < limit and fits(hi):
        lo, hi = hi, hi * 2
    if hi >= limit and fits(limit):
        return limit
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
