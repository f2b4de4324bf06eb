"""Market data end to end: venue simulator process → VenueConnector (WebSocket, JSON-RPC,
change-id tracking, conflation) → a subscriber actor, on a local Ray cluster.

Figures: book updates/s the connector ingests (the venue replays as fast as it can), batches
and rows delivered, and publish → subscriber latency p50/p99. Baseline in the same run: the
same subscriber fed directly by a local loop of Ray calls with the same batch shape.
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


def run(quick: bool = False, speedup: float = 60000.0, synthetic: bool = True) -> dict[str, Any]:
    import ray

    from actors.venue.process import VenueProcess
    from cluster.local import LocalCluster, NodeConfig
    from supervisors import ChildSpec, SupervisorSpec, start_tree

    duration_s = 5.0 if quick else 15.0
    work = Path(tempfile.mkdtemp(prefix="bench-md-"))
    cluster = LocalCluster.start([NodeConfig("head", num_cpus=0),
                                  NodeConfig("w1", num_cpus=4)], work_dir=work / "c")
    venue = VenueProcess.start("bench", seed=5, keys=KEYS, speedup=speedup, synthetic=synthetic)
    try:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        (cid, secret), = KEYS.items()
        spec = SupervisorSpec(id="root", children=[
            ChildSpec(id="sub", cls="actors.recorder:MarkRecorder"),
            ChildSpec(id="conn", cls="actors.connector:VenueConnector",
                      kwargs={"venue": "bench", "ws_url": venue.ws_url, "client_id": cid,
                              "client_secret": secret,
                              "instruments": ["BTC-PERPETUAL", "ETH-PERPETUAL"],
                              "subscribers": ["root/sub"], "publish_interval_s": 0.01})])
        tree = start_tree(spec, namespace="bench-md", store_url=f"sqlite://{work / 'j'}")
        conn = tree.actor("root/conn")
        deadline = time.monotonic() + 60
        while ray.get(conn.state.remote(), timeout=10) != "RUNNING":
            if time.monotonic() > deadline:
                raise RuntimeError("connector not RUNNING")
            time.sleep(0.05)

        def book_count() -> int:
            c = ray.get(conn.status.remote(), timeout=10)["counters"]
            return sum(v for k, v in c.items() if k.startswith("book_"))

        n0, t0 = book_count(), time.perf_counter()
        s0 = ray.get(tree.actor("root/sub").stats.remote(), timeout=10)
        time.sleep(duration_s)
        n1, t1 = book_count(), time.perf_counter()
        s1 = ray.get(tree.actor("root/sub").stats.remote(), timeout=10)
        lags = np.array(s1["lags_s"][len(s0["lags_s"]):] or [np.nan])
        # Baseline: the same batches straight from this process to the subscriber.
        sub = tree.actor("root/sub")
        batch = {"instrument": np.array(["BTC-PERPETUAL", "ETH-PERPETUAL"]),
                 "mark_price": np.array([1.0, 2.0]), "ts": 0.0}
        base = []
        for _ in range(200):
            batch["ts"] = time.time()
            t = time.perf_counter()
            ray.get(sub.on_marks.remote(batch), timeout=10)
            base.append(time.perf_counter() - t)
        base_arr = np.array(base)
        tree.stop()
        events_per_s = (n1 - n0) / (t1 - t0)
        return {
            "duration_s": round(t1 - t0, 2),
            "book_updates_per_s": round(events_per_s, 1),
            "batches_delivered_per_s": round((s1["batches"] - s0["batches"]) / (t1 - t0), 1),
            "publish_to_subscriber_p50_ms": round(float(np.nanpercentile(lags, 50)) * 1e3, 2),
            "publish_to_subscriber_p99_ms": round(float(np.nanpercentile(lags, 99)) * 1e3, 2),
            "baseline_direct_call_p50_ms": round(float(np.percentile(base_arr, 50)) * 1e3, 2),
            "baseline_direct_call_p99_ms": round(float(np.percentile(base_arr, 99)) * 1e3, 2),
            "goal_events_per_s": 200_000, "goal_p99_ms": 50,
            "goal_marketdata_met": bool(events_per_s >= 200_000 and
                                        np.nanpercentile(lags, 99) <= 0.05),
        }
    finally:
        ray.shutdown()
        venue.stop()
        cluster.shutdown()


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
