"""Order routing: pick a venue for each order and send it there at most once.

Pure part (no Ray, no clock):

* :class:`RoutingPolicy` — given a :class:`VenueView` per candidate venue (connector state,
  counterparty verdict, best bid/ask, cool-down) and the risk book's verdict, returns
  :class:`Routed` (best venue by price, then the other healthy ones as fallbacks, best first)
  or :class:`RouteDenied` (a stable ``reason`` key and the venues skipped, each with why).
  A venue is *healthy* when its connector is ``RUNNING``, the counterparty monitor allows the
  added notional and it is not cooling down after answering ``temporarily_unavailable``. Best
  price: the lowest ask for a buy, the highest bid for a sell; a venue with no fresh quote
  ranks after every priced one; ties go to the order of ``venues``.
* :class:`RouteLog` — the router's journaled state, folded from events by ``apply``.

The actor, :class:`OrderRouter` (``EventSourced``; async), does
``route(order, client_order_id)``:

1. a ``client_order_id`` already done returns its recorded outcome (``duplicate: True``) and
   sends nothing; one being routed right now waits for that routing's outcome; one whose
   routing was cut short by a router crash (a ``send`` journaled, no ``done``) is settled as
   ``unknown``: the order may have reached the connector, whose reconciliation with the venue
   settles it; it is never sent again;
2. the risk book's ``check_order`` (denied → ``denied`` with the risk reason; an unreachable
   risk book denies: fail closed);
3. the policy picks a venue; ``{"t": "send"}`` is journaled *before* the connector's
   ``submit`` is called;
4. the next healthy venue is tried only when the reply proves the order was not taken: the
   connector ``refused`` (not RUNNING, or the order is invalid there) or the venue rejected it
   with ``temporarily_unavailable`` (13028, e.g. an outage; the venue then cools down for
   ``venue_cooldown_s``). After ``accepted``, ``unknown``, any other rejection or a failed call
   (timeout, connector died: ``unknown``) nothing more is sent;
5. ``{"t": "done"}`` journals the outcome.

Outcome ``status``: ``accepted`` / ``rejected`` / ``unknown`` (from the venue that got the
send), ``refused`` (every venue tried refused; nothing reached a venue) or ``denied`` (nothing
sent: ``reason`` is ``invalid_order``, ``risk_denied`` or ``no_venue``).

Journal events:

    {"t": "send", "coid", "order", "venue", "attempt", "ts"}
    {"t": "done", "coid", "order", "outcome", "ts"}

Marks arrive from the connectors (``on_marks``, the router is one of their subscribers) and
are conflated to the latest bid/ask per (venue, instrument); they are not journaled. Only this
module's :class:`ActorCalls` touches Ray.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from actors.venue.clock import Clock, WallClock
from supervisors import EventSourced, current_context

log = logging.getLogger("bastion.router")

ROUTABLE_STATES = frozenset({"RUNNING"})
#: Venue error codes that prove an order was not taken, so another venue may be tried.
REROUTE_CODES = frozenset({13028})  # temporarily_unavailable
#: Venue error codes of a cancel that mean the order is no longer open (filled or cancelled).
CLOSED_ORDER_CODES = ("11044", "10004")  # not_open_order, order_not_found
ORDER_KEYS = ("instrument", "direction", "amount", "type", "price", "post_only", "reduce_only",
              "time_in_force")


class RouterConfigError(ValueError):
    """A router setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"OrderRouter: invalid {field_name}={value!r}: {why}")


# ---------------------------------------------------------------------------------------------
# The pure policy
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VenueView:
    """What the router knows about one venue for one order. ``state``: the connector's state
    (None: it did not answer). ``exposure_ok`` / ``exposure_reason``: the counterparty
    monitor's verdict. ``cooling_down``: non-empty while skipped after an outage reply."""

    venue: str
    state: str | None
    bid: float = math.nan
    ask: float = math.nan
    exposure_ok: bool = True
    exposure_reason: str = ""
    cooling_down: str = ""


@dataclass(frozen=True)
class Routed:
    venue: str
    reason: str
    fallbacks: tuple[str, ...] = ()
    skipped: dict[str, str] = field(default_factory=dict)
    ok = True


