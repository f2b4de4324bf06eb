"""The VenueConnector against a real simulator process, under a real supervision tree: orders,
reconciliation, SIGKILL at random moments in a stream of fills, a venue outage."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
import ray

from actors.venue.process import VenueProcess
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until

KEYS = {"bastion-test": "s3cret-not-for-production"}
INSTRUMENT = "BTC-PERPETUAL"


@pytest.fixture
def venue(tmp_path) -> Iterator[VenueProcess]:
    with VenueProcess.start("deribit", seed=7, keys=KEYS, speedup=60.0) as proc:
        yield proc


def rpc(venue: VenueProcess, method: str, params: dict | None = None) -> object:
    """One authenticated JSON-RPC call over HTTP (Basic auth, as Deribit accepts)."""
    import base64

    (cid, secret), = KEYS.items()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                       "params": params or {}}).encode()
    req = urllib.request.Request(f"{venue.http_url}/api/v2/{method}", data=body, method="POST",
                                 headers={"Content-Type": "application/json",
                                          "Authorization": "Basic " + base64.b64encode(
                                              f"{cid}:{secret}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply = json.loads(resp.read())
    assert "error" not in reply, reply
    return reply["result"]


def venue_position(venue: VenueProcess) -> float:
    pos = rpc(venue, "private/get_position", {"instrument_name": INSTRUMENT})
    size = pos["size"]
    return float(size)


def connector_tree(venue: VenueProcess, subscribers: list[str] | None = None,
                   with_book: bool = False) -> SupervisorSpec:
    (cid, secret), = KEYS.items()
    children: list = []
    if with_book:
        children.append(ChildSpec(id="book", cls="actors.risk_book:RiskBook",
                                  kwargs={"book_id": "main", "instruments": [INSTRUMENT]},
                                  backoff=Backoff(initial_s=0.0)))
    children.append(ChildSpec(
        id="deribit", cls="actors.connector:VenueConnector",
        kwargs={"venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                "client_secret": secret, "instruments": [INSTRUMENT],
                "subscribers": subscribers or []},
        backoff=Backoff(initial_s=0.0)))
    return SupervisorSpec(id="root", intensity=100, period_s=60, children=children)


def running(tree) -> bool:
    return ray.get(tree.actor("root/deribit", 5).state.remote(), timeout=5) == "RUNNING"


def test_connector_when_orders_sent_then_fills_match_venue_and_flow_to_risk_book(
        venue, namespace, store_url, trees) -> None:
    tree = start_tree(connector_tree(venue, ["root/book"], with_book=True),
                      namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    conn = tree.actor("root/deribit")
    bad = ray.get(conn.submit.remote({"instrument": INSTRUMENT, "direction": "buy",
                                      "amount": float("nan"), "type": "market"}), timeout=30)
    assert bad["status"] == "refused" and "amount" in bad["reason"]
    for direction, amount in [("buy", 30), ("buy", 20), ("sell", 10)]:
        out = ray.get(conn.submit.remote({"instrument": INSTRUMENT, "direction": direction,
                                          "amount": amount, "type": "market"}), timeout=30)
        assert out["status"] == "accepted", out
    assert ray.get(conn.positions.remote(), timeout=10) == {INSTRUMENT: 40.0}
    assert venue_position(venue) == 40.0

    def book_size() -> float | None:
        rows = ray.get(tree.actor("root/book").positions.remote(), timeout=10)
        return next((r["size"] for r in rows if r["instrument"] == INSTRUMENT), None)

    wait_until(lambda: book_size() == 40.0, 20, "risk book position from published fills")


@pytest.mark.slow
def test_connector_when_sigkilled_20_times_in_a_stream_of_fills_then_positions_exact(
        venue, namespace, store_url, trees) -> None:
    tree = start_tree(connector_tree(venue), namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    stop = threading.Event()
    outcomes: list[str] = []

    def flow() -> None:  # a steady stream of crossing orders (fills) from a client
        rng = random.Random(1)
        while not stop.is_set():
            order = {"instrument": INSTRUMENT, "direction": rng.choice(["buy", "sell"]),
                     "amount": float(rng.randint(1, 5) * 10), "type": "market"}
            try:
                conn = tree.actor("root/deribit", 10)
                outcomes.append(ray.get(conn.submit.remote(order, 5.0), timeout=15)["status"])
            except Exception:  # noqa: BLE001 - the connector died under this call
                outcomes.append("died")

    thread = threading.Thread(target=flow, daemon=True)
    thread.start()
    rng = random.Random(42)
    kills = 0
    try:
        while kills < 20:
            wait_until(lambda: running(tree), 60, "connector back to RUNNING")
            time.sleep(rng.uniform(0.05, 0.4))  # a random moment in the stream
            os.kill(tree.child("root/deribit").pid, signal.SIGKILL)
            kills += 1
    finally:
        stop.set()
        thread.join(30)
    wait_until(lambda: running(tree), 60, "connector RUNNING after the last kill")
    conn = tree.actor("root/deribit")
    status = ray.get(conn.status.remote(), timeout=10)
    ours = ray.get(conn.positions.remote(), timeout=10).get(INSTRUMENT, 0.0)
    theirs = venue_position(venue)
    assert ours == theirs, (ours, theirs, status)
    assert outcomes.count("accepted") > 20
    engine = rpc(venue, "public/simulator/status")["engine"]
    labels = ray.get(conn.labels.remote(), timeout=10)
    assert engine["duplicate_labels"] == 0  # no order was ever sent twice
    assert engine["orders_created"] <= len(labels)  # every venue order is one of our labels
    assert tree.child("root/deribit").restarts == 20


def test_connector_when_subscriber_slow_and_feed_surges_then_conflates_and_counts(
        namespace, store_url, trees) -> None:
    """Market data at 600x (a crisis hour in six seconds) into a subscriber that takes 0.3 s
    per batch: nothing queues up — batches are conflated to the latest book, counted, and the
    subscriber keeps receiving fresh marks."""
    (cid, secret), = KEYS.items()
    with VenueProcess.start("surge", seed=3, keys=KEYS, speedup=600.0) as fast:
        spec = SupervisorSpec(id="root", children=[
            ChildSpec(id="slow", cls="actors.recorder:MarkRecorder", kwargs={"delay_s": 0.3}),
            ChildSpec(id="deribit", cls="actors.connector:VenueConnector",
                      kwargs={"venue": "surge", "ws_url": fast.ws_url, "client_id": cid,
                              "client_secret": secret,
                              "instruments": [INSTRUMENT, "ETH-PERPETUAL"],
                              "subscribers": ["root/slow"], "publish_interval_s": 0.02}),
        ])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        wait_until(lambda: running(tree), 60, "connector RUNNING")
        conn = tree.actor("root/deribit")
        status = wait_until(lambda: (s := ray.get(conn.status.remote(), timeout=10))
                            ["counters"].get("publish_conflated", 0) >= 150 and s, 60,
                            "conflation under a slow subscriber")
        updates = sum(v for k, v in status["counters"].items() if k.startswith("book_"))
        stats = ray.get(tree.actor("root/slow").stats.remote(), timeout=30)
        # Far fewer batches reached the slow consumer than book updates arrived: conflated.
        assert stats["batches"] < updates / 2 and stats["batches"] >= 3
        assert stats["max_batch_rows"] <= 2  # one row per instrument: the latest book only
        assert set(stats["latest"]) <= {INSTRUMENT, "ETH-PERPETUAL"}
        assert stats["max_gap_s"] < 5.0  # it still gets fresh marks, never starves


def test_connector_when_venue_outage_then_degraded_cancel_only_and_recovers(
        venue, namespace, store_url, trees) -> None:
    tree = start_tree(connector_tree(venue), namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    conn = tree.actor("root/deribit")
    order = {"instrument": INSTRUMENT, "direction": "buy", "amount": 10, "type": "market"}
    rpc(venue, "private/simulator/set_faults", {"outage": True})
    answers = [ray.get(conn.submit.remote(order, 0.5), timeout=30) for _ in range(4)]
    assert [a["status"] for a in answers[:3]] == ["rejected"] * 3
    assert answers[3]["status"] == "refused" and "DEGRADED" in answers[3]["reason"]
    assert ray.get(conn.state.remote(), timeout=10) == "DEGRADED"
    rpc(venue, "private/simulator/set_faults", {"outage": False})
    wait_until(lambda: running(tree), 30, "RUNNING again after the outage")
    assert ray.get(conn.submit.remote(order), timeout=30)["status"] == "accepted"
    assert ray.get(conn.positions.remote(), timeout=10) == {INSTRUMENT: venue_position(venue)}


def test_connector_when_book_messages_dropped_then_gap_detected_and_resynced(
        venue, namespace, store_url, trees) -> None:
    tree = start_tree(connector_tree(venue), namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    rpc(venue, "private/simulator/set_faults", {"md_drop_probability": 0.3})
    conn = tree.actor("root/deribit")
    counters = wait_until(lambda: (c := ray.get(conn.status.remote(), timeout=10)["counters"])
                          .get("resyncs", 0) >= 2 and c, 60, "gaps resynced")
    assert counters["book_gap"] >= 2
    rpc(venue, "private/simulator/set_faults", {"md_drop_probability": 0.0})
    before = counters.get("book_snapshot", 0)
    wait_until(lambda: ray.get(conn.status.remote(), timeout=10)["counters"]
               .get("book_snapshot", 0) >= before and running(tree), 30, "still RUNNING")


def test_connector_when_venue_process_restarts_then_reconnects_and_reconciles(
        namespace, store_url, trees) -> None:
    first = VenueProcess.start("restarting", seed=9, keys=KEYS, speedup=60.0)
    port = first.port
    try:
        tree = start_tree(connector_tree(first), namespace=namespace, store_url=store_url)
        trees.append(tree)
        wait_until(lambda: running(tree), 60, "connector RUNNING")
        first.stop()  # the venue goes away: the connection drops
        wait_until(lambda: not running(tree), 30, "connector notices the disconnect")
        second = VenueProcess.start("restarting", port=port, seed=9, keys=KEYS, speedup=60.0)
        try:
            wait_until(lambda: running(tree), 60, "reconnected and reconciled")
            status = ray.get(tree.actor("root/deribit").status.remote(), timeout=10)
            moves = [(a, b) for _, a, b, _ in status["transitions"]]
            assert ("RUNNING", "STARTING") in moves and moves[-1] == ("RECONCILING", "RUNNING")
            assert status["counters"].get("connect_errors", 0) >= 1
            out = ray.get(tree.actor("root/deribit").submit.remote(
                {"instrument": INSTRUMENT, "direction": "sell", "amount": 10,
                 "type": "market"}), timeout=30)
            assert out["status"] == "accepted"
        finally:
            second.stop()
    finally:
        first.stop()


def test_risk_book_when_sigkilled_while_fills_flow_then_catches_up_from_redelivery(
        venue, namespace, store_url, trees) -> None:
    """Fills published to a risk book that dies before taking them are delivered again (at
    least once; the book dedups by trade_id), without the connector restarting."""
    tree = start_tree(connector_tree(venue, ["root/book"], with_book=True),
                      namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    conn = tree.actor("root/deribit")
    order = {"instrument": INSTRUMENT, "direction": "buy", "amount": 10, "type": "market"}
    refs = [conn.submit.remote(order) for _ in range(30)]
    ray.wait(refs, num_returns=10, timeout=60)
    os.kill(tree.child("root/book").pid, signal.SIGKILL)
    assert all(r["status"] == "accepted" for r in ray.get(refs, timeout=60))
    conn_pid = tree.child("root/deribit").pid

    def book_size() -> float | None:
        rows = ray.get(tree.actor("root/book", 10).positions.remote(), timeout=10)
        return next((r["size"] for r in rows if r["instrument"] == INSTRUMENT), None)

    wait_until(lambda: book_size() == 300.0, 30, "risk book caught up to 30 fills")
    assert venue_position(venue) == 300.0
    assert tree.child("root/deribit").pid == conn_pid  # no connector restart was needed


def test_connector_when_marks_subscriber_restarts_then_marks_reach_the_new_one_without_fills(
        venue, namespace, store_url, trees) -> None:
    """A subscriber SIGKILLed and restarted under its name is a new actor: the connector drops
    the stale handle when its marks call fails and finds the new one (no fill needed)."""
    (cid, secret), = KEYS.items()
    spec = SupervisorSpec(id="root", children=[
        ChildSpec(id="rec", cls="actors.recorder:MarkRecorder", backoff=Backoff(initial_s=0.0)),
        ChildSpec(id="deribit", cls="actors.connector:VenueConnector",
                  kwargs={"venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                          "client_secret": secret, "instruments": [INSTRUMENT],
                          "subscribers": ["root/rec"], "publish_interval_s": 0.02})])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    wait_until(lambda: running(tree), 60, "connector RUNNING")
    wait_until(lambda: ray.get(tree.actor("root/rec").stats.remote(), timeout=10)["batches"]
               > 0, 30, "marks before the kill")
    old_pid = tree.child("root/rec").pid
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: (c := tree.child("root/rec")).status == "running" and c.pid != old_pid,
               30, "recorder restarted")
    wait_until(lambda: ray.get(tree.actor("root/rec").stats.remote(), timeout=10)["batches"]
               > 3, 30, "marks reach the restarted recorder")
    status = ray.get(tree.actor("root/deribit").status.remote(), timeout=10)
    assert status["counters"].get("marks_subscriber_lost", 0) >= 1
    assert status["fills"] == 0  # no fill was needed to find it again
