"""Market data end to end: venue simulator process → VenueConnector → RiskBook, on a local Ray
cluster (a head and one worker node; the simulator is its own process; all on 2 cores).

Two runs in the same process, one after the other, each for ``duration_s``:

* ``json``: the Deribit JSON-RPC ``book.*.raw`` channels (one JSON parse and one change-id check
  per update in the connector) — the baseline;
* ``l1``: the venue's binary top-of-book feed (``actors.venue.l1_feed``) with its load generator
  offering ``offered_events_per_s``; the connector decodes frames with ``np.frombuffer``, checks
  sequence and values vectorized, conflates per instrument, and publishes every 10 ms.

Figures: events/s the connector accepted (``l1_accepted`` / ``book_ok`` counters over the run),
events that reached the RiskBook inside its batches (``events`` merged per batch), and the
latency from the venue's event time to the RiskBook having applied the batch: ``oldest`` (the
first event merged into each batch: the worst any event waited, incl. up to one publish
interval of conflation) and ``newest``. Drops are reported, never hidden: frames the venue
dropped for a slow client, records refused as duplicates, change-id gaps.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

KEYS = {"bench": "bench-secret-123"}
INSTRUMENTS = ["BTC-PERPETUAL", "ETH-PERPETUAL"]
GOAL_EVENTS_PER_S = 200_000
GOAL_P99_MS = 50.0


def _pct_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)) * 1e3, 2) if values else float("nan")


def _measure(tree: Any, conn: Any, book: Any, counter_keys: tuple[str, ...],
             duration_s: float) -> dict[str, Any]:
    import ray

    deadline = time.monotonic() + 60
    while ray.get(conn.state.remote(), timeout=10) != "RUNNING":
        if time.monotonic() > deadline:
            raise RuntimeError("connector not RUNNING")
        time.sleep(0.05)
    time.sleep(1.0)  # warm-up: first frames, first batches

    def accepted() -> tuple[int, dict[str, int]]:
        c = ray.get(conn.status.remote(), timeout=10)["counters"]
        return sum(c.get(k, 0) for k in counter_keys), c

    n0, _ = accepted()
    m0 = ray.get(book.market_data_stats.remote(), timeout=10)
    t0 = time.perf_counter()
    time.sleep(duration_s)
    n1, counters = accepted()
    t1 = time.perf_counter()
    m1 = ray.get(book.market_data_stats.remote(), timeout=10)
    oldest = m1["oldest_lag_s"][len(m0["oldest_lag_s"]):]
    newest = m1["newest_lag_s"][len(m0["newest_lag_s"]):]
    return {"events_per_s": (n1 - n0) / (t1 - t0),
            "risk_events_per_s": (m1["events"] - m0["events"]) / (t1 - t0),
            "risk_batches_per_s": (m1["batches"] - m0["batches"]) / (t1 - t0),
            "oldest_p50_ms": _pct_ms(oldest, 50), "oldest_p99_ms": _pct_ms(oldest, 99),
            "newest_p50_ms": _pct_ms(newest, 50), "newest_p99_ms": _pct_ms(newest, 99),
            "counters": counters, "duration_s": t1 - t0}


def run(quick: bool = False, offered_events_per_s: float = 300_000.0) -> dict[str, Any]:
    import ray

    from actors.venue.process import VenueProcess
    from cluster.local import LocalCluster, NodeConfig
    from supervisors import ChildSpec, SupervisorSpec, start_tree

    duration_s = 4.0 if quick else 10.0
    work = Path(tempfile.mkdtemp(prefix="bench-md-"))
    cluster = LocalCluster.start([NodeConfig("head", num_cpus=0),
                                  NodeConfig("w1", num_cpus=4)], work_dir=work / "c")
    (cid, secret), = KEYS.items()
    results: dict[str, dict[str, Any]] = {}
    venue: Any = None
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        for mode in ("json", "l1"):
            # json: the engine replays a synthetic feed 60000x as fast as it can (the JSON
            # channels' rate is what the connector must parse); l1: the engine at 60x and the
            # binary feed's load generator offering ``offered_events_per_s``.
            if venue is not None:
                venue.stop()
            venue = VenueProcess.start(
                "bench", seed=5, keys=KEYS, synthetic=True,
                speedup=60000.0 if mode == "json" else 60.0,
                l1_load_rate_per_s=offered_events_per_s if mode == "l1" else 0.0)
            spec = SupervisorSpec(id="root", children=[
                ChildSpec(id="book", cls="actors.risk_book:RiskBook",
                          kwargs={"book_id": "bench", "instruments": INSTRUMENTS}),
                ChildSpec(id="conn", cls="actors.connector:VenueConnector",
                          kwargs={"venue": "bench", "ws_url": venue.ws_url, "client_id": cid,
                                  "client_secret": secret, "instruments": INSTRUMENTS,
                                  "subscribers": ["root/book"], "publish_interval_s": 0.01,
                                  "l1_url": venue.l1_url if mode == "l1" else None})])
            tree = start_tree(spec, namespace=f"bench-md-{mode}",
                              store_url=f"sqlite://{work / ('j-' + mode)}")
            keys = ("l1_accepted",) if mode == "l1" else ("book_ok", "book_gap", "book_snapshot")
            results[mode] = _measure(tree, tree.actor("root/conn"), tree.actor("root/book"),
                                     keys, duration_s)
            tree.stop()
        # Baseline for latency: one Ray call carrying the same batch shape, from this driver.
        tree = start_tree(SupervisorSpec(id="root", children=[
            ChildSpec(id="book", cls="actors.risk_book:RiskBook",
                      kwargs={"book_id": "bench", "instruments": INSTRUMENTS})]),
            namespace="bench-md-base", store_url=f"sqlite://{work / 'j-base'}")
        book = tree.actor("root/book")
        batch = {"instrument": np.array(INSTRUMENTS), "mark_price": np.full(4, 50_000.0),
                 "bid": np.full(4, 49_999.0), "ask": np.full(4, 50_001.0)}
        base = []
        for _ in range(200):
            t = time.perf_counter()
            ray.get(book.on_marks.remote(batch), timeout=10)
            base.append(time.perf_counter() - t)
        tree.stop()
        hub = venue_status(venue)["l1_feed"]["counts"]
    finally:
        ray.shutdown()
        if venue is not None:
            venue.stop()
        cluster.shutdown()
    j, b = results["json"], results["l1"]
    c = b["counters"]
    met = b["events_per_s"] >= GOAL_EVENTS_PER_S and b["oldest_p99_ms"] <= GOAL_P99_MS
    return {
        "duration_s": round(b["duration_s"], 2),
        "offered_events_per_s": offered_events_per_s,
        "l1_events_per_s": round(b["events_per_s"]),
        "l1_events_reaching_risk_per_s": round(b["risk_events_per_s"]),
        "l1_risk_batches_per_s": round(b["risk_batches_per_s"], 1),
        "l1_event_to_risk_oldest_p50_ms": b["oldest_p50_ms"],
        "l1_event_to_risk_oldest_p99_ms": b["oldest_p99_ms"],
        "l1_event_to_risk_newest_p50_ms": b["newest_p50_ms"],
        "l1_event_to_risk_newest_p99_ms": b["newest_p99_ms"],
        "l1_duplicates_dropped": c.get("l1_duplicate", 0),
        "l1_gaps": c.get("l1_gap", 0),
        "venue_frames_dropped_slow_client": hub.get("frames_dropped_slow_client", 0),
        "json_book_updates_per_s": round(j["events_per_s"]),
        "ratio_l1_vs_json_events_per_s": round(b["events_per_s"] / max(j["events_per_s"], 1), 1),
        "baseline_direct_call_p50_ms": _pct_ms(base, 50),
        "baseline_direct_call_p99_ms": _pct_ms(base, 99),
        "goal_events_per_s": GOAL_EVENTS_PER_S, "goal_p99_ms": GOAL_P99_MS,
        "goal_marketdata_met": bool(met),
    }


def venue_status(venue: Any) -> dict[str, Any]:
    import urllib.request

    with urllib.request.urlopen(f"{venue.http_url}/api/v2/public/simulator/status",
                                timeout=10) as resp:
        return json.loads(resp.read())["result"]


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