@dataclass(frozen=True)
class RouteDenied:
    """Nothing to send. ``reason``: ``invalid_order`` / ``risk_denied`` / ``no_venue``."""

    reason: str
    detail: str = ""
    risk: dict[str, Any] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    ok = False

    def to_outcome(self) -> dict[str, Any]:
        out: dict[str, Any] = {"status": "denied", "reason": self.reason, "detail": self.detail,
                               "skipped": dict(self.skipped)}
        if self.risk is not None:
            out["risk"] = dict(self.risk)
        return out


def risk_as_dict(risk: Any) -> dict[str, Any]:
    """An ``OrderAccepted`` / ``OrderDenied`` (or its ``to_dict()``) as a plain dict."""
    if hasattr(risk, "to_dict"):
        return risk.to_dict()
    if isinstance(risk, Mapping) and "ok" in risk:
        return dict(risk)
    return {"ok": False, "reason": "invalid_risk_result", "detail": repr(risk)[:200]}


def skip_reason(view: VenueView) -> str:
    """Why ``view``'s venue cannot take an order now ("" when it can)."""
    if view.state is None:
        return "connector unreachable"
    if view.state not in ROUTABLE_STATES:
        return f"connector is {view.state}"
    if view.cooling_down:
        return view.cooling_down
    if not view.exposure_ok:
        return f"counterparty: {view.exposure_reason}"
    return ""


@dataclass(frozen=True)
class RoutingPolicy:
    """Choose the best healthy venue by price (see the module docstring)."""

    def choose(self, order: Mapping[str, Any], views: Sequence[VenueView],
               risk: Any) -> Routed | RouteDenied:
        problem = order_problem(order)
        if problem:
            return RouteDenied("invalid_order", problem)
        verdict = risk_as_dict(risk)
        if not verdict.get("ok"):
            return RouteDenied("risk_denied", f"{verdict.get('reason')}: "
                               f"{verdict.get('detail', '')}".strip(), risk=verdict)
        skipped = {v.venue: why for v in views if (why := skip_reason(v))}
        healthy = [(i, v) for i, v in enumerate(views) if v.venue not in skipped]
        if not healthy:
            detail = "; ".join(f"{k}: {w}" for k, w in skipped.items()) or "no candidate venue"
            return RouteDenied("no_venue", detail, skipped=skipped)
        buy = order["direction"] == "buy"

        def key(item: tuple[int, VenueView]) -> tuple[int, float, int]:
            i, v = item
            px = v.ask if buy else -v.bid
            return (0, px, i) if math.isfinite(px) else (1, 0.0, i)

        ranked = [v for _, v in sorted(healthy, key=key)]
        best = ranked[0]
        side, px = ("ask", best.ask) if buy else ("bid", best.bid)
        reason = (f"best {side} {px:g} of {len(ranked)} healthy venue(s)" if math.isfinite(px)
                  else f"no fresh quote; first of {len(ranked)} healthy venue(s)")
        return Routed(best.venue, reason, tuple(v.venue for v in ranked[1:]), skipped)


def order_problem(order: Any) -> str:
    """What is wrong with an order's shape ("" if nothing); the connector checks the rest."""
    if not isinstance(order, Mapping):
        return f"order must be a dict, got {type(order).__name__}"
    unknown = sorted(set(order) - set(ORDER_KEYS))
    if unknown:
        return f"unknown order fields {unknown}"
    if not isinstance(order.get("instrument"), str) or not order["instrument"]:
        return f"instrument must be a name, got {order.get('instrument')!r}"
    if order.get("direction") not in ("buy", "sell"):
        return f"direction must be 'buy' or 'sell', got {order.get('direction')!r}"
    amount = order.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int | float) or \
            not math.isfinite(amount) or amount <= 0:
        return f"amount must be a finite number > 0, got {amount!r}"
    return ""


def clean_order(order: Any) -> Any:
    """The order as plain msgpack-able data: numpy numbers become Python ones, anything
    exotic its ``repr`` (and a non-dict order its ``repr``), so it can be journaled."""
    if not isinstance(order, Mapping):
        return repr(order)[:200]
    out = {}
    for k, v in order.items():
        if hasattr(v, "item"):
            v = v.item()
        out[str(k)] = v if v is None or isinstance(v, str | int | float | bool) else repr(v)
    return {k: v for k, v in out.items() if v is not None}


