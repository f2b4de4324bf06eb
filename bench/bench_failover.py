"""Site failover: RTO from a site being cut off to the first order the venue accepts from the
promoted site, and the overlap of two active sites — on two sites that are separate Ray
clusters (a head + one worker each), one mesh over CURVE, a witness process, one shared venue.

Each sample cuts the currently active site off at the mesh's socket level
(``MultiSite.cut_off``), waits until the other site's orders trade at the venue, then heals; the
next sample cuts the new active site, so the role goes back and forth. Every site runs a client
order flow (a market order every 20 ms) into its role-gated connector; the venue's own record of
trades is the judge:

* ``rto``: cut (the moment the active site's own agents were cut) → the promoted site's first
  trade at the venue;
* ``old_stop``: cut → the cut-off site's last trade (it must stop by itself, within its lease);
* ``overlap_ms``: how long both sites' trades interleave: the old site's last trade minus the new
  site's first, when positive. Goal: exactly zero, every sample;
* baseline, same run: ``lease_s`` of the lease preset (a takeover can never beat the old lease's
  expiry), and ``ratio_rto_p50_vs_lease``.

Run ``python bench/bench_failover.py [--quick]``: the last line printed is the figures as JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

KEYS = {"bench": "bench-secret-123"}
GOAL_RTO_S = 3.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(1, min(len(ordered), math.ceil(q / 100 * len(ordered)))) - 1]


def run(quick: bool = False) -> dict[str, Any]:
    from actors.venue.process import VenueProcess
    from cluster.demo import venue_rpc
    from cluster.multisite import MultiSite, connector_streams, failover_tree, trades_by_site
    from supervisors import start_tree
    from topology.lease import LeaseConfig

    samples = 3 if quick else 10
    work = Path(tempfile.mkdtemp(prefix="bench-failover-"))
    (cid, secret), = KEYS.items()
    rtos, stops, overlaps, epochs = [], [], [], []
    import_ms: list[float] = []  # per sample: the promoted connector's replica import
    with VenueProcess.start("deribit", seed=3, keys=KEYS, speedup=60.0) as venue:
        def trades() -> dict[str, list[tuple[int, int]]]:
            return trades_by_site(lambda m, p: venue_rpc(venue.http_url, cid, secret, m, p))

        def wait(cond: Any, timeout_s: float, what: str) -> Any:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if (got := cond()):
                    return got
                time.sleep(0.02)
            raise RuntimeError(f"bench_failover: timed out waiting for {what}")

        sites = MultiSite.start({"tokyo": 1, "london": 1}, work / "ms", resources=["deribit"],
                                preferred={"deribit": "tokyo"})
        try:
            for name in sites.sites:
                with sites.use(name):
                    start_tree(failover_tree(name, "deribit", venue.ws_url, cid, secret,
                                             flow_interval_s=0.02),
                               namespace="bastion", store_url=f"sqlite://{work / name}")
            sites.enable_roles({name: {"deribit": [(f"site-{name}/deribit", "bastion")]}
                                for name in sites.sites})
            sites.enable_replication(
                "deribit", {name: f"sqlite://{work / name}" for name in sites.sites},
                {name: connector_streams(name, "deribit") for name in sites.sites})
            active, standby = "tokyo", "london"
            wait(lambda: len(trades().get(active, [])) >= 20, 60, f"{active} trading")
            # steady state, before any cut: the active's journal reaching the standby
            wait(lambda: sites.replication(standby)["deribit"]["apply_lag_s"]["n"] >= 200, 30,
                 "200 records replicated")
            steady = sites.replication(standby)["deribit"]["apply_lag_s"]
            for _ in range(samples):
                before = len(trades().get(standby, []))
                cut_ms = sites.cut_off(active) * 1000
                got = wait(lambda s=standby, b=before: (t := trades()) and
                           len(t.get(s, [])) >= b + 10 and t, 30, f"{standby} promoted")
                first_new = min(ts for ts, _ in got[standby][before:])
                last_old = max(ts for ts, _ in got[active])
                rtos.append((first_new - cut_ms) / 1000)
                stops.append(max(0.0, last_old - cut_ms) / 1000)
                overlaps.append(max(0.0, last_old - first_new))
                epochs.append(max(e for _, e in got[standby]))
                with sites.use(standby):
                    import ray

                    imported = ray.get(ray.get_actor(f"site-{standby}/deribit",
                                                     namespace="bastion").status.remote(),
                                       timeout=10)["replica"]["last_import"] or {}
                import_ms.append(float(imported.get("ms", math.nan)))
                sites.heal()
                # the healed site stands by: the next sample cuts the new active one
                active, standby = standby, active
                time.sleep(1.0)  # let the healed mesh settle before the next cut
            engine = venue_rpc(venue.http_url, cid, secret, "public/simulator/status")["engine"]
        finally:
            sites.shutdown()
    lease_s = LeaseConfig.preset("local").lease_s
    p99 = _pct(rtos, 99)
    return {
        "samples": len(rtos), "lease_s": lease_s,
        "rto_p50_s": round(_pct(rtos, 50), 3), "rto_p99_s": round(p99, 3),
        "rto_max_s": round(max(rtos), 3),
        "old_site_stop_p50_s": round(_pct(stops, 50), 3),
        "old_site_stop_max_s": round(max(stops), 3),
        "overlap_max_ms": max(overlaps), "overlapping_samples": sum(o > 0 for o in overlaps),
        "epochs_strictly_increasing": all(b > a for a, b in zip(epochs, epochs[1:], strict=False)),
        "venue_fenced_orders": engine["fenced_orders"],
        "venue_duplicate_labels": engine["duplicate_labels"],
        "ratio_rto_p50_vs_lease": round(_pct(rtos, 50) / lease_s, 2),
        "replication_lag_steady_n": steady["n"],
        "replication_lag_steady_p50_ms": round(steady["p50"] * 1000, 2),
        "replication_lag_steady_p99_ms": round(steady["p99"] * 1000, 2),
        "replica_import_p50_ms": round(_pct([m for m in import_ms if m == m], 50), 2),
        "goal_rto_p99_s": GOAL_RTO_S,
        "goal_failover_met": bool(p99 <= GOAL_RTO_S and max(overlaps) == 0),
    }


if __name__ == "__main__":
    print(json.dumps(run(quick="--quick" in sys.argv)))
