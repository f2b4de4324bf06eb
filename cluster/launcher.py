"""Launch a deployment on a local cluster: nodes per site, one simulator process per venue,
one supervision tree per site. Used by ``bastion up --deployment`` and by the demo.

Venue simulators are separate OS processes (a real exchange outlives our crashes). Started by
the demo they die with it (``--exit-with-parent``); started by ``bastion up`` they are detached,
log to the cluster's work dir, and are recorded in ``venues.json`` for ``bastion down``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .deployment import Deployment, SiteSpec, site_tree
from .local import LocalCluster, NodeConfig, stop_process


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


#: ``VenueInfo.site`` of a venue every site shares (``failover.venues``), keyed by its name
SHARED = "*"


def start_venues(dep: Deployment, work_dir: Path, *, detached: bool,
                 start_timeout_s: float = 60.0) -> dict[str, VenueInfo]:
    """Start every venue simulator; returns them by ``site/venue``, and a shared venue
    (``failover.venues``) once, by its name. Keys come from the spec."""
    from actors.venue.process import VenueProcess

    work_dir.mkdir(parents=True, exist_ok=True)
    shared = set(dep.failover.venues) if dep.failover is not None else set()
    started: dict[str, VenueInfo] = {}
    procs: list[VenueProcess] = []
    try:
        for site in dep.sites:
            for venue in site.venues:
                owner = SHARED if venue.name in shared else site.name
                key = venue.name if owner == SHARED else f"{site.name}/{venue.name}"
                if key in started:
                    continue
                name = venue.name if owner == SHARED else f"{site.name}-{venue.name}"
                log_path = work_dir / f"venue-{name}.log"
                proc = VenueProcess.start(
                    name, port=venue.port, data=venue.data,
                    seed=venue.seed, keys={venue.client_id: venue.client_secret},
                    speedup=venue.speedup, synthetic=venue.synthetic, options=venue.options,
                    start_timeout_s=start_timeout_s,
                    log_path=log_path if detached else None)
                procs.append(proc)
                started[key] = VenueInfo(owner, venue.name, proc.ws_url, proc.http_url,
                                         proc.pid, str(log_path) if detached else "")
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    (work_dir / "venues.json").write_text(json.dumps(
        {k: asdict(v) for k, v in started.items()}, indent=2))
    return started


def stop_venues(work_dir: Path) -> int:
    """Stop the venues recorded in ``work_dir/venues.json``; returns how many were stopped."""
    path = work_dir / "venues.json"
    if not path.exists():
        return 0
    venues = json.loads(path.read_text())
    for info in venues.values():
        stop_process(info["pid"], cmdline_has="actors.venue.process")
    path.unlink()
    return len(venues)


def site_venues(site: SiteSpec, venues: Mapping[str, VenueInfo]) -> dict[str, VenueInfo]:
    """The simulators ``site`` trades on, by venue name (its own, and the shared ones)."""
    return {v.name: venues.get(f"{site.name}/{v.name}") or venues[v.name] for v in site.venues}


def start_site_tree(dep: Deployment, site: SiteSpec, venues: Mapping[str, VenueInfo], *,
                    store_url: str | None, gated: Collection[str] = ()) -> Any:
    """``site``'s supervision tree in the deployment's namespace (after ``ray.init``)."""
    from supervisors import start_tree

    infos = site_venues(site, venues)
    tree = site_tree(site, {k: i.ws_url for k, i in infos.items()},
                     http_urls={k: i.http_url for k, i in infos.items()}, gated=gated)
    return start_tree(tree, namespace=dep.namespace, store_url=store_url)


def start_trees(dep: Deployment, venues: dict[str, VenueInfo], *,
                store_url: str | None = None) -> list[Any]:
    """One supervision tree per site, in the deployment's namespace."""
    return [start_site_tree(dep, site, venues, store_url=store_url or dep.store_url)
            for site in dep.sites]


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
