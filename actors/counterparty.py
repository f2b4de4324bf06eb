"""Counterparty (venue) risk: what we hold at each venue, how healthy each venue looks, and how
much more we may put there.

Pure core, :class:`CounterpartyState` (no Ray, time passed in):

* **Exposure** of a venue: ``sum(balances_usd) + unrealised_pnl_usd`` (floored at 0) — what
  we would lose if it failed. ``margin_usd`` (the part of the balances locked as margin) is
  reported, not added.
* **Health signals** via ``observe(venue, signals, ts_s)``: ``api_error_rate`` and
  ``reject_rate`` (fractions), ``latency_s``, ``feed_staleness_s``, ``mid_price`` (a reference
  mid; its deviation from the median of the fresh mids of every venue is the
  ``price_deviation`` signal, which may also be given directly) and ``withdrawals``
  (``ok`` / ``delayed`` / ``suspended``). The effective staleness is at least the time since
  the venue was last observed, so a silent venue's score decays; a signal never observed
  costs nothing, except staleness (a venue never observed counts as fully stale).
* **Score** in [0, 1]: each signal ``x`` becomes a penalty ``p = clip((x - good) / (bad -
  good), 0, 1)`` (``withdrawals``: 0 / 0.5 / 1), and::

      score = clip(1 - sum_k w_k p_k, 0, 1),   then min(score, suspended_max_score)
                                               while withdrawals are suspended

  with default weights api_error_rate 0.20, reject_rate 0.15, latency_s 0.15,
  feed_staleness_s 0.20, price_deviation 0.15, withdrawals 0.15 (they sum to 1). Every
  penalty is non-decreasing in its signal and the weights are >= 0, so the score never rises
  when a signal gets worse.
* **Cap**: ``cap = base_cap_usd * f(score)``, ``f(s) = clip((s - cutoff_score) /
  (full_score - cutoff_score), 0, 1)``: the full cap at or above ``full_score``, nothing at or
  below ``cutoff_score``, linear between.
* **Status** per venue: ``HEALTHY`` / ``DEGRADED`` / ``BREACHED`` as one transition table
  (:data:`STATUS_TRANSITIONS`) and one ``_transition()``; a venue is ``BREACHED`` while its
  exposure exceeds its cap and leaves it (for ``DEGRADED``) once the exposure is within
  ``recover_fraction`` of the cap; the score moves it between HEALTHY and DEGRADED with a
  hysteresis band (``degraded_below`` < ``healthy_at``).

The actor, :class:`CounterpartyMonitor` (``EventSourced``), journals observations, exposure
updates, cap changes and status changes, and pushes each status change to subscribers: Ray
actor handles registered with ``subscribe(handle, method_name)``, called with ``.remote()``
and never waited on; failures are counted when their results are collected (without
blocking) and a subscriber that fails ``max_failures`` times in a row is dropped. Handles are
not journaled: subscribers register again after the monitor restarts.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from actors.venue.clock import Clock, WallClock
from supervisors import EventSourced

RATE_SIGNALS = ("api_error_rate", "reject_rate")
NONNEGATIVE_SIGNALS = ("latency_s", "feed_staleness_s", "price_deviation")
SIGNALS = (*RATE_SIGNALS, "latency_s", "feed_staleness_s", "price_deviation", "withdrawals")
WITHDRAWAL_PENALTY = {"ok": 0.0, "delayed": 0.5, "suspended": 1.0}


class CounterpartyConfigError(ValueError):
    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"invalid counterparty config {field_name}={value!r}: {why}")


def _finite(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class CounterpartyConfig:
    """Scoring and capping policy (see the module docstring for the formulas).

    ``ramps[k] = (good, bad)``: the signal value with no penalty and with the full penalty.
    ``mid_ttl_s``: a venue's mid older than this is left out of the cross-venue median."""

    weights: Mapping[str, float] = field(default_factory=lambda: {
        "api_error_rate": 0.20, "reject_rate": 0.15, "latency_s": 0.15,
        "feed_staleness_s": 0.20, "price_deviation": 0.15, "withdrawals": 0.15})
    ramps: Mapping[str, tuple[float, float]] = field(default_factory=lambda: {
        "api_error_rate": (0.01, 0.20), "reject_rate": (0.02, 0.30), "latency_s": (0.25, 2.0),
        "feed_staleness_s": (2.0, 30.0), "price_deviation": (0.002, 0.02)})
    suspended_max_score: float = 0.2
    cutoff_score: float = 0.3
    full_score: float = 0.9
    degraded_below: float = 0.6
    healthy_at: float = 0.75
    recover_fraction: float = 0.9
    mid_ttl_s: float = 30.0

    def __post_init__(self) -> None:
        if set(self.weights) != set(SIGNALS):
            raise CounterpartyConfigError("weights", dict(self.weights),
                                          f"needs exactly the signals {SIGNALS}")
        for k, w in self.weights.items():
            if not _finite(w) or w < 0:
                raise CounterpartyConfigError(f"weights[{k}]", w, "must be finite and >= 0")
        if abs(sum(self.weights.values()) - 1.0) > 1e-9:
            raise CounterpartyConfigError("weights", dict(self.weights), "must sum to 1")
        if set(self.ramps) != set(SIGNALS) - {"withdrawals"}:
            raise CounterpartyConfigError("ramps", dict(self.ramps),
                                          "needs every signal but withdrawals")
        for k, ramp in self.ramps.items():
            if len(ramp) != 2 or not all(_finite(x) for x in ramp) or not 0 <= ramp[0] < ramp[1]:
                raise CounterpartyConfigError(f"ramps[{k}]", ramp, "must be 0 <= good < bad")
        for name in ("suspended_max_score", "cutoff_score", "full_score", "degraded_below",
                     "healthy_at", "recover_fraction"):
            value = getattr(self, name)
            if not _finite(value) or not 0 <= value <= 1:
                raise CounterpartyConfigError(name, value, "must be within [0, 1]")
        if not self.cutoff_score < self.full_score:
            raise CounterpartyConfigError("cutoff_score", self.cutoff_score, "must be < full_score")
        if not self.degraded_below < self.healthy_at:
            raise CounterpartyConfigError("degraded_below", self.degraded_below,
                                          "must be < healthy_at (hysteresis)")
        if not _finite(self.mid_ttl_s) or self.mid_ttl_s <= 0:
            raise CounterpartyConfigError("mid_ttl_s", self.mid_ttl_s, "must be > 0 s")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> CounterpartyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data or {}:
            if key not in known:
                raise CounterpartyConfigError(str(key), data[key], f"unknown; known {known}")
        return cls(**dict(data or {}))


