"""The run history and the invariant checker (``cluster.history``, ``cluster.checker``,
``cluster.history_sources``, ``bastion check``).

A clean history passes every check; each planted violation is caught by the check it belongs
to and located (history line, keys). The collectors are fed real sources: the venue engine's
order log, a SQLite journal with a deleted and a corrupted record, and a real venue simulator
process taking orders over its HTTP API (one of them resent, and then one label reused)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from actors.connector_core import Ledger, fill_event
from actors.venue.clock import ManualClock
from actors.venue.engine import VenueConfig, VenueEngine
from actors.venue.instruments import default_instruments
from actors.venue.process import VenueProcess
from cluster import cli
from cluster.checker import Verdict, check
from cluster.history import History, HistoryError, HistoryWriter, load_history
from cluster.history_sources import (
    collect_connector,
    collect_journal,
    collect_role_log,
    collect_roles,
    collect_tree,
    collect_venue,
    venue_rpc,
)
from supervisors.journal import open_store
from tests.conftest import wait_until

VENUE, ACCOUNT, BTC = "deribit", "alice", "BTC-PERPETUAL"
TOKYO_1 = "e1.site-tokyo-deribit.1"
LONDON_1 = "e2.site-london-deribit.1"


def order(label: str, ts: float, outcome: str = "created", **extra: Any) -> dict[str, Any]:
    base = {"t": "venue_order", "ts": ts, "venue": VENUE, "account": ACCOUNT, "label": label,
            "outcome": outcome, "instrument": BTC, "direction": "buy", "amount": 10.0,
            "price": 50_000.0, "type": "limit"}
    return {**base, **extra}


def fill(source: str, trade_id: str, amount: float, ts: float, label: str) -> dict[str, Any]:
    return {"t": "fill", "ts": ts, "source": source, "venue": VENUE, "account": ACCOUNT,
            "trade_id": trade_id, "instrument": BTC, "amount": amount, "label": label}


def clean_events() -> list[dict[str, Any]]:
    """Tokyo holds the venue's lease (epoch 1) for 100..110 s, London (epoch 2) from 110 s,
    renewed to 120 s; one order each, a resend, a fenced late Tokyo order, two fills agreed by
    the venue, the connector and the risk book; a kill recovered in 1.5 s; a full journal."""
    return [
        {"t": "role", "ts": 100.0, "site": "tokyo", "resource": VENUE, "epoch": 1,
         "state": "active"},
        {"t": "lease", "ts": 100.0, "site": "tokyo", "resource": VENUE, "epoch": 1,
         "valid_until_ts": 110.5},
        {"t": "order_sent", "ts": 101.0, "venue": VENUE, "label": TOKYO_1, "site": "tokyo"},
        order(TOKYO_1, 101.0),
        fill("venue", "BTC-1", 10.0, 101.0, TOKYO_1),
        fill("connector", "BTC-1", 10.0, 101.0, TOKYO_1),
        {"t": "fault", "ts": 105.0, "id": "kill-1", "kind": "kill",
         "target": "site-tokyo/deribit", "bound_s": 5.0},
        {"t": "restart", "ts": 106.5, "child": "site-tokyo/deribit", "incarnation": 2},
        {"t": "role", "ts": 110.0, "site": "tokyo", "resource": VENUE, "epoch": 1,
         "state": "standby"},
        {"t": "role", "ts": 110.0, "site": "london", "resource": VENUE, "epoch": 2,
         "state": "active"},
        {"t": "lease", "ts": 110.0, "site": "london", "resource": VENUE, "epoch": 2,
         "valid_until_ts": 115.0},
        {"t": "order_sent", "ts": 111.0, "venue": VENUE, "label": LONDON_1, "site": "london"},
        order(LONDON_1, 111.0, direction="sell", amount=30.0),
        fill("venue", "BTC-2", -30.0, 111.0, LONDON_1),
        fill("connector", "BTC-2", -30.0, 111.0, LONDON_1),
        order("e1.site-tokyo-deribit.2", 111.5, "rejected", reason="fenced_epoch"),
        order(LONDON_1, 112.0, "duplicate", direction="sell", amount=30.0),
        {"t": "lease", "ts": 114.0, "site": "london", "resource": VENUE, "epoch": 2,
         "valid_until_ts": 120.0},
        {"t": "limit_change", "ts": 115.0, "who": "ops", "why": "widen for the open",
         "old": {"max_position": 10}, "new": {"max_position": 20}},
        {"t": "journal", "ts": 119.0, "stream": "actor/site-tokyo/deribit", "venue": VENUE,
         "account": ACCOUNT, "last_seq": 6, "ranges": [[1, 6]], "compacted_upto": 0},
        {"t": "position", "ts": 119.0, "source": "venue", "venue": VENUE, "account": ACCOUNT,
         "instrument": BTC, "value": -20.0},
        {"t": "position", "ts": 119.0, "source": "connector", "venue": VENUE,
         "account": ACCOUNT, "instrument": BTC, "value": -20.0},
        {"t": "position", "ts": 119.0, "source": "risk_book", "venue": VENUE, "account": "*",
         "instrument": BTC, "value": -20.0},
    ]


def write(path: Path, events: list[dict[str, Any]], raw_lines: tuple[str, ...] = ()) -> Path:
    with HistoryWriter(path) as w:
        w.extend(events)
    if raw_lines:
        with open(path, "a") as f:
            f.writelines(line + "\n" for line in raw_lines)
    return path


def judge(tmp_path: Path, events: list[dict[str, Any]],
          raw_lines: tuple[str, ...] = ()) -> Verdict:
    return check(load_history(write(tmp_path / "history.jsonl", events, raw_lines)))


def only_failure(verdict: Verdict, name: str, code: str) -> dict[str, Any]:
    """Assert ``name`` is the one failed check, ``code`` its violation; the first one's place."""
    assert verdict.failed == [name], verdict.to_dict()
    result = verdict.check(name)
    assert result.counts[code] == result.violation_count >= 1, result
    return result.violations[0].where


