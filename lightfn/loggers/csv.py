"""Plain files anyone can read: ``metrics.csv``, ``hparams.yaml`` and PNG images.

Layout of a run folder ``save_dir/name/version_N``::

    metrics.csv                 step, then one column per metric name (sorted)
    hparams.yaml                the hyperparameters
    images/<tag>_step<N>.png    logged images ('/' in a tag becomes '_')

``metrics.csv`` has one row per :meth:`CSVLogger.log_metrics` call; a metric a row does
not have is an empty cell. Rows are buffered and written every ``flush_every_n_rows``
rows and on :meth:`~CSVLogger.flush`/:meth:`~CSVLogger.close`; when a later call brings a
metric name the file does not have yet, the file is rewritten with the wider header.
Buffered rows reach the file only on a flush: call :meth:`~CSVLogger.close` at the end (or
use the logger as a context manager); ``fit`` does this for you, also on errors.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import LoggerError
from ._file import FileLogger
from .base import check_metrics, image_to_uint8_chw

__all__ = ["CSVLogger"]

METRICS_FILE = "metrics.csv"


class CSVLogger(FileLogger):
    """Writes metrics to ``metrics.csv`` in ``save_dir/name/version_N``.

    Args:
        save_dir: the root folder of all runs.
        name: a sub-folder grouping versions of one experiment (``""``: none).
        version: the run's number; ``None`` takes the next free one. Passing an existing
            version appends to that run's ``metrics.csv`` (e.g. after a resume).
        flush_every_n_rows: write buffered rows to disk after this many.

    The ``step`` column holds the ``step`` argument of each call; a metric named
    ``"step"`` must agree with it and is not repeated as a column.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        name: str = "lightfn",
        version: int | None = None,
        *,
        flush_every_n_rows: int = 100,
    ) -> None:
        if isinstance(flush_every_n_rows, bool) or not isinstance(flush_every_n_rows, int) or flush_every_n_rows < 1:
            raise LoggerError(f"flush_every_n_rows must be an int >= 1, got {flush_every_n_rows!r}")
        super().__init__(save_dir, name, version)
        self._flush_every = flush_every_n_rows
        self._pending: list[dict[str, float | int]] = []
        self._columns: list[str] | None = None  # metric columns of the file on disk, once known

    @property
    def metrics_file(self) -> Path:
        return self.log_dir / METRICS_FILE

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = check_metrics(metrics, step)
        if "step" in values:
            if values.pop("step") != step:
                raise LoggerError(f"metric 'step'={metrics['step']!r} disagrees with the step argument {step}")
        self._pending.append({"step": int(step), **values})
        if len(self._pending) >= self._flush_every:
            self.flush()

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write ``hparams.yaml``; calling again adds to (and overrides) earlier values."""
        self._add_hparams(hparams)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """Save ``images/<tag>_step<step>.png``."""
        from PIL import Image

        img = image_to_uint8_chw(tag, image)
        array = img.permute(1, 2, 0).numpy()
        if array.shape[2] == 1:
            array = array[:, :, 0]
        folder = self.log_dir / "images"
        folder.mkdir(exist_ok=True)
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", tag)
        Image.fromarray(array).save(folder / f"{safe}_step{int(step)}.png")

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.metrics_file
        if self._columns is None:
            self._columns = _read_header(path)
        keys = set().union(*self._pending) - {"step"}
        new = keys - set(self._columns)
        if new or not path.exists():
            self._rewrite(path, sorted(set(self._columns) | new))
        else:
            with path.open("a", newline="") as f:
                csv.DictWriter(f, ["step", *self._columns], restval="").writerows(self._pending)
        self._pending.clear()

    def _rewrite(self, path: Path, columns: list[str]) -> None:
        old: list[dict[str, str]] = []
        if path.exists():
            with path.open(newline="") as f:
                old = list(csv.DictReader(f))
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, ["step", *columns], restval="")
            writer.writeheader()
            writer.writerows(old)
            writer.writerows(self._pending)
        # Replace in one step so a crash mid-write never leaves a truncated metrics.csv.
        os.replace(tmp, path)
        self._columns = columns

    def close(self) -> None:
        self.flush()


def _read_header(path: Path) -> list[str]:
    """The metric columns of an existing ``metrics.csv`` (a resumed run), else ``[]``."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        header = next(csv.reader(f), [])
    return [c for c in header if c != "step"]
