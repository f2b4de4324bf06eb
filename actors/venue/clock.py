"""Time for the venue simulator: always passed in, never read inside the logic.

The engine and the market-data pacer take a ``Clock``; tests use ``ManualClock`` and move time
explicitly, the server uses ``WallClock``. Times are float seconds since the Unix epoch (``*_s``);
Deribit's millisecond timestamps are made only when a record is turned into wire data.
"""

from __future__ import annotations

import math
import time
from typing import Protocol


class Clock(Protocol):
    """Anything that can tell the current time in seconds since the Unix epoch."""

    def now_s(self) -> float: ...


class WallClock:
    """The real wall clock (for the server process only, never inside tests)."""

    def now_s(self) -> float:
        return time.time()


class ManualClock:
    """A clock that moves only when told to. ``advance(dt_s)`` refuses to go backwards."""

    def __init__(self, start_s: float = 1_700_000_000.0) -> None:
        if not math.isfinite(start_s):
            raise ValueError(f"invalid start_s={start_s!r}: must be finite")
        self._now_s = float(start_s)

    def now_s(self) -> float:
        return self._now_s

    def advance(self, dt_s: float) -> float:
        if not math.isfinite(dt_s) or dt_s < 0:
            raise ValueError(f"invalid dt_s={dt_s!r}: must be finite and >= 0")
        self._now_s += dt_s
        return self._now_s

    def set(self, t_s: float) -> None:
        if not math.isfinite(t_s) or t_s < self._now_s:
            raise ValueError(f"invalid t_s={t_s!r}: must be finite and >= now_s={self._now_s!r}")
        self._now_s = float(t_s)


def to_ms(t_s: float) -> int:
    """Seconds -> Deribit's integer milliseconds (only at the wire)."""
    return int(round(t_s * 1000.0))
