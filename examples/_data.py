"""MNIST for the examples, offline first: local IDX files, else a download, else sklearn digits.

``load_mnist(data_dir)`` returns a :class:`Digits` split into train and validation sets:
images as float32 ``(N, 1, 28, 28)`` in [0, 1] and int64 labels. Where it comes from:

1. IDX files in ``data_dir`` (or ``data_dir/MNIST/raw``, where torchvision puts them),
   plain or ``.gz``: the 60k train set split 55k/5k (as in Lightning's MNIST example),
   else the 10k test set alone split 9k/1k;
2. else ``torchvision.datasets.MNIST(download=True)`` into ``data_dir``, giving up after a
   few seconds when no mirror answers;
3. else scikit-learn's bundled 8x8 handwritten digits (1797 images) upsampled to 28x28,
   announced with one line on stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import io
import pathlib
import socket
import urllib.parse
import urllib.request

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["Digits", "load_mnist", "read_idx"]

_MAGIC = {0x0801: 1, 0x0803: 3}  # unsigned-byte IDX files: labels (1 dim), images (3 dims)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Digits:
    train_images: torch.Tensor
    train_labels: torch.Tensor
    val_images: torch.Tensor
    val_labels: torch.Tensor
    source: str  # one phrase saying where the data came from


def read_idx(path: pathlib.Path) -> np.ndarray:
    """An unsigned-byte IDX file (``.gz`` or not) as a numpy array of its declared shape."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    magic = int.from_bytes(raw[:4], "big")
    if magic not in _MAGIC:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (magic {magic:#010x})")
    ndim = _MAGIC[magic]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes of data, its header says {shape}")
    return data.reshape(shape)


def _find(folder: pathlib.Path, stem: str) -> pathlib.Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz", folder / "MNIST" / "raw" / stem, folder / "MNIST" / "raw" / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_local(data_dir: pathlib.Path) -> tuple[torch.Tensor, torch.Tensor, int, str] | None:
    """(images uint8 (N,28,28), labels, validation size, description) from IDX files, or None."""
    for prefix, n_val in (("train", 5000), ("t10k", 1000)):
        images, labels = _find(data_dir, f"{prefix}-images-idx3-ubyte"), _find(data_dir, f"{prefix}-labels-idx1-ubyte")
        if images is not None and labels is not None:
            x, y = read_idx(images), read_idx(labels)
            if len(x) != len(y):
                raise ValueError(f"{images} holds {len(x)} images but {labels} holds {len(y)} labels")
            n_val = min(n_val, len(x) // 10)  # a smaller file (a subset) keeps a 90/10 split
            what = "train" if prefix == "train" else "test"
            return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64)), n_val, f"MNIST {what} set from {images.parent}"
    return None


def _reachable(urls: list[str], timeout: float) -> bool:
    """Whether a TCP connection to one of ``urls`` opens within ``timeout`` (or a proxy is set).

    torchvision tries every file on every mirror, each with its own timeout: probing once
    first keeps an offline machine from waiting for all of them.
    """
    if urllib.request.getproxies():
        return True  # the proxy decides; a direct probe would say nothing
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        try:
            socket.create_connection((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout).close()
            return True
        except OSError:
            continue
    return False


def _download(data_dir: pathlib.Path, timeout: float) -> bool:
    """Try torchvision's MNIST download into ``data_dir``; quietly False on any failure."""
    from torchvision.datasets import MNIST

    if not _reachable(MNIST.mirrors, timeout):
        return False
    raw = data_dir.absolute() / "MNIST" / "raw"
    created = [p for p in reversed([raw, *raw.parents]) if not p.exists()]  # outermost first
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        # torchvision prints each mirror it tries; the caller prints the one line that matters.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            MNIST(str(data_dir), train=True, download=True)
        return True
    except Exception:  # noqa: BLE001 - offline, a proxy, a read-only folder: all mean "fall back"
        for folder in reversed(created):  # leave no empty folders behind
            with contextlib.suppress(OSError):
                folder.rmdir()
        return False
    finally:
        socket.setdefaulttimeout(previous)


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    small = torch.from_numpy(digits.images.astype(np.float32) / 16.0).unsqueeze(1)  # (1797, 1, 8, 8)
    big = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).clamp(0, 1)
    return (big.squeeze(1) * 255).round().to(torch.uint8), torch.from_numpy(digits.target.astype(np.int64))


def load_mnist(
    data_dir: str | pathlib.Path, *, download: bool = True, timeout: float = 3.0, seed: int = 42
) -> Digits:
    """Digits split into train/validation (see the module docstring for the sources).

    ``seed`` fixes the random split. ``download=False`` skips the network attempt;
    ``timeout`` bounds each network wait (seconds).
    """
    data_dir = pathlib.Path(data_dir)
    found = _read_local(data_dir)
    if found is None and download and _download(data_dir, timeout):
        found = _read_local(data_dir)
    if found is None:
        images, labels = _sklearn_digits()
        n_val = len(images) // 10
        source = "scikit-learn's 8x8 digits resized to 28x28"
        why = "could not be downloaded" if download else "download disabled"
        print(f"MNIST IDX files not found in {data_dir} ({why}): falling back to {source} ({len(images)} images)", flush=True)
    else:
        images, labels, n_val, source = found
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    x = images.float().div_(255.0).unsqueeze(1)  # (N, 1, 28, 28) in [0, 1]
    val, train = order[:n_val], order[n_val:]
    return Digits(train_images=x[train], train_labels=labels[train], val_images=x[val], val_labels=labels[val], source=source)
