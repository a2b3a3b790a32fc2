"""A small YAML writer for ``hparams.yaml`` (dicts, lists, strings, numbers, bools, None).

lightfn does not depend on PyYAML for one file. The output is plain block-style YAML that
PyYAML (YAML 1.1) and YAML 1.2 parsers read back to the same values: strings are always
double-quoted (JSON escapes are valid YAML), floats always carry a '.' so 1.1 resolvers
do not read ``1e-05`` as a string, and NaN/infinities use YAML's ``.nan``/``.inf``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from .base import plain

__all__ = ["dump_yaml"]

_PLAIN_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/]*")
# Keys a YAML 1.1 parser would read as booleans or null if left unquoted.
_RESERVED = {"y", "n", "yes", "no", "true", "false", "on", "off", "null"}


def dump_yaml(data: Mapping[str, Any]) -> str:
    """``data`` (a mapping) as a YAML document. Other objects are written as their ``str``.

    >>> print(dump_yaml({"lr": 0.001, "betas": (0.9, 0.999), "model": {"name": "mlp"}}), end="")
    lr: 0.001
    betas: [0.9, 0.999]
    model:
      name: "mlp"
    """
    data = plain(data)
    if not data:
        return "{}\n"
    return "".join(line + "\n" for line in _mapping(data, 0))


def _key(k: str) -> str:
    if _PLAIN_KEY.fullmatch(k) and k.lower() not in _RESERVED:
        return k
    return json.dumps(k)


def _scalar(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return ".nan"
        if math.isinf(v):
            return ".inf" if v > 0 else "-.inf"
        r = repr(v)
        mantissa, e, exponent = r.partition("e")
        if "." not in mantissa:
            mantissa += ".0"
        return mantissa + e + exponent
    return json.dumps(str(v))


def _is_scalar(v: Any) -> bool:
    return not isinstance(v, (dict, list))


def _mapping(d: dict[str, Any], indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for k, v in d.items():
        if _is_scalar(v) or not v or (isinstance(v, list) and all(map(_is_scalar, v))):
            lines.append(f"{pad}{_key(k)}: {_inline(v)}")
        elif isinstance(v, dict):
            lines.append(f"{pad}{_key(k)}:")
            lines.extend(_mapping(v, indent + 2))
        else:
            lines.append(f"{pad}{_key(k)}:")
            lines.extend(_sequence(v, indent + 2))
    return lines


def _sequence(items: list[Any], indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    for v in items:
        if _is_scalar(v) or not v or (isinstance(v, list) and all(map(_is_scalar, v))):
            lines.append(f"{pad}- {_inline(v)}")
        else:
            # A nested block starts on the dash's line, indented past the dash.
            sub = _mapping(v, indent + 2) if isinstance(v, dict) else _sequence(v, indent + 2)
            lines.append(f"{pad}- {sub[0].lstrip()}")
            lines.extend(sub[1:])
    return lines


def _inline(v: Any) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    return _scalar(v)
