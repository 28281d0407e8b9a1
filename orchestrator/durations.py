"""Durations as Fly's API takes them: seconds, or Go-style strings such as ``"10s"``."""

from __future__ import annotations

import re
from typing import Any

from .errors import InvalidRequestError

_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: Any, field: str) -> float:
    """Seconds from a number or a Go-style duration string (``"10s"``, ``"1m30s"``, ``"500ms"``)."""
    if isinstance(value, bool):
        raise InvalidRequestError(f"{field}: expected a duration, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and value:
        pos, seconds = 0, 0.0
        for m in _DURATION_RE.finditer(value):
            if m.start() != pos:
                break
            seconds += float(m.group(1)) * _UNITS[m.group(2)]
            pos = m.end()
        if pos != len(value):
            raise InvalidRequestError(f"{field}: invalid duration {value!r} (e.g. '10s', '500ms')")
    else:
        raise InvalidRequestError(f"{field}: expected a duration, got {value!r}")
    if not 0 <= seconds <= 86400:
        raise InvalidRequestError(f"{field}: duration out of range (0 to 24h): {value!r}")
    return seconds


__all__ = ["parse_duration"]