# --------------------------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------------------------


def penalty(x: float, good: float, bad: float) -> float:
    """0 at or below ``good``, 1 at or above ``bad``, linear between (NaN counts as bad)."""
    if math.isnan(x):
        return 1.0
    return min(1.0, max(0.0, (x - good) / (bad - good)))


def score_signals(signals: Mapping[str, Any], config: CounterpartyConfig
                  ) -> tuple[float, dict[str, float]]:
    """The score and the penalty per signal. A missing signal has no penalty."""
    pens: dict[str, float] = {}
    for name in SIGNALS:
        if name not in signals:
            pens[name] = 0.0
        elif name == "withdrawals":
            pens[name] = WITHDRAWAL_PENALTY[signals[name]]
        else:
            pens[name] = penalty(float(signals[name]), *config.ramps[name])
    score = min(1.0, max(0.0, 1.0 - sum(config.weights[k] * p for k, p in pens.items())))
    if signals.get("withdrawals") == "suspended":
        score = min(score, config.suspended_max_score)
    return score, pens


def cap_factor(score: float, config: CounterpartyConfig) -> float:
    """``f(score)``: 0 at or below ``cutoff_score``, 1 at or above ``full_score``."""
    span = config.full_score - config.cutoff_score
    return min(1.0, max(0.0, (score - config.cutoff_score) / span))


# --------------------------------------------------------------------------------------------
# Status machine
# --------------------------------------------------------------------------------------------


class VenueStatus(StrEnum):
    HEALTHY = "HEALTHY"
    DEGRADED = "DEGRADED"  # score below degraded_below: caps shrinking
    BREACHED = "BREACHED"  # exposure above the cap: nothing more goes there


class StatusTrigger(StrEnum):
    OVER_CAP = "over_cap"
    WITHIN_CAP = "within_cap"  # exposure <= recover_fraction * cap
    SCORE_LOW = "score_low"  # score < degraded_below
    SCORE_OK = "score_ok"  # score >= healthy_at


