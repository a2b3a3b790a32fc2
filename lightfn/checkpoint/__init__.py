"""Checkpoints: any lightfn pytree saved as one safetensors file, and loaded back safely.

Example::

    lf.save("ckpt.safetensors", state, metadata={"lr": 3e-4})
    state = lf.load("ckpt.safetensors", like=state)        # same structure, dtypes, devices
    params = lf.load("ckpt.safetensors")["params"]         # nested dicts of tensors
    enc = lf.load("ckpt.safetensors", subtree=("params", "encoder"))   # reads only that part

Why safetensors: a checkpoint must never be able to run code when opened (a pickle can), and
any tool should read it. Tensors are stored under keys that encode their pytree path as
JSON (``["params","enc.0.weight"]``); the tree's structure, its Python scalars and strings,
per-tensor CRC32s and the user's metadata live as JSON in the safetensors metadata. Writes
are atomic: a crash (even ``kill -9``) leaves either the old checkpoint or the new one,
never a half-written file.

The package, from the bottom up:

- ``_atomic``: crash-safe replacement of a file (temporary, fsync, rename).
- ``_bytes``: the safetensors container: header encoding, the checks that make reading a
  hostile file safe, tensor bytes and CRC32s.
- ``_format``: lightfn's entries in the file's ``__metadata__`` (format version, user
  metadata, structure), and the names fit and sharded checkpoints share with ``load``.
- ``_structure``: a pytree's structure as JSON and back: encode, check, rebuild, fit a template.
- ``_io``: :func:`save`, :func:`load`, :func:`read_metadata` on top.
- ``__main__``: ``python -m lightfn.checkpoint consolidate FOLDER OUT``.
"""

from ..errors import CheckpointError
from ._io import load, read_metadata, save

__all__ = ["save", "load", "read_metadata", "CheckpointError"]