# --- a clean run -----------------------------------------------------------------------------
def test_check_when_history_clean_then_every_check_passes_with_counts(tmp_path: Path) -> None:
    verdict = judge(tmp_path, clean_events())
    assert verdict.passed, verdict.to_dict()
    assert [c.name for c in verdict.checks] == [
        "history", "positions", "unique_labels", "lease", "recovery", "journal"]
    assert verdict.check("positions").counts["compared"] == 3
    labels = verdict.check("unique_labels").counts
    assert (labels["resends"], labels["rejected"], labels["venue_labels"]) == (1, 1, 2)
    lease = verdict.check("lease").counts
    assert (lease["checked"], lease["fenced"], lease["overlap_s"]) == (2, 1, 0.0)
    assert verdict.check("recovery").counts["p50_s"] == pytest.approx(1.5)
    assert verdict.check("journal").counts["venue_fills"] == 2


# --- planted violations, one per check -------------------------------------------------------
def test_positions_when_connector_off_by_one_lot_then_mismatch_located(tmp_path: Path) -> None:
    events = clean_events()
    events[-2]["value"] = -10.0  # the connector's claim, one 10 USD lot short
    where = only_failure(judge(tmp_path, events), "positions", "position_mismatch")
    assert where == {"source": "connector", "venue": VENUE, "account": ACCOUNT,
                     "instrument": BTC, "value": -10.0, "expected": -20.0,
                     "line": len(events) - 1}


def test_positions_when_risk_book_misses_an_instrument_then_counted_as_zero(
        tmp_path: Path) -> None:
    events = [e for e in clean_events() if e.get("source") != "risk_book"]
    events.append({"t": "position", "ts": 119.0, "source": "risk_book", "venue": VENUE,
                   "account": "*", "instrument": "ETH-PERPETUAL", "value": 0.0})
    where = only_failure(judge(tmp_path, events), "positions", "position_mismatch")
    assert (where["source"], where["instrument"], where["value"]) == ("risk_book", BTC, 0.0)


def test_unique_labels_when_label_reused_for_another_order_then_located(
        tmp_path: Path) -> None:
    events = clean_events()
    events.append(order(LONDON_1, 113.0, "duplicate", direction="buy", amount=10.0))
    where = only_failure(judge(tmp_path, events), "unique_labels", "label_reused")
    assert (where["label"], where["line"], where["first_line"]) == (LONDON_1, len(events), 13)


