"""Journal store benchmark: batched append throughput and snapshot + tail recovery time.

For each backend (SQLite always; Redis when ``redis-server`` is installed):

* append ``events`` msgpack events in batches of ``batch_events`` to one stream, with a snapshot
  of the folded state every ``snapshot_every_events`` (taken mid-interval, so recovery replays a
  tail of half an interval); only the ``append`` / ``put_snapshot`` calls are timed;
* recovery, repeated: open a fresh store, load the latest snapshot, read the tail after it,
  decode and fold every event; the result is checked against the writer's state;
* one full replay of the whole stream from seq 0 (no snapshot), for comparison.

``run(quick=True)`` uses 100k events. Run ``python bench/bench_journal.py [--quick]``: the last
line printed is the figures as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack

_REPO_ROOT = Path(__file__).resolve().parents[1]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

STREAM = "bench/fills"
SYMBOLS = [f"SYM{i:03d}" for i in range(100)]


def _event(i: int) -> dict[str, Any]:
    return {
        "k": "fill",
        "id": i,
        "sym": SYMBOLS[i % len(SYMBOLS)],
        "qty": (i % 7) - 3,
        "px": 100.0 + (i % 1000) * 0.01,
        "ts": 1_700_000_000.0 + i * 0.001,
    }


def _new_state() -> dict[str, Any]:
    return {"n": 0, "notional": 0.0, "pos": dict.fromkeys(SYMBOLS, 0)}


def _apply(state: dict[str, Any], event: dict[str, Any]) -> None:
    state["n"] += 1
    state["notional"] += event["qty"] * event["px"]
    state["pos"][event["sym"]] += event["qty"]


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def _count_label(events: int) -> str:
    return f"{events // 1_000_000}m" if events % 1_000_000 == 0 else f"{events // 1000}k"


def _batches(events: int, batch_events: int) -> Iterator[tuple[list[dict[str, Any]], list[bytes]]]:
    for start in range(0, events, batch_events):
        evs = [_event(i) for i in range(start, min(events, start + batch_events))]
        yield evs, [msgpack.packb(e, use_bin_type=True) for e in evs]


def _write(
    url: str, events: int, batch_events: int, snapshot_every: int
) -> tuple[dict[str, Any], list[float], list[float]]:
    """Write the stream; returns the final state and the append / snapshot latencies (s)."""
    from supervisors.journal import open_store

    state = _new_state()
    append_s: list[float] = []
    snapshot_s: list[float] = []
    with open_store(url) as store:
        epoch = store.next_epoch(STREAM)
        for evs, payloads in _batches(events, batch_events):
            t0 = time.perf_counter()
            last = store.append(STREAM, payloads, epoch=epoch)
            append_s.append(time.perf_counter() - t0)
            for e in evs:
                _apply(state, e)
            if last % snapshot_every == snapshot_every // 2:
                blob = msgpack.packb(state, use_bin_type=True)
                t0 = time.perf_counter()
                store.put_snapshot(STREAM, last, blob, epoch=epoch)
                snapshot_s.append(time.perf_counter() - t0)
    return state, append_s, snapshot_s


def _recover(url: str, *, use_snapshot: bool) -> tuple[dict[str, Any], int, float]:
    """Rebuild the state; returns it, the events replayed and the wall time (s)."""
    from supervisors.journal import open_store

    t0 = time.perf_counter()
    with open_store(url) as store:
        snapshot = store.latest_snapshot(STREAM) if use_snapshot else None
        if snapshot is None:
            state, after = _new_state(), 0
        else:
            state, after = msgpack.unpackb(snapshot.payload, raw=False), snapshot.seq
        replayed = 0
        for batch in store.iter_read(STREAM, after_seq=after):
            for record in batch:
                _apply(state, msgpack.unpackb(record.payload, raw=False))
            replayed += len(batch)
    return state, replayed, time.perf_counter() - t0


def bench_backend(
    label: str, url: str, *, events: int, batch_events: int, snapshot_every: int, runs: int
) -> dict[str, float]:
    """All figures of one backend, keys prefixed with ``label``."""
    tag = _count_label(events)
    state, append_s, snapshot_s = _write(url, events, batch_events, snapshot_every)
    recovery_s = []
    tail = 0
    for _ in range(runs):
        got, tail, elapsed_s = _recover(url, use_snapshot=True)
        if got != state:
            raise AssertionError(f"{label}: recovered state differs from the written state")
        recovery_s.append(elapsed_s)
    got, replayed, full_s = _recover(url, use_snapshot=False)
    if got != state or replayed != events:
        raise AssertionError(f"{label}: full replay differs ({replayed} of {events} events)")
    return {
        f"{label}_appends_per_s": round(events / sum(append_s)),
        f"{label}_append_batch_p50_s": _percentile(append_s, 50),
        f"{label}_append_batch_p99_s": _percentile(append_s, 99),
        f"{label}_put_snapshot_p50_s": _percentile(snapshot_s, 50) if snapshot_s else 0.0,
        f"{label}_recovery_{tag}_s": _percentile(recovery_s, 50),
        f"{label}_recovery_{tag}_p99_s": _percentile(recovery_s, 99),
        f"{label}_recovery_tail_events": tail,
        f"{label}_full_replay_{tag}_s": full_s,
        f"{label}_full_replay_records_per_s": round(events / full_s),
    }


def run(quick: bool = False) -> dict[str, float]:
    """Run the benchmark; returns a flat dict of figures (units in the key names)."""
    from tests.redis_server import find_redis_server, redis_server

    events = 100_000 if quick else 1_000_000
    params = {
        "events": events,
        "batch_events": 1000,
        "snapshot_every": 10_000,
        "runs": 10 if quick else 20,
    }
    results: dict[str, float] = {
        "events_total": events,
        "batch_events": params["batch_events"],
        "snapshot_every_events": params["snapshot_every"],
        "recovery_runs": params["runs"],
    }
    with tempfile.TemporaryDirectory(prefix="bastion-bench-") as tmp:
        results.update(bench_backend("sqlite", f"sqlite://{tmp}/full", **params))
        normal = bench_backend(
            "sqlite_normal", f"sqlite://{tmp}/normal?synchronous=NORMAL", **params
        )
        results["sqlite_normal_appends_per_s"] = normal["sqlite_normal_appends_per_s"]
    if find_redis_server() is not None:
        with redis_server() as server:  # appendonly yes, appendfsync always
            results.update(bench_backend("redis", server.url, **params))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k events instead of 1M")
    args = parser.parse_args()
    print(json.dumps(run(quick=args.quick)))


if __name__ == "__main__":
    main()
