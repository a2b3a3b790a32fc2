"""An in-memory logger shared by the fit, ModelCheckpoint and resume tests."""

from __future__ import annotations

from lightfn.loggers import Logger


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)`` and the hparams."""

    def __init__(self):
        self.rows = []
        self.hparams = None

    def log_metrics(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def log_hparams(self, hparams):
        self.hparams = dict(hparams)

    @property
    def log_dir(self):
        return None

    @property
    def version(self):
        return 0

    def values(self, name):
        """``[(step, value)]`` of one metric, in logging order."""
        return [(s, m[name]) for s, m in self.rows if name in m]

    def by_step(self):
        """Everything logged, merged per step."""
        out = {}
        for step, metrics in self.rows:
            out.setdefault(step, {}).update(metrics)
        return out