def test_unique_labels_when_intent_journaled_twice_then_minted_twice(tmp_path: Path) -> None:
    events = clean_events()
    events.append({"t": "order_sent", "ts": 116.0, "venue": VENUE, "label": TOKYO_1})
    where = only_failure(judge(tmp_path, events), "unique_labels", "minted_twice")
    assert (where["label"], where["line"], where["first_line"]) == (TOKYO_1, len(events), 3)


def test_lease_when_order_sent_from_site_outside_its_lease_then_located(
        tmp_path: Path) -> None:
    events = clean_events()
    events.append(order("e1.site-tokyo-deribit.3", 112.0))  # accepted: tokyo stood down at 110
    verdict = judge(tmp_path, events)
    where = only_failure(verdict, "lease", "outside_lease")
    assert (where["site"], where["epoch"], where["ts"], where["line"]) == (
        "tokyo", 1, 112.0, len(events))
    assert "ended 2.000 s before" in verdict.check("lease").violations[0].detail


def test_lease_when_order_after_last_renewal_expired_then_outside_lease(
        tmp_path: Path) -> None:
    events = clean_events()  # london's open interval is capped at its renewal's 120 s
    events.append(order("e2.site-london-deribit.9", 121.0))
    where = only_failure(judge(tmp_path, events), "lease", "outside_lease")
    assert (where["site"], where["ts"]) == ("london", 121.0)


def test_lease_when_order_carries_an_older_epoch_of_the_active_site_then_stale_epoch(
        tmp_path: Path) -> None:
    events = clean_events()
    events.append(order("e1.site-london-deribit.5", 112.0))
    where = only_failure(judge(tmp_path, events), "lease", "stale_epoch")
    assert (where["site"], where["epoch"]) == ("london", 1)


def test_lease_when_two_sites_active_overlap_half_a_second_then_overlap_reported(
        tmp_path: Path) -> None:
    events = clean_events()
    tokyo_down = next(e for e in events if e["t"] == "role" and e["state"] == "standby")
    tokyo_down["ts"] = 110.5
    verdict = judge(tmp_path, events)
    where = only_failure(verdict, "lease", "overlap")
    assert where["sites"] == ["tokyo", "london"]
    assert where["overlap_s"] == pytest.approx(0.5)
    assert verdict.check("lease").counts["overlap_s"] == pytest.approx(0.5)


@pytest.mark.parametrize(("recovery", "code"), [(None, "not_recovered"),
                                                (111.0, "recovered_late")])
def test_recovery_when_fault_unrecovered_or_late_then_named(
        tmp_path: Path, recovery: float | None, code: str) -> None:
    events = [e for e in clean_events() if e["t"] != "restart"]
    if recovery is not None:
        events.append({"t": "recovered", "ts": recovery, "fault_id": "kill-1"})
    verdict = judge(tmp_path, events)
    where = only_failure(verdict, "recovery", code)
    assert (where["fault"], where["line"]) == ("kill-1", 7)
    if recovery is not None:
        assert where["took_s"] == pytest.approx(6.0)
        assert verdict.check("recovery").counts["max_s"] == pytest.approx(6.0)


def test_journal_when_venue_fill_missing_from_journal_then_located(tmp_path: Path) -> None:
    events = [e for e in clean_events()
              if not (e["t"] == "fill" and e["source"] == "connector" and
                      e["trade_id"] == "BTC-2")]
    where = only_failure(judge(tmp_path, events), "journal", "fill_not_journaled")
    assert (where["trade_id"], where["label"]) == ("BTC-2", LONDON_1)


def test_journal_when_seq_gap_then_missing_run_located(tmp_path: Path) -> None:
    events = clean_events()
    journal = next(e for e in events if e["t"] == "journal")
    journal["ranges"] = [[1, 2], [5, 6]]
    where = only_failure(judge(tmp_path, events), "journal", "seq_gap")
    assert where["missing"] == [3, 4]


