"""A small, honest market maker for one inverse perpetual (``BTC-PERPETUAL`` by default).

Every ``interval_s`` the :class:`MarketMaker` actor runs one :meth:`MarketMaker.step`:

1. **Settle** intents journaled before a restart: each is routed again under its original
   client order id, so the router returns the original outcome and nothing is sent twice.
2. **Sample** the mid of the freshest best bid/ask (from ``on_marks``; the best bid and ask
   over the venues with a mark younger than ``stale_after_s``) and fold its log return into an
   EWMA variance: ``var <- (1 - ewma_alpha) * var + ewma_alpha * r**2``; ``vol_bps =
   sqrt(var) * 1e4`` is the volatility *per interval*.
3. **Classify** (:func:`classify`) the risk book's trading state, the data and ``vol_bps``
   into one trigger, then move the state machine (:data:`TRANSITIONS`, one ``(state,
   trigger) -> state`` table; each change is journaled with its reason):

   ``QUOTING``  both sides, ``half_spread_bps = base_spread_bps / 2 + vol_spread_mult *
   vol_bps``; ``WIDENED`` (``vol_bps >= widen_vol_bps``) the same times ``widened_mult``;
   ``REDUCING`` (the risk book is REDUCING) only the side that shrinks the inventory;
   ``PAUSED`` (``vol_bps >= pause_vol_bps``, the risk book HALTED or unreachable, no fresh
   marks, still warming up) nothing, and live quotes are cancelled. A regime is left only once
   vol falls below ``recover_fraction`` of its threshold, and a pause ends through WIDENED.
4. **Quote** (:func:`decide_quotes`): the reservation price is the mid skewed against the
   inventory, ``mid * (1 - skew_bps_at_max / 1e4 * clip(inventory / max_inventory, -1, 1))``;
   quotes are passive post-only limits at ``reservation * (1 -/+ half_spread_bps / 1e4)`` on
   the tick grid, sized ``quote_size`` but never taking ``|inventory|`` past ``max_inventory``.
   When ``|inventory| > hedge_fraction * max_inventory`` a marketable IOC reduce-only limit,
   ``hedge_cross_bps`` through the touch, brings it back to ``hedge_target_fraction *
   max_inventory`` (and replaces the passive quote on that side).
5. **Replace** (:func:`plan_orders`): a live quote is kept while its side and size match and
   its price is within ``requote_tolerance_bps`` of the new one; others are cancelled through
   the router; at most ``max_live_orders`` quotes rest at once.

Every order goes through ``router.route(order, client_order_id)``; the id is
``<strategy id>.<journal seq of its intent>``, journaled before the call, so a restart never
mints a second id for one intent. Inventory is the sum of the instrument's fills from
``on_fills`` (deduplicated by ``trade_id``; the connector delivers at least once). It assumes
this strategy is the only one trading the instrument on its connectors' accounts.

Journal events: ``intent`` (coid, order, kind), ``outcome`` (coid, the router's reply),
``fills`` (trade_id, signed amount, label), ``gone`` (a live quote no longer rests), ``state``
(from, to, trigger, reason, ts). Marks and the volatility estimate are not journaled: after a
restart the maker warms up again (PAUSED) before it quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import Counter, deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from actors.router import ActorCalls, CallFailed
from actors.venue.clock import Clock, WallClock
from supervisors import EventSourced, current_context

log = logging.getLogger("bastion.strategy")


class MakerConfigError(ValueError):
    """A market-maker setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"MakerConfig: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class MakerConfig:
    """Amounts are the instrument's (USD for an inverse perpetual), prices its quote
    currency, spreads and volatility basis points (vol per interval), durations seconds."""

    instrument: str = "BTC-PERPETUAL"
    quote_size: float = 10.0
    amount_step: float = 10.0          # the contract size: every amount is a multiple
    tick_size: float = 0.5
    base_spread_bps: float = 4.0       # full spread at zero volatility
    vol_spread_mult: float = 1.0       # half spread grows by this many bps per bp of vol
    widened_mult: float = 2.0          # half spread multiplier in WIDENED
    widen_vol_bps: float = 5.0
    pause_vol_bps: float = 20.0
    recover_fraction: float = 0.8      # leave a regime once vol < fraction * its threshold
    ewma_alpha: float = 0.2            # weight of the newest squared return
    warmup_samples: int = 3            # returns needed before the first quote
    max_inventory: float = 100.0
    skew_bps_at_max: float = 5.0
    hedge_fraction: float = 0.8
    hedge_target_fraction: float = 0.5
    hedge_cross_bps: float = 5.0
    requote_tolerance_bps: float = 1.0
    max_live_orders: int = 2
    stale_after_s: float = 5.0
    interval_s: float = 0.5
    call_timeout_s: float = 5.0        # risk-book and cancel calls
    route_timeout_s: float = 60.0      # one route call (the router's own sends time out first)

    def __post_init__(self) -> None:
        if not isinstance(self.instrument, str) or not self.instrument:
            raise MakerConfigError("instrument", self.instrument, "must be a name")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "instrument":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or \
                    not math.isfinite(value) or value < 0:
                raise MakerConfigError(f.name, value, "must be a finite number >= 0")
        for name in ("quote_size", "amount_step", "tick_size", "max_inventory", "interval_s",
                     "pause_vol_bps", "ewma_alpha", "max_live_orders"):
            if getattr(self, name) <= 0:
                raise MakerConfigError(name, getattr(self, name), "must be > 0")
        for name in ("warmup_samples", "max_live_orders"):
            if not isinstance(getattr(self, name), int):
                raise MakerConfigError(name, getattr(self, name), "must be an int")
        if abs(self.quote_size / self.amount_step - round(self.quote_size / self.amount_step)) \
                > 1e-9:
            raise MakerConfigError("quote_size", self.quote_size,
                                   f"must be a multiple of amount_step={self.amount_step}")
        if not self.widen_vol_bps <= self.pause_vol_bps:
            raise MakerConfigError("widen_vol_bps", self.widen_vol_bps,
                                   f"must be <= pause_vol_bps={self.pause_vol_bps}")
        for name in ("recover_fraction", "ewma_alpha", "hedge_fraction",
                     "hedge_target_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise MakerConfigError(name, getattr(self, name), "must be in (0, 1]")
        if self.hedge_target_fraction >= self.hedge_fraction:
            raise MakerConfigError("hedge_target_fraction", self.hedge_target_fraction,
                                   f"must be < hedge_fraction={self.hedge_fraction}")


# ---------------------------------------------------------------------------------------------
# The state machine
# ---------------------------------------------------------------------------------------------


class MMState(StrEnum):
    QUOTING = "QUOTING"
    WIDENED = "WIDENED"
    PAUSED = "PAUSED"
    REDUCING = "REDUCING"


class MMTrigger(StrEnum):
    CALM = "calm"                    # vol below the widen threshold, risk ACTIVE
    VOLATILE = "volatile"            # vol between the widen and the pause thresholds
    EXTREME = "extreme"              # vol above the pause threshold
    NO_DATA = "no_data"              # no fresh mark, or still warming up
    RISK_REDUCING = "risk_reducing"  # the risk book lets only risk-reducing orders through
    RISK_HALTED = "risk_halted"      # the risk book is HALTED or cannot be asked


Q, W, P, R = MMState.QUOTING, MMState.WIDENED, MMState.PAUSED, MMState.REDUCING
G = MMTrigger
#: Every (state, trigger) pair; self-loops are listed so that the table is visibly total.
TRANSITIONS: dict[tuple[MMState, MMTrigger], MMState] = {
    (Q, G.CALM): Q, (Q, G.VOLATILE): W, (Q, G.EXTREME): P, (Q, G.NO_DATA): P,
    (Q, G.RISK_REDUCING): R, (Q, G.RISK_HALTED): P,
    (W, G.CALM): Q, (W, G.VOLATILE): W, (W, G.EXTREME): P, (W, G.NO_DATA): P,
    (W, G.RISK_REDUCING): R, (W, G.RISK_HALTED): P,
    # A pause ends cautiously: through WIDENED, even when it is calm again.
    (P, G.CALM): W, (P, G.VOLATILE): W, (P, G.EXTREME): P, (P, G.NO_DATA): P,
    (P, G.RISK_REDUCING): R, (P, G.RISK_HALTED): P,
    (R, G.CALM): Q, (R, G.VOLATILE): W, (R, G.EXTREME): P, (R, G.NO_DATA): P,
    (R, G.RISK_REDUCING): R, (R, G.RISK_HALTED): P,
}


@dataclass(frozen=True)
class Transition:
    ts_s: float
    from_state: MMState
    to_state: MMState
    trigger: MMTrigger
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts_s": self.ts_s, "from": self.from_state.value, "to": self.to_state.value,
                "trigger": self.trigger.value, "reason": self.reason}


