"""What a promoted connector imports from the replicated journal (pure: no Ray, no sockets),
and the journal shipper between two real SQLite stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgpack

from actors.connector_core import Ledger
from actors.connector_replica import import_replica
from supervisors.journal import open_store
from topology.journal_ship import JournalShipper, replica_stream


def body(event: dict[str, Any], rseq: int) -> dict[str, Any]:
    return {"src": rseq, "p": msgpack.packb(event, use_bin_type=True), "rseq": rseq}


def intent(label: str, amount: float = 1.0) -> dict[str, Any]:
    return {"t": "intent", "label": label, "instrument": "BTC-PERPETUAL", "direction": "buy",
            "amount": amount, "price": 100.0, "type": "limit"}


def fill(trade_id: str, label: str, amount: float = 1.0, seq: int = 1) -> dict[str, Any]:
    return {"t": "fill", "trade_id": trade_id, "trade_seq": seq, "instrument": "BTC-PERPETUAL",
            "direction": "buy", "amount": amount, "price": 100.0, "fee": 0.0,
            "order_id": "o-" + label, "label": label, "ts_ms": 0}


def apply_all(ledger: Ledger, events: list[dict[str, Any]]) -> Ledger:
    for e in events:
        ledger.apply(e)
    return ledger


def test_import_when_old_active_had_resting_and_filled_orders_then_ledger_knows_both() -> None:
    records = [body(intent("e1.a.1"), 1), body({"t": "ack", "label": "e1.a.1", "order_id": "o1",
                                                 "state": "open"}, 2),
               body(intent("e1.a.2"), 3), body(fill("t1", "e1.a.2"), 4)]
    ledger = Ledger()
    result = import_replica(ledger, records)
    apply_all(ledger, result.events)
    assert ledger.orders["e1.a.1"].state == "open" and ledger.orders["e1.a.1"].order_id == "o1"
    assert ledger.orders["e1.a.2"].state == "filled"
    assert ledger.position == {"BTC-PERPETUAL": 1.0}
    assert [o.label for o in ledger.unresolved()] == ["e1.a.1"]
    assert result.last_rseq == 4 and result.records == 4


def test_import_when_applied_twice_then_nothing_more_is_added() -> None:
    records = [body(intent("e1.a.1"), 1), body(fill("t1", "e1.a.1"), 2),
               body({"t": "closed", "label": "e1.a.1", "state": "filled"}, 3)]
    ledger = Ledger()
    apply_all(ledger, import_replica(ledger, records).events)
    snapshot = ledger.snapshot()
    again = import_replica(ledger, records)
    assert again.events == [] and again.skipped["known_fill"] == 1
    assert ledger.snapshot() == snapshot


def test_import_when_standby_saw_the_fills_first_then_imported_intent_is_filled_not_open() -> None:
    ledger = apply_all(Ledger(), [fill("t1", "e1.a.1", amount=2.0)])  # heard on user.trades
    assert ledger.orphan_filled == {"e1.a.1": 2.0}
    result = import_replica(ledger, [body(intent("e1.a.1", amount=2.0), 1),
                                     body(fill("t1", "e1.a.1", amount=2.0), 2)])
    apply_all(ledger, result.events)
    assert ledger.orders["e1.a.1"].state == "filled" and ledger.unresolved() == []
    assert ledger.position == {"BTC-PERPETUAL": 2.0}  # the fill counted once
    assert result.skipped["known_fill"] == 1


def test_import_when_records_are_malformed_then_skipped_by_reason_and_rest_imported() -> None:
    records = [{"src": 1, "p": b"\xc1", "rseq": 1}, {"src": 2, "rseq": 2},
               body({"t": "intent", "label": "x", "amount": float("nan")}, 3),
               body({"t": "fill", "trade_id": "t9", "amount": -1}, 4),
               body("not a dict", 5), body({"t": "replica", "upto": 3}, 6),
               body(intent("e1.a.7"), 7)]
    ledger = Ledger()
    result = import_replica(ledger, records)
    apply_all(ledger, result.events)
    assert list(ledger.orders) == ["e1.a.7"]
    assert result.skipped["no_payload"] == 1 and result.skipped["bad_intent"] == 1
    assert result.skipped["bad_fill"] == 1 and result.skipped["not_an_event"] == 1
    assert result.skipped["kind:replica"] == 1
    assert sum(v for k, v in result.skipped.items() if k.startswith("undecodable")) == 1


def test_import_when_a_snapshot_is_shipped_then_its_open_orders_and_fills_come_in() -> None:
    old = apply_all(Ledger(), [intent("e1.a.1"), {"t": "ack", "label": "e1.a.1",
                                                  "order_id": "o1", "state": "open"},
                               intent("e1.a.2"), fill("t1", "e1.a.2")])
    snap = {"snap": 4, "p": msgpack.packb(old.snapshot(), use_bin_type=True), "rseq": 1}
    ledger = Ledger()
    apply_all(ledger, import_replica(ledger, [snap]).events)
    assert ledger.orders["e1.a.1"].order_id == "o1" and ledger.orders["e1.a.1"].state == "open"
    assert ledger.position == old.position and set(ledger.fills) == {"t1"}


class _FakeRoles:
    def __init__(self) -> None:
        self.active = True

    def epoch(self, resource: str) -> int | None:
        return 3 if self.active else None


class _Result:
    def __init__(self, accepted: bool, reason: str = "") -> None:
        self.accepted, self.reason = accepted, reason


class _LoopbackLog:
    """A replicated log whose standby is in this process: append -> the standby's apply.
    The replication protocol itself is tested in test_topology_replication / _sites."""

    resource = "deribit"

    def __init__(self, standby: JournalShipper) -> None:
        self.roles = _FakeRoles()
        self.standby = standby
        self.seq = 0

    def append(self, stream: str, record: Any) -> _Result:
        if not self.roles.active:
            return _Result(False, "not_active")
        self.seq += 1
        self.standby.apply(stream, self.seq, record)
        return _Result(True)

    def status(self) -> dict[str, Any]:
        return {}


def test_shipper_when_active_then_snapshot_then_tail_reach_the_standby_store(
        tmp_path: Path) -> None:
    src, dst = open_store(f"sqlite://{tmp_path / 'tokyo'}"), open_store(
        f"sqlite://{tmp_path / 'london'}")
    stream = "bastion/site-tokyo/deribit"
    epoch = src.next_epoch(stream)
    src.append(stream, [msgpack.packb(intent(f"e1.a.{i}")) for i in range(1, 4)], epoch=epoch)
    src.put_snapshot(stream, 3, msgpack.packb(apply_all(Ledger(), [
        intent(f"e1.a.{i}") for i in range(1, 4)]).snapshot()), epoch=epoch)
    src.append(stream, [msgpack.packb(fill("t1", "e1.a.3"))], epoch=epoch)
    standby = JournalShipper(dst, {}, replica_prefix="replica/deribit")
    active = JournalShipper(src, {"deribit": stream}, replica_prefix="replica/deribit")
    rlog = _LoopbackLog(standby)
    active.attach(rlog)
    assert active.poll() == 2  # the snapshot covering 1..3, then record 4
    assert active.poll() == 0
    src.append(stream, [msgpack.packb(fill("t2", "e1.a.2"))], epoch=epoch)
    rlog.roles.active = False
    assert active.poll() == 0  # standby now: nothing shipped
    rlog.roles.active = True
    assert active.poll() == 1
    replica = [msgpack.unpackb(r.payload, raw=False) for r in dst.read(
        replica_stream("replica/deribit", "deribit"))]
    assert [("snap" in b, b.get("src")) for b in replica] == [(True, None), (False, 4),
                                                              (False, 5)]
    ledger = Ledger()
    apply_all(ledger, import_replica(ledger, replica).events)
    assert set(ledger.fills) == {"t1", "t2"} and len(ledger.orders) == 3
    assert standby.status()["counters"]["applied"] == 3
    assert standby.status()["apply_lag_s"]["n"] == 3