def test_journal_when_limit_change_without_why_then_audit_incomplete(tmp_path: Path) -> None:
    events = clean_events()
    next(e for e in events if e["t"] == "limit_change")["why"] = " "
    only_failure(judge(tmp_path, events), "journal", "audit_incomplete")


def test_history_when_lines_malformed_then_each_reported_by_line_number(
        tmp_path: Path) -> None:
    events = clean_events()
    n = len(events)
    verdict = judge(tmp_path, events, ('{"t": "fill", "ts": 1', '["a list"]',
                                       '{"t": "teleport", "ts": 1}',
                                       '{"t": "fault", "ts": 1, "id": "x", "kind": "kill"}'))
    only_failure(verdict, "history", "malformed")
    bad = verdict.check("history")
    assert [v.where["line"] for v in bad.violations] == [n + 1, n + 2, n + 3, n + 4]
    assert "target" in bad.violations[3].detail  # names the missing field
    assert bad.counts["events"] == n


# --- the command line ------------------------------------------------------------------------
def test_cli_check_when_violation_then_exit_1_and_violation_named(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clean = write(tmp_path / "clean.jsonl", clean_events())
    assert cli.main(["check", str(clean)]) == 0
    assert "PASS" in capsys.readouterr().out
    events = clean_events()
    events.append(order("e1.site-tokyo-deribit.3", 112.0))
    bad = write(tmp_path / "bad.jsonl", events)
    assert cli.main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "FAIL" in out and "outside_lease" in out
    assert cli.main(["check", str(bad), "--json"]) == 1
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["failed"] == ["lease"] and not verdict["passed"]
    assert cli.main(["check", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


# --- the writer --------------------------------------------------------------------------------
def test_history_writer_when_threads_append_then_every_line_is_one_valid_event(
        tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    with HistoryWriter(path, flush_every=7) as w:
        def work(site: str) -> None:
            for i in range(200):
                w.append("order_sent", venue=VENUE, label=f"{site}.{i}", site=site)
        threads = [threading.Thread(target=work, args=(s,)) for s in ("a", "b", "c", "d")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        fault_id = w.fault("kill", "site-a/deribit", bound_s=2.0)
        w.recovered(fault_id)
        with pytest.raises(HistoryError, match="bound_s"):
            w.fault("kill", "x", bound_s=float("nan"))
    history = load_history(path)
    assert (len(history.events), history.malformed) == (802, [])
    assert check(history).passed


# --- collectors over real sources ------------------------------------------------------------
def test_order_log_when_created_resent_rejected_then_each_logged_and_paged() -> None:
    clock = ManualClock(1_700_000_000.0)
    engine = VenueEngine(VenueConfig(default_instruments(clock.now_s())), clock,
                         order_log_max=3)
    engine.buy(ACCOUNT, BTC, 10, price=100.0, label="e2.a.1")
    clock.advance(1.0)
    engine.buy(ACCOUNT, BTC, 10, price=100.0, label="e2.a.1")           # resend
    engine.buy(ACCOUNT, BTC, 10, price=100.0, label="e1.a.2")           # fenced
    engine.sell(ACCOUNT, BTC, 7, price=100.0, label="e2.a.3")           # bad amount
    entries, last = engine.order_log(ACCOUNT)
    assert last == 4 and [e.seq for e in entries] == [2, 3, 4]  # the oldest fell out
    assert [(e.outcome, e.reason) for e in entries] == [
        ("duplicate", None), ("rejected", "fenced_epoch"), ("rejected", entries[2].reason)]
    assert entries[2].reason and entries[0].ts_s == clock.now_s()
    assert [e.seq for e in engine.order_log(ACCOUNT, after_seq=2, count=1)[0]] == [3]
    assert engine.order_log("nobody") == ([], 0)


def _ledger_stream(store: Any, stream: str, n_fills: int) -> None:
    events = []
    for i in range(1, n_fills + 1):
        events += [{"t": "intent", "label": f"c.{2 * i - 1}", "instrument": BTC,
                    "direction": "buy", "amount": 10.0, "price": 1.0, "type": "limit"},
                   {"t": "fill", "trade_id": f"T{i}", "trade_seq": i, "instrument": BTC,
                    "direction": "buy", "amount": 10.0, "price": 1.0, "fee": 0.0,
                    "order_id": f"o{i}", "label": f"c.{2 * i - 1}", "ts_ms": 1000 * i}]
    store.claim(stream, 1)
    store.append(stream, [msgpack.packb(e) for e in events], epoch=1)


def test_collect_journal_when_record_deleted_and_one_corrupted_then_gap_and_corrupt(
        tmp_path: Path) -> None:
    store = open_store(f"sqlite://{tmp_path / 'journal'}")
    stream = "actor/site-tokyo/deribit"
    _ledger_stream(store, stream, n_fills=5)  # seqs 1..10
    with sqlite3.connect(store.stream_path(stream)) as db:
        db.execute("DELETE FROM records WHERE seq IN (4, 5)")
        db.execute("UPDATE records SET entry = CAST(entry || x'00' AS BLOB) WHERE seq = 8")
    events = collect_journal(store, stream, venue=VENUE, account=ACCOUNT)
    journal = events[-1]
    assert journal["ranges"] == [[1, 3], [6, 7], [9, 10]] and journal["corrupt"] == [8]
    assert sorted(e["trade_id"] for e in events if e["t"] == "fill") == ["T1", "T3", "T5"]
    verdict = check(History.from_events(events))
    assert verdict.failed == ["journal"]
    counts = verdict.check("journal").counts
    assert (counts["seq_gap"], counts["corrupt_record"]) == (1, 1)
    store.close()


def test_collect_tree_when_child_restarts_elsewhere_then_restart_and_migration() -> None:
    before = {"children": [{"actor_name": "root/deribit", "incarnation": 1, "node_id": "n1",
                            "restarts": 0, "started_at": 10.0},
                           {"actor_name": "root/sub", "incarnation": 1, "node_id": "n1",
                            "restarts": 0, "tree": {"children": [
                                {"actor_name": "root/sub/risk", "incarnation": 1,
                                 "node_id": "n2", "restarts": 0}]}}]}
    after = json.loads(json.dumps(before))
    after["children"][0].update(incarnation=2, node_id="n3", restarts=1, started_at=12.0,
                                last_failure="node died")
    after["children"][1]["tree"]["children"][0].update(incarnation=2, restarts=1,
                                                       started_at=13.0)
    events = collect_tree(after, before)
    assert [(e["t"], e["child"], e["ts"]) for e in events] == [
        ("restart", "root/deribit", 12.0), ("migration", "root/deribit", 12.0),
        ("restart", "root/sub/risk", 13.0)]
    assert events[1]["from_node"] == "n1" and events[1]["to_node"] == "n3"
    assert [e["child"] for e in collect_tree(after)] == ["root/deribit", "root/sub/risk"]


def test_collect_roles_when_role_log_and_status_then_intervals_the_checker_uses() -> None:
    role_log = [
        {"kind": "activate", "resource": VENUE, "epoch": 3, "sent_wall_s": 50.0,
         "valid_for_s": 2.0, "site": "tokyo", "reason": ""},
        {"kind": "renew", "resource": VENUE, "epoch": 3, "sent_wall_s": 51.0,
         "valid_for_s": 2.0, "site": "tokyo", "reason": ""},
        {"kind": "deactivate", "resource": VENUE, "epoch": 3, "sent_wall_s": 54.0,
         "site": "tokyo", "reason": "fenced"}]
    events = collect_role_log(role_log)
    assert [(e["t"], e.get("state"), e.get("valid_until_ts")) for e in events] == [
        ("role", "active", None), ("lease", None, 52.0), ("lease", None, 53.0),
        ("role", "standby", None)]
    late = order("e3.site-tokyo-deribit.4", 53.5)  # after the window, before the deactivate
    verdict = check(History.from_events([*events, late]))
    assert verdict.check("lease").counts.get("outside_lease") == 1
    status = {"site": "london", "resources": {VENUE: {"changes": [
        {"ts_s": 5.0, "from": "CANDIDATE", "to": "ACTIVE", "epoch": 4, "reason": "won"},
        {"ts_s": 9.0, "from": "ACTIVE", "to": "DRAINING", "epoch": 4, "reason": "fenced"}]}}}
    assert [(e["ts"], e["state"], e["epoch"]) for e in
            collect_roles(status, wall_minus_clock_s=100.0)] == [
        (105.0, "active", 4), (109.0, "standby", 4)]


# --- a real venue simulator --------------------------------------------------------------------
@pytest.fixture
def venue() -> Iterator[VenueProcess]:
    with VenueProcess.start(VENUE, keys={ACCOUNT: "alice-secret-0001"}, seed=3,
                            speedup=120.0) as proc:
        yield proc


def test_check_when_real_venue_took_orders_with_a_resend_then_passes_and_reuse_caught(
        tmp_path: Path, venue: VenueProcess) -> None:
    rpc = venue_rpc(venue.http_url, ACCOUNT, venue.keys[ACCOUNT])
    ticker = wait_until(lambda: (t := rpc("public/ticker", {"instrument_name": BTC}))
                        ["best_ask_price"] and t, 20.0, "BTC quotes")
    path = tmp_path / "history.jsonl"
    writer = HistoryWriter(path)
    writer.append("role", site="tokyo", resource=VENUE, epoch=1, state="active")
    store = open_store(f"sqlite://{tmp_path / 'journal'}")
    stream = "actor/site-tokyo/deribit"
    store.claim(stream, 1)
    ledger = Ledger()

    def journal(*events: dict[str, Any]) -> None:  # what the connector journals, in order
        store.append(stream, [msgpack.packb(e) for e in events], epoch=1)
        for e in events:
            ledger.apply(e)

    def send(seq: int, direction: str, amount: float, price: float | None = None,
             resend: bool = False) -> dict[str, Any]:
        label = f"e1.site-tokyo-deribit.{seq}"
        params: dict[str, Any] = {"instrument_name": BTC, "amount": amount, "label": label,
                                  "type": "market" if price is None else "limit"}
        if price is not None:
            params["price"] = price
        if not resend:
            journal({"t": "intent", "label": label, "instrument": BTC, "direction": direction,
                     "amount": amount, "price": price, "type": params["type"]})
        result = rpc(f"private/{direction}", params)
        if not resend:
            journal({"t": "ack", "label": label, "order_id": result["order"]["order_id"],
                     "state": result["order"]["order_state"]},
                    *[e for t in result["trades"] if (e := fill_event(t)) is not None])
        return result

    send(1, "buy", 30.0)                                            # fills at the ask
    rest = send(3, "buy", 10.0, price=float(int(ticker["best_bid_price"] * 0.8)))
    again = send(3, "buy", 10.0, price=rest["order"]["price"], resend=True)
    assert again["order"]["order_id"] == rest["order"]["order_id"]
    send(5, "sell", 10.0)
    rpc("private/cancel_all", {})
    writer.extend(collect_venue(rpc, VENUE, ACCOUNT, instruments=[BTC]))
    writer.extend(collect_journal(store, stream, venue=VENUE, account=ACCOUNT))
    writer.extend(collect_connector(ledger.position, venue=VENUE, account=ACCOUNT))
    writer.flush()
    verdict = check(load_history(path))
    assert verdict.passed, verdict.to_dict()
    assert verdict.check("unique_labels").counts["resends"] == 1
    assert verdict.check("positions").counts["compared"] == 2  # the venue's and the ledger's
    assert verdict.check("journal").counts["venue_fills"] >= 2
    assert verdict.check("lease").counts["checked"] == 3

    rpc("private/sell", {"instrument_name": BTC, "amount": 20.0, "type": "market",
                         "label": "e1.site-tokyo-deribit.1"})  # a reused label: not sold
    reused = tmp_path / "reused.jsonl"
    write(reused, collect_venue(rpc, VENUE, ACCOUNT, instruments=[BTC]))
    t0 = time.monotonic()
    code = cli.main(["check", str(reused), "--json"])
    assert code == 1 and time.monotonic() - t0 < 10.0
    writer.close()
    store.close()
    failed = check(load_history(reused))
    where = only_failure(failed, "unique_labels", "label_reused")
    assert where["label"] == "e1.site-tokyo-deribit.1"
