"""TensorBoard event files: scalars, hyperparameters (the HPARAMS tab) and images.

>>> logger = TensorBoardLogger("runs")                       # doctest: +SKIP
>>> logger.log_hparams({"lr": 1e-3, "batch_size": 64})      # doctest: +SKIP
>>> logger.log_metrics({"train/loss": 0.25}, step=100)      # doctest: +SKIP
>>> logger.close()                                          # doctest: +SKIP

Then ``tensorboard --logdir runs`` shows ``lightfn/version_0``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..errors import LoggerError
from ._file import FileLogger
from .base import check_metrics, flatten_hparams, image_to_uint8_chw

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

__all__ = ["TensorBoardLogger", "image_grid"]


class TensorBoardLogger(FileLogger):
    """Writes a TensorBoard run into ``save_dir/name/version_N``.

    Args:
        save_dir: the folder to point ``tensorboard --logdir`` at.
        name: a sub-folder grouping versions of one experiment (``""``: none).
        version: the run's number; ``None`` takes the next free one. Passing an existing
            version keeps logging into that run (e.g. after a resume).
        flush_secs: how often the event writer flushes to disk in the background.

    Hyperparameters go into the same run as the scalars (TensorBoard's HPARAMS tab then
    lists every scalar of the run as a metric column) and into ``hparams.yaml``.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str],
        name: str = "lightfn",
        version: int | None = None,
        flush_secs: int = 10,
    ) -> None:
        super().__init__(save_dir, name, version)
        self._flush_secs = flush_secs
        self._writer: SummaryWriter | None = None

    @property
    def writer(self) -> SummaryWriter:
        """The underlying ``SummaryWriter`` (created on first use), for anything else to log."""
        if self._writer is None:
            # Imported here: torch.utils.tensorboard pulls in tensorboard and protobuf,
            # which `import lightfn` should not pay for.
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=self._flush_secs)
        return self._writer

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        values = check_metrics(metrics, step)
        writer = self.writer
        for k, v in values.items():
            writer.add_scalar(k, v, global_step=int(step))

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Write ``hparams`` to the HPARAMS tab of this run and to ``hparams.yaml``.

        Nested dicts become ``outer/inner`` names; lists and other objects are shown as
        text. Calling it again adds to (and overrides) the earlier values.
        """
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        table = {}
        for k, v in flatten_hparams(self._add_hparams(hparams)).items():
            if v is None or isinstance(v, (list, dict)):
                v = str(v)  # the HPARAMS table holds numbers, strings and bools only
            table[k] = v
        # Only the session-start and session-end summaries are written, not the
        # "experiment" one: TensorBoard then builds the experiment from every run's
        # hparams and scalar tags, so several versions in one logdir compare cleanly and
        # all logged scalars appear as metric columns.
        _experiment, start, end = hparams_summaries(table, {})
        self.writer.file_writer.add_summary(start)
        self.writer.file_writer.add_summary(end)

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        img = image_to_uint8_chw(tag, image)
        self.writer.add_image(tag, img, global_step=int(step), dataformats="CHW")

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def image_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, padding: int = 2) -> torch.Tensor:
    """Tile a batch of images into one ``CHW`` image (e.g. inputs over reconstructions).

    ``images`` is ``NCHW``, ``NHW``, or a list of ``CHW``/``HW`` tensors; ``nrow`` images
    per row. Values are kept as they are (float in [0, 1] or uint8), ready for
    :meth:`Logger.log_image`.
    """
    from torchvision.utils import make_grid

    if isinstance(images, torch.Tensor):
        batch = images.detach()
    else:
        batch = torch.stack([x.detach() for x in images])
    if batch.dim() == 3:
        batch = batch.unsqueeze(1)
    if batch.dim() != 4:
        raise LoggerError(f"image_grid needs NCHW, NHW or a list of CHW/HW images, got shape {tuple(batch.shape)}")
    return make_grid(batch, nrow=nrow, padding=padding)