_V, _T = VenueStatus, StatusTrigger
STATUS_TRANSITIONS: dict[tuple[VenueStatus, StatusTrigger], VenueStatus] = {
    (_V.HEALTHY, _T.OVER_CAP): _V.BREACHED,
    (_V.HEALTHY, _T.SCORE_LOW): _V.DEGRADED,
    (_V.DEGRADED, _T.OVER_CAP): _V.BREACHED,
    (_V.DEGRADED, _T.SCORE_OK): _V.HEALTHY,
    (_V.BREACHED, _T.WITHIN_CAP): _V.DEGRADED,
}


@dataclass
class Venue:
    base_cap_usd: float
    balances_usd: dict[str, float] = field(default_factory=dict)
    margin_usd: float = 0.0
    unrealised_pnl_usd: float = 0.0
    signals: dict[str, Any] = field(default_factory=dict)
    signal_ts: dict[str, float] = field(default_factory=dict)
    last_seen_s: float = -math.inf
    status: VenueStatus = VenueStatus.HEALTHY
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def exposure_usd(self) -> float:
        return max(0.0, sum(self.balances_usd.values()) + self.unrealised_pnl_usd)


class CounterpartyState:
    """Venues, their exposure, signals and status. ``base_caps``: venue -> base cap (USD)."""

    def __init__(self, base_caps: Mapping[str, float] | None = None,
                 config: CounterpartyConfig | None = None) -> None:
        self.config = config or CounterpartyConfig()
        self.venues: dict[str, Venue] = {}
        for name, cap in (base_caps or {}).items():
            if not isinstance(name, str) or not _finite(cap) or cap < 0:
                raise CounterpartyConfigError(f"venues[{name!r}]", cap, "base cap must be >= 0")
            self.venues[name] = Venue(float(cap))
        self.counters: dict[str, int] = {}

    # ---- commands -> events --------------------------------------------------------------
    def prepare_observe(self, venue: str, signals: object, ts_s: object
                        ) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
        """An ``obs`` event with the valid signals, and the refused ones (``signal``,
        ``reason``). An unknown venue, a bad time or an out-of-order observation refuses all."""
        v = self.venues.get(venue)
        why = ("unknown_venue" if v is None else
               "bad_timestamp" if not _finite(ts_s) or ts_s < 0 else
               "signals_not_a_dict" if not isinstance(signals, Mapping) else
               "out_of_order" if ts_s < v.last_seen_s else "")
        if why:
            return [self._rejects({f"observe_rejected.{why}": 1})], [{"signal": "*",
                                                                       "reason": why}]
        good: dict[str, Any] = {}
        rejected: list[dict[str, str]] = []
        for name, value in signals.items():
            reason = _signal_problem(name, value)
            if reason:
                rejected.append({"signal": str(name), "reason": reason})
            else:
                good[name] = value if name == "withdrawals" else float(value)
        events: list[dict[str, Any]] = [{"t": "obs", "v": venue, "s": good, "ts": float(ts_s)}]
        if rejected:
            events.append(self._rejects({f"signal_rejected.{r['reason']}": 1
                                         for r in rejected}))
        return events, rejected

    def prepare_exposure(self, venue: str, balances_usd: object, margin_usd: object,
                         unrealised_pnl_usd: object, ts_s: object) -> list[dict[str, Any]]:
        ok = (venue in self.venues and isinstance(balances_usd, Mapping)
              and all(isinstance(k, str) and _finite(x) for k, x in balances_usd.items())
              and _finite(margin_usd) and margin_usd >= 0 and _finite(unrealised_pnl_usd)
              and _finite(ts_s))
        if not ok:
            return [self._rejects({"exposure_rejected": 1})]
        return [{"t": "exp", "v": venue, "b": {k: float(x) for k, x in balances_usd.items()},
                 "m": float(margin_usd), "u": float(unrealised_pnl_usd), "ts": float(ts_s)}]

    @staticmethod
    def _rejects(counts: dict[str, int]) -> dict[str, Any]:
        return {"t": "rejects", "counts": counts}

    def status_events(self, now_s: float) -> list[dict[str, Any]]:
        """The status changes the current exposure, caps and scores call for (not applied)."""
        events = []
        for name, v in sorted(self.venues.items()):
            status = v.status
            score = self.score(name, now_s)[0]
            cap = v.base_cap_usd * cap_factor(score, self.config)
            for _ in range(len(VenueStatus)):
                trigger = self._trigger(status, score, v.exposure_usd, cap)
                to = STATUS_TRANSITIONS.get((status, trigger)) if trigger else None
                if to is None:
                    break
                events.append({"t": "status", "v": name, "from": status.value, "to": to.value,
                               "trigger": trigger.value, "ts": float(now_s), "score": score,
                               "cap_usd": cap, "exposure_usd": v.exposure_usd,
                               "reason": f"exposure {v.exposure_usd:.2f} USD, cap {cap:.2f} "
                                         f"USD, score {score:.3f}"})
                status = to
        return events

    def _trigger(self, status: VenueStatus, score: float, exposure: float,
                 cap: float) -> StatusTrigger | None:
        cfg = self.config
        if exposure > cap:
            return StatusTrigger.OVER_CAP
        if status is VenueStatus.BREACHED:
            within = exposure <= cfg.recover_fraction * cap or exposure == 0.0
            return StatusTrigger.WITHIN_CAP if within else None
        if score < cfg.degraded_below:
            return StatusTrigger.SCORE_LOW
        if score >= cfg.healthy_at:
            return StatusTrigger.SCORE_OK
        return None

    # ---- the fold ----------------------------------------------------------------------
    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event["t"]
        if kind == "obs":
            v = self.venues[event["v"]]
            v.signals.update(event["s"])
            v.signal_ts.update(dict.fromkeys(event["s"], event["ts"]))
            v.last_seen_s = max(v.last_seen_s, event["ts"])
            self._count("observations")
        elif kind == "exp":
            v = self.venues[event["v"]]
            v.balances_usd, v.margin_usd, v.unrealised_pnl_usd = (dict(event["b"]), event["m"],
                                                                  event["u"])
        elif kind == "cap":
            self.venues.setdefault(event["v"], Venue(event["cap"])).base_cap_usd = event["cap"]
        elif kind == "status":
            self._transition(event["v"], VenueStatus(event["to"]),
                             StatusTrigger(event["trigger"]), event)
        elif kind == "rejects":
            for key, n in event["counts"].items():
                self._count(key, n)
        else:
            raise ValueError(f"unknown counterparty event type {kind!r}")

    def _transition(self, venue: str, to: VenueStatus, trigger: StatusTrigger,
                    event: Mapping[str, Any]) -> None:
        v = self.venues[venue]
        if STATUS_TRANSITIONS.get((v.status, trigger)) is not to:
            raise RuntimeError(f"{venue}: no transition {v.status.value} --{trigger.value}--> "
                               f"{to.value}")
        v.history.append({"ts": event["ts"], "from": v.status.value, "to": to.value,
                          "trigger": trigger.value, "reason": event["reason"]})
        v.status = to
        self._count(f"status.{to.value}")

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    # ---- views -------------------------------------------------------------------------
    def price_deviation(self, venue: str, now_s: float) -> float | None:
        """``|mid - median| / median`` over the fresh mids of every venue (None: no mid)."""
        v = self.venues[venue]
        if "price_deviation" in v.signals:
            return v.signals["price_deviation"]
        ttl = self.config.mid_ttl_s
        fresh = {n: x.signals["mid_price"] for n, x in self.venues.items()
                 if "mid_price" in x.signals and now_s - x.signal_ts["mid_price"] <= ttl}
        if venue not in fresh:
            return None
        median = statistics.median(fresh.values())
        return abs(fresh[venue] - median) / median

    def score(self, venue: str, now_s: float) -> tuple[float, dict[str, float]]:
        v = self.venues[venue]
        signals = {k: x for k, x in v.signals.items() if k in SIGNALS}
        signals["feed_staleness_s"] = max(signals.get("feed_staleness_s", 0.0),
                                          now_s - v.last_seen_s)
        deviation = self.price_deviation(venue, now_s)
        if deviation is not None:
            signals["price_deviation"] = deviation
        return score_signals(signals, self.config)

    def cap(self, venue: str, now_s: float) -> float:
        return self.venues[venue].base_cap_usd * cap_factor(self.score(venue, now_s)[0],
                                                            self.config)

    def exposure_ok(self, venue: str, added_notional: float, now_s: float) -> tuple[bool, str]:
        """May ``added_notional`` USD more go to ``venue``? Reducing (<= 0) always may."""
        if venue not in self.venues:
            return False, f"unknown_venue: {venue!r}"
        if not _finite(added_notional):
            return False, f"bad_notional: {added_notional!r}"
        if added_notional <= 0:
            return True, "reduces exposure"
        v = self.venues[venue]
        score = self.score(venue, now_s)[0]
        cap = v.base_cap_usd * cap_factor(score, self.config)
        if v.status is VenueStatus.BREACHED:
            return False, (f"breached: exposure {v.exposure_usd:.2f} USD over cap, now "
                           f"{cap:.2f} USD (score {score:.3f})")
        if v.exposure_usd + added_notional > cap:
            return False, (f"cap: exposure {v.exposure_usd:.2f} + {added_notional:.2f} USD > "
                           f"cap {cap:.2f} USD (score {score:.3f})")
        return True, "ok"

    def venue_summary(self, venue: str, now_s: float) -> dict[str, Any]:
        v = self.venues[venue]
        score, pens = self.score(venue, now_s)
        return {"status": v.status.value, "score": score, "penalties": pens,
                "base_cap_usd": v.base_cap_usd,
                "cap_usd": v.base_cap_usd * cap_factor(score, self.config),
                "exposure_usd": v.exposure_usd, "balances_usd": dict(v.balances_usd),
                "margin_usd": v.margin_usd, "unrealised_pnl_usd": v.unrealised_pnl_usd,
                "signals": dict(v.signals),
                "last_seen_s": v.last_seen_s if math.isfinite(v.last_seen_s) else None}

    # ---- snapshots ---------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        return {"counters": dict(self.counters), "venues": {n: {
            "cap": v.base_cap_usd, "b": v.balances_usd, "m": v.margin_usd,
            "u": v.unrealised_pnl_usd, "s": v.signals, "sts": v.signal_ts,
            "seen": v.last_seen_s, "status": v.status.value, "history": list(v.history)}
            for n, v in self.venues.items()}}

    def restore(self, data: Mapping[str, Any]) -> None:
        self.counters = dict(data["counters"])
        self.venues = {}
        for n, d in data["venues"].items():
            self.venues[n] = Venue(d["cap"], dict(d["b"]), d["m"], d["u"], dict(d["s"]),
                                   dict(d["sts"]), d["seen"], VenueStatus(d["status"]),
                                   deque(d["history"], maxlen=200))


