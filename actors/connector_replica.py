"""What a promoted connector takes from the replicated journal of the site it replaces.

While a site is standby its controller keeps the active site's connector journal, shipped over
the mesh (:mod:`topology.journal_ship`), in the local stream ``replica/<venue>/<connector>``.
When the site is promoted, its connector reads that stream *before* it reconciles with the
venue and journals, as its own events, what it did not know:

* the old active's orders that were in flight or resting (``intent`` / ``ack``): the promoted
  connector then looks each one up at the venue by label like its own, and cancels those still
  resting — a deposed site's orders belong to no strategy here, and the old site may be cut off
  from the venue as well as from us, so its own cancel on lapse may never have arrived;
* ``closed`` for orders it knows are still open;
* every ``fill`` it has not seen (deduplicated by trade id), so the position is right before
  the venue is asked, and the venue reconciliation only fetches what replication had not
  delivered yet.

A shipped snapshot (``{"snap": seq, "p": ledger state}``) contributes the same way. Importing is
idempotent: a record seen twice, or a record older than what the connector already knows, adds
nothing. Pure functions; the actor does the I/O.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from actors.connector_core import Ledger

__all__ = ["ImportResult", "import_replica"]

_OPEN = ("intent", "open")


@dataclass
class ImportResult:
    """The events to journal, with what was read and skipped (by reason)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    records: int = 0
    last_rseq: int = 0
    skipped: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        kinds = Counter(e["t"] for e in self.events)
        return {"records": self.records, "last_rseq": self.last_rseq,
                "events": dict(kinds), "skipped": dict(self.skipped)}


class _View:
    """The ledger as it will be once the events collected so far are applied."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.states: dict[str, str] = {}        # label -> state, for labels imported now
        self.order_ids: dict[str, str | None] = {}
        self.trades: set[str] = set()

    def state(self, label: str) -> str | None:
        if label in self.states:
            return self.states[label]
        order = self.ledger.orders.get(label)
        return None if order is None else order.state

    def order_id(self, label: str) -> str | None:
        if label in self.order_ids:
            return self.order_ids[label]
        order = self.ledger.orders.get(label)
        return None if order is None else order.order_id

    def has_trade(self, trade_id: str) -> bool:
        return trade_id in self.trades or trade_id in self.ledger.fills


def import_replica(ledger: Ledger, records: Iterable[Mapping[str, Any]]) -> ImportResult:
    """The ledger events that bring ``ledger`` up to the replicated ``records`` (decoded
    replica bodies, oldest first). Malformed records are skipped and counted by reason."""
    out = ImportResult()
    view = _View(ledger)
    for body in records:
        out.records += 1
        rseq = body.get("rseq")
        if isinstance(rseq, int):
            out.last_rseq = max(out.last_rseq, rseq)
        payload = body.get("p")
        if not isinstance(payload, bytes):
            out.skipped["no_payload"] += 1
            continue
        try:
            value = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        except (ValueError, msgpack.UnpackException) as exc:
            out.skipped[f"undecodable:{type(exc).__name__}"] += 1
            continue
        if "snap" in body:
            _from_snapshot(view, value, out)
        else:
            _from_event(view, value, out)
    return out


def _from_snapshot(view: _View, state: Any, out: ImportResult) -> None:
    try:
        other = Ledger.restore(state)
    except (KeyError, TypeError, ValueError) as exc:
        out.skipped[f"bad_snapshot:{type(exc).__name__}"] += 1
        return
    for order in other.orders.values():
        if order.state not in _OPEN or not order.instrument:
            continue
        _from_event(view, {"t": "intent", "label": order.label, "instrument": order.instrument,
                           "direction": order.direction, "amount": order.amount,
                           "price": order.price, "type": order.type}, out)
        if order.order_id is not None:
            _from_event(view, {"t": "ack", "label": order.label, "order_id": order.order_id,
                               "state": order.state}, out)
    for fill in other.fills.values():
        _from_event(view, {**fill, "t": "fill"}, out)


def _from_event(view: _View, event: Any, out: ImportResult) -> None:
    if not isinstance(event, dict) or not isinstance(event.get("t"), str):
        out.skipped["not_an_event"] += 1
        return
    kind = event["t"]
    label = event.get("label")
    if kind == "intent":
        if not isinstance(label, str) or not label or not _intent_ok(event):
            out.skipped["bad_intent"] += 1
        elif view.state(label) is not None:
            out.skipped["known_intent"] += 1
        else:
            out.events.append({k: event[k] for k in (
                "t", "label", "instrument", "direction", "amount", "price", "type")})
            view.states[label] = "intent"
    elif kind == "ack":
        order_id = event.get("order_id")
        if not isinstance(label, str) or not isinstance(order_id, str) or not order_id:
            out.skipped["bad_ack"] += 1
        elif view.state(label) is None:
            out.skipped["ack_of_unknown_order"] += 1
        elif view.order_id(label) is not None:
            out.skipped["known_ack"] += 1
        else:
            out.events.append({"t": "ack", "label": label, "order_id": order_id,
                               "state": str(event.get("state") or "open")})
            view.order_ids[label] = order_id
            if view.state(label) == "intent":
                view.states[label] = "open"
    elif kind == "closed":
        state = view.state(label) if isinstance(label, str) else None
        if state is None:
            out.skipped["closed_of_unknown_order"] += 1
        elif state not in _OPEN:
            out.skipped["known_closed"] += 1
        else:
            out.events.append({"t": "closed", "label": label,
                               "state": str(event.get("state") or "closed"),
                               "reason": str(event.get("reason") or "")})
            view.states[label] = str(event.get("state") or "closed")
    elif kind == "fill":
        trade_id = event.get("trade_id")
        if not isinstance(trade_id, str) or not _fill_ok(event):
            out.skipped["bad_fill"] += 1
        elif view.has_trade(trade_id):
            out.skipped["known_fill"] += 1
        else:
            out.events.append(dict(event))
            view.trades.add(trade_id)
    else:
        out.skipped[f"kind:{kind}"] += 1  # the other connector's own bookkeeping


def _finite_positive(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _intent_ok(event: Mapping[str, Any]) -> bool:
    return (isinstance(event.get("instrument"), str) and event.get("direction") in ("buy", "sell")
            and _finite_positive(event.get("amount"))
            and (event.get("price") is None or _finite_positive(event.get("price"))))


def _fill_ok(event: Mapping[str, Any]) -> bool:
    return (isinstance(event.get("instrument"), str) and event.get("direction") in ("buy", "sell")
            and _finite_positive(event.get("amount")) and _finite_positive(event.get("price"))
            and isinstance(event.get("trade_seq"), int))