class MakerMachine:
    """The table plus ``transition()``, which checks, records ``(ts, from, to, trigger,
    reason)`` and returns the change (None for a self-loop). Starts PAUSED (warming up)."""

    def __init__(self, state: MMState = MMState.PAUSED) -> None:
        self.state = state
        self.history: deque[Transition] = deque(maxlen=200)

    def next_state(self, trigger: MMTrigger) -> MMState:
        return TRANSITIONS[(self.state, trigger)]

    def transition(self, trigger: MMTrigger, ts_s: float, reason: str,
                   expect: MMState | None = None) -> Transition | None:
        to = self.next_state(trigger)
        if expect is not None and to is not expect:
            raise RuntimeError(f"journal: {trigger} from {self.state} gives {to}, not {expect}")
        if to is self.state:
            return None
        change = Transition(ts_s, self.state, to, trigger, reason)
        self.history.append(change)
        self.state = to
        return change


def classify(state: MMState, vol_bps: float, samples: int, mark_age_s: float,
             risk_state: str, cfg: MakerConfig) -> tuple[MMTrigger, str]:
    """The trigger the current inputs fire, with its reason (risk first, then data, then
    volatility; hysteresis: a regime is left only below ``recover_fraction`` of its
    threshold)."""
    if risk_state == "HALTED":
        return G.RISK_HALTED, "risk book HALTED"
    if risk_state == "REDUCING":
        return G.RISK_REDUCING, "risk book REDUCING"
    if risk_state != "ACTIVE":
        return G.RISK_HALTED, f"risk book state {risk_state!r}"
    if not mark_age_s <= cfg.stale_after_s:
        return G.NO_DATA, f"no mark for {mark_age_s:.1f} s"
    if samples < cfg.warmup_samples:
        return G.NO_DATA, f"warming up: {samples} of {cfg.warmup_samples} returns"
    f = cfg.recover_fraction
    pause_at = cfg.pause_vol_bps * (f if state is P else 1.0)
    widen_at = cfg.widen_vol_bps * (f if state in (W, P) else 1.0)
    if vol_bps >= pause_at:
        return G.EXTREME, f"vol {vol_bps:.2f} bps >= {pause_at:.2f}"
    if vol_bps >= widen_at:
        return G.VOLATILE, f"vol {vol_bps:.2f} bps >= {widen_at:.2f}"
    return G.CALM, f"vol {vol_bps:.2f} bps < {widen_at:.2f}"


