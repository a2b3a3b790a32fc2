"""The safetensors container: its bytes, and the checks that make reading one safe.

A safetensors file is 8 bytes (little-endian length ``n`` of the JSON header), ``n`` bytes
of JSON, then the raw tensor bytes. The header maps each tensor key to ``{"dtype", "shape",
"data_offsets"}``, plus an optional ``__metadata__`` string-to-string map (where lightfn
keeps its own entries: :mod:`lightfn.checkpoint._format`).

lightfn writes and reads these bytes itself (the layout is small) so that it controls the
temporary file of an atomic save and reads tensors into ordinary memory. Reading never
unpickles, imports or executes anything named in a file, and every size the file claims is
checked against the file's real size before anything is allocated, so a hostile or damaged
file costs at most one header read. Tensors are stored by decreasing element size, then
key, so each starts aligned; any safetensors reader opens the files. Files are written
atomically (:mod:`lightfn.checkpoint._atomic`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError
from ._atomic import write_atomic

# safetensors refuses headers above 100 MB; a larger claim is damage, not a checkpoint.
MAX_HEADER_BYTES = 100_000_000

# safetensors dtype codes <-> torch dtypes (every dtype torch >= 2.11 and safetensors share).
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
}
DTYPE_CODES: dict[torch.dtype, str] = {d: code for code, d in DTYPES.items()}

_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_PROTOCOLS = range(2, 6)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def tensor_crc(t: torch.Tensor) -> int:
    """CRC32 of a contiguous CPU tensor's bytes (zlib runs over the buffer, no Python loop)."""
    return zlib.crc32(tensor_bytes(t)) if t.numel() else 0


def is_int(x: Any) -> bool:
    """A JSON integer (``bool`` is an ``int`` subclass, and not one)."""
    return type(x) is int


def parse_json(text: str, what: str, path: Path) -> Any:
    """``json.loads`` that rejects duplicate keys and turns every failure into CheckpointError."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e}); the file is damaged.") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate key in a JSON object")
    return out


# ----------------------------------------------------------------------------- writing


def write_safetensors(target: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write contiguous CPU ``tensors`` and the string ``metadata`` to ``target`` as a safetensors file, atomically."""
    if sys.byteorder != "little":
        raise CheckpointError(f"{target}: lightfn writes safetensors (little-endian) only on little-endian machines.")
    head, ordered = _encode_header(tensors, metadata)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir():
        raise CheckpointError(f"{target}: is a directory; give a file path to save to.")

    def write(f: BinaryIO) -> None:
        f.write(head)
        for t in ordered:
            f.write(tensor_bytes(t))

    write_atomic(target, write)


def _encode_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list[torch.Tensor]]:
    """The length prefix and JSON header of a safetensors file, and the tensors in data order.

    Tensors are laid out by decreasing element size, then key, so with the header padded to
    a multiple of 8 bytes every tensor starts aligned to its element size (zero-copy mmap).
    """
    order = sorted(tensors, key=lambda k: (-tensors[k].element_size(), k))
    header: dict[str, Any] = {}
    offset = 0
    for key in order:
        t = tensors[key]
        n = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = metadata
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % 8)
    if len(text) > MAX_HEADER_BYTES:
        raise CheckpointError(f"the checkpoint header would be {len(text)} bytes, over the {MAX_HEADER_BYTES} safetensors accepts.")
    return len(text).to_bytes(8, "little") + text, [tensors[k] for k in order]


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorEntry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


@dataclasses.dataclass(frozen=True, kw_only=True)
class Header:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


