"""What several callbacks (and the resume code that saves their state) share.

* :func:`missing_metric_error`: the one message for a monitored name the loop never
  logged (EarlyStopping, ModelCheckpoint), listing what it did log;
* :func:`encode_float` / :func:`decode_float`: a float as a callback's state and a fit
  checkpoint's JSON metadata hold it (a best score may be ``inf`` before the first check).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..errors import MisconfigurationError

__all__ = ["missing_metric_error", "encode_float", "decode_float"]


def missing_metric_error(
    owner: str, monitor: str, metrics: Mapping[str, float], hint: str = ""
) -> MisconfigurationError:
    """The error for a monitored name that the loop never logged, listing what it did log."""
    available = ", ".join(repr(k) for k in sorted(metrics)) or "none yet"
    return MisconfigurationError(
        f"{owner} monitors {monitor!r}, but no metric of that name was logged; "
        f"logged metrics: {available}. Step metrics are logged as 'train/<name>' and eval "
        f"metrics as 'val/<name>' (name = a key of the dict your step returns).{hint}"
    )


def encode_float(x: float) -> float | str:
    """JSON-safe float: strict JSON has no inf/NaN, so those travel as strings."""
    return x if math.isfinite(x) else repr(x)


def decode_float(x: float | str) -> float:
    """The inverse of :func:`encode_float` (``float("inf")`` reads ``repr(inf)``)."""
    return float(x)
