"""What the file loggers share: a ``save_dir/name/version_N`` run folder and ``hparams.yaml``.

CSVLogger and TensorBoardLogger differ in how they write metrics and images; where their
run lives and how hyperparameters accumulate across calls is the same, and lives here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .base import Logger, RunDir, plain, write_hparams_yaml

__all__ = ["FileLogger"]


class FileLogger(Logger):
    """A :class:`Logger` writing into its own run folder (see :class:`RunDir`)."""

    def __init__(self, save_dir: str | os.PathLike[str], name: str = "lightfn", version: int | None = None) -> None:
        self._run = RunDir(save_dir, name, version)
        self._hparams: dict[str, Any] = {}

    @property
    def log_dir(self) -> Path:
        return self._run.path

    @property
    def version(self) -> int:
        return self._run.version

    def _add_hparams(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``hparams`` into the run's (later calls add and override), rewrite
        ``hparams.yaml``; return all of them."""
        self._hparams.update(plain(hparams))
        write_hparams_yaml(self.log_dir, self._hparams)
        return self._hparams
