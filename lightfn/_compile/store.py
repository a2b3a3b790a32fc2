"""Where lightfn's AOT cache (lightfn/_compile/aot.py) keeps its artifacts, and how it trusts them.

One folder, ``<lightfn cache>/aot``: per key a manifest ``<key>.json`` (the package's file
name, size and sha256, and the output structure) and the package ``<key>-<sha>.pt2``. The
package is compiled into a temporary file and moved into place before its manifest is, both
atomically (``os.replace``), so concurrent processes see a whole artifact or none. Builds
take the folder's lock (:func:`build_lock`, one build at a time per folder), and a process
that waited for it looks for the artifact again first: two processes needing the same key
build it once. A package whose size
or sha256 differs from its manifest is never loaded. The folder is bounded
(``LIGHTFN_AOT_CACHE_MB``, default 2048): after each build the least recently used
artifacts (by the manifest's mtime, touched on every load) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch

from .._diagnostics import first_line

__all__ = ["open_package", "read_manifest", "load", "write_package", "evict", "build_lock"]


def _limit_bytes() -> int:
    try:
        return int(float(os.environ.get("LIGHTFN_AOT_CACHE_MB", "2048")) * 2**20)
    except ValueError:
        return 2048 * 2**20



def open_package(path: Path) -> Any:
    # The C++ loader directly: torch._inductor.aoti_load_package would import inductor's
    # Python side (seconds) only to wrap the loader with pytree specs this module keeps itself.
    return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: Path, key: str) -> dict[str, Any] | None:
    """The manifest for ``key``, None if absent; raises ValueError when it is corrupted."""
    try:
        text = (folder / f"{key}.json").read_text()
    except FileNotFoundError:
        return None
    manifest = json.loads(text)  # ValueError on a torn or edited file
    if not isinstance(manifest, dict) or manifest.get("key") != key:
        raise ValueError("manifest does not match its key")
    return manifest


def load(folder: Path, key: str, manifest: dict[str, Any]) -> Any:
    """The loaded package; ValueError when it does not match its manifest."""
    path = folder / str(manifest["package"])
    if path.parent != folder:
        raise ValueError("manifest names a file outside the cache")
    size = path.stat().st_size  # FileNotFoundError: evicted meanwhile, a plain miss
    if size != manifest.get("size") or sha256(path) != manifest.get("sha256"):
        raise ValueError(f"{path.name} has {size} bytes and another sha256 than recorded")
    try:
        model = open_package(path)
    except Exception as e:  # noqa: BLE001 - any load failure means a bad artifact
        raise ValueError(f"AOTInductor cannot load {path.name}: {first_line(e)}") from e
    try:
        os.utime(folder / f"{key}.json")  # recently used: evicted last
    except OSError:
        pass  # a read-only cache still loads
    return model


def write_package(folder: Path, key: str, ep: Any, options: dict[str, Any]) -> tuple[Path, int, str]:
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{key}.", suffix=".pt2")
    os.close(fd)
    try:
        opts = {k: v for k, v in options.items() if k != "guard_filter_fn"}
        torch._inductor.aoti_compile_and_package(ep, package_path=tmp, inductor_configs=opts)
        sha = sha256(Path(tmp))
        final = folder / f"{key}-{sha[:16]}.pt2"
        size = os.path.getsize(tmp)
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return final, size, sha


def evict(folder: Path, keep: str) -> None:
    """Remove least recently used artifacts until the folder is within its limit."""
    limit = _limit_bytes()
    now = time.time()
    for tmp in folder.glob(".*.pt2"):  # a build killed midway leaves its temporary behind
        try:
            if now - tmp.stat().st_mtime > 86400:
                tmp.unlink()
        except OSError:
            pass
    entries = []
    total = 0
    for m in folder.glob("*.json"):
        if m.name.startswith("."):  # lightfn's own notes (pathlib's glob matches dotfiles)
            continue
        key = m.stem
        try:
            stamp = m.stat().st_mtime
            files = [m, *folder.glob(f"{key}-*.pt2")]
            size = sum(f.stat().st_size for f in files)
        except OSError:
            continue
        total += size
        entries.append((stamp, key, files, size))
    for stamp, key, files, size in sorted(entries):
        if total <= limit:
            break
        if key == keep:
            continue
        for f in files:  # the manifest first: a reader then sees a miss, not a missing package
            f.unlink(missing_ok=True)
        total -= size


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Hold the folder's build lock (an ``flock``, released by the OS if the holder dies).

    Builds are serialized per cache folder: on a small machine two concurrent builds only
    slow each other down, and the second usually wants what the first is building.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".build.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
