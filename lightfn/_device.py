"""Where to run: the one rule that turns ``"auto"``, ``None``, a name or a device into a
``torch.device`` (fit, validate/test, predict and the single-process mesh all ask it)."""

from __future__ import annotations

import torch

from .errors import DeviceError, LightfnError

__all__ = ["default_device", "resolve_device"]


def default_device() -> torch.device:
    """CUDA if available (this process's current CUDA device), else Apple MPS, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device: torch.device | str | None, *, error: type[LightfnError] = DeviceError) -> torch.device:
    """``"auto"`` or ``None``: :func:`default_device`; anything else as ``torch.device``
    reads it. A value that names no device raises ``error`` (:class:`DeviceError` unless
    the caller names its own type), saying what is accepted."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return default_device()
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise error(f"device={device!r} is not a device ({e}); use 'auto', 'cpu', 'cuda', 'cuda:1', 'mps'") from None