def added_notional_usd(order: Mapping[str, Any], ref_price: float, reducing: bool,
                       underlying_usd: float = math.nan) -> float:
    """USD the order adds at a venue (negative when the risk book says it reduces risk).
    Inverse perpetuals and futures (``BTC-PERPETUAL``, ``BTC-27DEC26``) trade USD amounts;
    coin-quoted options (``BTC-27DEC26-60000-C``) coins of the underlying, valued at
    ``underlying_usd``; other instruments trade coin, valued at the order's price or else
    ``ref_price``."""
    amount = float(order["amount"])
    parts = str(order["instrument"]).split("-")
    if len(parts) == 2:
        notional = amount
    elif len(parts) == 4 and "_" not in parts[0]:
        notional = amount * underlying_usd if math.isfinite(underlying_usd) else math.inf
    else:
        px = order.get("price") or ref_price
        notional = amount * px if px and math.isfinite(px) else math.inf
    return -notional if reducing else notional


def retry_elsewhere(reply: Mapping[str, Any]) -> bool:
    """Does a connector's ``submit`` reply prove the venue did not take the order?"""
    status = reply.get("status")
    return status == "refused" or (status == "rejected" and reply.get("code") in REROUTE_CODES)


# ---------------------------------------------------------------------------------------------
# The journaled state
# ---------------------------------------------------------------------------------------------


@dataclass
class RouteLog:
    """Routing records by client order id, oldest first; at most ``max_done`` finished ones
    are kept (an older id retried after that is routed as new)."""

    max_done: int = 100_000
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    done: int = 0

    def apply(self, event: Mapping[str, Any]) -> None:
        coid = event["coid"]
        rec = self.records.setdefault(coid, {"order": event["order"], "sends": [],
                                             "outcome": None})
        if event["t"] == "send":
            rec["sends"].append(event["venue"])
        elif event["t"] == "done":
            if rec["outcome"] is None:
                self.done += 1
            rec["outcome"] = event["outcome"]
            while self.done > self.max_done:
                oldest = next(k for k, r in self.records.items() if r["outcome"] is not None)
                del self.records[oldest]
                self.done -= 1

    def pending(self) -> list[str]:
        return [k for k, r in self.records.items() if r["outcome"] is None]

    def snapshot(self) -> dict[str, Any]:
        return {"records": self.records, "done": self.done}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.records = dict(state["records"])
        self.done = int(state["done"])


# ---------------------------------------------------------------------------------------------
# The thin Ray layer
# ---------------------------------------------------------------------------------------------


class CallFailed(RuntimeError):
    """A call to another actor failed or timed out (the message says which and why)."""


