"""The :class:`Logger` interface and what every logger shares: run folders, value checks.

A logger receives plain Python numbers: the training loop copies metrics from the device
once per log interval and hands loggers floats, so a logger can never force a host sync
in the middle of training. Only rank 0 logs in a distributed run (``fit`` decides that);
loggers contain no distributed code.

Run folders follow Lightning's layout, ``save_dir/name/version_N``, where ``N`` is the
next free integer. The folder is claimed lazily (at the first write or the first look at
``log_dir``/``version``) and atomically (``mkdir`` fails if another process took ``N``
first), so processes that build a logger but never log create nothing.
"""

from __future__ import annotations

import abc
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import LoggerError

__all__ = ["Logger"]


class Logger(abc.ABC):
    """What the training loop calls to record a run. Subclass it to write your own.

    Only :meth:`log_metrics`, :attr:`log_dir` and :attr:`version` are required;
    hparams, images, flush and close do nothing unless overridden (a logger that cannot
    show images simply ignores them). A logger is also a context manager that closes
    itself.
    """

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Record scalar ``metrics`` (name -> Python number) at training step ``step``."""

    def log_hparams(self, hparams: Mapping[str, Any]) -> None:
        """Record the run's hyperparameters (nested dicts allowed)."""

    def log_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """Record an image: ``CHW`` (C in 1, 3, 4) or ``HW``; float in [0, 1] or uint8."""

    def flush(self) -> None:
        """Write everything buffered so far to disk."""

    def close(self) -> None:
        """Flush and release files; logging again afterwards reopens them."""

    @property
    @abc.abstractmethod
    def log_dir(self) -> Path:
        """The folder this run writes into."""

    @property
    @abc.abstractmethod
    def version(self) -> int:
        """The run's version number (``N`` of ``version_N``)."""

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RunDir:
    """``save_dir/name/version_N``, claimed on first use; shared by the file loggers."""

    def __init__(self, save_dir: str | os.PathLike[str], name: str = "lightfn", version: int | None = None) -> None:
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 0):
            raise LoggerError(f"version must be None or an int >= 0, got {version!r}")
        if not isinstance(name, str):
            raise LoggerError(f"name must be a str (use '' for no sub-folder), got {type(name).__name__}")
        self.root = Path(save_dir) / name if name else Path(save_dir)
        self._version = version
        self._path: Path | None = None

    @property
    def path(self) -> Path:
        """The run folder, created (and its version chosen) on first access."""
        if self._path is None:
            self._path = self._claim()
        return self._path

    @property
    def version(self) -> int:
        self.path  # noqa: B018 -- choosing the version claims the folder
        assert self._version is not None
        return self._version

    def _claim(self) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._version is not None:
            # An explicit version reuses its folder: that is how a resumed run keeps logging.
            path = self.root / f"version_{self._version}"
            path.mkdir(exist_ok=True)
            return path
        n = next_version(self.root)
        while True:
            path = self.root / f"version_{n}"
            try:
                path.mkdir()
            except FileExistsError:  # another logger or process took it in between
                n += 1
                continue
            self._version = n
            return path


def next_version(root: Path) -> int:
    """One more than the largest ``N`` of the ``version_N`` folders in ``root`` (0 if none)."""
    found = [-1]
    if root.is_dir():
        for entry in root.iterdir():
            m = re.fullmatch(r"version_(\d+)", entry.name)
            if m and entry.is_dir():
                found.append(int(m.group(1)))
    return max(found) + 1


def check_metrics(metrics: Mapping[str, Any], step: int) -> dict[str, float | int]:
    """Validate ``metrics`` and ``step``; return a plain ``{name: number}`` dict."""
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise LoggerError(f"step must be an int, got {type(step).__name__} {step!r}")
    if not isinstance(metrics, Mapping):
        raise LoggerError(f"metrics must be a mapping of name -> number, got {type(metrics).__name__}")
    out: dict[str, float | int] = {}
    for k, v in metrics.items():
        if not isinstance(k, str) or not k:
            raise LoggerError(f"metric names must be non-empty strings, got {k!r}")
        if isinstance(v, torch.Tensor):
            raise LoggerError(
                f"metric {k!r} is a torch.Tensor; loggers take Python numbers so they never sync the device: "
                "call .item() where you log (once per log interval, not every step)"
            )
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise LoggerError(f"metric {k!r} must be a real number, got {type(v).__name__} {v!r:.60}")
        out[k] = int(v) if isinstance(v, numbers.Integral) else float(v)
    return out


def image_to_uint8_chw(tag: str, image: torch.Tensor) -> torch.Tensor:
    """A CPU uint8 ``CHW`` copy of ``image`` (``CHW`` or ``HW``; float in [0, 1] or uint8)."""
    if not isinstance(image, torch.Tensor):
        raise LoggerError(f"image {tag!r} must be a torch.Tensor, got {type(image).__name__}")
    img = image.detach()
    if img.dim() == 2:
        img = img.unsqueeze(0)
    if img.dim() != 3 or img.shape[0] not in (1, 3, 4):
        raise LoggerError(
            f"image {tag!r} must be CHW with C in (1, 3, 4) or HW, got shape {tuple(image.shape)}; "
            "use lightfn.loggers.image_grid for a batch of images"
        )
    img = img.cpu()
    if img.dtype == torch.uint8:
        return img.contiguous()
    if not img.is_floating_point():
        raise LoggerError(f"image {tag!r} must be float in [0, 1] or uint8, got {img.dtype}")
    # Out-of-range values are clipped, as TensorBoard does.
    return (img.float().clamp(0, 1) * 255).round().to(torch.uint8)


def flatten_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``"outer/inner"`` keys (TensorBoard's HPARAMS table is flat)."""
    out: dict[str, Any] = {}
    for k, v in hparams.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_hparams(v, prefix=f"{key}/"))
        else:
            out[key] = v
    return out


def plain(value: Any) -> Any:
    """``value`` as YAML/TensorBoard-friendly Python data (tensors, tuples, paths, dtypes...)."""
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def write_hparams_yaml(log_dir: Path, hparams: Mapping[str, Any]) -> None:
    """Write ``hparams`` to ``log_dir/hparams.yaml`` (Lightning's file name) as block-style YAML.

    PyYAML's safe dumper writes only plain data, so ``yaml.safe_load`` of the file gives back
    exactly ``plain(hparams)``; keys stay in the order they were logged.
    """
    text = yaml.safe_dump(plain(hparams), sort_keys=False, allow_unicode=True)
    (log_dir / "hparams.yaml").write_text(text, encoding="utf-8")
