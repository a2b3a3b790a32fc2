"""ModelCheckpoint: keep the best k checkpoints by a monitored metric, and ``last.safetensors``.

Lightning's semantics, as a callback that only decides: it returns
``Signal(save=..., delete=...)`` and ``fit`` writes (atomically, rank 0 only) a checkpoint
of the whole loop (state, loop position, callback states: see :mod:`lightfn.fit._run`).

- When: every ``every_n_steps`` steps (``on_train_batch_end``), or every
  ``train_time_interval`` of training time, or else at the end of every ``every_n_epochs``
  epochs (after that epoch's validation, so ``val/...`` metrics are current). As in
  Lightning, the step and time schedules replace the epoch schedule.
- What: with ``monitor``, the file joins the best ``save_top_k`` by ``ctx.metrics[monitor]``
  (``mode="min"`` or ``"max"``; NaN counts as worst) and the one that falls out is deleted;
  ``save_top_k=-1`` keeps all, ``0`` none. Without ``monitor``, ``save_top_k=1`` keeps the
  latest file only, ``-1`` keeps every one. ``save_last`` refreshes ``last.safetensors`` at
  every save, which ``fit(resume_from="last")`` continues from.
- Names: ``filename`` is formatted with ``epoch``, ``step`` and every logged metric, whose
  name has ``/`` replaced by ``_`` (``"{epoch}-{val_loss:.3f}"``); the monitored value is
  appended when the template does not use it; characters unsafe on some filesystem become
  ``_``: ``epoch=3-step=120-val_loss=0.1234.safetensors``.
- Its bookkeeping (the best k paths and scores) is in :meth:`state_dict`, so a resumed run
  keeps ranking against the files already on disk. It is stored under a key made of the
  folder, the monitor and the schedule: resume with the same ``dirpath``.

>>> import lightfn as lf
>>> ckpt = lf.callbacks.ModelCheckpoint("ckpts", monitor="val/loss", mode="min", save_top_k=2)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import MisconfigurationError
from ._common import decode_float, encode_float, missing_metric_error
from .base import Callback, Context, Signal
from .timer import Duration, parse_duration

__all__ = ["ModelCheckpoint"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")
LAST = "last.safetensors"


def _key(name: str) -> str:
    """A metric name as a format key and file-name part: ``val/loss`` -> ``val_loss``."""
    return _UNSAFE.sub("_", name)


class ModelCheckpoint(Callback):
    """Save fit checkpoints to ``dirpath``, keeping the best ``save_top_k`` and ``last``.

    Args:
        dirpath: the folder for checkpoints (created on first save).
        filename: a ``str.format`` template for the file name without extension; keys are
            ``epoch``, ``step`` and the logged metric names with ``/`` as ``_``.
        monitor: the logged metric to rank by (e.g. ``"val/loss"``); ``None``: the latest.
        mode: ``"min"`` or ``"max"``: which way ``monitor`` is better.
        save_top_k: how many ranked files to keep (``-1``: all, ``0``: none).
        save_last: also write ``last.safetensors`` at every save.
        every_n_steps: save every that many steps (instead of per epoch).
        every_n_epochs: save at the end of every that many epochs (``0``: never).
        train_time_interval: save every that much training time (seconds, a ``timedelta``,
            ``"DD:HH:MM:SS"``...), instead of per epoch.
        save_on_exception: when fit raises, save ``exception-epoch=E-step=S.safetensors``.

    Attributes:
        best_model_path: the best file so far (``None`` before the first ranked save);
            ``lf.test(evaluate, lf.load(ckpt.best_model_path, like=state), test_data)``
            scores it.
        best_model_score: its monitored value (``None`` without ``monitor``).
        best_k_models: ``{path: score}`` of the files kept.
        last_model_path: the latest ``last.safetensors`` written.
    """

    def __init__(
        self,
        dirpath: str | Path,
        filename: str = "epoch={epoch}-step={step}",
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_steps: int | None = None,
        every_n_epochs: int = 1,
        train_time_interval: Duration | None = None,
        save_on_exception: bool = False,
    ) -> None:
        name = "ModelCheckpoint"
        if mode not in ("min", "max"):
            raise MisconfigurationError(f"{name}: mode must be 'min' or 'max', got {mode!r}")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise MisconfigurationError(f"{name}: save_top_k must be an int >= -1, got {save_top_k!r}")
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise MisconfigurationError(
                f"{name}(save_top_k={save_top_k}, monitor=None): without a monitored metric there is nothing to rank "
                "the top k by; pass monitor='val/loss' (for example), or save_top_k=-1 to keep every file"
            )
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise MisconfigurationError(f"{name}: every_n_steps must be None or an int >= 1, got {every_n_steps!r}")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 0:
            raise MisconfigurationError(f"{name}: every_n_epochs must be an int >= 0, got {every_n_epochs!r}")
        if not isinstance(filename, str) or not filename:
            raise MisconfigurationError(f"{name}: filename must be a non-empty format string, got {filename!r}")
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = save_last
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.train_time_interval = None if train_time_interval is None else parse_duration(train_time_interval)
        self.save_on_exception = save_on_exception
        self.best_k_models: dict[str, float] = {}
        self._best_model_path: str | None = None
        self.best_model_score: float | None = None
        self.last_model_path = ""
        self._last_saved_step = -1
        self._last_time_save = 0.0
        self._validation_seen = False

    @property
    def checkpoint_dir(self) -> Path | None:
        return self.dirpath

    @property
    def state_key(self) -> str:
        # Lightning's fields plus the folder: two checkpoints of one metric into two folders
        # (top 1 in "best/", all in "all/") keep separate books. Resuming with the folder
        # renamed starts this callback's bookkeeping afresh (its old paths would be stale).
        return (
            f"ModelCheckpoint[dirpath={self.dirpath}, monitor={self.monitor}, mode={self.mode}, "
            f"every_n_steps={self.every_n_steps}, every_n_epochs={self.every_n_epochs}, "
            f"train_time_interval={self.train_time_interval}]"
        )

    @property
    def best_model_path(self) -> str | None:
        """The path of the best checkpoint so far (by ``monitor``; without one, the latest
        kept), or ``None`` before the first: what ``lf.load(path, like=state)`` takes."""
        return self._best_model_path

    # -- hooks ------------------------------------------------------------------------------

    def on_fit_start(self, ctx: Context) -> Signal | None:
        self._last_time_save = ctx.elapsed
        self._validation_seen = False
        return None

    def on_train_batch_end(self, ctx: Context) -> Signal | None:
        if self.every_n_steps is not None and ctx.step % self.every_n_steps == 0:
            return self._save(ctx)
        if self.train_time_interval is not None and ctx.elapsed - self._last_time_save >= self.train_time_interval:
            self._last_time_save = ctx.elapsed
            return self._save(ctx)
        return None

    def on_validation_end(self, ctx: Context) -> Signal | None:
        self._validation_seen = True
        if ctx.stage == "validate" and self.monitor is not None and self.monitor.startswith("val/"):
            if self.monitor not in ctx.metrics:  # every val/ name is logged by each validation
                raise missing_metric_error("ModelCheckpoint", self.monitor, ctx.metrics)
        return None

    def on_epoch_end(self, ctx: Context) -> Signal | None:
        # A val/ name may appear later (validation every n epochs); others are all logged by now.
        if self.monitor is not None and not self.monitor.startswith("val/") and not self._known(ctx.metrics):
            raise missing_metric_error("ModelCheckpoint", self.monitor, ctx.metrics)
        if self.every_n_steps is not None or self.train_time_interval is not None or self.every_n_epochs == 0:
            return None
        if (ctx.epoch + 1) % self.every_n_epochs == 0:
            return self._save(ctx)
        return None

    def on_fit_end(self, ctx: Context) -> Signal | None:
        if self.monitor is not None and not self._known(ctx.metrics) and ctx.epoch > 0:
            raise missing_metric_error(
                "ModelCheckpoint", self.monitor, ctx.metrics,
                " No validation ran in this fit: pass val_data and an eval_step to fit to log val/ metrics.",
            )
        return None

    def on_exception(self, ctx: Context, error: BaseException) -> Signal | None:
        if not self.save_on_exception:
            return None
        return Signal(save=(self.dirpath / f"exception-epoch={ctx.epoch}-step={ctx.step}.safetensors",))

    # -- deciding what to write -------------------------------------------------------------

    def _known(self, metrics: Mapping[str, float]) -> bool:
        # "train/x" is logged every log_every_n_steps steps; its epoch mean proves the name exists.
        m = self.monitor
        return m in metrics or (m is not None and m.startswith("train/") and f"{m}_epoch" in metrics)

    def _worse(self, a: float, b: float) -> bool:
        return a > b if self.mode == "min" else a < b

    def _save(self, ctx: Context) -> Signal | None:
        if ctx.step == self._last_saved_step:  # e.g. a step save and an epoch save at one step
            return None
        self._last_saved_step = ctx.step
        save: list[Path] = []
        delete: list[Path] = []
        if self.save_top_k != 0:
            if self.monitor is None:
                path = self._path(ctx, None)
                if self.save_top_k == 1:
                    delete += [Path(p) for p in self.best_k_models if p != str(path)]
                    self.best_k_models = {}
                self.best_k_models[str(path)] = math.nan
                self._best_model_path = str(path)
                save.append(path)
            elif self.monitor in ctx.metrics:
                save_path, dropped = self._rank(ctx, float(ctx.metrics[self.monitor]))
                save += [save_path] if save_path else []
                delete += dropped
        if self.save_last:
            last = self.dirpath / LAST
            self.last_model_path = str(last)
            save.append(last)
        return Signal(save=tuple(save), delete=tuple(delete)) if save or delete else None

    def _rank(self, ctx: Context, score: float) -> tuple[Path | None, list[Path]]:
        if math.isnan(score):  # NaN ranks last
            score = math.inf if self.mode == "min" else -math.inf
        path = self._path(ctx, score)
        kept = self.best_k_models
        if str(path) not in kept and self.save_top_k != -1 and len(kept) >= self.save_top_k:
            worst = max(kept, key=lambda p: kept[p] if self.mode == "min" else -kept[p])
            if not self._worse(kept[worst], score):
                return None, []
            del kept[worst]
            dropped = [Path(worst)]
        else:
            dropped = []
        kept[str(path)] = score
        best = min(kept, key=lambda p: kept[p] if self.mode == "min" else -kept[p])
        self._best_model_path, self.best_model_score = best, kept[best]
        return path, dropped

    def _path(self, ctx: Context, score: float | None) -> Path:
        fields: dict[str, Any] = {_key(k): v for k, v in ctx.metrics.items()}
        fields.update(epoch=ctx.epoch, step=ctx.step)
        try:
            name = self.filename.format(**fields)
        except (KeyError, IndexError, ValueError) as e:
            raise MisconfigurationError(
                f"ModelCheckpoint: filename {self.filename!r} cannot be formatted ({type(e).__name__}: {e}); "
                f"available keys: {', '.join(sorted(fields))}"
            ) from None
        if self.monitor is not None and "{" + _key(self.monitor) not in self.filename:
            name += f"-{_key(self.monitor)}={score:.4f}"
        name = _UNSAFE.sub("_", name)
        if name == "last":
            name = "last-top"  # never overwrite last.safetensors with a ranked file
        return self.dirpath / f"{name}.safetensors"

    # -- resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "dirpath": str(self.dirpath),
            "best_k_models": [[p, encode_float(s)] for p, s in self.best_k_models.items()],
            "best_model_path": self._best_model_path or "",  # "" for none, as checkpoints always held
            "best_model_score": None if self.best_model_score is None else encode_float(self.best_model_score),
            "last_model_path": self.last_model_path,
            "last_saved_step": self._last_saved_step,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_k_models = {p: decode_float(s) for p, s in state["best_k_models"]}
        self._best_model_path = state["best_model_path"] or None
        score = state["best_model_score"]
        self.best_model_score = None if score is None else decode_float(score)
        self.last_model_path = state["last_model_path"]
        self._last_saved_step = int(state["last_saved_step"])
