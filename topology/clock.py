"""Time for the topology package, passed in rather than read.

Every piece of mesh logic (detectors, membership, partition, leases) takes ``now_s`` as an
argument or holds a :class:`Clock`; nothing in ``topology/`` calls ``time`` directly except
:class:`MonotonicClock`. Tests use :class:`ManualClock`; chaos tests wrap a node's clock in a
:class:`SkewedClock` to model a node whose clock runs ahead of or behind its peers.

All values are float seconds on a monotonic timeline (not wall-clock time: never compare them
across processes except through an explicit drift bound).
"""

from __future__ import annotations

import math
import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "ManualClock", "MonotonicClock", "SkewedClock"]


@runtime_checkable
class Clock(Protocol):
    """Something that tells monotonic time in float seconds."""

    def now_s(self) -> float:
        """Current monotonic time in seconds. Never decreases for one clock."""
        ...


class MonotonicClock:
    """The real clock: :func:`time.monotonic`."""

    __slots__ = ()

    def now_s(self) -> float:
        return time.monotonic()

    def __repr__(self) -> str:
        return "MonotonicClock()"


class ManualClock:
    """A clock that moves only when told to. Starts at ``start_s``."""

    __slots__ = ("_now_s",)

    def __init__(self, start_s: float = 0.0) -> None:
        _check_finite("start_s", start_s)
        self._now_s = float(start_s)

    def now_s(self) -> float:
        return self._now_s

    def advance(self, dt_s: float) -> float:
        """Move forward by ``dt_s`` (>= 0) seconds and return the new time.

        Raises:
            ValueError: if ``dt_s`` is negative, NaN or infinite (a monotonic clock never goes
                back).
        """
        _check_finite("dt_s", dt_s)
        if dt_s < 0:
            raise ValueError(f"dt_s = {dt_s!r}: must be >= 0 (a monotonic clock never goes back)")
        self._now_s += float(dt_s)
        return self._now_s

    def set(self, t_s: float) -> None:
        """Jump to ``t_s``, which must not be earlier than now.

        Raises:
            ValueError: if ``t_s`` is earlier than the current time, NaN or infinite.
        """
        _check_finite("t_s", t_s)
        if t_s < self._now_s:
            raise ValueError(f"t_s = {t_s!r}: must be >= now_s = {self._now_s!r}")
        self._now_s = float(t_s)

    def __repr__(self) -> str:
        return f"ManualClock(now_s={self._now_s!r})"


class SkewedClock:
    """``base`` shifted by ``offset_s`` seconds (positive: this node's clock runs ahead).

    The offset may be changed at run time (``offset_s`` is a plain attribute) to model a clock
    that jumps; the caller is responsible for only moving it forward if it needs monotonicity.
    """

    __slots__ = ("base", "offset_s")

    def __init__(self, base: Clock, offset_s: float = 0.0) -> None:
        _check_finite("offset_s", offset_s)
        self.base = base
        self.offset_s = float(offset_s)

    def now_s(self) -> float:
        return self.base.now_s() + self.offset_s

    def __repr__(self) -> str:
        return f"SkewedClock(base={self.base!r}, offset_s={self.offset_s!r})"


def _check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} = {value!r}: must be a finite number of seconds")
