"""Atomic file replacement: a crash at any moment (even ``kill -9``) leaves the old file or the new one.

The file is written under a hidden ``.<name>.<pid>.<hex>.tmp`` name in the same folder,
fsynced, then renamed over the target; the folder is fsynced so the rename itself is durable.
Checkpoint files and the ``index.json`` of a sharded checkpoint are both written this way.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomic(target: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``target`` through ``write(file)`` so that a crash at any moment leaves either
    the previous file or the complete new one: a temporary in the same folder, fsync,
    rename, fsync of the folder. Temporaries of earlier saves whose process died are removed.
    (Checkpoints and the index of a sharded checkpoint are both written this way.)"""
    _remove_stale_temporaries(target)
    # Hidden and ending in .tmp, so no glob for checkpoints (*.safetensors) ever matches it.
    tmp = target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with open(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if os.name == "posix":  # make the rename itself durable
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _remove_stale_temporaries(target: Path) -> None:
    """Delete temporaries of earlier saves to ``target`` whose process is gone (killed mid-save)."""
    if os.name != "posix":
        return
    pattern = re.compile(re.escape(f".{target.name}.") + r"(\d+)\.[0-9a-f]+\.tmp")
    with os.scandir(target.parent) as it:
        for entry in it:
            m = pattern.fullmatch(entry.name)
            if m and int(m[1]) != os.getpid() and not _process_alive(int(m[1])):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OverflowError:
        return False
    return True
