"""Durations and sizes as people write and read them: ``11h30m``, ``90s``, ``1.2 GiB``."""

from __future__ import annotations

import math
import re

from ..errors import LiferaftError

_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
_NUMBER = re.compile(r"\d+(?:\.\d*)?|\.\d+", re.ASCII)
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|d|h|m|s)", re.ASCII)
_ALL = re.compile(r"(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ms|d|h|m|s))+", re.ASCII)
_OFF = ("none", "off", "no", "never")


def parse_duration(text: str | float | int, what: str = "duration", *, allow_off: bool = False) -> float | None:
    """Seconds in ``text``; ``None`` for ``none``/``off`` (or ``0``) when ``allow_off``.

    A bare number is seconds. Units d, h, m, s and ms may be combined: ``1h30m``, ``2m 5s``.

    >>> parse_duration("11h30m")
    41400.0
    >>> parse_duration("90")
    90.0
    >>> parse_duration("off", allow_off=True) is None
    True
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        raw = str(text).strip().lower().replace(" ", "")
        if allow_off and raw in _OFF:
            return None
        if _NUMBER.fullmatch(raw):
            value = float(raw)
        elif _ALL.fullmatch(raw):
            value = sum(float(num) * _UNITS[unit] for num, unit in _PART.findall(raw))
        else:
            raise LiferaftError(f"{what} {text!r} is not a duration", "write e.g. 11h30m, 90m, 45s or 3600 (seconds)")
    if not math.isfinite(value) or value < 0:
        raise LiferaftError(f"{what} {text!r} must be a positive duration", "write e.g. 11h30m, 90m, 45s")
    if value == 0 and allow_off:
        return None
    return value


def format_duration(seconds: float) -> str:
    """Short human form: ``2h05m``, ``4m30s``, ``12s``, ``0.4s``.

    >>> format_duration(7500)
    '2h05m'
    """
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        m, s = divmod(s, 60)
        return f"{m}m{s:02d}s" if s else f"{m}m"
    h, rem = divmod(s, 3600)
    m = rem // 60
    if h >= 48:
        d, h = divmod(h, 24)
        return f"{d}d{h:02d}h"
    return f"{h}h{m:02d}m"


def format_size(n: float) -> str:
    """Bytes in binary units: ``96.0 MiB``.

    >>> format_size(100 << 20)
    '100.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def plural(n: int, word: str) -> str:
    """``plural(1, "file")`` → ``'1 file'``, ``plural(3, "file")`` → ``'3 files'``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