# ---------------------------------------------------------------------------------------------
# Volatility and quotes (pure)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VolEstimate:
    """EWMA of squared log returns of the mid, one sample per interval."""

    alpha: float
    last_mid: float = math.nan
    var: float = 0.0
    samples: int = 0

    def update(self, mid: float) -> VolEstimate:
        if not (math.isfinite(mid) and mid > 0):
            return self
        if not math.isfinite(self.last_mid):
            return dataclasses.replace(self, last_mid=mid)
        r2 = math.log(mid / self.last_mid) ** 2
        var = r2 if self.samples == 0 else (1 - self.alpha) * self.var + self.alpha * r2
        return VolEstimate(self.alpha, mid, var, self.samples + 1)

    @property
    def vol_bps(self) -> float:
        return math.sqrt(self.var) * 1e4


@dataclass(frozen=True)
class Order:
    """An order the maker wants. ``kind``: ``quote`` (passive, rests) or ``hedge`` (IOC)."""

    kind: str
    direction: str
    amount: float
    price: float

    def to_router(self, instrument: str) -> dict[str, Any]:
        order = {"instrument": instrument, "direction": self.direction, "amount": self.amount,
                 "type": "limit", "price": self.price}
        if self.kind == "quote":
            order["post_only"] = True
        else:
            order.update(time_in_force="immediate_or_cancel", reduce_only=True)
        return order


