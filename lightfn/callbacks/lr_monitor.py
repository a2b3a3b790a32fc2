"""LearningRateMonitor: log the learning rate the optimizer actually used.

lightfn optimizers record the rate of each update in their state
(``scale_by_learning_rate``), so the monitor reads it back with
:func:`lightfn.optim.learning_rates` instead of re-evaluating a schedule. Reading a device
tensor into a float is a host sync, so it happens only every ``log_every_n_steps`` steps
(``ctx.step``; ``logging_interval="step"``) or once per epoch (``"epoch"``).

``fit`` itself already logs ``"lr"`` at its log points when the state is an
``lf.TrainState`` holding exactly one rate; this callback adds the epoch interval, several
rates with their own names, and rates anywhere in a custom state. With this monitor among the
callbacks, fit logs no ``lr`` of its own: the monitor owns every learning-rate name.

Names it logs:

- one learning rate in the state: ``"lr"``;
- several (``multi_transform``, or a state holding several optimizers, e.g. a GAN's
  ``{"g": ..., "d": ...}``): ``"lr/<path>"``, the pytree path of each rate with brackets
  and quotes dropped and parts joined by ``/``, e.g. ``"lr/g"`` and ``"lr/d"``. Positions in
  a ``chain`` (bare integers) are left out when the names stay distinct without them;
- an ``lf.ensemble`` state whose members' rates differ (a sweep built with
  ``lf.optim.inject_hyperparams``, each rate of shape ``(K,)``): the name above holds the
  mean over members and ``"<name>/member_<i>"`` each member's rate; when all members share
  one rate, just the name.

>>> import lightfn as lf
>>> monitor = lf.callbacks.LearningRateMonitor(logging_interval="step", log_every_n_steps=10)
"""

from __future__ import annotations

import re
from typing import Literal

import torch

from .. import optim as _optim
from .._members import collapse_equal, expand
from ..errors import MisconfigurationError
from ..state import TrainState
from .base import Callback, Context, Signal

__all__ = ["LearningRateMonitor", "lr_log_names"]

# One key of an ``lf.tree.keystr`` path: ['name'], ["name"] or [3].
_KEY = re.compile(r"\[('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\]]*)\]")
# Containers every optimizer state has: they say nothing about which rate this is.
_STRUCTURAL = {"opt_state", "inner_state", "inner_states"}


def _parts(keystr: str) -> list[str]:
    parts = []
    for key in _KEY.findall(keystr):
        if len(key) >= 2 and key[0] == key[-1] and key[0] in "'\"":
            key = key[1:-1]
        parts.append(key)
    return parts


def lr_log_names(paths: list[str], prefix: str = "lr") -> dict[str, str]:
    """Map each learning-rate path (an ``lf.tree.keystr``) to the name it is logged under."""
    if len(paths) == 1:
        return {paths[0]: prefix}
    full = {p: _parts(p) for p in paths}
    short = {p: [k for k in ks if not k.isdigit() and k not in _STRUCTURAL] for p, ks in full.items()}
    chosen = short
    names = ["/".join(ks) for ks in short.values()]
    if any(not n for n in names) or len(set(names)) != len(names):
        chosen = full
    out = {p: "/".join([prefix, *ks]) for p, ks in chosen.items()}
    if len(set(out.values())) != len(out):  # unusual keys: fall back to the raw paths
        out = {p: f"{prefix}/{p}" for p in paths}
    return out


def _to_host(values: dict[str, torch.Tensor]) -> dict[str, float]:
    if len({(v.dtype, v.device) for v in values.values()}) != 1:
        return {k: float(v) for k, v in values.items()}
    return dict(zip(values, torch.stack([v.reshape(()) for v in values.values()]).tolist()))


class LearningRateMonitor(Callback):
    """Log the learning rate(s) in ``ctx.state`` (see the module docstring for names).

    Args:
        logging_interval: ``"step"``: every ``log_every_n_steps`` steps;
            ``"epoch"``: at each epoch end.
        log_every_n_steps: the step interval; use the same value as ``fit``'s so the rate
            lands on the same steps as the other metrics.
        log_momentum: not supported: lightfn optimizers keep momentum coefficients as
            constants of the transform, not in the state, so there is nothing to read
            back; log them as hyperparameters instead. ``True`` raises.

    The state is ``ctx.state.opt_state`` for a :class:`lightfn.TrainState`, else the whole
    state pytree (a custom step may carry several optimizer states). A state without any
    learning rate raises :class:`MisconfigurationError` at fit start.
    """

    role = "lr"

    def __init__(
        self,
        logging_interval: Literal["step", "epoch"] = "step",
        log_every_n_steps: int = 50,
        log_momentum: bool = False,
    ) -> None:
        if logging_interval not in ("step", "epoch"):
            raise MisconfigurationError(
                f"LearningRateMonitor: logging_interval must be 'step' or 'epoch', got {logging_interval!r}"
            )
        if not isinstance(log_every_n_steps, int) or log_every_n_steps < 1:
            raise MisconfigurationError(
                f"LearningRateMonitor: log_every_n_steps must be an int >= 1, got {log_every_n_steps!r}"
            )
        if log_momentum:
            raise MisconfigurationError(
                "LearningRateMonitor(log_momentum=True): lightfn optimizer states do not hold momentum "
                "coefficients (b1/momentum are constants of the transform), so they cannot be read back; "
                "log them once as hyperparameters (logger.log_hparams) instead."
            )
        self.logging_interval = logging_interval
        self.log_every_n_steps = log_every_n_steps
        self.log_momentum = log_momentum
        self._last_logged_step: int | None = None

    @staticmethod
    def _rates(ctx: Context) -> dict[str, torch.Tensor]:
        state = ctx.state.opt_state if isinstance(ctx.state, TrainState) else ctx.state
        return _optim.learning_rates(state)

    def _read(self, ctx: Context) -> Signal | None:
        rates = self._rates(ctx)
        if not rates:
            return None
        names = lr_log_names(sorted(rates))
        # An ensemble's rates have shape (K,): the mean and each member's rate, or just the
        # one value when every member uses the same rate.
        values: dict[str, torch.Tensor] = {}
        for path, rate in rates.items():
            values.update(expand({names[path]: rate}))
        # One copy to the host (a sync): only reached at the logging interval. Rates keep
        # their dtype (float64 on most devices), so a logged rate is the one used.
        host = _to_host(values)
        for name in names.values():
            host = collapse_equal(host, name)
        return Signal(log=host)

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self._last_logged_step = None
        # Finding the rates reads no tensor values (no sync): fail before training, not after.
        if not self._rates(ctx):
            kind = "state.opt_state" if isinstance(ctx.state, TrainState) else "the state"
            raise MisconfigurationError(
                f"LearningRateMonitor found no learning rate in {kind}: build the optimizer from "
                "lf.optim (its scale_by_learning_rate records the rate of each update), or remove "
                "the callback."
            )
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        # Hooks may see the same step twice (e.g. a resumed run): log it once.
        if (self.logging_interval != "step" or ctx.step % self.log_every_n_steps != 0
                or ctx.step == self._last_logged_step):
            return None
        self._last_logged_step = ctx.step
        return self._read(ctx)

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        if self.logging_interval != "epoch":
            return None
        return self._read(ctx)
