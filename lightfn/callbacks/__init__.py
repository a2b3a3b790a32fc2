"""Callbacks: observe the loop, return signals. See :mod:`lightfn.callbacks.base`."""

from ..errors import MisconfigurationError, NonFiniteLossError
from .base import Callback, Context, Signal
from .checkpoint import ModelCheckpoint
from .progress import ProgressBar
from .progress_log import ProgressLog
from .ema import EMA
from .early_stopping import EarlyStopping
from .lr_monitor import LearningRateMonitor
from .nan import TerminateOnNaN
from .timer import Timer

__all__ = ["Callback", "Context", "Signal", "ModelCheckpoint", "ProgressBar", "ProgressLog", "EarlyStopping", "MisconfigurationError", "LearningRateMonitor", "TerminateOnNaN", "NonFiniteLossError", "Timer", "EMA"]