@dataclass(frozen=True)
class QuoteDecision:
    orders: tuple[Order, ...]
    reason: str
    half_spread_bps: float = math.nan
    reservation: float = math.nan


def _floor_to(x: float, step: float) -> float:
    return math.floor(x / step + 1e-9) * step


def _ceil_to(x: float, step: float) -> float:
    return math.ceil(x / step - 1e-9) * step


def decide_quotes(state: MMState, bid: float, ask: float, vol_bps: float, inventory: float,
                  cfg: MakerConfig) -> QuoteDecision:
    """The orders wanted now (see the module docstring, step 4)."""
    if state is P:
        return QuoteDecision((), "paused")
    if not (math.isfinite(bid) and math.isfinite(ask) and 0 < bid <= ask):
        return QuoteDecision((), f"no usable touch ({bid}, {ask})")
    mid = (bid + ask) / 2
    half = cfg.base_spread_bps / 2 + cfg.vol_spread_mult * max(vol_bps, 0.0)
    if state is W:
        half *= cfg.widened_mult
    q = max(-1.0, min(1.0, inventory / cfg.max_inventory))
    res = mid * (1 - cfg.skew_bps_at_max / 1e4 * q)
    tick, step = cfg.tick_size, cfg.amount_step
    buy_px = min(_floor_to(res * (1 - half / 1e4), tick), ask - tick)
    sell_px = max(_ceil_to(res * (1 + half / 1e4), tick), bid + tick)
    buy_size = _floor_to(min(cfg.quote_size, cfg.max_inventory - inventory), step)
    sell_size = _floor_to(min(cfg.quote_size, cfg.max_inventory + inventory), step)
    if state is R:  # only the side that shrinks the inventory, never past flat
        buy_size = _floor_to(min(cfg.quote_size, -inventory), step) if inventory < 0 else 0.0
        sell_size = _floor_to(min(cfg.quote_size, inventory), step) if inventory > 0 else 0.0
    orders: list[Order] = []
    hedge = None
    if abs(inventory) > cfg.hedge_fraction * cfg.max_inventory:
        amount = _floor_to(abs(inventory) - cfg.hedge_target_fraction * cfg.max_inventory, step)
        if amount >= step:
            cross = cfg.hedge_cross_bps / 1e4
            hedge = (Order("hedge", "sell", amount, _floor_to(bid * (1 - cross), tick))
                     if inventory > 0 else
                     Order("hedge", "buy", amount, _ceil_to(ask * (1 + cross), tick)))
            orders.append(hedge)
    if buy_size >= step and buy_px > 0 and not (hedge and hedge.direction == "buy"):
        orders.append(Order("quote", "buy", buy_size, buy_px))
    if sell_size >= step and not (hedge and hedge.direction == "sell"):
        orders.append(Order("quote", "sell", sell_size, sell_px))
    reason = (f"{state.value}: mid {mid:g} half spread {half:.2f} bps, inventory {inventory:g}"
              + (f", hedge {hedge.direction} {hedge.amount:g}" if hedge else ""))
    return QuoteDecision(tuple(orders), reason, half, res)


def plan_orders(decision: QuoteDecision, live: Mapping[str, Mapping[str, Any]],
                cfg: MakerConfig) -> tuple[list[str], list[Order]]:
    """``(client order ids to cancel, orders to place)``: a live quote stays while a wanted
    quote has its side and size and a price within ``requote_tolerance_bps``."""
    wanted = [o for o in decision.orders if o.kind == "quote"]
    cancel: list[str] = []
    for coid, lo in live.items():
        match = next((o for o in wanted if o.direction == lo["direction"]
                      and o.amount == lo["amount"]
                      and abs(o.price - lo["price"]) <= cfg.requote_tolerance_bps / 1e4
                      * o.price), None)
        if match is None:
            cancel.append(coid)
        else:
            wanted.remove(match)
    hedges = [o for o in decision.orders if o.kind == "hedge"]
    return cancel, hedges + wanted


# ---------------------------------------------------------------------------------------------
# The journaled state
# ---------------------------------------------------------------------------------------------


