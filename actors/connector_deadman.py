"""The connector's half of the venue dead-man's switch (``private/cancel_all_after``).

The second line of defence against two active sites: the connector cancels its own resting
orders when its lease lapses, but a connector that is frozen (a stopped worker) or cut off
while its venue socket stays open cancels nothing and cancel-on-disconnect never fires. So the
venue is told, on every activation and renewal, to cancel this connector's orders of this
epoch by itself unless told again in time (``actors.venue.deadman``):

* role-gated: armed when the connector goes ACTIVE and re-armed on every ``renew``, with
  ``label_prefix = e<epoch>.<connector>.`` (only this epoch's orders: never those of the site
  that took over) and ``timeout = max(min_timeout_s, lease left + margin_s)`` — the venue
  cancels ``margin_s`` after the connector itself would have. A clean deactivation disarms
  it once the connector's own cancels succeeded; after a lapse it is left to fire;
* ``deadman_s`` (ungated connectors): ``label_prefix = <connector>.``, re-armed every
  ``deadman_s / 3`` while RUNNING; a connector that stops, or stops re-arming, has its orders
  cancelled ``deadman_s`` later.

Requests are sent one at a time, the latest per prefix winning (a renewal that arrives while
the previous arm is in flight is coalesced, not queued). A failed request is logged, counted in
``deadman_*_failed`` and never raised: the switch is a backstop, trading does not wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("bastion.connector.deadman")

#: The venue's accepted range of ``timeout`` (``actors.venue.deadman``), in seconds.
VENUE_MIN_TIMEOUT_S = 0.1
VENUE_MAX_TIMEOUT_S = 600.0
#: Failures are logged the first time and then every this many.
LOG_EVERY = 50

Call = Callable[[str, dict[str, Any]], Awaitable[Any]]


class DeadmanConfigError(ValueError):
    """A dead-man setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"deadman: invalid {field_name}={value!r}: {why}")


def _seconds(name: str, value: object, low_s: float, high_s: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or \
            not math.isfinite(value) or not low_s <= value <= high_s:
        raise DeadmanConfigError(name, value, f"must be a number of seconds in "
                                              f"[{low_s:g}, {high_s:g}]")
    return float(value)


@dataclass(frozen=True)
class DeadmanPolicy:
    """``margin_s``: how long after the lease's local deadline the venue cancels;
    ``min_timeout_s``: the shortest countdown ever armed; ``periodic_s``: the ``deadman_s``
    countdown of an ungated connector (None: off)."""

    margin_s: float = 0.25
    min_timeout_s: float = 0.5
    periodic_s: float | None = None

    def __post_init__(self) -> None:
        _seconds("margin_s", self.margin_s, 0.0, 60.0)
        _seconds("min_timeout_s", self.min_timeout_s, VENUE_MIN_TIMEOUT_S, VENUE_MAX_TIMEOUT_S)
        if self.periodic_s is not None:
            _seconds("deadman_s", self.periodic_s, 1.0, VENUE_MAX_TIMEOUT_S)

    def lease_timeout_s(self, lease_left_s: float) -> float:
        """The countdown for a lease with ``lease_left_s`` left (module doc)."""
        left = lease_left_s if math.isfinite(lease_left_s) else 0.0
        return min(VENUE_MAX_TIMEOUT_S, max(self.min_timeout_s, left + self.margin_s))


class DeadmanArmer:
    """Arms, re-arms and disarms the venue's switches of one connector over its ``call``
    (the connector's JSON-RPC call); counts into the connector's ``counters``."""

    def __init__(self, call: Call, counters: Counter[str], venue: str,
                 policy: DeadmanPolicy | None = None,
                 now_s: Callable[[], float] = time.monotonic) -> None:
        self._call = call
        self.counters = counters
        self.venue = venue
        self.policy = policy or DeadmanPolicy()
        self._now_s = now_s
        self._wanted: dict[str, Callable[[], float] | None] = {}  # prefix -> timeout_s; None: off
        self._busy = False
        self.armed: dict[str, float] = {}  # prefix -> the venue's trigger time (ms)

    async def arm_for_lease(self, prefix: str, deadline_s: float) -> None:
        """Arm for a lease whose local deadline is ``deadline_s`` (on ``now_s``'s clock)."""
        await self._submit(prefix, lambda: self.policy.lease_timeout_s(
            deadline_s - self._now_s()))

    async def arm_for(self, prefix: str, timeout_s: float) -> None:
        await self._submit(prefix, lambda: timeout_s)

    async def disarm(self, prefix: str) -> None:
        await self._submit(prefix, None)

    async def run_periodic(self, prefix: str, running: Callable[[], bool],
                           stopped: Callable[[], bool]) -> None:
        """The ``deadman_s`` loop: re-arm every third of the countdown while ``running()``."""
        period_s = self.policy.periodic_s
        if period_s is None:
            return
        while not stopped():
            if running():
                await self.arm_for(prefix, period_s)
            await asyncio.sleep(period_s / 3)

    async def _submit(self, prefix: str, timeout_s: Callable[[], float] | None) -> None:
        self._wanted.pop(prefix, None)
        self._wanted[prefix] = timeout_s
        if self._busy:
            self.counters["deadman_coalesced"] += 1
            return
        self._busy = True
        try:
            while self._wanted:
                prefix, timeout = next(iter(self._wanted.items()))
                del self._wanted[prefix]
                await self._send(prefix, None if timeout is None else timeout())
        finally:
            self._busy = False

    async def _send(self, prefix: str, timeout_s: float | None) -> None:
        what = "arm" if timeout_s is not None else "disarm"
        timeout_ms = 0 if timeout_s is None else max(int(VENUE_MIN_TIMEOUT_S * 1000),
                                                     int(round(timeout_s * 1000)))
        try:
            result = await self._call("private/cancel_all_after",
                                      {"timeout": timeout_ms, "label_prefix": prefix})
        except Exception as exc:  # noqa: BLE001 - a backstop: never raised into trading
            self.counters[f"deadman_{what}_failed"] += 1
            failures = self.counters[f"deadman_{what}_failed"]
            if failures % LOG_EVERY == 1:
                log.warning("%s: dead-man %s of %r failed (%d so far): %r", self.venue, what,
                            prefix, failures, exc)
            return
        if timeout_s is None:
            self.armed.pop(prefix, None)
            self.counters["deadman_disarmed"] += 1
        else:
            trigger = result.get("trigger_time") if isinstance(result, dict) else None
            self.armed[prefix] = float(trigger) if isinstance(trigger, int | float) else math.nan
            self.counters["deadman_armed"] += 1

    def status(self) -> dict[str, Any]:
        return {"armed": dict(self.armed), "policy": {
            "margin_s": self.policy.margin_s, "min_timeout_s": self.policy.min_timeout_s,
            "periodic_s": self.policy.periodic_s}}