class ActorCalls:
    """The only Ray code here: named actors resolved (and cached) in this tree's namespace,
    called with a timeout. A failed call forgets the handle (the actor may have restarted)."""

    def __init__(self, namespace: str | None = None) -> None:
        self.namespace = namespace
        self._handles: dict[str, Any] = {}

    async def call(self, path: str, method: str, *args: Any, timeout_s: float) -> Any:
        import ray

        try:
            handle = self._handles.get(path)
            if handle is None:
                handle = self._handles[path] = ray.get_actor(path, namespace=self.namespace)
            return await asyncio.wait_for(getattr(handle, method).remote(*args), timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the caller as one error type
            self._handles.pop(path, None)
            raise CallFailed(f"{path}.{method}: {exc!r}"[:300]) from exc


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class OrderRouter(EventSourced):
    """An order router. Keywords: ``venues`` (venue name -> connector actor path, in order of
    preference on price ties), ``risk_book`` (path), ``counterparty`` (path or None),
    ``instruments_by_venue`` (venue -> instruments it trades; None: every venue trades
    everything), ``submit_wait_s`` (how long a connector may wait to be RUNNING before it
    refuses), ``submit_timeout_s`` (the whole ``submit`` call; past it the outcome is
    ``unknown``), ``query_timeout_s`` (state / risk / counterparty calls),
    ``venue_cooldown_s`` (a venue that answered ``temporarily_unavailable`` is skipped this
    long), ``quote_max_age_s`` (older quotes count as none), ``max_done`` (outcomes kept),
    ``clock`` (``now_s()``; the wall clock by default), ``calls`` (an :class:`ActorCalls`
    stand-in, for tests)."""

    snapshot_every = 500

    def __init__(self, venues: Mapping[str, str], risk_book: str,
                 counterparty: str | None = None,
                 instruments_by_venue: Mapping[str, Sequence[str]] | None = None,
                 submit_wait_s: float = 1.0, submit_timeout_s: float = 30.0,
                 query_timeout_s: float = 3.0, venue_cooldown_s: float = 5.0,
                 quote_max_age_s: float = 5.0, max_done: int = 100_000,
                 clock: Clock | None = None, calls: Any = None) -> None:
        if not isinstance(venues, Mapping) or not venues or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in venues.items()):
            raise RouterConfigError("venues", venues, "must map venue name -> connector path")
        if not isinstance(risk_book, str) or not risk_book:
            raise RouterConfigError("risk_book", risk_book, "must be an actor path")
        if instruments_by_venue is not None:
            extra = sorted(set(instruments_by_venue) - set(venues))
            if extra:
                raise RouterConfigError("instruments_by_venue", dict(instruments_by_venue),
                                        f"venues {extra} are not in venues")
        for name, value in (("submit_wait_s", submit_wait_s),
                            ("submit_timeout_s", submit_timeout_s),
                            ("query_timeout_s", query_timeout_s),
                            ("venue_cooldown_s", venue_cooldown_s),
                            ("quote_max_age_s", quote_max_age_s)):
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0:
                raise RouterConfigError(name, value, "must be a finite number of seconds >= 0")
        self.venues = dict(venues)
        self.risk_book = risk_book
        self.counterparty = counterparty
        self.instruments_by_venue = ({k: set(v) for k, v in instruments_by_venue.items()}
                                     if instruments_by_venue is not None else None)
        self.submit_wait_s = float(submit_wait_s)
        self.submit_timeout_s = float(submit_timeout_s)
        self.query_timeout_s = float(query_timeout_s)
        self.venue_cooldown_s = float(venue_cooldown_s)
        self.quote_max_age_s = float(quote_max_age_s)
        self.policy = RoutingPolicy()
        self.log = RouteLog(max_done=max_done)
        self.quotes: dict[tuple[str, str], tuple[float, float, float]] = {}
        self.cooldown_until_s: dict[str, float] = {}
        self.counters: Counter[str] = Counter()
        self._clock: Clock = clock or WallClock()
        ctx = current_context()
        self._calls = calls or ActorCalls(ctx.namespace if ctx else None)
        self._inflight: dict[str, asyncio.Future] = {}

    # ---- EventSourced ------------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        self.log.apply(event)

    def snapshot_state(self) -> Any:
        return self.log.snapshot()

    def restore_state(self, state: Any) -> None:
        self.log.restore(state)

    # ---- inputs from the connectors ----------------------------------------------------------
    def on_marks(self, batch: Mapping[str, Any]) -> None:
        """Latest best bid/ask per (venue, instrument) from a connector's batch (conflated)."""
        venue = batch.get("venue") if isinstance(batch, Mapping) else None
        if venue not in self.venues:
            self.counters["marks_unknown_venue"] += 1
            return
        now = self._clock.now_s()
        try:
            rows = zip(batch["instrument"], batch["bid"], batch["ask"], strict=True)
            for name, bid, ask in rows:
                self.quotes[(venue, str(name))] = (float(bid), float(ask), now)
        except (KeyError, TypeError, ValueError):
            self.counters["marks_malformed"] += 1
            return
        self.counters["mark_batches"] += 1

    def on_fills(self, fills: list[dict[str, Any]]) -> None:
        """Connectors publish fills to every subscriber; the router only counts them."""
        self.counters["fills_seen"] += len(fills) if isinstance(fills, list) else 0

    # ---- the public API ----------------------------------------------------------------------
    async def route(self, order: dict[str, Any], client_order_id: str) -> dict[str, Any]:
        """Route one order, at most once per ``client_order_id`` (see the module docstring).
        Always returns an outcome dict; never raises for a refused order."""
        coid = client_order_id
        if not isinstance(coid, str) or not coid or len(coid) > 128:
            self.counters["bad_client_order_id"] += 1
            return {"status": "denied", "reason": "invalid_order",
                    "detail": f"client_order_id must be a non-empty str, got {coid!r}"[:200]}
        order = clean_order(order)
        rec = self.log.records.get(coid)
        if rec is not None and rec["order"] != order:
            self.counters["client_order_id_conflicts"] += 1
            return {"status": "denied", "reason": "invalid_order", "client_order_id": coid,
                    "detail": "client_order_id already used for a different order"}
        if rec is not None and rec["outcome"] is not None:
            self.counters["duplicates"] += 1
            return {**rec["outcome"], "duplicate": True}
        if coid in self._inflight:
            self.counters["duplicates"] += 1
            return {**await asyncio.shield(self._inflight[coid]), "duplicate": True}
        if rec is not None:  # sent (maybe) by an incarnation that died before the outcome
            outcome = {"status": "unknown", "client_order_id": coid,
                       "venue": rec["sends"][-1] if rec["sends"] else None,
                       "reason": "the router restarted while sending; the venue connector's "
                                 "reconciliation settles the order, it is never resent"}
            return self._finish(coid, order, outcome)
        future = asyncio.get_running_loop().create_future()
        self._inflight[coid] = future
        try:
            outcome = await self._route_new(order, coid)
            future.set_result(outcome)
            return outcome
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        finally:
            del self._inflight[coid]

    async def cancel(self, client_order_id: str) -> dict[str, Any]:
        """Cancel a routed order at its venue. ``order_closed: True`` when the venue says it
        is no longer open (already filled or cancelled)."""
        rec = self.log.records.get(client_order_id)
        outcome = rec["outcome"] if rec else None
        if not outcome or outcome.get("status") != "accepted" or not outcome.get("label"):
            return {"status": "refused", "reason": f"no accepted order {client_order_id!r}"}
        path = self.venues[outcome["venue"]]
        try:
            reply = await self._calls.call(path, "cancel", outcome["label"],
                                           timeout_s=self.submit_timeout_s)
        except CallFailed as exc:
            return {"status": "unknown", "reason": str(exc)}
        reason = str(reply.get("reason", ""))
        closed = reply.get("status") == "rejected" and any(c in reason
                                                            for c in CLOSED_ORDER_CODES)
        return {**reply, "order_closed": closed or reply.get("state") in ("filled",)}

    async def cancel_all(self) -> dict[str, Any]:
        """``cancel_all`` at every venue (an operator's or a paused strategy's broom)."""
        out = {}
        for venue, path in self.venues.items():
            try:
                out[venue] = await self._calls.call(path, "cancel_all",
                                                    timeout_s=self.submit_timeout_s)
            except CallFailed as exc:
                out[venue] = {"status": "unknown", "reason": str(exc)}
        return out

    def outcome(self, client_order_id: str) -> dict[str, Any] | None:
        rec = self.log.records.get(client_order_id)
        return None if rec is None else rec["outcome"]

    def status(self) -> dict[str, Any]:
        now = self._clock.now_s()
        by_status = Counter(r["outcome"]["status"] for r in self.log.records.values()
                            if r["outcome"] is not None)
        return {"venues": dict(self.venues),
                "quotes": {f"{v}:{i}": {"bid": b, "ask": a, "age_s": now - ts}
                           for (v, i), (b, a, ts) in self.quotes.items()},
                "cooling_down": {v: t - now for v, t in self.cooldown_until_s.items() if t > now},
                "routes": len(self.log.records), "by_status": dict(by_status),
                "pending": self.log.pending(), "in_flight": len(self._inflight),
                "counters": dict(self.counters),
                "journal_seq": getattr(self, "_es_seq", 0),
                "epoch": getattr(self, "_es_epoch", 0)}

    def __repr__(self) -> str:
        log_ = getattr(self, "log", None)
        if log_ is None:
            return "OrderRouter(?)"
        return (f"OrderRouter(venues={sorted(self.venues)} routes={len(log_.records)} "
                f"in_flight={len(self._inflight)})")

    # ---- internals ---------------------------------------------------------------------------
    def _finish(self, coid: str, order: Any, outcome: dict[str, Any]) -> dict[str, Any]:
        outcome = {"client_order_id": coid, **outcome}
        self.emit({"t": "done", "coid": coid, "order": order, "outcome": outcome,
                   "ts": self._clock.now_s()})
        self.counters[f"outcome.{outcome['status']}"] += 1
        return outcome

    async def _route_new(self, order: Any, coid: str) -> dict[str, Any]:
        problem = order_problem(order)
        if problem:
            return self._finish(coid, order, RouteDenied("invalid_order", problem).to_outcome())
        check = {"instrument_name": order["instrument"], "direction": order["direction"],
                 "amount": order["amount"], "label": coid}
        try:
            risk = risk_as_dict(await self._calls.call(self.risk_book, "check_order", check,
                                                       timeout_s=self.query_timeout_s))
        except CallFailed as exc:
            risk = {"ok": False, "reason": "risk_unavailable", "detail": str(exc)}
        views = await self._views(order, risk)
        decision = self.policy.choose(order, views, risk)
        if isinstance(decision, RouteDenied):
            return self._finish(coid, order, decision.to_outcome())
        attempts: list[dict[str, Any]] = []
        for attempt, venue in enumerate((decision.venue, *decision.fallbacks), start=1):
            self.emit({"t": "send", "coid": coid, "order": order, "venue": venue,
                       "attempt": attempt, "ts": self._clock.now_s()})
            try:
                reply = await self._calls.call(self.venues[venue], "submit", order,
                                               self.submit_wait_s,
                                               timeout_s=self.submit_timeout_s)
            except CallFailed as exc:
                reply = {"status": "unknown", "reason": str(exc)}
            attempts.append({"venue": venue, "status": reply.get("status"),
                             "reason": reply.get("reason", "")})
            if retry_elsewhere(reply):
                if reply.get("code") in REROUTE_CODES:
                    self.cooldown_until_s[venue] = self._clock.now_s() + self.venue_cooldown_s
                self.counters["rerouted"] += 1
                continue
            outcome = {"status": reply.get("status", "unknown"), "venue": venue,
                       "label": reply.get("label"), "order_id": reply.get("order_id"),
                       "state": reply.get("state"), "filled": reply.get("filled", 0.0),
                       "reason": reply.get("reason", ""), "route_reason": decision.reason,
                       "attempts": attempts}
            return self._finish(coid, order, outcome)
        detail = "; ".join(f"{a['venue']}: {a['reason']}" for a in attempts)
        return self._finish(coid, order, {"status": "refused", "reason": "all_venues_refused",
                                          "detail": detail, "attempts": attempts,
                                          "skipped": dict(decision.skipped)})

    async def _views(self, order: Mapping[str, Any], risk: Mapping[str, Any]
                     ) -> list[VenueView]:
        if not risk.get("ok"):
            return []  # denied anyway: ask nobody
        name = order["instrument"]
        venues = [v for v in self.venues if self.instruments_by_venue is None
                  or name in self.instruments_by_venue.get(v, ())]
        now = self._clock.now_s()

        async def state(venue: str) -> str | None:
            try:
                return await self._calls.call(self.venues[venue], "state",
                                              timeout_s=self.query_timeout_s)
            except CallFailed:
                return None

        async def exposure(venue: str, ref: float) -> tuple[bool, str]:
            if self.counterparty is None:
                return True, ""
            under_bid, under_ask = self._quote(venue, f"{name.split('-')[0]}-PERPETUAL", now)
            added = added_notional_usd(order, ref, bool(risk.get("reducing")),
                                       (under_bid + under_ask) / 2)
            try:
                ok, why = await self._calls.call(self.counterparty, "exposure_ok", venue, added,
                                                 timeout_s=self.query_timeout_s)
                return bool(ok), str(why)
            except CallFailed as exc:
                return False, f"monitor unavailable ({exc})"

        quotes = {v: self._quote(v, name, now) for v in venues}
        refs = {v: (b + a) / 2 for v, (b, a) in quotes.items()}
        states = await asyncio.gather(*(state(v) for v in venues))
        exposures = await asyncio.gather(*(exposure(v, refs[v]) for v in venues))
        views = []
        for venue, st, (ok, why) in zip(venues, states, exposures, strict=True):
            until = self.cooldown_until_s.get(venue, 0.0)
            cooling = (f"cooling down {until - now:.1f} s after temporarily_unavailable"
                       if until > now else "")
            bid, ask = quotes[venue]
            views.append(VenueView(venue, st, bid, ask, ok, why, cooling))
        return views

    def _quote(self, venue: str, name: str, now: float) -> tuple[float, float]:
        bid, ask, ts = self.quotes.get((venue, name), (math.nan, math.nan, -math.inf))
        if now - ts > self.quote_max_age_s:
            return math.nan, math.nan
        return bid, ask