@dataclass
class MakerBook:
    """Everything journaled, folded from events by ``apply``."""

    instrument: str
    inventory: float = 0.0
    trade_ids: set[str] = field(default_factory=set)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)   # coid -> intent
    live: dict[str, dict[str, Any]] = field(default_factory=dict)      # coid -> resting quote
    label_fills: dict[str, float] = field(default_factory=dict)        # label -> amount
    outcomes: Counter[str] = field(default_factory=Counter)
    machine: MakerMachine = field(default_factory=MakerMachine)

    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event["t"]
        if kind == "intent":
            self.intents[event["coid"]] = {"order": event["order"], "kind": event["kind"]}
        elif kind == "outcome":
            intent = self.intents.pop(event["coid"], None)
            out = event["outcome"]
            self.outcomes[out.get("status", "?")] += 1
            if intent is not None and intent["kind"] == "quote" and \
                    out.get("status") == "accepted" and out.get("state") == "open":
                order = intent["order"]
                self.live[event["coid"]] = {"direction": order["direction"],
                                            "price": order["price"], "amount": order["amount"],
                                            "label": out.get("label") or ""}
                self._drop_if_filled(event["coid"])
        elif kind == "fills":
            for f in event["fills"]:
                self.trade_ids.add(f["trade_id"])
                self.inventory += f["signed"]
                if f["label"]:
                    self.label_fills[f["label"]] = self.label_fills.get(f["label"], 0.0) + \
                        abs(f["signed"])
            for coid in list(self.live):
                self._drop_if_filled(coid)
            while len(self.label_fills) > 1000:  # labels of orders long gone
                del self.label_fills[next(iter(self.label_fills))]
        elif kind == "gone":
            self.live.pop(event["coid"], None)
        elif kind == "state":
            self.machine.transition(MMTrigger(event["trigger"]), event["ts"], event["reason"],
                                    expect=MMState(event["to"]))
        else:
            raise ValueError(f"unknown event {event!r}")

    def _drop_if_filled(self, coid: str) -> None:
        lo = self.live[coid]
        if self.label_fills.get(lo["label"], 0.0) >= lo["amount"] - 1e-9:
            del self.live[coid]

    def snapshot(self) -> dict[str, Any]:
        return {"inventory": self.inventory, "trade_ids": sorted(self.trade_ids),
                "intents": self.intents, "live": self.live, "label_fills": self.label_fills,
                "outcomes": dict(self.outcomes), "state": self.machine.state.value,
                "history": [t.to_dict() for t in self.machine.history]}

    def restore(self, s: Mapping[str, Any]) -> None:
        self.inventory = float(s["inventory"])
        self.trade_ids = set(s["trade_ids"])
        self.intents, self.live = dict(s["intents"]), dict(s["live"])
        self.label_fills = dict(s["label_fills"])
        self.outcomes = Counter(s["outcomes"])
        self.machine = MakerMachine(MMState(s["state"]))
        for t in s["history"]:
            self.machine.history.append(Transition(t["ts_s"], MMState(t["from"]),
                                                   MMState(t["to"]), MMTrigger(t["trigger"]),
                                                   t["reason"]))


# ---------------------------------------------------------------------------------------------
# The actor
# ---------------------------------------------------------------------------------------------