@contextlib.contextmanager
def open_checkpoint(path: Path) -> Iterator[BinaryIO]:
    """Open ``path`` for reading; a missing file or a directory is a CheckpointError."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint file.") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file.") from None
    with f:
        yield f


def read_header(path: Path, f: BinaryIO) -> Header:
    """Read and validate the header of the open file ``f`` (named ``path`` in errors).

    Checks, before anything is allocated from the file's claims: pickle/zip magic, the
    length prefix against the file size, JSON validity, every dtype and shape, and that the
    tensors' byte ranges tile the data section exactly (no holes, overlaps or truncation).
    """
    size = f.seek(0, os.SEEK_END)
    f.seek(0)
    head = f.read(8)
    _sniff(path, head, size)
    n = int.from_bytes(head, "little")
    if n > size - 8:
        raise CheckpointError(
            f"{path}: the header length prefix claims {n} bytes but only {size - 8} follow it: "
            "the file is truncated or is not a safetensors file."
        )
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: the header claims {n} bytes (limit {MAX_HEADER_BYTES}): not a checkpoint.")
    raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: the file changed size while being read.")
    if raw[:1] != b"{":
        raise CheckpointError(f"{path}: not a safetensors file (the header does not start with a JSON object).")
    try:
        text = raw.decode("utf-8")  # explicit: json.loads(bytes) would guess UTF-16/32 from NUL bytes
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: the safetensors header is not UTF-8 text; the file is damaged.") from None
    obj = parse_json(text, "the safetensors header", path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the safetensors header is not a JSON object.")
    meta = obj.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: the header's __metadata__ is not a string-to-string mapping.")
    tensors, spans = {}, []
    for key, info in obj.items():
        entry, begin, end = _tensor_entry(path, key, info, data_start=8 + n)
        tensors[key] = entry
        spans.append((begin, end, key))
    _check_tiling(path, spans, size - 8 - n)
    return Header(tensors=tensors, metadata=meta)


def _sniff(path: Path, head: bytes, size: int) -> None:
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); it is not a checkpoint.")
    if head.startswith(_ZIP_MAGIC) or (head[:1] == b"\x80" and head[1:2] and head[1] in _PICKLE_PROTOCOLS):
        kind = "a zip archive, as torch.save and Lightning .ckpt files are" if head.startswith(_ZIP_MAGIC) else "a pickle stream"
        raise CheckpointError(
            f"{path}: this looks like a pickle/torch.save file ({kind}); lightfn never unpickles, because "
            "unpickling can execute arbitrary code. If you trust the file, convert it once in a separate "
            "process: `sd = torch.load(old, weights_only=True)` (for a Lightning .ckpt take "
            "`sd['state_dict']`), then `lf.save(new_path, sd)` or `safetensors.torch.save_file(sd, new_path)`."
        )
    if size < 8:
        raise CheckpointError(f"{path}: only {size} bytes; too short to be a safetensors file.")


def _tensor_entry(path: Path, key: str, info: Any, *, data_start: int) -> tuple[TensorEntry, int, int]:
    bad = f"{path}: header entry {key!r} is malformed"
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{bad} (expected dtype, shape and data_offsets).")
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in DTYPES:
        raise CheckpointError(f"{bad}: unsupported dtype {code!r}.")
    if not isinstance(shape, list) or not all(is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{bad}: shape {shape!r} is not a list of non-negative integers.")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_int(o) for o in offsets):
        raise CheckpointError(f"{bad}: data_offsets {offsets!r} are not two integers.")
    begin, end = offsets
    dtype = DTYPES[code]
    nbytes = math.prod(shape) * dtype.itemsize  # exact Python ints: absurd shapes cannot overflow
    if not 0 <= begin <= end or end - begin != nbytes:
        raise CheckpointError(f"{bad}: shape {shape} of {code} needs {nbytes} bytes but data_offsets span {end - begin}.")
    return TensorEntry(dtype=dtype, shape=tuple(shape), offset=data_start + begin, nbytes=nbytes), begin, end


def _check_tiling(path: Path, spans: list[tuple[int, int, str]], data_len: int) -> None:
    pos = 0
    for begin, end, key in sorted(spans):
        if begin != pos:
            raise CheckpointError(f"{path}: tensor {key!r} starts at byte {begin} of the data section, expected {pos}: the header is damaged.")
        pos = end
    if pos != data_len:
        what = "truncated" if pos > data_len else "followed by unexplained bytes"
        raise CheckpointError(f"{path}: the tensors need {pos} data bytes but the file holds {data_len}: the file is {what}.")


def read_tensor(path: Path, f: BinaryIO, entry: TensorEntry) -> torch.Tensor:
    """Read one tensor of a validated header into fresh memory (one copy, no mmap).

    Plain reads rather than a file mapping: a mapped tensor would crash the process (SIGBUS)
    if the file were later truncated in place, and would pin a deleted file's disk space.
    """
    t = torch.empty(entry.shape, dtype=entry.dtype)
    if entry.nbytes:
        f.seek(entry.offset)
        if f.readinto(tensor_bytes(t)) != entry.nbytes:
            raise CheckpointError(f"{path}: the file became shorter while being read.")
    return t
