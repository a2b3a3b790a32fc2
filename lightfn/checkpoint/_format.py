"""lightfn's entries in a safetensors file's ``__metadata__``, and the names other layers share.

A lightfn checkpoint is an ordinary safetensors file (:mod:`lightfn.checkpoint._bytes`)
whose ``__metadata__`` (string to string, as safetensors requires) holds the entries named
by the ``META_*`` constants below: the format version, the lightfn and torch versions, the
user's metadata (JSON), the structure description (JSON, :mod:`lightfn.checkpoint._structure`)
and a CRC32 of all of these. A file without any ``lightfn.*`` entry is a foreign
safetensors file and loads as a flat dict.

The constants below ``META_*`` name what ``lf.fit`` (:mod:`lightfn.resume`) and sharded
checkpoints (:mod:`lightfn.distributed`) put in a checkpoint, so that ``lf.load`` can
recognize them without importing those layers.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ._bytes import parse_json

FORMAT_VERSION = 1

META_FORMAT = "lightfn.format_version"
META_LIGHTFN = "lightfn.lightfn_version"
META_TORCH = "lightfn.torch_version"
META_USER = "lightfn.metadata"
META_STRUCTURE = "lightfn.structure"
META_CRC = "lightfn.metadata_crc32"
REQUIRED_META = (META_FORMAT, META_LIGHTFN, META_TORCH, META_USER, META_STRUCTURE, META_CRC)

# A checkpoint written by ``lf.fit`` (lightfn.resume) carries this entry in its user metadata
# and holds the run's bookkeeping under these top-level keys, beside the state's own fields.
# ``lf.load`` with a template that has none of those keys (a TrainState) skips them.
FIT_WRITER_KEY, FIT_WRITER = "written_by", "lightfn.fit"
FIT_RUN_KEYS = ("loop", "callbacks")
# fit(hparams=...) is stored under this key of the user metadata (see read_metadata).
HPARAMS_KEY = "hparams"
# A sharded checkpoint (lightfn.distributed.save_sharded) is a folder of per-rank files plus
# this index; lf.load recognizes such a folder by it.
SHARDED_INDEX = "index.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class LightfnMeta:
    format_version: int
    lightfn_version: str
    torch_version: str
    user: dict[str, Any]
    structure: Any


def encode_meta(user: str, structure: Mapping[str, Any]) -> dict[str, str]:
    """The ``__metadata__`` of a checkpoint written now; ``user`` is the user's metadata as JSON text."""
    meta = {
        META_FORMAT: str(FORMAT_VERSION),
        META_LIGHTFN: _lightfn_version(),
        META_TORCH: torch.__version__,
        META_USER: user,
        META_STRUCTURE: json.dumps(structure, ensure_ascii=False, separators=(",", ":")),
    }
    meta[META_CRC] = str(metadata_crc(meta))
    return meta


def _lightfn_version() -> str:
    try:
        return importlib.metadata.version("lightfn")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def metadata_crc(meta: Mapping[str, str]) -> int:
    """CRC32 over every lightfn metadata entry except the CRC itself, in a canonical order."""
    body = {k: v for k, v in meta.items() if k.startswith("lightfn.") and k != META_CRC}
    return zlib.crc32(json.dumps(body, sort_keys=True, ensure_ascii=False).encode())


def parse_lightfn_meta(path: Path, meta: dict[str, str], *, verify: bool) -> LightfnMeta | None:
    """The lightfn entries of ``__metadata__``, validated; ``None`` for a file lightfn did not write."""
    if not any(k.startswith("lightfn.") for k in meta):
        return None
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: lightfn metadata is incomplete (missing {', '.join(missing)}); the file is damaged.")
    text = meta[META_FORMAT]
    if not (text.isascii() and text.isdigit()) or len(text) > 6 or int(text) < 1:
        raise CheckpointError(f"{path}: invalid checkpoint format version {text!r}; the file is damaged.")
    if int(text) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: written in checkpoint format version {int(text)} (by lightfn {meta[META_LIGHTFN]!r}); this "
            f"lightfn reads format versions up to {FORMAT_VERSION}. Upgrade lightfn to load it."
        )
    structure = parse_json(meta[META_STRUCTURE], f"metadata entry {META_STRUCTURE!r}", path)
    user = parse_json(meta[META_USER], f"metadata entry {META_USER!r}", path)
    if not isinstance(user, dict):
        raise CheckpointError(f"{path}: metadata entry {META_USER!r} is not a JSON object; the file is damaged.")
    if verify and meta[META_CRC] != str(metadata_crc(meta)):
        raise CheckpointError(f"{path}: the checksum of lightfn's metadata does not match: the header is damaged.")
    return LightfnMeta(
        format_version=int(text),
        lightfn_version=meta[META_LIGHTFN],
        torch_version=meta[META_TORCH],
        user=user,
        structure=structure,
    )
