"""The demo's reading of its watchers' observations (no Ray: the lines as the watcher writes
them): restarts and migrations from incarnations and nodes, detections matched to faults."""

from __future__ import annotations

from cluster.demo_sites import history_from_observations


def test_observations_when_child_restarts_elsewhere_and_node_dies_then_events_and_detections(
) -> None:
    obs = [
        {"obs": "child", "site": "tokyo", "ts": 10.0, "path": "site-tokyo/risk/main",
         "status": "running", "pid": 1, "node": "n1", "incarnation": 1},
        {"obs": "child", "site": "tokyo", "ts": 20.4, "path": "site-tokyo/risk/main",
         "status": "restarting", "pid": None, "node": None, "incarnation": 1},
        {"obs": "child", "site": "tokyo", "ts": 21.5, "path": "site-tokyo/risk/main",
         "status": "running", "pid": 2, "node": "n2", "incarnation": 2},
        {"obs": "mesh", "site": "tokyo", "ts": 30.3, "kind": "suspect", "node_id": "n1"},
        {"obs": "role_log", "site": "tokyo", "ts": 40.6, "event": {
            "kind": "deactivate", "resource": "deribit", "epoch": 1, "site": "tokyo",
            "sent_wall_s": 40.6, "reason": "lease lapsed"}},
        {"obs": "pnl", "site": "tokyo", "ts": 41.0, "book": "tokyo/main", "value": 12.5},
    ]
    faults = [{"id": "f1", "kind": "kill-actor", "target": "site-tokyo/risk/main", "ts": 20.0},
              {"id": "f2", "kind": "kill-node", "target": "tokyo/tokyo-1", "ts": 30.0},
              {"id": "f3", "kind": "partition", "target": "tokyo", "ts": 40.0},
              {"id": "f4", "kind": "venue-reject-storm", "target": "deribit", "ts": 50.0}]
    events = history_from_observations(obs, faults, {"n1": "tokyo/tokyo-1",
                                                     "n2": "tokyo/tokyo-2"})
    kinds = [e["t"] for e in events]
    assert kinds.count("restart") == 1 and kinds.count("migration") == 1
    migration = next(e for e in events if e["t"] == "migration")
    assert (migration["from_node"], migration["to_node"]) == ("tokyo/tokyo-1", "tokyo/tokyo-2")
    detected = {e["fault_id"]: (e["by"], e["ts"]) for e in events if e["t"] == "detected"}
    assert detected == {"f1": ("supervisor", 20.4), "f2": ("mesh", 30.3),
                        "f3": ("lease", 40.6)}  # nothing claims to see the reject storm
    assert any(e["t"] == "pnl" and e["value"] == 12.5 for e in events)
