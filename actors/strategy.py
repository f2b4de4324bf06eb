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
   When ``|inventory| > hedge_fraction * max_inventory`` a marketable IOC limit,
   ``hedge_cross_bps`` through the touch, brings it back to ``hedge_target_fraction *
   max_inventory`` (and replaces the passive quote on that side).
5. **Replace** (:func:`plan_orders`): a live quote is kept while its side and size match and
   its price is within ``requote_tolerance_bps`` of the new one; others are cancelled through
   the router; at most ``max_live_orders`` quotes rest at once.

Every order goes through ``router.route(order, client_order_id)``; the id is
``<strategy id>.<journal seq of its intent>``, journaled before the call, so a restart never
mints a second id for one intent. Inventory is the sum of the instrument's fills from
``on_fills`` (deduplicated by ``trade_id``; the connector delivers at least once) whose label
is one of the maker's own orders (:class:`MakerBook`): other strategies and clients may trade
the same instrument on the same account (the option quoter hedges with the perpetual).

What the maker and ``actors.option_quoter.OptionQuoter`` share lives here too: the journaled
book, the state table, the loop and the routing (:class:`RoutedStrategy`).

Journal events: ``intent`` (coid, order, kind), ``outcome`` (coid, the router's reply),
``fills`` (trade_id, instrument, signed amount, label), ``gone`` (a live quote no longer
rests), ``state`` (from, to, trigger, reason, ts). Marks and the volatility estimate are not
journaled: after a restart the maker warms up again (PAUSED) before it quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from actors.router import ActorCalls, CallFailed
from actors.venue.clock import Clock, WallClock
from supervisors import EventSourced, current_context

log = logging.getLogger("bastion.strategy")
C = TypeVar("C")


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


def risk_trigger(risk_state: str) -> tuple[MMTrigger, str] | None:
    """The trigger a risk book's trading state fires (None: ACTIVE). Anything but ACTIVE,
    REDUCING and HALTED (e.g. "unreachable: ...") counts as HALTED: fail closed."""
    if risk_state == "ACTIVE":
        return None
    if risk_state == "HALTED":
        return G.RISK_HALTED, "risk book HALTED"
    if risk_state == "REDUCING":
        return G.RISK_REDUCING, "risk book REDUCING"
    return G.RISK_HALTED, f"risk book state {risk_state!r}"


def vol_trigger(state: MMState, value: float, widen_at: float, pause_at: float,
                recover_fraction: float, what: str) -> tuple[MMTrigger, str]:
    """CALM / VOLATILE / EXTREME for one volatility measure, with hysteresis: a regime is
    left only once ``value`` is below ``recover_fraction`` of its threshold."""
    pause = pause_at * (recover_fraction if state is P else 1.0)
    widen = widen_at * (recover_fraction if state in (W, P) else 1.0)
    if value >= pause:
        return G.EXTREME, f"{what} {value:.2f} >= {pause:.2f}"
    if value >= widen:
        return G.VOLATILE, f"{what} {value:.2f} >= {widen:.2f}"
    return G.CALM, f"{what} {value:.2f} < {widen:.2f}"


def classify(state: MMState, vol_bps: float, samples: int, mark_age_s: float,
             risk_state: str, cfg: MakerConfig) -> tuple[MMTrigger, str]:
    """The trigger the current inputs fire, with its reason (risk first, then data, then
    volatility; hysteresis: a regime is left only below ``recover_fraction`` of its
    threshold)."""
    risk = risk_trigger(risk_state)
    if risk is not None:
        return risk
    if not mark_age_s <= cfg.stale_after_s:
        return G.NO_DATA, f"no mark for {mark_age_s:.1f} s"
    if samples < cfg.warmup_samples:
        return G.NO_DATA, f"warming up: {samples} of {cfg.warmup_samples} returns"
    return vol_trigger(state, vol_bps, cfg.widen_vol_bps, cfg.pause_vol_bps,
                       cfg.recover_fraction, "vol bps")


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
    """An order a strategy wants. ``kind``: ``quote`` (passive post-only limit, rests) or
    ``hedge`` (a marketable IOC limit). ``instrument``: set by strategies that trade several
    (the market maker passes its one instrument to ``to_router``).

    A hedge is not ``reduce_only``: the venue applies that to the account's position, which
    other strategies on the same account share; a hedge's amount comes from this strategy's own
    position, so it cannot flip it."""

    kind: str
    direction: str
    amount: float
    price: float
    instrument: str = ""

    def to_router(self, instrument: str = "") -> dict[str, Any]:
        order = {"instrument": instrument or self.instrument, "direction": self.direction,
                 "amount": self.amount, "type": "limit", "price": self.price}
        if self.kind == "quote":
            order["post_only"] = True
        else:
            order["time_in_force"] = "immediate_or_cancel"
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


class RequoteTolerance(Protocol):
    requote_tolerance_bps: float


def plan_orders(decision: QuoteDecision, live: Mapping[str, Mapping[str, Any]],
                cfg: RequoteTolerance) -> tuple[list[str], list[Order]]:
    """``(client order ids to cancel, orders to place)``: a live quote stays while a wanted
    quote has its side and size and a price within ``requote_tolerance_bps``. ``live`` holds
    the quotes of the decision's instrument only."""
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

MAX_OWN_LABELS = 20_000          # labels of own orders remembered (a live quote's always)
MAX_UNATTRIBUTED_LABELS = 2_000  # labels of fills not (yet) known to be ours
MAX_PENDING_HEDGES = 200         # hedges whose fills have not all arrived yet
_EPS = 1e-9


@dataclass
class MakerBook:
    """Everything a strategy journals, folded from events by ``apply``.

    Fills are attributed by label: a fill moves ``positions`` only when its label is one of
    this strategy's orders, learnt from the router's outcomes (``own_labels``). A fill whose
    label is not known waits in ``unattributed``: it may have overtaken the reply of its route
    call, and is credited when that outcome arrives; the fills of other strategies trading the
    same account wait there too (bounded, oldest dropped), so two strategies on one account
    never count each other's fills. An order whose outcome carries no label (``unknown``: the
    router died while sending it) cannot be attributed. ``pending_hedges``: hedges the venue
    reported filled (label -> [instrument, signed amount]) whose fills have not all arrived."""

    instrument: str
    positions: dict[str, float] = field(default_factory=dict)
    trade_ids: set[str] = field(default_factory=set)
    intents: dict[str, dict[str, Any]] = field(default_factory=dict)   # coid -> intent
    live: dict[str, dict[str, Any]] = field(default_factory=dict)      # coid -> resting quote
    label_fills: dict[str, float] = field(default_factory=dict)        # own label -> filled
    own_labels: dict[str, None] = field(default_factory=dict)          # insertion-ordered
    unattributed: dict[str, list[list[Any]]] = field(default_factory=dict)
    pending_hedges: dict[str, list[Any]] = field(default_factory=dict)
    own_fills: int = 0                                                 # fills credited
    outcomes: Counter[str] = field(default_factory=Counter)
    machine: MakerMachine = field(default_factory=MakerMachine)

    @property
    def inventory(self) -> float:
        """The position in the book's own instrument."""
        return self.positions.get(self.instrument, 0.0)

    def expected_position(self, name: str) -> float:
        """The position once the fills of hedges already reported filled have arrived."""
        pending = sum(signed - math.copysign(self.label_fills.get(label, 0.0), signed)
                      for label, (inst, signed) in self.pending_hedges.items() if inst == name)
        return self.positions.get(name, 0.0) + pending

    def apply(self, event: Mapping[str, Any]) -> None:
        kind = event["t"]
        if kind == "intent":
            self.intents[event["coid"]] = {"order": event["order"], "kind": event["kind"]}
        elif kind == "outcome":
            self._outcome(event["coid"], event["outcome"])
        elif kind == "fills":
            for f in event["fills"]:
                self.trade_ids.add(f["trade_id"])
                name = f.get("instrument", self.instrument)
                if f["label"] in self.own_labels:
                    self._credit(name, f["signed"], f["label"])
                elif f["label"]:
                    self.unattributed.setdefault(f["label"], []).append([name, f["signed"]])
            for coid in list(self.live):
                self._drop_if_filled(coid)
            self._settle_hedges()
            _trim(self.unattributed, MAX_UNATTRIBUTED_LABELS)
        elif kind == "gone":
            self.live.pop(event["coid"], None)
        elif kind == "state":
            self.machine.transition(MMTrigger(event["trigger"]), event["ts"], event["reason"],
                                    expect=MMState(event["to"]))
        else:
            raise ValueError(f"unknown event {event!r}")

    def _outcome(self, coid: str, out: Mapping[str, Any]) -> None:
        intent = self.intents.pop(coid, None)
        self.outcomes[out.get("status", "?")] += 1
        label = out.get("label") or ""
        if label:
            self._own(label)
        if intent is None or out.get("status") != "accepted":
            return
        order = intent["order"]
        if intent["kind"] == "quote" and out.get("state") == "open":
            self.live[coid] = {"instrument": order["instrument"],
                               "direction": order["direction"], "price": order["price"],
                               "amount": order["amount"], "label": label}
            self._drop_if_filled(coid)
        elif intent["kind"] == "hedge" and label and (out.get("filled") or 0) > 0:
            sign = 1.0 if order["direction"] == "buy" else -1.0
            self.pending_hedges[label] = [order["instrument"], sign * float(out["filled"])]
            self._settle_hedges()
            _trim(self.pending_hedges, MAX_PENDING_HEDGES)

    def _own(self, label: str) -> None:
        self.own_labels[label] = None
        for name, signed in self.unattributed.pop(label, []):
            self._credit(name, signed, label)
        if len(self.own_labels) > MAX_OWN_LABELS + 1000:
            keep = {lo["label"] for lo in self.live.values()} | set(self.pending_hedges)
            for old in list(self.own_labels):
                if len(self.own_labels) <= MAX_OWN_LABELS:
                    break
                if old not in keep:
                    del self.own_labels[old]
                    self.label_fills.pop(old, None)

    def _credit(self, name: str, signed: float, label: str) -> None:
        self.positions[name] = self.positions.get(name, 0.0) + signed
        self.label_fills[label] = self.label_fills.get(label, 0.0) + abs(signed)
        self.own_fills += 1

    def _settle_hedges(self) -> None:
        for label, (_, signed) in list(self.pending_hedges.items()):
            if self.label_fills.get(label, 0.0) >= abs(signed) - _EPS:
                del self.pending_hedges[label]

    def _drop_if_filled(self, coid: str) -> None:
        lo = self.live[coid]
        if self.label_fills.get(lo["label"], 0.0) >= lo["amount"] - _EPS:
            del self.live[coid]

    def snapshot(self) -> dict[str, Any]:
        return {"instrument": self.instrument, "positions": self.positions,
                "trade_ids": sorted(self.trade_ids), "intents": self.intents,
                "live": self.live, "label_fills": self.label_fills,
                "own_labels": list(self.own_labels), "unattributed": self.unattributed,
                "pending_hedges": self.pending_hedges, "own_fills": self.own_fills,
                "outcomes": dict(self.outcomes),
                "state": self.machine.state.value,
                "history": [t.to_dict() for t in self.machine.history]}

    def restore(self, s: Mapping[str, Any]) -> None:
        self.positions = {str(k): float(v) for k, v in s["positions"].items()}
        self.trade_ids = set(s["trade_ids"])
        self.intents, self.live = dict(s["intents"]), dict(s["live"])
        self.label_fills = dict(s["label_fills"])
        self.own_labels = dict.fromkeys(s["own_labels"])
        self.unattributed = {k: [list(x) for x in v] for k, v in s["unattributed"].items()}
        self.pending_hedges = {k: list(v) for k, v in s["pending_hedges"].items()}
        self.own_fills = int(s["own_fills"])
        self.outcomes = Counter(s["outcomes"])
        self.machine = MakerMachine(MMState(s["state"]))
        for t in s["history"]:
            self.machine.history.append(Transition(t["ts_s"], MMState(t["from"]),
                                                   MMState(t["to"]), MMTrigger(t["trigger"]),
                                                   t["reason"]))


def _trim(d: dict[str, Any], max_len: int) -> None:
    """Drop the oldest entries of an insertion-ordered dict beyond ``max_len``."""
    while len(d) > max_len:
        del d[next(iter(d))]


class Touch:
    """The latest best bid/ask per instrument and venue from the connectors' batches
    (conflated), and the best over the venues whose mark is fresh."""

    def __init__(self) -> None:
        self.quotes: dict[str, dict[str, tuple[float, float, float]]] = {}

    def update(self, batch: Mapping[str, Any], wanted: Callable[[str], bool],
               now_s: float) -> bool:
        """Take the rows of ``batch`` whose instrument is ``wanted``; False if malformed."""
        try:
            venue = str(batch.get("venue", ""))
            for name, bid, ask in zip(batch["instrument"], batch["bid"], batch["ask"],
                                      strict=True):
                if wanted(str(name)):
                    self.quotes.setdefault(str(name), {})[venue] = (float(bid), float(ask),
                                                                    now_s)
        except (AttributeError, KeyError, TypeError, ValueError):
            return False
        return True

    def best(self, name: str, now_s: float, stale_after_s: float
             ) -> tuple[float, float, float]:
        """Best bid, best ask over the venues with a fresh mark, and the freshest age."""
        by_venue = self.quotes.get(name, {}).values()
        fresh = [(b, a) for b, a, ts in by_venue if now_s - ts <= stale_after_s]
        age = min((now_s - ts for _, _, ts in by_venue), default=math.inf)
        if not fresh:
            return math.nan, math.nan, age
        return max(b for b, _ in fresh), min(a for _, a in fresh), age


# ---------------------------------------------------------------------------------------------
# The actors
# ---------------------------------------------------------------------------------------------


def config_from(cls: Callable[..., C], error: Callable[[str, object, str], Exception],
                config: Mapping[str, Any] | None, **own: Any) -> C:
    """A strategy's frozen config from its own keywords and its ``config`` dict; an unknown
    key, or one of its own keywords repeated in ``config``, raises ``error`` naming it."""
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in (config or {}).items():
        if key not in known or key in own:
            raise error(str(key), value, "unknown setting" if key not in known
                        else "pass it as its own keyword")
    return cls(**{**dict(config or {}), **own})


class RoutedStrategy(EventSourced):
    """What the strategies here share (:class:`MarketMaker`, ``actors.option_quoter``): a
    journaled :class:`MakerBook`, fills from the connectors, a loop of ``step()`` every
    interval that survives its own exceptions, and orders through the router under client
    order ids ``<strategy id>.<journal seq of the intent>``, journaled before the route call,
    so that a restart never mints a second id for one intent (pending intents are routed again
    under their own ids: the router answers with the original outcome). Subclasses call
    ``_setup`` and implement ``_step(now_s)`` and ``_trades(name)``."""

    snapshot_every = 500

    def _setup(self, router: str, risk_book: str, book: MakerBook, *, interval_s: float,
               call_timeout_s: float, route_timeout_s: float, strategy_id: str | None,
               default_id: str, clock: Clock | None, calls: Any) -> None:
        ctx = current_context()
        self.router = router
        self.risk_book = risk_book
        self.book = book
        self.strategy_id = strategy_id or (ctx.path.replace("/", "-") if ctx else default_id)
        self.counters: Counter[str] = Counter()
        self.last_risk_state = "?"
        self._interval_s = interval_s
        self._call_timeout_s = call_timeout_s
        self._route_timeout_s = route_timeout_s
        self._clock: Clock = clock or WallClock()
        self._calls = calls or ActorCalls(ctx.namespace if ctx else None)
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False

    def _trades(self, name: str) -> bool:
        """Does this strategy trade ``name`` (its fills and marks are wanted)?"""
        raise NotImplementedError

    async def _step(self, now_s: float) -> dict[str, Any]:
        raise NotImplementedError

    # ---- EventSourced ------------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        self.book.apply(event)

    def snapshot_state(self) -> Any:
        return self.book.snapshot()

    def restore_state(self, state: Any) -> None:
        self.book.restore(state)

    # ---- fills from the connectors -----------------------------------------------------------
    def on_fills(self, fills: list[dict[str, Any]]) -> int:
        """Journal the new fills of our instruments (deduplicated by ``trade_id``: the
        connector delivers at least once); returns how many were new."""
        new, seen = [], set()
        for f in fills if isinstance(fills, list) else []:
            try:
                tid, name = str(f["trade_id"]), str(f["instrument_name"])
                signed = float(f["amount"]) * (1.0 if f["direction"] == "buy" else -1.0)
            except (KeyError, TypeError, ValueError):
                self.counters["fills_malformed"] += 1
                continue
            if not self._trades(name) or tid in self.book.trade_ids or tid in seen:
                continue
            seen.add(tid)
            new.append({"trade_id": tid, "instrument": name, "signed": signed,
                        "label": str(f.get("label") or "")})
        if new:
            self.emit({"t": "fills", "fills": new})
        return len(new)

    # ---- the loop ----------------------------------------------------------------------------
    async def on_started(self) -> None:
        """Called by the supervisor once this incarnation is up: start the loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await self.step()
            except Exception as exc:  # noqa: BLE001 - the loop survives; counted, logged
                self.counters["step_errors"] += 1
                log.warning("%s: step failed: %r", self.strategy_id, exc)
            await asyncio.sleep(self._interval_s)

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

    # ---- building blocks of a step -----------------------------------------------------------
    async def _settle_intents(self) -> None:
        """Route again, under the same ids, the intents journaled without an outcome."""
        for coid in list(self.book.intents):
            await self._route(coid)
            self.counters["intents_settled"] += 1

    async def _risk_state(self) -> str:
        try:
            state = str(await self._calls.call(self.risk_book, "trading_state",
                                               timeout_s=self._call_timeout_s))
        except CallFailed as exc:
            state = f"unreachable: {exc}"[:120]
        self.last_risk_state = state
        return state

    def _move(self, trigger: MMTrigger, reason: str, now_s: float) -> None:
        """Journal the state change ``trigger`` calls for (nothing for a self-loop)."""
        machine = self.book.machine
        to = machine.next_state(trigger)
        if to is not machine.state:
            self.emit({"t": "state", "from": machine.state.value, "to": to.value,
                       "trigger": trigger.value, "reason": reason, "ts": now_s})

    async def _place(self, order: dict[str, Any], kind: str) -> dict[str, Any]:
        """Journal the intent (its seq makes the client order id), then route it."""
        seq = self.journal_seq + 1
        coid = f"{self.strategy_id}.{seq}"
        acked = self.emit({"t": "intent", "coid": coid, "kind": kind, "order": order})
        assert acked == seq, (acked, seq)
        return await self._route(coid)

    async def _route(self, coid: str) -> dict[str, Any]:
        order = self.book.intents[coid]["order"]
        try:
            outcome = await self._calls.call(self.router, "route", order, coid,
                                             timeout_s=self._route_timeout_s)
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

    # ---- queries -----------------------------------------------------------------------------
    def state(self) -> str:
        return self.book.machine.state.value

    def transitions(self) -> list[dict[str, Any]]:
        return [t.to_dict() for t in self.book.machine.history]

    def positions(self) -> dict[str, float]:
        """Own positions (attributed fills), by instrument."""
        return {k: v for k, v in self.book.positions.items() if v != 0.0}

    def _common_status(self) -> dict[str, Any]:
        return {"strategy_id": self.strategy_id, "state": self.book.machine.state.value,
                "positions": self.positions(), "risk_state": self.last_risk_state,
                "live": dict(self.book.live), "pending_intents": list(self.book.intents),
                "fills": self.book.own_fills, "fills_seen": len(self.book.trade_ids),
                "outcomes": dict(self.book.outcomes),
                "unattributed_labels": len(self.book.unattributed),
                "counters": dict(self.counters), "transitions": self.transitions()[-20:],
                "journal_seq": getattr(self, "_es_seq", 0)}


class MarketMaker(RoutedStrategy):
    """A market maker. Keywords: ``router`` and ``risk_book`` (actor paths), ``instrument``,
    ``quote_size``, ``base_spread_bps``, ``max_inventory``, ``interval_s``, ``config`` (any
    other :class:`MakerConfig` field), ``strategy_id`` (prefix of its client order ids;
    default: its tree path), ``clock`` (``now_s()``), ``calls`` (an ``ActorCalls`` stand-in,
    for tests)."""

    def __init__(self, router: str, risk_book: str, instrument: str = "BTC-PERPETUAL",
                 quote_size: float = 10.0, base_spread_bps: float = 4.0,
                 max_inventory: float = 100.0, interval_s: float = 0.5,
                 config: Mapping[str, Any] | None = None, strategy_id: str | None = None,
                 clock: Clock | None = None, calls: Any = None) -> None:
        self.cfg = config_from(MakerConfig, MakerConfigError, config, instrument=instrument,
                               quote_size=quote_size, base_spread_bps=base_spread_bps,
                               max_inventory=max_inventory, interval_s=interval_s)
        self._setup(router, risk_book, MakerBook(self.cfg.instrument),
                    interval_s=self.cfg.interval_s, call_timeout_s=self.cfg.call_timeout_s,
                    route_timeout_s=self.cfg.route_timeout_s, strategy_id=strategy_id,
                    default_id="mm", clock=clock, calls=calls)
        self.vol = VolEstimate(self.cfg.ewma_alpha)
        self.touch = Touch()
        self.last_decision: QuoteDecision | None = None

    def _trades(self, name: str) -> bool:
        return name == self.cfg.instrument

    def on_marks(self, batch: Mapping[str, Any]) -> None:
        """Keep the latest best bid/ask of our instrument per venue (conflated)."""
        if not self.touch.update(batch, self._trades, self._clock.now_s()):
            self.counters["marks_malformed"] += 1

    async def _step(self, now: float) -> dict[str, Any]:
        cfg = self.cfg
        await self._settle_intents()
        bid, ask, age = self.touch.best(cfg.instrument, now, cfg.stale_after_s)
        if age <= cfg.stale_after_s:
            self.vol = self.vol.update((bid + ask) / 2)
        risk_state = await self._risk_state()
        trigger, reason = classify(self.book.machine.state, self.vol.vol_bps, self.vol.samples,
                                   age, risk_state, cfg)
        self._move(trigger, reason, now)
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
            sent.append(await self._place(order.to_router(cfg.instrument), order.kind))
        return {"state": self.book.machine.state.value, "trigger": trigger.value,
                "reason": reason, "vol_bps": self.vol.vol_bps, "decision": decision.reason,
                "cancelled": cancels, "sent": sent}

    # ---- queries -----------------------------------------------------------------------------
    def inventory(self) -> float:
        return self.book.inventory

    def status(self) -> dict[str, Any]:
        d = self.last_decision
        return {**self._common_status(), "instrument": self.cfg.instrument,
                "inventory": self.book.inventory, "vol_bps": self.vol.vol_bps,
                "vol_samples": self.vol.samples, "decision": d.reason if d else None}

    def __repr__(self) -> str:
        book = getattr(self, "book", None)
        if book is None:
            return "MarketMaker(?)"
        return (f"MarketMaker({self.cfg.instrument} {book.machine.state.value} "
                f"inv={book.inventory:g} live={len(book.live)})")
