"""The RiskBook as a supervised Ray actor: after a SIGKILL it comes back with exactly the
positions its acknowledged fills imply, refused orders come back as data, and limit changes
and the trading state survive the restart."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import ray

from actors.limits import OrderAccepted, OrderDenied
from actors.risk import RiskState
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until

PERP, SPOT, CALL = "BTC-PERPETUAL", "BTC_USDC", "BTC-25DEC26-60000-C"
INSTRUMENTS = [PERP, SPOT, CALL, "ETH-PERPETUAL"]
T0_MS = 1_700_000_000_000
PATH = "root/risk"


def fills(first: int, n: int) -> list[dict]:
    """Fills ``T<first>`` ... over four instruments (opens, increases, reductions, flips);
    fill ``i`` is the same whichever batch it is in, so an overlap is a true replay."""
    out = []
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        inst = INSTRUMENTS[i % 4]
        amount = {PERP: 10.0 * rng.integers(1, 50), SPOT: round(float(rng.uniform(0.01, 1)), 4),
                  CALL: round(float(rng.uniform(0.1, 3)), 1),
                  "ETH-PERPETUAL": float(rng.integers(1, 500))}[inst]
        price = {PERP: 50_000 + 0.5 * rng.integers(-2000, 2000),
                 SPOT: 50_000 + float(rng.integers(-2000, 2000)),
                 CALL: round(float(rng.uniform(0.01, 0.08)), 4),
                 "ETH-PERPETUAL": 3_000 + 0.05 * rng.integers(-2000, 2000)}[inst]
        out.append({"trade_id": f"T{i}", "trade_seq": 1_000 + i, "instrument_name": inst,
                    "direction": "buy" if rng.random() < 0.55 else "sell", "amount": amount,
                    "price": float(price), "fee": round(float(rng.uniform(0, 1e-5)), 8),
                    "timestamp": T0_MS + i, "order_id": f"O{i}", "label": f"L{i}"})
    return out


def start_book(namespace: str, store_url: str, trees: list, **kwargs) -> object:
    spec = SupervisorSpec(id="root", intensity=5, children=[ChildSpec(
        id="risk", cls="actors.risk_book:RiskBook", backoff=Backoff(initial_s=0.0),
        kwargs={"book_id": "btc", "instruments": INSTRUMENTS, "snapshot_every": 7, **kwargs})])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    return tree


def kill_and_wait(tree: object) -> None:
    old = tree.child(PATH)
    os.kill(old.pid, signal.SIGKILL)
    wait_until(lambda: (c := tree.child(PATH)).status == "running" and c.pid != old.pid, 30,
               "the risk book restarted")


def test_risk_book_when_sigkilled_then_positions_equal_the_acknowledged_fills_exactly(
        namespace, store_url, trees) -> None:
    tree = start_book(namespace, store_url, trees)
    book = tree.actor(PATH)
    batches = [fills(1, 40), fills(41, 25), fills(55, 30)]  # the last replays 55..65
    acks = [ray.get(book.on_fills.remote(b), timeout=30) for b in batches]
    assert [a["applied"] for a in acks] == [40, 25, 19] and acks[2]["duplicates"] == 11
    assert all(not a["rejected"] for a in acks)
    expected = RiskState(INSTRUMENTS)
    for b in batches:
        expected.on_fills(b)
    before = ray.get(book.positions.remote(), timeout=30)
    kill_and_wait(tree)
    book = tree.actor(PATH)
    after = ray.get(book.positions.remote(), timeout=30)
    assert after == before
    for row in after:  # exactly the pure state fed the same fills: no float drift, no replay
        p = expected.positions[row["instrument"]]
        assert (row["size"], row["average_price"], row["realised_pnl"], row["fees"],
                row["trades"]) == (p.size, p.avg_price, p.realised, p.fees, p.trades)
    assert sum(r["trades"] for r in after) == 84
    recovery = ray.get(book.recovery.remote(), timeout=30)
    assert recovery["snapshot_seq"] > 0 and recovery["epoch"] == 2
    replay = ray.get(book.on_fills.remote(batches[0]), timeout=30)  # still deduplicated
    assert (replay["applied"], replay["duplicates"]) == (0, 40)


def test_risk_book_when_limits_bite_then_denials_are_data_and_changes_survive_restart(
        namespace, store_url, trees) -> None:
    tree = start_book(namespace, store_url, trees,
                      limits={"max_position_usd": 50_000.0, "max_orders_per_s": 100.0})
    book = tree.actor(PATH)
    ray.get(book.on_fills.remote([{
        "trade_id": "A1", "trade_seq": 1, "instrument_name": PERP, "direction": "buy",
        "amount": 30_000.0, "price": 50_000.0, "fee": 0.0, "timestamp": T0_MS,
        "order_id": "O1", "label": "L1"}]), timeout=30)
    batch = {"instrument": np.array([PERP, CALL]), "mark_price": np.array([50_100.0, 0.04]),
             "index_price": np.array([50_000.0, 50_000.0]), "iv": np.array([np.nan, 0.6])}
    assert ray.get(book.on_marks.remote(batch), timeout=30)["applied"] == 2
    order = {"instrument_name": PERP, "direction": "buy", "amount": 30_000.0, "label": "c1"}
    denied = ray.get(book.check_order.remote(order), timeout=30)
    assert isinstance(denied, OrderDenied) and not denied.ok
    assert (denied.reason, denied.limit, denied.value) == ("max_position_usd",
                                                           "max_position_usd", 60_000.0)
    accepted = ray.get(book.check_order.remote({**order, "amount": 10_000.0}), timeout=30)
    assert isinstance(accepted, OrderAccepted) and accepted.post_position == 40_000.0
    change = ray.get(book.set_limits.remote({"max_position_usd": 20_000.0}, "risk-desk",
                                            "cut the perp"), timeout=30)
    assert change["changed"] and change["trading_state"] == "REDUCING"
    reduce_only = ray.get(book.check_order.remote({**order, "amount": 1_000.0}), timeout=30)
    assert reduce_only.reason == "reducing_only"
    summary = ray.get(book.summary.remote(), timeout=30)
    json.dumps(summary, allow_nan=False)  # JSON-able as it is
    assert summary["counters"]["orders"] == {"denied.max_position_usd": 1, "accepted": 1,
                                             "denied.reducing_only": 1}
    assert summary["greeks"]["BTC"]["delta"] == pytest.approx(30_000 / 50_100)
    kill_and_wait(tree)
    book = tree.actor(PATH)
    assert ray.get(book.limits.remote(), timeout=30)["max_position_usd"] == 20_000.0
    history = ray.get(book.limit_history.remote(), timeout=30)
    assert [(h["who"], h["why"], h["old"]["max_position_usd"], h["new"]["max_position_usd"])
            for h in history] == [("risk-desk", "cut the perp", 50_000.0, 20_000.0)]
    assert ray.get(book.trading_state.remote(), timeout=30) == "REDUCING"
    after = ray.get(book.summary.remote(), timeout=30)
    assert after["status"] == "no_marks" and math.isclose(after["positions"][0]["size"], 30_000)
    sell = ray.get(book.check_order.remote({**order, "direction": "sell", "amount": 5_000.0}),
                   timeout=30)
    assert isinstance(sell, OrderAccepted) and sell.reducing
