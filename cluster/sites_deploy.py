"""A geographically redundant deployment from the deployment file's ``failover`` section: each
site its own Ray cluster (:class:`~cluster.multisite.MultiSite`), one simulator per shared
venue reached by every site, one lease per shared venue; the site holding it trades there.

    bastion up --deployment cluster/deploy/two_sites.yaml   # launch_sites
    bastion status [--json]                                 # collect_sites_status
    bastion failover --venue deribit --to london            # hand_over
    bastion down                                            # down_sites

Everything outlives ``bastion up``: the site clusters (``site-<name>/cluster.json``), the
witness and the venues are detached processes, and ``multisite.json`` in the work dir records
how to reach them (:meth:`MultiSite.save`), so every later command runs in a process of its own.

Per site, :func:`~cluster.deployment.site_tree` with each shared venue's connector role-gated
(it orders only while its site holds that venue's lease) and importing, on promotion, the
journal the active site replicated to it (``replica/<venue>/<venue>`` of its own store). The
site's controller agent tells the connector of role changes and ships the connector's journal
stream while the site is active. A hand-over is the controller's ``transfer``: the active site
stops at once and hands the lease to the target, which campaigns; nothing fails back by itself.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .deployment import Deployment
from .launcher import LaunchError, VenueInfo, start_site_tree, start_venues, stop_venues
from .local import ClusterError
from .multisite import MultiSite

ROLE_CALL_TIMEOUT_S = 10.0
#: how long ``bastion up`` waits for every shared venue to have an active site
ACTIVE_TIMEOUT_S = 60.0
#: how long ``bastion failover`` waits for the target to be active (lease and connector)
HANDOVER_TIMEOUT_S = 30.0


class HandOverRefused(RuntimeError):
    """``bastion failover`` could not hand the venue over; the message says why."""


def connector_path(site: str, venue: str) -> str:
    """The connector of ``venue`` in ``site``'s tree (:func:`cluster.deployment.site_tree`)."""
    return f"site-{site}/venues/{venue}/connector"


def site_store_url(dep: Deployment, site: str, work_dir: Path) -> str:
    """``site``'s own journal store: ``store_url`` with ``{site}`` filled in, else SQLite
    under the work dir."""
    if dep.store_url is not None:
        return dep.store_url.replace("{site}", site)
    path = work_dir / f"site-{site}" / "journal"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite://{path}"


def is_up(work_dir: Path) -> bool:
    """A multi-site deployment is recorded in ``work_dir`` with a node still running."""
    try:
        sites = MultiSite.load(work_dir, strict=False)
    except ClusterError:
        return False
    return any(n.alive() for s in sites.sites.values() for n in s.cluster.nodes.values())


# -- up -------------------------------------------------------------------------------------

def launch_sites(dep: Deployment, work_dir: Path, *, include_dashboard: bool = False,
                 active_timeout_s: float = ACTIVE_TIMEOUT_S, say: Any = None
                 ) -> tuple[MultiSite, dict[str, VenueInfo], dict[str, str]]:
    """Venues, sites (clusters, mesh, witness), trees, roles, replication — in that order,
    all detached; returns the sites, the venues and each shared venue's active site once
    every one has one. ``say`` (e.g. ``print``) gets a line as each step is done. On failure
    everything started is stopped.

    Raises:
        ValueError: the deployment has no ``failover`` section.
        TimeoutError: a shared venue had no active site within ``active_timeout_s``.
    """
    f = dep.failover
    if f is None:
        raise ValueError("launch_sites needs a deployment with a failover section")
    t0 = time.monotonic()

    def done(what: str) -> None:
        if say is not None:
            say(f"[{time.monotonic() - t0:5.1f} s] {what}")

    venues = start_venues(dep, work_dir, detached=True)
    done(f"venues: {', '.join(venues)}")
    try:
        sites = MultiSite.start({s.name: f.nodes_per_site for s in dep.sites}, work_dir,
                                resources=list(f.venues), preferred=dep.preferred_sites(),
                                mesh_preset=f.mesh, lease=f.lease_fields(), witness=f.witness,
                                include_dashboard=include_dashboard, detached=True)
    except BaseException:
        stop_venues(work_dir)
        raise
    done(f"sites: {', '.join(sites.sites)} (a Ray cluster each, the mesh"
         f"{', the witness' if sites.witness else ''})")
    try:
        stores = {s.name: site_store_url(dep, s.name, work_dir) for s in dep.sites}
        sites.save({"deployment": dep.name, "namespace": dep.namespace,
                    "venues": list(f.venues), "stores": stores,
                    "connectors": {s.name: {v: connector_path(s.name, v) for v in f.venues}
                                   for s in dep.sites}})
        start_trees_in_parallel(dep, sites, venues, stores)
        done("trees: " + ", ".join(f"site-{s.name}" for s in dep.sites))
        sites.enable_roles({s.name: {v: [(connector_path(s.name, v), dep.namespace)]
                                     for v in f.venues} for s in dep.sites})
        for venue in f.venues:
            sites.enable_replication(
                venue, stores,
                {s.name: {venue: f"{dep.namespace}/{connector_path(s.name, venue)}"}
                 for s in dep.sites})
        done("roles and journal replication on")
        active = _wait_all_active(sites, list(f.venues), active_timeout_s)
        done("active: " + ", ".join(f"{v} at {s}" for v, s in active.items()))
    except BaseException:
        sites.shutdown()
        sites.forget()
        stop_venues(work_dir)
        raise
    return sites, venues, active


