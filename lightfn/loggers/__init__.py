"""Loggers: where ``fit`` (or your own loop) records metrics, hyperparameters and images.

- :class:`TensorBoardLogger`: TensorBoard event files (scalars, the HPARAMS tab, images).
- :class:`CSVLogger`: ``metrics.csv``, ``hparams.yaml`` and PNG images.
- :class:`Logger`: the interface; subclass it for any other backend.

Both write into Lightning's run layout ``save_dir/name/version_N``. Loggers take Python
numbers, never device tensors: the loop decides when to copy from the device.

>>> import tempfile, lightfn as lf
>>> with lf.loggers.CSVLogger(tempfile.mkdtemp()) as logger:
...     logger.log_metrics({"train/loss": 0.5}, step=1)
>>> logger.metrics_file.read_text().splitlines()
['step,train/loss', '1,0.5']
"""

from __future__ import annotations

from ..errors import LoggerError
from .base import Logger
from .csv import CSVLogger
from .tensorboard import TensorBoardLogger, image_grid

__all__ = ["Logger", "LoggerError", "TensorBoardLogger", "CSVLogger", "image_grid"]
