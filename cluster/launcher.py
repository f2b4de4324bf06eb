"""Launch a deployment on a local cluster: nodes per site, one simulator process per venue,
one supervision tree per site. Used by ``bastion up --deployment`` and by the demo.

Venue simulators are separate OS processes (a real exchange outlives our crashes). Started by
the demo they die with it (``--exit-with-parent``); started by ``bastion up`` they are detached,
log to the cluster's work dir, and are recorded in ``venues.json`` for ``bastion down``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from .deployment import Deployment, site_tree
from .local import LocalCluster, NodeConfig

READY_PREFIX = "VENUE_READY "


class LaunchError(RuntimeError):
    """A venue or tree of the deployment could not be started; the message says which."""


@dataclass(frozen=True)
class VenueInfo:
    site: str
    name: str
    ws_url: str
    http_url: str
    pid: int
    log_path: str


def cluster_nodes(dep: Deployment, workers_per_site: int = 2) -> list[NodeConfig]:
    """A head (in the first site) and ``workers_per_site`` worker nodes per site."""
    nodes = [NodeConfig("head", site=dep.sites[0].name, zone="a", num_cpus=0)]
    for site in dep.sites:
        for i in range(1, workers_per_site + 1):
            nodes.append(NodeConfig(f"{site.name}-{i}", site=site.name,
                                    zone="abc"[(i - 1) % 3], num_cpus=4))
    return nodes


def start_venues(dep: Deployment, work_dir: Path, *, detached: bool,
                 start_timeout_s: float = 60.0) -> dict[str, VenueInfo]:
    """Start every venue simulator; returns them by ``site/venue``. Keys come from the spec."""
    work_dir.mkdir(parents=True, exist_ok=True)
    started: dict[str, VenueInfo] = {}
    procs: list[subprocess.Popen] = []
    try:
        for site in dep.sites:
            for venue in site.venues:
                key = f"{site.name}/{venue.name}"
                keys_path = work_dir / f"keys-{site.name}-{venue.name}.json"
                keys_path.write_text(json.dumps({venue.client_id: venue.client_secret}))
                keys_path.chmod(0o600)
                log_path = work_dir / f"venue-{site.name}-{venue.name}.log"
                argv = [sys.executable, "-u", "-m", "actors.venue.process", "serve",
                        "--name", f"{site.name}-{venue.name}", "--port", str(venue.port),
                        "--seed", str(venue.seed), "--keys", str(keys_path),
                        "--speedup", repr(float(venue.speedup))]
                if venue.data:
                    argv += ["--data", venue.data]
                if venue.synthetic:
                    argv.append("--synthetic")
                if not detached:
                    argv.append("--exit-with-parent")
                with open(log_path, "wb") as log:
                    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL,
                                            start_new_session=detached)
                procs.append(proc)
                ws, http = _wait_ready(proc, log_path, start_timeout_s, key)
                started[key] = VenueInfo(site.name, venue.name, ws, http, proc.pid,
                                         str(log_path))
    except BaseException:
        for proc in procs:
            _stop_pid(proc.pid)
        raise
    (work_dir / "venues.json").write_text(json.dumps(
        {k: asdict(v) for k, v in started.items()}, indent=2))
    return started


def _wait_ready(proc: subprocess.Popen, log_path: Path, timeout_s: float,
                key: str) -> tuple[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        for line in text.splitlines():
            if line.startswith(READY_PREFIX):
                fields = dict(p.split("=", 1) for p in line[len(READY_PREFIX):].split())
                return fields["ws"], fields["http"]
        if proc.poll() is not None:
            raise LaunchError(f"venue {key} exited with {proc.returncode}:\n{text[-2000:]}")
        time.sleep(0.05)
    raise LaunchError(f"venue {key} not ready after {timeout_s:g} s (log {log_path})")


def _stop_pid(pid: int, grace_s: float = 10.0) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        proc = psutil.Process(pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(grace_s)


def stop_venues(work_dir: Path) -> int:
    """Stop the venues recorded in ``work_dir/venues.json``; returns how many were stopped."""
    path = work_dir / "venues.json"
    if not path.exists():
        return 0
    venues = json.loads(path.read_text())
    for info in venues.values():
        _stop_pid(info["pid"])
    path.unlink()
    for keys in work_dir.glob("keys-*.json"):
        keys.unlink()
    return len(venues)


def start_trees(dep: Deployment, venues: dict[str, VenueInfo], *,
                store_url: str | None = None) -> list[Any]:
    """One supervision tree per site, in the deployment's namespace."""
    from supervisors import start_tree

    trees = []
    for site in dep.sites:
        urls = {v.name: venues[f"{site.name}/{v.name}"].ws_url for v in site.venues}
        trees.append(start_tree(site_tree(site, urls), namespace=dep.namespace,
                                store_url=store_url or dep.store_url))
    return trees


def launch(dep: Deployment, work_dir: Path, *, detached: bool, include_dashboard: bool = True,
           workers_per_site: int = 2, store_url: str | None = None
           ) -> tuple[LocalCluster, dict[str, VenueInfo], list[Any]]:
    """Cluster, venues, trees — in that order; on failure everything started is stopped."""
    cluster = LocalCluster.start(cluster_nodes(dep, workers_per_site), work_dir=work_dir,
                                 include_dashboard=include_dashboard)
    try:
        venues = start_venues(dep, work_dir, detached=detached)
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", cluster.auth_mode)
        if not ray.is_initialized():
            ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        trees = start_trees(dep, venues, store_url=store_url or dep.store_url or
                            f"sqlite://{work_dir / 'journal'}")
    except BaseException:
        stop_venues(work_dir)
        cluster.shutdown()
        raise
    return cluster, venues, trees
