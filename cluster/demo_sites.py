"""``make demo``: two sites trading one venue through a scripted mix of real faults, ending with
the resilience report.

1. **Up**: a venue simulator replaying real BTC data (the May 2021 crash), then two sites,
   tokyo and london, each its own Ray cluster (a head + two workers) with a heartbeat mesh over
   CURVE, a witness, leases, journal replication, and per site a risk book, a router and a
   market maker (``cluster/deploy/demo.yaml``; ``cluster.sites_deploy``). Tokyo is preferred
   and trades; london stands by.
2. **Faults** (``cluster/chaos/scenarios/demo.yaml``, seeded, run by ``cluster.chaos``): the
   active connector and a risk book SIGKILLed, a reject storm at the venue, a tokyo worker
   node crashed, then tokyo cut off from everyone: london takes over. After the heal, an
   explicit failback hands the venue back to tokyo.
3. **Report**: everything is recorded in ``history.jsonl`` (faults and their undos from the
   chaos runner; roles, leases, restarts, migrations, mesh events and P&L from a watcher
   process per site, ``cluster.demo_record``; the venue's order log, trades and positions, the
   connectors' journals and positions, the risk books' positions afterwards), judged by
   ``cluster.checker`` and drawn by ``cluster.report``: ``report.png``, ``report.html``, and
   the table of detection / recovery times on the terminal.

Everything is torn down at the end and the demo checks that no process of it is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from cluster.demo import _wait

REPO = Path(__file__).resolve().parents[1]
SPEC = REPO / "cluster" / "deploy" / "demo.yaml"
SCENARIO = REPO / "cluster" / "chaos" / "scenarios" / "demo.yaml"
VENUE = "deribit"


def _say(line: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)


def _dashboard_help(sites: Any) -> None:
    for name, site in sites.sites.items():
        url = site.cluster.dashboard_url
        if url is None:
            continue
        if site.cluster.auth_mode == "token":
            login = "log in with the token in ~/.ray/auth_token"
        else:
            login = "no login (token auth off; `bastion up --auth token` turns it on)"
        _say(f"Ray dashboard of {name}: {url} ({login}); actors show their state, "
             "metrics under ray_bastion_*")


def _start_watchers(sites: Any, work: Path, namespace: str) -> list[subprocess.Popen[bytes]]:
    procs = []
    for name, site in sites.sites.items():
        env = {**os.environ, "RAY_AUTH_MODE": site.cluster.auth_mode}
        log = open(work / f"watch-{name}.log", "wb")  # noqa: SIM115 - closed with the process
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "cluster.demo_record", "--address", site.cluster.address,
             "--site", name, "--namespace", namespace, "--controller", site.controller,
             "--out", str(work / f"{name}.obs.jsonl")],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO)))
    return procs


def _stop_watchers(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


def _observations(work: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(work.glob("*.obs.jsonl")):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return sorted(out, key=lambda o: o.get("ts", 0))


def history_from_observations(obs: list[dict[str, Any]], faults: list[dict[str, Any]],
                              node_names: dict[str, str]) -> list[dict[str, Any]]:
    """Restart / migration / role / lease / pnl / detected events from the watchers' lines.
    ``node_names``: node id -> ``site/name`` (the chaos targets' names)."""
    from cluster.history_sources import collect_role_log

    events: list[dict[str, Any]] = []
    role_log = [dict(o["event"], site=o["site"]) for o in obs if o["obs"] == "role_log"]
    events += collect_role_log(role_log)
    last: dict[str, dict[str, Any]] = {}  # path -> its last observation while running
    for o in obs:
        if o["obs"] == "child":
            if o["status"] != "running":
                continue
            before = last.get(o["path"])
            last[o["path"]] = o
            if before and o["incarnation"] and before["incarnation"] and \
                    o["incarnation"] > before["incarnation"]:
                events.append({"t": "restart", "ts": o["ts"], "child": o["path"],
                               "node": node_names.get(o["node"] or "", o["node"])})
                if before["node"] and o["node"] and before["node"] != o["node"]:
                    events.append({"t": "migration", "ts": o["ts"], "child": o["path"],
                                   "from_node": node_names.get(before["node"], before["node"]),
                                   "to_node": node_names.get(o["node"], o["node"])})
        elif o["obs"] == "pnl":
            events.append({"t": "pnl", "ts": o["ts"], "book": o["book"], "value": o["value"]})
    events += _detections(obs, faults, node_names)
    return events


def _detections(obs: list[dict[str, Any]], faults: list[dict[str, Any]],
                node_names: dict[str, str]) -> list[dict[str, Any]]:
    """The first sign, after each fault, that the system noticed it."""
    ids = {v: k for k, v in node_names.items()}
    out = []
    for f in faults:
        kind, target, t0 = f["kind"], str(f["target"]), f["ts"]
        hit = None
        if kind in ("kill-actor", "kill-supervisor", "pause"):
            # the supervisor's own record of when it learned of the death, else the first
            # observation of the child down
            hit = next((("supervisor", o["exited_at"]) for o in obs if o["obs"] == "child"
                        and o["path"] == target and (o.get("exited_at") or 0) >= t0), None) \
                or next((("supervisor", o["ts"]) for o in obs if o["obs"] == "child" and
                         o["ts"] >= t0 and o["path"] == target and o["status"] != "running"),
                        None)
        elif kind in ("kill-node", "pause-node"):
            node_id = ids.get(target)
            hit = next((("mesh", o["ts"]) for o in obs if o["obs"] == "mesh" and
                        o["ts"] >= t0 and o.get("node_id") == node_id and
                        o.get("kind") in ("suspect", "down")), None)
        elif kind.startswith("partition"):
            hit = next((("lease", o["ts"]) for o in obs if o["obs"] == "role_log" and
                        o["ts"] >= t0 and o["site"] == target and
                        o["event"].get("kind") == "deactivate"), None) or next(
                (("mesh", o["ts"]) for o in obs if o["obs"] == "mesh" and o["ts"] >= t0 and
                 o.get("kind") in ("suspect", "down", "partitioned")), None)
        if hit is not None:
            out.append({"t": "detected", "ts": hit[1], "fault_id": f["id"], "by": hit[0]})
    return out


def _collect_after(sites: Any, dep: Any, work: Path, history: Any) -> None:
    """The venue's and each site's side of the run, into the history."""
    import ray

    from cluster.history_sources import (
        collect_connector,
        collect_journal,
        collect_risk_book,
        collect_venue,
        venue_rpc,
    )
    from cluster.sites_deploy import connector_path, site_store_url
    from supervisors.journal import open_store

    venues = json.loads((work / "venues.json").read_text())
    info = next(v for v in venues.values() if v["name"] == VENUE)
    spec = next(v for s in dep.sites for v in s.venues if v.name == VENUE)
    rpc = venue_rpc(info["http_url"], spec.client_id, spec.client_secret)
    account = spec.client_id
    history.extend(collect_venue(rpc, VENUE, account, instruments=list(spec.instruments)))
    for name in sites.sites:
        path = connector_path(name, VENUE)
        with sites.use(name):
            conn = ray.get_actor(path, namespace=dep.namespace)
            positions = ray.get(conn.positions.remote(), timeout=30)
            history.extend(collect_connector(positions, venue=VENUE, account=account))
            book = ray.get_actor(f"site-{name}/risk/main", namespace=dep.namespace)
            history.extend(collect_risk_book(ray.get(book.positions.remote(), timeout=30),
                                             venue=VENUE, account=account,
                                             book=f"{name}/main"))
        store = open_store(site_store_url(dep, name, work))
        history.extend(collect_journal(store, f"{dep.namespace}/{path}", venue=VENUE,
                                       account=account, site=name))


def _quiesce(sites: Any, dep: Any) -> None:
    """Stop each site's trading (router and maker, orderly), then wait until every risk book
    holds what its connector holds: the run's books are closed before they are compared."""
    import ray

    from cluster.sites_deploy import connector_path
    from supervisors import Tree

    for name in sites.sites:
        with sites.use(name), contextlib.suppress(Exception):
            Tree(f"site-{name}", dep.namespace, "").terminate_child(f"site-{name}/trading")
    _say("trading stopped at both sites; waiting for the books to settle")
    for name in sites.sites:
        with sites.use(name):
            conn = ray.get_actor(connector_path(name, VENUE), namespace=dep.namespace)
            book = ray.get_actor(f"site-{name}/risk/main", namespace=dep.namespace)

            def settled(conn: Any = conn, book: Any = book) -> bool:
                held = ray.get(conn.positions.remote(), timeout=10)
                rows = ray.get(book.positions.remote(), timeout=10)
                booked = {r["instrument"]: r["size"] for r in rows if r["size"]}
                return all(abs(booked.get(k, 0.0) - v) < 1e-9 for k, v in held.items()) and \
                    all(k in held for k in booked)

            with contextlib.suppress(RuntimeError):  # compared anyway: the checker says
                _wait(settled, 20.0, f"{name}'s risk book = its connector", poll_s=0.5)


def _leftovers(work: Path) -> list[psutil.Process]:
    marker = str(work)
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if proc.pid != os.getpid() and any(marker in part for part in
                                               proc.info.get("cmdline") or []):
                found.append(proc)
    return found


def main(quick: bool = False, work_dir: str | None = None) -> int:
    """Run the demo; 0 when the checker passes and nothing is left behind."""
    from cluster import deployment
    from cluster.chaos.context import LiveSystem, VenueAccess, deployment_environment
    from cluster.chaos.scenario import Runner
    from cluster.chaos.scenario import load as load_scenario
    from cluster.history import HistoryWriter, load_history
    from cluster.report import build_report, print_summary
    from cluster.sites_deploy import down_sites, hand_over, launch_sites, site_store_url
    from supervisors import Tree

    work = Path(work_dir or REPO / ".bastion" / "demo").resolve()
    if work.exists():
        with contextlib.suppress(Exception):
            down_sites(work)
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    dep = deployment.load(SPEC)
    scenario = load_scenario(SCENARIO)
    if quick:
        scenario = scenario.model_copy(update={"steps": scenario.steps[:2]})
    history_path = work / "history.jsonl"
    _say(f"Bastion demo: two sites, one venue replaying the 2021-05-19 crash; work dir {work}")
    watchers: list[subprocess.Popen[bytes]] = []
    sites = None
    code = 1
    try:
        sites, venues, active = launch_sites(dep, work, include_dashboard=True, say=_say)
        _say(f"{VENUE}: {active.get(VENUE)} ACTIVE, the other site stands by")
        _dashboard_help(sites)
        watchers = _start_watchers(sites, work, dep.namespace)
        node_names = {}
        for name in sites.sites:
            with sites.use(name):
                import ray

                for n in ray.nodes():
                    label = n.get("Labels", {}).get("bastion-node")
                    if label:
                        node_names[n["NodeID"]] = f"{name}/{label}"
        spec = next(v for s in dep.sites for v in s.venues if v.name == VENUE)
        info = next(v for v in venues.values() if v.name == VENUE)
        system = LiveSystem(
            environment=deployment_environment(dep), source=str(SPEC), sites=sites,
            trees=[Tree(f"site-{s}", dep.namespace, site_store_url(dep, s, work))
                   for s in sites.sites],
            tree_sites={f"site-{s}": s for s in sites.sites},
            venues={VENUE: VenueAccess(VENUE, None, info.http_url, spec.client_id,
                                       spec.client_secret)})
        with HistoryWriter(history_path) as history:
            _say(f"chaos: scenario {scenario.name!r} (seed {scenario.seed}), "
                 f"{len(scenario.steps)} steps over ~{scenario.duration_s:g} s")
            report = Runner(system, history=history).run(scenario)
            _say(f"chaos done: {len(report.injected)} faults injected, {len(report.undone)} "
                 f"undone, {len(report.recovered)} recovered"
                 + (f"; not recovered: {report.not_recovered}" if report.not_recovered else "")
                 + (f"; errors: {report.errors}" if report.errors else ""))
            # Failback is an explicit operation: hand the venue back to the preferred site.
            preferred = dep.preferred_sites().get(VENUE)
            _say(f"failback: handing {VENUE} back to {preferred}")
            with contextlib.suppress(Exception):
                hand_over(sites, VENUE, preferred, say=_say)
            time.sleep(3.0)  # let it trade a little under the failed-back lease
            _quiesce(sites, dep)
            _stop_watchers(watchers)
            watchers = []
            faults = [e for e in load_history(history_path).of("fault")]
            history.extend(history_from_observations(_observations(work), faults, node_names))
            _say("collecting the venue's order log, trades and positions, and each site's "
                 "journal and positions")
            _collect_after(sites, dep, work, history)
        result = build_report(history_path, work, title="Bastion demo: two sites, one venue")
        print_summary(result)
        code = 0 if result.verdict.passed else 1
    finally:
        _stop_watchers(watchers)
        _say("tearing down")
        with contextlib.suppress(Exception):
            down_sites(work)
        left = _wait_gone(work)
        if left:
            _say(f"LEFT BEHIND: {[p.pid for p in left]}")
            code = code or 2
        else:
            _say("nothing left running")
    return code


def _wait_gone(work: Path, timeout_s: float = 20.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    left = _leftovers(work)
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    return left


if __name__ == "__main__":
    sys.exit(main(quick="--quick" in sys.argv))