def start_trees_in_parallel(dep: Deployment, sites: MultiSite, venues: Mapping[str, VenueInfo],
                            stores: Mapping[str, str], timeout_s: float = 300.0) -> None:
    """Every site's tree at once, each started by a Python process of its own (a Ray driver
    joins one cluster; most of a tree's start is waiting on its actors' worker processes).
    The trees are detached: they outlive those processes.

    Raises:
        LaunchError: a site's tree did not start (each failed site and why).
    """
    import pickle
    import subprocess
    import sys

    procs: dict[str, subprocess.Popen[bytes]] = {}
    failed = {}
    try:
        for site in dep.sites:
            cluster = sites.sites[site.name].cluster
            job = sites.work_dir / f"site-{site.name}" / "tree-job.pickle"
            # the job holds the venue keys: readable by us only
            with open(os.open(job, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as fh:
                pickle.dump((dep, site.name, dict(venues), stores[site.name], cluster.address),
                            fh)
            procs[site.name] = subprocess.Popen(
                [sys.executable, "-c", "import cluster.sites_deploy as m; m._start_tree_main()",
                 str(job)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**os.environ, "RAY_AUTH_MODE": cluster.auth_mode})
        deadline = time.monotonic() + timeout_s
        for name, proc in procs.items():
            try:
                out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed[name] = f"not started within {timeout_s:g} s"
                continue
            if proc.returncode != 0:
                text = out.decode(errors="replace")
                said = [x.removeprefix(_TREE_ERROR) for x in text.splitlines()
                        if x.startswith(_TREE_ERROR)]
                failed[name] = " ".join(said) or text.strip()[-2000:] or \
                    f"exited with {proc.returncode}"
    finally:  # none outlives this call (interrupted, or timed out)
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    if failed:
        raise LaunchError("; ".join(f"site {n}: tree did not start: {why}"
                                    for n, why in failed.items()))


_TREE_ERROR = "TREE_ERROR "  # marks the error line among Ray's own output


def _start_tree_main() -> None:
    """The process :func:`start_trees_in_parallel` starts: the job (a pickle file we wrote,
    removed once read) in ``argv[1]``; exits 0 once the site's tree runs, else 1 with the
    error on stdout."""
    import pickle
    import sys

    job = Path(sys.argv[1])
    dep, site, venues, store_url, address = pickle.loads(job.read_bytes())
    job.unlink()
    import ray

    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        spec = next(s for s in dep.sites if s.name == site)
        start_site_tree(dep, spec, venues, store_url=store_url,
                        gated=dep.failover.venues if dep.failover else ())
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises
        print(_TREE_ERROR + f"{type(exc).__name__}: {exc}".replace("\n", " "), flush=True)
        sys.exit(1)
    finally:
        with contextlib.suppress(Exception):
            ray.shutdown()


def _wait_all_active(sites: MultiSite, venues: list[str], timeout_s: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    first = next(iter(sites.sites))
    while True:
        seen = role_view(sites, first)
        active = {v: next((s for s, roles in seen.items() if roles.get(v) == "ACTIVE"), None)
                  for v in venues}
        if all(active.values()):
            return {v: s for v, s in active.items() if s is not None}
        if time.monotonic() > deadline:
            raise TimeoutError(f"no active site within {timeout_s:g} s; roles {seen}")
        time.sleep(0.2)


def role_view(sites: MultiSite, site: str) -> dict[str, dict[str, str]]:
    """Site -> resource -> holder state, as ``site``'s controller sees it: its own roles, and
    the other sites' from their beacons (one Ray connection for all)."""
    status = sites.roles(site)
    view = {site: {r: x["state"] for r, x in status["resources"].items()}}
    for peer in status["peers"].values():
        view.setdefault(peer["site"], {}).update(
            {r: h["state"] for r, h in peer["holders"].items()})
    return view


# -- status ---------------------------------------------------------------------------------

def collect_sites_status(sites: MultiSite) -> dict[str, Any]:
    """Per site: its Ray address and nodes, per shared venue its lease role (state, epoch,
    window left) and replication (lag), and its supervision trees (``collect_status``). A site
    that cannot be reached says why in ``error``."""
    import ray

    from .cli import collect_status

    w = sites.witness
    out: dict[str, Any] = {
        "deployment": sites.extra.get("deployment"), "work_dir": str(sites.work_dir),
        "witness": None if w is None else {"pid": w.pid, "control": w.control,
                                           "alive": _pid_alive(w.pid)},
        "sites": {}}
    node_site = {s.controller: name for name, s in sites.sites.items()}
    for name, site in sites.sites.items():
        entry: dict[str, Any] = {"address": site.cluster.address,
                                 "controller": site.controller, "roles": {},
                                 "replication": {}, "cluster": None, "error": None}
        out["sites"][name] = entry
        if not _head_alive(sites, name):
            entry["error"] = "the head of this site's cluster is not running"
            continue
        try:
            with sites.use(name):
                controller = sites.controller(name)
                roles = ray.get(controller.roles_status.remote(), timeout=ROLE_CALL_TIMEOUT_S)
                shipped = ray.get(controller.replication_status.remote(),
                                  timeout=ROLE_CALL_TIMEOUT_S)
                entry["cluster"] = collect_status(site.cluster)
                gates = {v: _gate_state(sites, name, v) for v in roles["resources"]}
        except Exception as exc:  # noqa: BLE001 - report the site as unreachable, go on
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
            continue
        for venue, r in roles["resources"].items():
            entry["roles"][venue] = {
                "state": r["state"], "epoch": r["epoch"], "may_act": r["may_act"],
                "window_left_s": r["window_left_s"], "lease_left_s": r["lease_left_s"],
                "preferred_site": r["preferred_site"], "campaign": r["campaign"]["reason"],
                "connector": gates[venue]}
        for venue, s in shipped.items():
            entry["replication"][venue] = _replication_summary(s, node_site)
    return out


def _head_alive(sites: MultiSite, site: str) -> bool:
    """Whether ``site``'s head runs (joining a cluster whose head is gone hangs for a while)."""
    return any(n.head and n.alive() for n in sites.sites[site].cluster.nodes.values())


def _gate_state(sites: MultiSite, site: str, venue: str) -> str | None:
    """The role gate of ``site``'s connector to ``venue`` (inside ``use(site)``); None if it
    cannot be asked (restarting)."""
    import ray

    path = sites.extra.get("connectors", {}).get(site, {}).get(venue)
    if path is None:
        return None
    try:
        handle = ray.get_actor(path, namespace=sites.extra["namespace"])
        return ray.get(handle.status.remote(), timeout=ROLE_CALL_TIMEOUT_S)["role"]["state"]
    except Exception:  # noqa: BLE001 - not there or not answering: unknown
        return None


def _replication_summary(s: Mapping[str, Any], node_site: Mapping[str, str]) -> dict[str, Any]:
    log = s.get("log") or {}
    lags = s.get("apply_lag_s") or {}
    return {"role": log.get("role"),
            # active: how far each standby is behind (records, seconds), by site
            "lag": {node_site.get(n, n): v for n, v in (log.get("lag") or {}).items()},
            "shipped_upto": s.get("shipped_upto"), "applied_upto": s.get("applied_upto"),
            # standby: from the record's append at the active site to its apply here
            "apply_lag_p99_s": lags.get("p99"), "applied": lags.get("n", 0)}


def _pid_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def render_sites_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    from .cli import render_status

    console = Console()
    table = Table(title=f"sites of {status['deployment']} ({status['work_dir']})")
    for col in ("site", "venue", "lease", "epoch", "window left", "connector", "replication"):
        table.add_column(col)
    for name, site in status["sites"].items():
        if site["error"]:
            table.add_row(name, "-", f"[red]{site['error'][:80]}[/red]", "-", "-", "-", "-")
        for venue, role in site["roles"].items():
            color = {"ACTIVE": "green", "STANDBY": "white"}.get(role["state"], "yellow")
            table.add_row(name, venue, f"[{color}]{role['state']}[/{color}]",
                          str(role["epoch"]), f"{role['window_left_s']:.2f}s",
                          role["connector"] or "?",
                          _replication_text(site["replication"].get(venue)))
    console.print(table)
    w = status["witness"]
    console.print("witness: " + ("none" if w is None else
                                 f"pid {w['pid']} {'alive' if w['alive'] else 'DEAD'}"))
    for name, site in status["sites"].items():
        if site["cluster"] is not None:
            console.rule(f"site {name}")
            render_status(site["cluster"])


def _replication_text(r: Mapping[str, Any] | None) -> str:
    if not r:
        return "-"
    if r["role"] == "active":
        lag = ", ".join(f"{site} {v['records']} rec / {v['seconds']:.3f}s"
                        for site, v in r["lag"].items())
        return f"shipping; behind: {lag or 'nobody'}"
    p99 = r["apply_lag_p99_s"]
    return f"replica: {r['applied']} applied" + (f", lag p99 {p99:.3f}s" if p99 else "")


# -- failover -------------------------------------------------------------------------------

def hand_over(sites: MultiSite, venue: str, to_site: str, *,
              timeout_s: float = HANDOVER_TIMEOUT_S, say: Any = print) -> dict[str, Any]:
    """Hand ``venue`` to ``to_site`` through the active site's controller
    (:meth:`topology.sites.SiteRoles.transfer`), then wait until ``to_site``'s lease and its
    connector are ACTIVE. ``say`` gets progress lines. Returns what happened.

    Raises:
        HandOverRefused: an unknown venue or site, no active site, the controller refused
            (its reason), or the target not active within ``timeout_s`` (its last state).
    """
    import ray

    if venue not in sites.extra.get("venues", []):
        raise HandOverRefused(f"venue {venue!r} is not shared by the sites (shared: "
                              f"{sites.extra.get('venues', [])})")
    if to_site not in sites.sites:
        raise HandOverRefused(f"no site {to_site!r} (sites: {sorted(sites.sites)})")
    if not _head_alive(sites, to_site):
        raise HandOverRefused(f"site {to_site!r}: the head of its cluster is not running")
    states = {name: roles.get(venue) for name, roles in role_view(sites, to_site).items()}
    active = [name for name, state in states.items() if state == "ACTIVE"]
    if to_site in active:
        say(f"{to_site} is already ACTIVE for {venue}; nothing to do")
        return {"accepted": True, "already": True, "states": states}
    if not active:
        raise HandOverRefused(f"no site is ACTIVE for {venue} (states {states}): nothing to "
                              f"hand over; the roles elect one by themselves")
    (source,) = active
    t0 = time.monotonic()
    with sites.use(source):
        result = ray.get(sites.controller(source).transfer.remote(venue, to_site),
                         timeout=ROLE_CALL_TIMEOUT_S)
    if not result["accepted"]:
        raise HandOverRefused(f"{source} refused to hand {venue} to {to_site}: "
                              f"{result['reason']}")
    say(f"{source} released {venue} (epoch {result['epoch']}) for {to_site} "
        f"({result['to_holder']})")
    deadline = t0 + timeout_s
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        role = sites.roles(to_site)["resources"][venue]
        last = {"lease": role["state"], "epoch": role["epoch"],
                "campaign": role["campaign"]["reason"]}
        if role["state"] == "ACTIVE":
            with sites.use(to_site):
                last["connector"] = _gate_state(sites, to_site, venue)
            if last["connector"] == "ACTIVE":
                took_s = time.monotonic() - t0
                say(f"{to_site} ACTIVE for {venue} at epoch {role['epoch']} (lease and "
                    f"connector) after {took_s:.2f} s")
                return {"accepted": True, "already": False, "from": source, "to": to_site,
                        "epoch": role["epoch"], "took_s": took_s}
        time.sleep(0.1)
    raise HandOverRefused(f"{to_site} not ACTIVE for {venue} within {timeout_s:g} s after "
                          f"{source} released it; last seen {last}")


# -- down -----------------------------------------------------------------------------------

def down_sites(work_dir: Path) -> tuple[int, int]:
    """Stop every site's cluster, the witness and the venues recorded in ``work_dir``;
    returns (sites, venues) stopped.

    Raises:
        ClusterError: no multi-site deployment is recorded there.
    """
    sites = MultiSite.load(work_dir, strict=False)
    sites.shutdown()
    sites.forget()
    return len(sites.sites), stop_venues(work_dir)
