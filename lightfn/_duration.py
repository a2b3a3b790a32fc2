"""Durations as users write them (``max_time=``, ``Timer(duration=)``): seconds, a
``timedelta``, a dict of its keyword arguments or Lightning's ``"DD:HH:MM:SS"``."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping

from .errors import LightfnError

__all__ = ["Duration", "seconds_of"]

Duration = float | int | datetime.timedelta | Mapping[str, float] | str

_DHMS = re.compile(r"^\s*(\d+):(\d+):(\d+):(\d+(?:\.\d*)?)\s*$")


def seconds_of(duration: Duration, *, who: str, error: type[LightfnError] = LightfnError) -> float:
    """Seconds from a number of seconds, a ``timedelta``, a dict of ``timedelta`` keyword
    arguments (``dict(days=1, hours=2)``) or a ``"DD:HH:MM:SS"`` string. A value that is none
    of these raises ``error`` (the caller's type), its message starting with ``who``."""
    if isinstance(duration, bool):
        raise error(f"{who}: duration must be a time, got {duration!r}")
    if isinstance(duration, (int, float)):
        seconds = float(duration)
    elif isinstance(duration, datetime.timedelta):
        seconds = duration.total_seconds()
    elif isinstance(duration, Mapping):
        allowed = {"weeks", "days", "hours", "minutes", "seconds", "milliseconds", "microseconds"}
        unknown = sorted(set(duration) - allowed)
        if unknown:
            raise error(
                f"{who}: unknown duration keys {unknown}; use some of {sorted(allowed)}, "
                "e.g. dict(hours=1, minutes=30)"
            )
        seconds = datetime.timedelta(**duration).total_seconds()
    elif isinstance(duration, str):
        match = _DHMS.match(duration)
        if match is None:
            raise error(
                f"{who}: duration string {duration!r} is not 'DD:HH:MM:SS' (e.g. '00:12:00:00' for 12 hours)"
            )
        days, hours, minutes = (int(g) for g in match.groups()[:3])
        seconds = datetime.timedelta(days=days, hours=hours, minutes=minutes,
                                     seconds=float(match.group(4))).total_seconds()
    else:
        raise error(
            f"{who}: duration must be seconds, a timedelta, a dict or 'DD:HH:MM:SS', got {type(duration).__name__}"
        )
    if not seconds >= 0:
        raise error(f"{who}: duration must be >= 0 seconds, got {duration!r}")
    return seconds