def _signal_problem(name: object, value: object) -> str:
    if name == "mid_price":
        return "" if _finite(value) and value > 0 else "not_positive_finite"
    if name == "withdrawals":
        return "" if value in WITHDRAWAL_PENALTY else "bad_withdrawal_status"
    if name in RATE_SIGNALS:
        return "" if _finite(value) and 0 <= value <= 1 else "not_a_fraction"
    if name in NONNEGATIVE_SIGNALS:
        return "" if _finite(value) and value >= 0 else "not_nonnegative_finite"
    return "unknown_signal"


# --------------------------------------------------------------------------------------------
# Subscribers: the only code here that calls Ray
# --------------------------------------------------------------------------------------------


class Subscribers:
    """Push events to Ray actor handles without waiting. Results are collected by ``reap()``
    (``ray.wait`` with ``timeout=0``): a failure is counted, ``max_failures`` in a row drop
    the subscriber, and beyond ``max_pending`` outstanding calls the oldest are forgotten."""

    def __init__(self, max_pending: int = 1000, max_failures: int = 3) -> None:
        self.max_pending = max_pending
        self.max_failures = max_failures
        self._subs: dict[str, list[Any]] = {}  # key -> [handle, method, consecutive failures]
        self._pending: deque[tuple[Any, str]] = deque()
        self.stats = dict.fromkeys(("sent", "delivered", "failed", "dropped_calls",
                                    "dropped_subscribers"), 0)

    @staticmethod
    def key(handle: Any, method_name: str) -> str:
        actor_id = getattr(handle, "_actor_id", None)
        return f"{actor_id.hex() if actor_id is not None else id(handle)}.{method_name}"

    def add(self, handle: Any, method_name: str) -> str:
        if not isinstance(method_name, str) or not hasattr(handle, method_name):
            raise ValueError(f"subscriber has no method {method_name!r}")
        key = self.key(handle, method_name)
        self._subs[key] = [handle, method_name, 0]
        return key

    def remove(self, key: str) -> bool:
        return self._subs.pop(key, None) is not None

    def __len__(self) -> int:
        return len(self._subs)

    def publish(self, event: Any) -> None:
        self.reap()
        for key, (handle, method, _) in list(self._subs.items()):
            try:
                ref = getattr(handle, method).remote(event)
            except Exception:  # noqa: BLE001 - a broken handle is a failed delivery
                self._failed(key)
                continue
            self.stats["sent"] += 1
            self._pending.append((ref, key))
        while len(self._pending) > self.max_pending:
            self._pending.popleft()
            self.stats["dropped_calls"] += 1

    def reap(self) -> None:
        if not self._pending:
            return
        import ray

        refs = [ref for ref, _ in self._pending]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        done = set(ready)
        still: deque[tuple[Any, str]] = deque()
        for ref, key in self._pending:
            if ref not in done:
                still.append((ref, key))
                continue
            try:
                ray.get(ref, timeout=0)
            except ray.exceptions.GetTimeoutError:
                still.append((ref, key))
                continue
            except Exception:  # noqa: BLE001 - the subscriber failed or died
                self._failed(key)
                continue
            self.stats["delivered"] += 1
            if key in self._subs:
                self._subs[key][2] = 0
        self._pending = still

    def _failed(self, key: str) -> None:
        self.stats["failed"] += 1
        sub = self._subs.get(key)
        if sub is None:
            return
        sub[2] += 1
        if sub[2] >= self.max_failures:
            del self._subs[key]
            self.stats["dropped_subscribers"] += 1

    def describe(self) -> dict[str, Any]:
        return {"subscribers": sorted(self._subs), "pending": len(self._pending), **self.stats}