class MarketMaker(EventSourced):
    """A market maker. Keywords: ``router`` and ``risk_book`` (actor paths), ``instrument``,
    ``quote_size``, ``base_spread_bps``, ``max_inventory``, ``interval_s``, ``config`` (any
    other :class:`MakerConfig` field), ``strategy_id`` (prefix of its client order ids;
    default: its tree path), ``clock`` (``now_s()``), ``calls`` (an ``ActorCalls`` stand-in,
    for tests)."""

    snapshot_every = 500

    def __init__(self, router: str, risk_book: str, instrument: str = "BTC-PERPETUAL",
                 quote_size: float = 10.0, base_spread_bps: float = 4.0,
                 max_inventory: float = 100.0, interval_s: float = 0.5,
                 config: Mapping[str, Any] | None = None, strategy_id: str | None = None,
                 clock: Clock | None = None, calls: Any = None) -> None:
        known = {f.name for f in dataclasses.fields(MakerConfig)}
        own = ("instrument", "quote_size", "base_spread_bps", "max_inventory", "interval_s")
        for key, value in (config or {}).items():
            if key not in known or key in own:
                raise MakerConfigError(str(key), value, "unknown setting" if key not in known
                                       else "pass it as its own keyword")
        self.cfg = MakerConfig(**{**dict(config or {}), "instrument": instrument,
                                  "quote_size": quote_size, "base_spread_bps": base_spread_bps,
                                  "max_inventory": max_inventory, "interval_s": interval_s})
        self.router = router
        self.risk_book = risk_book
        ctx = current_context()
        self.strategy_id = strategy_id or (ctx.path.replace("/", "-") if ctx else "mm")
        self.book = MakerBook(self.cfg.instrument)
        self.vol = VolEstimate(self.cfg.ewma_alpha)
        self.marks: dict[str, tuple[float, float, float]] = {}  # venue -> bid, ask, seen at
        self.counters: Counter[str] = Counter()
        self.last_decision: QuoteDecision | None = None
        self.last_risk_state = "?"
        self._clock: Clock = clock or WallClock()
        self._calls = calls or ActorCalls(ctx.namespace if ctx else None)
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    # ---- EventSourced ------------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        self.book.apply(event)

    def snapshot_state(self) -> Any:
        return self.book.snapshot()

    def restore_state(self, state: Any) -> None:
        self.book.restore(state)

    # ---- inputs from the connectors ----------------------------------------------------------
    def on_marks(self, batch: Mapping[str, Any]) -> None:
        """Keep the latest best bid/ask of our instrument per venue (conflated)."""
        try:
            venue = str(batch.get("venue", ""))
            for name, bid, ask in zip(batch["instrument"], batch["bid"], batch["ask"],
                                      strict=True):
                if str(name) == self.cfg.instrument:
                    self.marks[venue] = (float(bid), float(ask), self._clock.now_s())
        except (AttributeError, KeyError, TypeError, ValueError):
            self.counters["marks_malformed"] += 1

    def on_fills(self, fills: list[dict[str, Any]]) -> int:
        """Fold new fills of our instrument into the inventory; returns how many were new."""
        new, seen = [], set()
        for f in fills if isinstance(fills, list) else []:
            try:
                tid, name = str(f["trade_id"]), f["instrument_name"]
                signed = float(f["amount"]) * (1.0 if f["direction"] == "buy" else -1.0)
            except (KeyError, TypeError, ValueError):
                self.counters["fills_malformed"] += 1
                continue
            if name != self.cfg.instrument or tid in self.book.trade_ids or tid in seen:
                continue
            seen.add(tid)
            new.append({"trade_id": tid, "signed": signed, "label": str(f.get("label") or "")})
        if new:
            self.emit({"t": "fills", "fills": new})
        return len(new)

    # ---- the loop ----------------------------------------------------------------------------
    async def on_started(self) -> None:
        """Called by the supervisor once this incarnation is up: start the quoting loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - the loop survives; counted, logged
                self.counters["step_errors"] += 1
                log.warning("%s: step failed: %r", self.strategy_id, exc)
            await asyncio.sleep(self.cfg.interval_s)

    async def on_stop(self) -> None:
        """Graceful stop: no new orders; cancel the resting quotes (best effort)."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
        for coid in list(self.book.live):
            with contextlib.suppress(Exception):
                await self._cancel(coid, timeout_s=1.0)

    async def step(self, now_s: float | None = None) -> dict[str, Any]:
        """One tick (see the module docstring). Returns what it did."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            return await self._step(self._clock.now_s() if now_s is None else float(now_s))

    async def _step(self, now: float) -> dict[str, Any]:
        cfg = self.cfg
        for coid in list(self.book.intents):  # journaled before a restart: same id, same answer
            await self._route(coid)
            self.counters["intents_settled"] += 1
        bid, ask, age = self._touch(now)
        if age <= cfg.stale_after_s:
            self.vol = self.vol.update((bid + ask) / 2)
        try:
            risk_state = str(await self._calls.call(self.risk_book, "trading_state",
                                                    timeout_s=cfg.call_timeout_s))
        except CallFailed as exc:
            risk_state = f"unreachable: {exc}"[:120]
        self.last_risk_state = risk_state
        trigger, reason = classify(self.book.machine.state, self.vol.vol_bps, self.vol.samples,
                                   age, risk_state, cfg)
        to = self.book.machine.next_state(trigger)
        if to is not self.book.machine.state:
            self.emit({"t": "state", "from": self.book.machine.state.value, "to": to.value,
                       "trigger": trigger.value, "reason": reason, "ts": now})
        decision = decide_quotes(self.book.machine.state, bid, ask, self.vol.vol_bps,
                                 self.book.inventory, cfg)
        self.last_decision = decision
        cancels, places = plan_orders(decision, self.book.live, cfg)
        for coid in cancels:
            await self._cancel(coid, cfg.call_timeout_s)
        sent: list[dict[str, Any]] = []
        if self.book.intents:  # the router did not answer: no new orders until it does
            self.counters["steps_waiting_for_router"] += 1
            places = []
        for order in places:
            if order.kind == "quote" and len(self.book.live) >= cfg.max_live_orders:
                self.counters["quotes_skipped_max_live"] += 1
                continue
            seq = self.journal_seq + 1
            coid = f"{self.strategy_id}.{seq}"
            acked = self.emit({"t": "intent", "coid": coid, "kind": order.kind,
                               "order": order.to_router(cfg.instrument)})
            assert acked == seq, (acked, seq)
            sent.append(await self._route(coid))
        return {"state": self.book.machine.state.value, "trigger": trigger.value,
                "reason": reason, "vol_bps": self.vol.vol_bps, "decision": decision.reason,
                "cancelled": cancels, "sent": sent}

    async def _route(self, coid: str) -> dict[str, Any]:
        order = self.book.intents[coid]["order"]
        try:
            outcome = await self._calls.call(self.router, "route", order, coid,
                                             timeout_s=self.cfg.route_timeout_s)
        except CallFailed as exc:  # left pending: routed again, same id, next step
            self.counters["route_call_failed"] += 1
            return {"status": "pending", "client_order_id": coid, "reason": str(exc)}
        self.emit({"t": "outcome", "coid": coid, "outcome": {
            k: outcome.get(k) for k in ("status", "venue", "label", "state", "filled",
                                        "reason")}})
        return {"client_order_id": coid, **outcome}

    async def _cancel(self, coid: str, timeout_s: float) -> None:
        try:
            reply = await self._calls.call(self.router, "cancel", coid, timeout_s=timeout_s)
        except CallFailed:
            self.counters["cancel_call_failed"] += 1
            return
        if reply.get("status") == "accepted" or reply.get("order_closed"):
            self.emit({"t": "gone", "coid": coid, "why": reply.get("state") or "closed"})
        else:
            self.counters["cancel_refused"] += 1

    def _touch(self, now: float) -> tuple[float, float, float]:
        """Best bid, best ask over the venues with a fresh mark, and the freshest mark's age."""
        fresh = [(b, a) for b, a, ts in self.marks.values()
                 if now - ts <= self.cfg.stale_after_s]
        age = min((now - ts for _, _, ts in self.marks.values()), default=math.inf)
        if not fresh:
            return math.nan, math.nan, age
        return max(b for b, _ in fresh), min(a for _, a in fresh), age

    # ---- queries -----------------------------------------------------------------------------
    def inventory(self) -> float:
        return self.book.inventory

    def state(self) -> str:
        return self.book.machine.state.value

    def transitions(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.book.machine.history]

    def status(self) -> dict[str, Any]:
        d = self.last_decision
        return {"strategy_id": self.strategy_id, "instrument": self.cfg.instrument,
                "state": self.book.machine.state.value, "inventory": self.book.inventory,
                "vol_bps": self.vol.vol_bps, "vol_samples": self.vol.samples,
                "risk_state": self.last_risk_state, "live": dict(self.book.live),
                "pending_intents": list(self.book.intents), "fills": len(self.book.trade_ids),
                "outcomes": dict(self.book.outcomes), "counters": dict(self.counters),
                "decision": d.reason if d else None, "transitions": self.transitions()[-20:],
                "journal_seq": getattr(self, "_es_seq", 0)}

    def __repr__(self) -> str:
        book = getattr(self, "book", None)
        if book is None:
            return "MarketMaker(?)"
        return (f"MarketMaker({self.cfg.instrument} {book.machine.state.value} "
                f"inv={book.inventory:g} live={len(book.live)})")
