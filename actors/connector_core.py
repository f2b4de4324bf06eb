"""The pure core of a venue connector: its state machine, its order ledger, reconciliation.

No Ray, no sockets. The actor in ``actors.connector`` owns the WebSocket and calls into this.

The ledger is event-sourced: every change is one of these events, journaled before it is acted
on (an ``intent`` before the order is sent), so that a restarted connector knows every order it
may have sent and every fill it has acknowledged:

    {"t": "intent", "label", "instrument", "direction", "amount", "price", "type"}
    {"t": "ack", "label", "order_id", "state"}
    {"t": "closed", "label", "state", "reason"}      # filled / cancelled / rejected / abandoned
    {"t": "fill", "trade_id", "trade_seq", "instrument", "direction", "amount", "price",
     "fee", "order_id", "label", "ts_ms"}

Client order ids (Deribit ``label``) are derived from the connector id and the journal sequence
of the intent, so a restart can never mint a second label for one intent and never reuses one.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

State = Literal["STARTING", "RECONCILING", "RUNNING", "DEGRADED", "STOPPED"]

#: (state, trigger) -> next state. Anything else is refused and counted.
TRANSITIONS: dict[tuple[str, str], str] = {
    ("STARTING", "connected"): "RECONCILING",
    ("STARTING", "stop"): "STOPPED",
    ("RECONCILING", "reconciled"): "RUNNING",
    ("RECONCILING", "disconnected"): "STARTING",
    ("RECONCILING", "stop"): "STOPPED",
    ("RUNNING", "disconnected"): "STARTING",
    ("RUNNING", "venue_unhealthy"): "DEGRADED",
    ("RUNNING", "stop"): "STOPPED",
    ("DEGRADED", "venue_healthy"): "RUNNING",
    ("DEGRADED", "disconnected"): "STARTING",
    ("DEGRADED", "stop"): "STOPPED",
}


class StateMachine:
    """One table, one ``transition`` that checks, records ``(ts, from, to, reason)``."""

    def __init__(self, clock: Any = time.time) -> None:
        self.state: str = "STARTING"
        self.history: list[tuple[float, str, str, str]] = []
        self.refused: Counter[str] = Counter()
        self._clock = clock

    def transition(self, trigger: str, reason: str = "") -> bool:
        to = TRANSITIONS.get((self.state, trigger))
        if to is None:
            self.refused[f"{self.state}:{trigger}"] += 1
            return False
        self.history.append((self._clock(), self.state, to, reason or trigger))
        del self.history[:-500]
        self.state = to
        return True

    @property
    def accepts_orders(self) -> bool:
        return self.state == "RUNNING"

    @property
    def accepts_cancels(self) -> bool:
        return self.state in ("RUNNING", "DEGRADED", "RECONCILING")


def derive_label(connector_id: str, intent_seq: int) -> str:
    """The client order id of the intent journaled at ``intent_seq`` (unique, never reused)."""
    return f"{connector_id}.{intent_seq}"


class OrderRejected(ValueError):
    """An order request is malformed; the message names the field and value."""


def validate_order(order: dict[str, Any], instruments: set[str]) -> dict[str, Any]:
    """Normalise an order request or raise :class:`OrderRejected` naming what is wrong."""
    if not isinstance(order, dict):
        raise OrderRejected(f"order must be a dict, got {type(order).__name__}")
    instrument = order.get("instrument")
    if instrument not in instruments:
        raise OrderRejected(f"unknown instrument {instrument!r}")
    direction = order.get("direction")
    if direction not in ("buy", "sell"):
        raise OrderRejected(f"direction must be 'buy' or 'sell', got {direction!r}")
    kind = order.get("type", "limit")
    if kind not in ("limit", "market"):
        raise OrderRejected(f"type must be 'limit' or 'market', got {kind!r}")
    amount = order.get("amount")
    if not _positive(amount):
        raise OrderRejected(f"amount must be a finite number > 0, got {amount!r}")
    price = order.get("price")
    if kind == "limit" and not _positive(price):
        raise OrderRejected(f"price must be a finite number > 0, got {price!r}")
    out = {"instrument": instrument, "direction": direction, "type": kind,
           "amount": float(amount), "price": float(price) if price is not None else None}
    for flag in ("post_only", "reduce_only"):
        if order.get(flag):
            out[flag] = True
    if order.get("time_in_force"):
        out["time_in_force"] = str(order["time_in_force"])
    return out


def _positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@dataclass
class LedgerOrder:
    label: str
    instrument: str
    direction: str
    amount: float
    price: float | None
    type: str
    order_id: str | None = None
    state: str = "intent"  # intent -> open -> filled / cancelled / rejected / abandoned
    filled: float = 0.0


@dataclass
class Ledger:
    """Orders and fills as the journal says; rebuilt by replaying events through ``apply``."""

    orders: dict[str, LedgerOrder] = field(default_factory=dict)
    fills: dict[str, dict[str, Any]] = field(default_factory=dict)  # trade_id -> fill
    last_trade_seq: dict[str, int] = field(default_factory=dict)  # instrument -> seq
    position: dict[str, float] = field(default_factory=dict)  # signed, from fills
    #: filled amount per label of fills whose order is not (yet) in the ledger: a standby sees
    #: the active site's fills before it imports that site's intents (the newest kept)
    orphan_filled: dict[str, float] = field(default_factory=dict)

    MAX_ORPHANS = 100_000

    def apply(self, event: dict[str, Any]) -> None:
        kind = event["t"]
        if kind == "intent":
            order = self.orders[event["label"]] = LedgerOrder(
                label=event["label"], instrument=event["instrument"],
                direction=event["direction"], amount=event["amount"], price=event["price"],
                type=event["type"])
            filled = self.orphan_filled.pop(event["label"], 0.0)
            if filled:
                order.filled = filled
                if filled >= order.amount - 1e-12:
                    order.state = "filled"
        elif kind == "ack":
            order = self.orders.get(event["label"])
            if order is not None:
                order.order_id = event["order_id"]
                if order.state == "intent":
                    order.state = "open"
        elif kind == "closed":
            order = self.orders.get(event["label"])
            if order is not None:
                order.state = event["state"]
        elif kind == "fill":
            if event["trade_id"] in self.fills:
                return
            self.fills[event["trade_id"]] = event
            inst = event["instrument"]
            self.last_trade_seq[inst] = max(self.last_trade_seq.get(inst, 0), event["trade_seq"])
            sign = 1.0 if event["direction"] == "buy" else -1.0
            self.position[inst] = self.position.get(inst, 0.0) + sign * event["amount"]
            label = event.get("label") or ""
            order = self.orders.get(label)
            if order is not None:
                order.filled += event["amount"]
                if order.filled >= order.amount - 1e-12:
                    order.state = "filled"
            elif label:
                self.orphan_filled[label] = self.orphan_filled.pop(label, 0.0) + event["amount"]
                if len(self.orphan_filled) > self.MAX_ORPHANS:
                    del self.orphan_filled[next(iter(self.orphan_filled))]

    def unresolved(self) -> list[LedgerOrder]:
        """Intents we may have sent but never heard back about, and orders still open."""
        return [o for o in self.orders.values() if o.state in ("intent", "open")]

    def snapshot(self) -> dict[str, Any]:
        return {
            "orders": {k: vars(v) for k, v in self.orders.items()
                       if v.state in ("intent", "open")},
            "closed_labels": [k for k, v in self.orders.items()
                              if v.state not in ("intent", "open")][-10_000:],
            "fills": list(self.fills.values()),
            "last_trade_seq": dict(self.last_trade_seq),
            "position": dict(self.position),
            "orphan_filled": dict(self.orphan_filled),
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Ledger:
        ledger = cls()
        for label, o in state["orders"].items():
            ledger.orders[label] = LedgerOrder(**o)
        for label in state.get("closed_labels", []):
            ledger.orders.setdefault(label, LedgerOrder(label, "", "", 0.0, None, "",
                                                        state="closed"))
        for fill in state["fills"]:
            ledger.fills[fill["trade_id"]] = fill
        ledger.last_trade_seq = dict(state["last_trade_seq"])
        ledger.position = dict(state["position"])
        ledger.orphan_filled = dict(state.get("orphan_filled", {}))
        return ledger


def fill_event(trade: dict[str, Any]) -> dict[str, Any] | None:
    """A journal ``fill`` event from a Deribit user trade, or None when it is malformed."""
    try:
        amount = float(trade["amount"])
        price = float(trade["price"])
        if not (math.isfinite(amount) and math.isfinite(price) and amount > 0 and price > 0):
            return None
        if trade["direction"] not in ("buy", "sell"):
            return None
        return {"t": "fill", "trade_id": str(trade["trade_id"]),
                "trade_seq": int(trade["trade_seq"]),
                "instrument": str(trade["instrument_name"]), "direction": trade["direction"],
                "amount": amount, "price": price, "fee": float(trade.get("fee") or 0.0),
                "order_id": str(trade.get("order_id") or ""),
                "label": str(trade.get("label") or ""),
                "ts_ms": int(trade.get("timestamp") or 0)}
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class TopOfBook:
    """Latest best bid/ask per instrument from book snapshots and changes (conflated)."""

    bids: dict[str, dict[float, float]] = field(default_factory=dict)
    asks: dict[str, dict[float, float]] = field(default_factory=dict)
    dirty: set[str] = field(default_factory=set)

    def apply(self, data: dict[str, Any]) -> None:
        name = data["instrument_name"]
        if data.get("type") == "snapshot":
            self.bids[name] = {}
            self.asks[name] = {}
        for side, book in (("bids", self.bids), ("asks", self.asks)):
            levels = book.setdefault(name, {})
            for entry in data.get(side, []):
                if len(entry) == 3:
                    action, price, amount = entry
                else:  # snapshot levels may come as [price, amount]
                    action, (price, amount) = "new", entry
                if action == "delete" or amount == 0:
                    levels.pop(price, None)
                else:
                    levels[price] = amount
        self.dirty.add(name)

    def best(self, name: str) -> tuple[float, float]:
        bids, asks = self.bids.get(name, {}), self.asks.get(name, {})
        return (max(bids) if bids else math.nan, min(asks) if asks else math.nan)


def reconnect_delay_s(attempt: int, max_s: float, first_s: float = 0.05) -> float:
    """Capped exponential backoff with full-range jitter in [50 %, 100 %] of the step."""
    return min(max_s, first_s * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
