"""Where lightfn keeps what it learns about this machine between processes.

One folder: ``$LIGHTFN_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/lightfn``, else
``~/.cache/lightfn``. Every file in it is a cache: deleting the folder is always safe, and
a file that cannot be read is treated as absent. Files are written atomically (a temporary
in the same folder, then ``os.replace``), so concurrent processes never read half a file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["cache_dir", "write_text_atomic"]


def cache_dir() -> Path:
    """lightfn's cache folder (not created here)."""
    explicit = os.environ.get("LIGHTFN_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "lightfn"


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
