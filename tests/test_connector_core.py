"""The connector's pure core: state table, ledger replay, labels, input checks, book."""

from __future__ import annotations

import math

import pytest

from actors.connector_core import (
    Ledger,
    OrderRejected,
    StateMachine,
    TopOfBook,
    derive_label,
    fill_event,
    validate_order,
)


def test_state_machine_when_lifecycle_then_follows_table_and_records() -> None:
    sm = StateMachine(clock=lambda: 1.0)
    assert not sm.accepts_orders
    assert sm.transition("connected") and sm.state == "RECONCILING"
    assert not sm.accepts_orders and sm.accepts_cancels
    assert sm.transition("reconciled") and sm.accepts_orders
    assert sm.transition("venue_unhealthy", "reject storm") and sm.state == "DEGRADED"
    assert not sm.accepts_orders and sm.accepts_cancels
    assert sm.transition("disconnected") and sm.state == "STARTING"
    assert sm.history[2] == (1.0, "RUNNING", "DEGRADED", "reject storm")


def test_state_machine_when_trigger_not_in_table_then_refused_and_counted() -> None:
    sm = StateMachine()
    assert not sm.transition("reconciled")  # STARTING cannot skip reconciliation
    assert sm.state == "STARTING" and sm.refused["STARTING:reconciled"] == 1


def test_derive_label_when_seq_differs_then_unique() -> None:
    assert derive_label("root-venues-deribit", 7) == "root-venues-deribit.7"
    assert len({derive_label("c", i) for i in range(1000)}) == 1000


INSTRUMENTS = {"BTC-PERPETUAL"}
GOOD = {"instrument": "BTC-PERPETUAL", "direction": "buy", "amount": 10, "price": 50_000.0}


@pytest.mark.parametrize(("patch", "needle"), [
    ({"instrument": "DOGE-PERPETUAL"}, "unknown instrument"),
    ({"direction": "hold"}, "direction"),
    ({"amount": float("nan")}, "amount"),
    ({"amount": -1}, "amount"),
    ({"amount": 0}, "amount"),
    ({"price": 0.0}, "price"),
    ({"price": float("inf")}, "price"),
    ({"type": "stop"}, "type"),
    ({"amount": True}, "amount"),
])
def test_validate_order_when_bad_field_then_refused_naming_it(patch: dict, needle: str) -> None:
    with pytest.raises(OrderRejected, match=needle):
        validate_order({**GOOD, **patch}, INSTRUMENTS)


def test_validate_order_when_market_then_price_optional() -> None:
    out = validate_order({**GOOD, "type": "market", "price": None}, INSTRUMENTS)
    assert out["price"] is None and out["amount"] == 10.0


def trade(tid: str, seq: int, direction: str, amount: float, label: str = "c.1") -> dict:
    return {"trade_id": tid, "trade_seq": seq, "instrument_name": "BTC-PERPETUAL",
            "direction": direction, "amount": amount, "price": 50_000.0, "fee": 0.0,
            "order_id": "o1", "label": label, "timestamp": 1}


def test_ledger_when_fills_replayed_twice_then_counted_once() -> None:
    ledger = Ledger()
    ledger.apply({"t": "intent", "label": "c.1", "instrument": "BTC-PERPETUAL",
                  "direction": "buy", "amount": 30.0, "price": 50_000.0, "type": "limit"})
    ledger.apply({"t": "ack", "label": "c.1", "order_id": "o1", "state": "open"})
    for ev in [fill_event(trade("t1", 1, "buy", 10)), fill_event(trade("t2", 2, "buy", 20)),
               fill_event(trade("t1", 1, "buy", 10))]:
        ledger.apply(ev)
    assert ledger.position == {"BTC-PERPETUAL": 30.0}
    assert ledger.last_trade_seq == {"BTC-PERPETUAL": 2}
    assert ledger.orders["c.1"].state == "filled" and not ledger.unresolved()
    again = Ledger.restore(ledger.snapshot())
    assert again.position == ledger.position and set(again.fills) == {"t1", "t2"}
    assert "c.1" in again.orders  # a closed label is remembered: never reused


def test_ledger_when_intent_without_ack_then_unresolved() -> None:
    ledger = Ledger()
    ledger.apply({"t": "intent", "label": "c.5", "instrument": "BTC-PERPETUAL",
                  "direction": "sell", "amount": 1.0, "price": 1.0, "type": "limit"})
    assert [o.label for o in ledger.unresolved()] == ["c.5"]
    ledger.apply({"t": "closed", "label": "c.5", "state": "abandoned", "reason": "x"})
    assert ledger.unresolved() == []


@pytest.mark.parametrize("bad", [
    {"amount": float("nan")}, {"price": -1}, {"direction": "up"}, {"trade_seq": "x"},
    {"trade_id": None, "amount": 0},
])
def test_fill_event_when_malformed_then_none(bad: dict) -> None:
    assert fill_event({**trade("t1", 1, "buy", 1), **bad}) is None


def test_top_of_book_when_snapshot_then_changes_then_best_prices() -> None:
    book = TopOfBook()
    book.apply({"instrument_name": "X", "type": "snapshot",
                "bids": [["new", 99.0, 1.0], ["new", 98.0, 2.0]],
                "asks": [["new", 101.0, 1.0]]})
    book.apply({"instrument_name": "X", "type": "change", "bids": [["delete", 99.0, 0.0]],
                "asks": [["new", 100.5, 3.0]]})
    assert book.best("X") == (98.0, 100.5)
    assert all(math.isnan(x) for x in book.best("Y"))
