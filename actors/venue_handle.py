"""VenueHandle: the supervised stand-in for one venue simulator process, first child of the
venue's ``rest_for_one`` subtree (``site-X/venues/<venue>/handle``, then ``connector``).

The simulator is an OS process outside Ray (a real exchange outlives our crashes); the handle
is what the tree holds of it:

* it owns the venue's addresses (``addresses()``: WebSocket and HTTP URLs);
* it checks the simulator's health over HTTP every ``check_interval_s`` (``GET
  /api/v2/public/test``, which Deribit answers too, within ``check_timeout_s``), counts the
  failures and keeps the latency; ``status()`` reports it. Suspect before declaring dead:

      UNKNOWN --ok--> REACHABLE --fail--> SUSPECT --fail x unreachable_after--> UNREACHABLE
      every state --ok--> REACHABLE     (the table is :data:`TRANSITIONS`)

* for the chaos tools, ``set_faults(**fields)`` and ``get_faults()`` through the simulator's
  ``private/simulator/set_faults`` (any ``actors.venue.faults.Faults`` field, ``latency_s``,
  ``reset``) and ``public/simulator/status``. Requests are signed with the venue's key
  (``deri-hmac-sha256``): the secret never travels, and no repr or status shows it.

Why first in ``rest_for_one``: the connector after it depends on the venue it stands for, so a
restart of the handle restarts the connector too. That is acceptable: a restarted connector
reconciles with the venue before it takes an order (unresolved intents by label, fills by
``trade_seq``), cancel-on-disconnect has pulled the quotes of its old connection, and the
router and strategies see it refuse orders (``connector is STARTING``) until it is RUNNING
again. The handle itself loses nothing but live counters, and its loop survives its own
errors, so it restarts rarely. The pure part (:class:`HealthTracker`) takes its time from a
``Clock``; only the actor does I/O.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
from collections import Counter, deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from actors.venue.auth import hmac_authorization
from actors.venue.clock import Clock, WallClock
from actors.venue.faults import Faults

log = logging.getLogger("bastion.venue_handle")

FAULT_FIELDS = frozenset(f.name for f in dataclasses.fields(Faults)) | {"latency_s", "reset"}


class HandleConfigError(ValueError):
    """A venue-handle setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"VenueHandle: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class HandleConfig:
    """``check_interval_s``: time between health checks; ``check_timeout_s``: one check's
    budget (a slower answer is a failure); ``unreachable_after``: consecutive failures before
    SUSPECT becomes UNREACHABLE, so the verdict comes within about ``unreachable_after *
    (check_interval_s + check_timeout_s)`` of the venue going away."""

    check_interval_s: float = 1.0
    check_timeout_s: float = 1.0
    unreachable_after: int = 2

    def __post_init__(self) -> None:
        for name in ("check_interval_s", "check_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value <= 0:
                raise HandleConfigError(name, value, "must be a finite number of seconds > 0")
        n = self.unreachable_after
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise HandleConfigError("unreachable_after", n, "must be an int >= 1")


# ---------------------------------------------------------------------------------------------
# Reachability: the state table and the tracker (pure)
# ---------------------------------------------------------------------------------------------


class Reach(StrEnum):
    UNKNOWN = "UNKNOWN"
    REACHABLE = "REACHABLE"
    SUSPECT = "SUSPECT"
    UNREACHABLE = "UNREACHABLE"


class Check(StrEnum):
    OK = "ok"                  # the venue answered in time
    FAIL = "fail"              # it did not (refused, timed out, bad answer)
    FAIL_LIMIT = "fail_limit"  # ... for the unreachable_after-th time in a row


_U, _R, _S, _X = Reach.UNKNOWN, Reach.REACHABLE, Reach.SUSPECT, Reach.UNREACHABLE
#: Every (state, trigger) pair, self-loops included so that the table is visibly total.
TRANSITIONS: dict[tuple[Reach, Check], Reach] = {
    (_U, Check.OK): _R, (_U, Check.FAIL): _S, (_U, Check.FAIL_LIMIT): _X,
    (_R, Check.OK): _R, (_R, Check.FAIL): _S, (_R, Check.FAIL_LIMIT): _X,
    (_S, Check.OK): _R, (_S, Check.FAIL): _S, (_S, Check.FAIL_LIMIT): _X,
    (_X, Check.OK): _R, (_X, Check.FAIL): _X, (_X, Check.FAIL_LIMIT): _X,
}


class HealthTracker:
    """Folds check results into the reachability state; ``transition`` records ``(ts, from,
    to, reason)`` for each change."""

    def __init__(self, unreachable_after: int, clock: Clock) -> None:
        self.unreachable_after = unreachable_after
        self.state = Reach.UNKNOWN
        self.history: deque[dict[str, Any]] = deque(maxlen=100)
        self.checks = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_latency_s = math.nan
        self.last_ok_s = math.nan
        self.last_error = ""
        self._clock = clock

    def record_ok(self, latency_s: float) -> Reach:
        self.checks += 1
        self.consecutive_failures = 0
        self.last_latency_s = float(latency_s)
        self.last_ok_s = self._clock.now_s()
        return self.transition(Check.OK, f"answered in {latency_s * 1000:.1f} ms")

    def record_failure(self, error: str) -> Reach:
        self.checks += 1
        self.failures += 1
        self.consecutive_failures += 1
        self.last_error = error[:300]
        trigger = (Check.FAIL_LIMIT if self.consecutive_failures >= self.unreachable_after
                   else Check.FAIL)
        return self.transition(trigger, f"{self.consecutive_failures} failure(s) in a row: "
                                        f"{self.last_error}")

    def transition(self, trigger: Check, reason: str) -> Reach:
        to = TRANSITIONS[(self.state, trigger)]
        if to is not self.state:
            self.history.append({"ts_s": self._clock.now_s(), "from": self.state.value,
                                 "to": to.value, "trigger": trigger.value, "reason": reason})
            self.state = to
        return to

    def status(self) -> dict[str, Any]:
        now = self._clock.now_s()
        return {"state": self.state.value, "reachable": self.state is Reach.REACHABLE,
                "checks": self.checks, "failures": self.failures,
                "consecutive_failures": self.consecutive_failures,
                "latency_s": None if math.isnan(self.last_latency_s) else self.last_latency_s,
                "last_ok_age_s": None if math.isnan(self.last_ok_s) else now - self.last_ok_s,
                "last_error": self.last_error, "transitions": list(self.history)[-20:]}


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class VenueHandle:
    """The handle of one venue simulator (see the module docstring). Keywords: ``venue``,
    ``ws_url``, ``http_url``, ``client_id`` / ``client_secret`` (the venue's key, for
    ``set_faults``), ``check_interval_s``, ``check_timeout_s``, ``unreachable_after``
    (:class:`HandleConfig`), ``clock``."""

    def __init__(self, venue: str, ws_url: str, http_url: str, client_id: str,
                 client_secret: str, check_interval_s: float = 1.0,
                 check_timeout_s: float = 1.0, unreachable_after: int = 2,
                 clock: Clock | None = None) -> None:
        for name, value, schemes in (("ws_url", ws_url, ("ws://", "wss://")),
                                     ("http_url", http_url, ("http://", "https://"))):
            if not isinstance(value, str) or not value.startswith(schemes):
                raise HandleConfigError(name, value, f"must start with {' or '.join(schemes)}")
        self.venue = venue
        self.ws_url = ws_url
        self.http_url = http_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self.cfg = HandleConfig(check_interval_s, check_timeout_s, unreachable_after)
        self._clock: Clock = clock or WallClock()
        self.health = HealthTracker(self.cfg.unreachable_after, self._clock)
        self.counters: Counter[str] = Counter()
        self._session: Any = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    # ---- lifecycle ---------------------------------------------------------------------------
    async def on_started(self) -> None:
        """Called by the supervisor once this incarnation is up: start the health checks."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.check()
            except Exception as exc:  # noqa: BLE001 - the loop survives; counted, logged
                self.counters["check_errors"] += 1
                log.warning("%s: health check failed: %r", self.venue, exc)
            await asyncio.sleep(self.cfg.check_interval_s)

    async def on_stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        if self._session is not None:
            await self._session.close()

    # ---- the venue ---------------------------------------------------------------------------
    def addresses(self) -> dict[str, str]:
        return {"venue": self.venue, "ws_url": self.ws_url, "http_url": self.http_url}

    async def check(self) -> dict[str, Any]:
        """One health check now (the loop runs one every ``check_interval_s``)."""
        t0 = time.monotonic()
        try:
            reply = await self._request("GET", "public/test")
            if "result" not in reply:
                raise ValueError(f"answered {str(reply)[:200]}")
        except Exception as exc:  # noqa: BLE001 - any failure to answer is a failed check
            self.health.record_failure(repr(exc))
        else:
            self.health.record_ok(time.monotonic() - t0)
        return self.status()

    async def set_faults(self, **faults: Any) -> dict[str, Any]:
        """Switch the venue's faults (``Faults`` fields, ``latency_s``, ``reset=True``).
        ``status``: ``accepted`` (with the faults now in force), ``refused`` (an unknown
        field: nothing sent), ``rejected`` (the venue refused a value) or ``unknown`` (no
        answer: they may or may not be in force)."""
        unknown = sorted(set(faults) - FAULT_FIELDS)
        if unknown:
            return {"status": "refused",
                    "reason": f"unknown fault field(s) {unknown}; known: {sorted(FAULT_FIELDS)}"}
        return await self._answer("private/simulator/set_faults", faults)

    async def get_faults(self) -> dict[str, Any]:
        """The faults in force at the venue and its added latency."""
        out = await self._answer("public/simulator/status", {})
        if out["status"] == "accepted":
            out = {"status": "accepted", "faults": out["faults"], "latency_s": out["latency_s"]}
        return out

    async def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        try:
            reply = await self._request("POST", method, params)
        except Exception as exc:  # noqa: BLE001 - reported as data
            self.counters[f"{method}.unknown"] += 1
            return {"status": "unknown", "reason": repr(exc)[:300]}
        if "error" in reply:
            self.counters[f"{method}.rejected"] += 1
            err = reply["error"]
            return {"status": "rejected", "reason": f"{err.get('code')} {err.get('message')} "
                                                    f"{err.get('data') or ''}".strip()}
        self.counters[f"{method}.accepted"] += 1
        return {"status": "accepted", **reply["result"]}

    async def _request(self, verb: str, method: str,
                       params: dict[str, Any] | None = None) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.check_timeout_s))
        path = f"/api/v2/{method}"
        if verb == "GET":
            async with self._session.get(self.http_url + path) as resp:
                return json.loads(await resp.text())
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                           "params": params or {}})
        headers = {"Content-Type": "application/json"}
        if method.startswith("private/"):
            headers["Authorization"] = hmac_authorization(
                self._client_id, self._client_secret, "POST", path, body,
                timestamp_ms=int(self._clock.now_s() * 1000))
        async with self._session.post(self.http_url + path, data=body,
                                      headers=headers) as resp:
            return json.loads(await resp.text())

    # ---- queries -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"venue": self.venue, "http_url": self.http_url, **self.health.status(),
                "counters": dict(self.counters)}

    def __repr__(self) -> str:
        health = getattr(self, "health", None)
        state = health.state.value if health is not None else "?"
        return f"VenueHandle({getattr(self, 'venue', '?')} {state})"