class EventSink:
    """A subscriber keeping the last ``max_events`` events (dashboards, tests). With
    ``fail=True`` every delivery raises (to exercise failure counting)."""

    def __init__(self, max_events: int = 1000, fail: bool = False) -> None:
        self._events: deque[Any] = deque(maxlen=max_events)
        self.fail = fail

    def receive(self, event: Any) -> None:
        if self.fail:
            raise RuntimeError("EventSink(fail=True) refuses every event")
        self._events.append(event)

    def events(self) -> list[Any]:
        return list(self._events)


# --------------------------------------------------------------------------------------------
# The actor
# --------------------------------------------------------------------------------------------


class CounterpartyMonitor(EventSourced):
    """Event-sourced counterparty monitor. Keywords: ``monitor_id``, ``venues`` (venue ->
    base cap USD), ``config`` (:class:`CounterpartyConfig` fields), ``snapshot_every``,
    ``clock``, ``max_pending`` and ``max_failures`` (subscriber delivery)."""

    def __init__(self, monitor_id: str = "counterparty",
                 venues: Mapping[str, float] | None = None,
                 config: Mapping[str, Any] | None = None, snapshot_every: int = 1000,
                 clock: Clock | None = None, max_pending: int = 1000,
                 max_failures: int = 3) -> None:
        self.monitor_id = monitor_id
        self.snapshot_every = snapshot_every
        self.state = CounterpartyState(venues, CounterpartyConfig.from_dict(config))
        self._clock: Clock = clock or WallClock()
        self._subs = Subscribers(max_pending, max_failures)

    # EventSourced
    def apply(self, event: Any) -> None:
        self.state.apply(event)

    def snapshot_state(self) -> Any:
        return self.state.snapshot()

    def restore_state(self, state: Any) -> None:
        self.state.restore(state)

    # inputs
    def observe(self, venue: str, signals: dict[str, Any], ts_s: float | None = None
                ) -> dict[str, Any]:
        """Health signals of ``venue`` at ``ts_s`` (default: the clock). Returns the score,
        cap, status and any refused signals."""
        ts = self._now(ts_s)
        events, rejected = self.state.prepare_observe(venue, signals, ts)
        self._commit(events, ts)
        out = self._venue(venue, ts)
        out["rejected"] = rejected
        return out

    def update_exposure(self, venue: str, balances_usd: dict[str, float],
                        margin_usd: float = 0.0, unrealised_pnl_usd: float = 0.0,
                        ts_s: float | None = None) -> dict[str, Any]:
        """What we hold at ``venue`` (USD values per currency, margin used, open P&L)."""
        ts = self._now(ts_s)
        self._commit(self.state.prepare_exposure(venue, balances_usd, margin_usd,
                                                 unrealised_pnl_usd, ts), ts)
        return self._venue(venue, ts)

    def set_base_cap(self, venue: str, base_cap_usd: float, who: str, why: str
                     ) -> dict[str, Any]:
        """Add a venue or change its base cap (journaled with who and why)."""
        if not _finite(base_cap_usd) or base_cap_usd < 0:
            raise CounterpartyConfigError("base_cap_usd", base_cap_usd, "must be >= 0")
        if not who or not why:
            raise CounterpartyConfigError("who/why", (who, why), "say who and why")
        ts = self._clock.now_s()
        self._commit([{"t": "cap", "v": venue, "cap": float(base_cap_usd), "who": who,
                       "why": why, "ts": ts}], ts)
        return self._venue(venue, ts)

    def tick(self, now_s: float | None = None) -> list[dict[str, Any]]:
        """Re-evaluate time-dependent scores (staleness); returns the status changes."""
        now = self._now(now_s)
        return self._commit([], now)

    # queries
    def exposure_ok(self, venue: str, added_notional: float,
                    now_s: float | None = None) -> tuple[bool, str]:
        return self.state.exposure_ok(venue, added_notional, self._now(now_s))

    def scores(self, now_s: float | None = None) -> dict[str, float]:
        now = self._now(now_s)
        return {n: self.state.score(n, now)[0] for n in sorted(self.state.venues)}

    def summary(self, now_s: float | None = None) -> dict[str, Any]:
        now = self._now(now_s)
        self._subs.reap()
        return {"monitor_id": self.monitor_id, "ts_s": now,
                "venues": {n: self._venue(n, now) for n in sorted(self.state.venues)},
                "counters": dict(self.state.counters), "delivery": self._subs.describe(),
                "journal": {"seq": getattr(self, "_es_seq", 0)}}

    def status_history(self, venue: str) -> list[dict[str, Any]]:
        return list(self.state.venues[venue].history)

    # subscribers
    def subscribe(self, handle: Any, method_name: str) -> str:
        """Register a Ray actor handle; ``handle.<method_name>.remote(event)`` is called for
        every status change. Returns the subscription key (idempotent per actor+method)."""
        return self._subs.add(handle, method_name)

    def unsubscribe(self, key: str) -> bool:
        return self._subs.remove(key)

    def delivery_stats(self) -> dict[str, Any]:
        self._subs.reap()
        return self._subs.describe()

    def __repr__(self) -> str:
        state = getattr(self, "state", None)
        if state is None:
            return "CounterpartyMonitor(?)"
        worst = sorted(f"{n}:{v.status.value}" for n, v in state.venues.items()
                       if v.status is not VenueStatus.HEALTHY)
        return (f"CounterpartyMonitor({self.monitor_id} venues={len(state.venues)} "
                f"not_healthy={worst} subscribers={len(self._subs)})")

    # internals
    def _now(self, ts_s: float | None) -> float:
        return self._clock.now_s() if ts_s is None else float(ts_s)

    def _venue(self, venue: str, now_s: float) -> dict[str, Any]:
        if venue not in self.state.venues:
            return {"status": None, "error": f"unknown venue {venue!r}"}
        return self.state.venue_summary(venue, now_s)

    def _commit(self, events: list[dict[str, Any]], now_s: float) -> list[dict[str, Any]]:
        """Journal ``events``, then the status changes they cause, then publish those."""
        self.emit_many(events)
        changes = self.state.status_events(now_s)
        self.emit_many(changes)
        for change in changes:
            self._subs.publish({"type": "counterparty_status", "monitor": self.monitor_id,
                                "breach": change["to"] == VenueStatus.BREACHED.value,
                                **{k: v for k, v in change.items() if k != "t"}})
        return changes
