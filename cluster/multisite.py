"""Several sites on one machine, each its own Ray cluster, joined by one heartbeat mesh, with a
witness process: the local stand-in for a geographically redundant deployment.

    sites = MultiSite.start({"tokyo": 1, "london": 1}, work_dir, resources=["deribit"],
                            preferred={"deribit": "tokyo"})
    with sites.use("tokyo"):          # this process's Ray connection is now tokyo's cluster
        start_tree(...)
    sites.cut_off("tokyo")            # tokyo's agents and the others stop hearing each other
    sites.heal()
    sites.shutdown()

A Ray cluster's control plane lives in one place, so a region must be its own cluster: each site
here is a :class:`~cluster.local.LocalCluster` (a head + workers), with a mesh agent on every
node (:class:`topology.ray_mesh.RayMesh`) peered with every agent of every site and with the
witness, all over CURVE (each agent makes its own key pair; peers learn the public keys with
the endpoints). The head's agent of each site is its *controller*: it hosts the site's lease voter and
failover roles (:class:`topology.sites.SiteRoles`); the voters are the controllers and the
witness, so two sites break ties through the third place. Role changes reach the actors
subscribed per resource (the venue connectors) as ``on_role_event`` calls.

``cut_off(site)`` partitions a site at the mesh's socket level (every link between its agents
and everyone else dropped both ways, on both ends): what the lease and the order path see of a
real partition. Real network partitions (namespaces + nftables) are ``cluster.chaos.netns``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cluster.local import LocalCluster, NodeConfig

MESH_NAMESPACE = "bastion-mesh"
WITNESS_ID = "witness"
READY_TIMEOUT_S = 30.0


@dataclass
class WitnessProcess:
    """The witness: ``python -m topology.witness`` with a loopback control socket. ``popen``
    is None for a witness found through a state file (:meth:`MultiSite.load`)."""

    pid: int
    endpoint: str
    control: str
    public_key: str
    popen: subprocess.Popen[str] | None = None

    @classmethod
    def start(cls, work_dir: Path, mesh_preset: str, lease: Mapping[str, Any], *,
              detached: bool = False) -> WitnessProcess:
        """Start it and wait for its ready line. ``detached``: its own session, its output to
        ``witness.out`` in ``work_dir``, and it outlives this process (``bastion up``)."""
        from topology.keys import generate_keypair, load_public_key

        work_dir.mkdir(parents=True, exist_ok=True)
        public, secret = generate_keypair(work_dir / "keys", WITNESS_ID, overwrite=True)
        config = {"node_id": WITNESS_ID, "site": WITNESS_ID, "preset": mesh_preset,
                  "secret_key_file": str(secret),
                  "voter_only": True, "lease_voter": {
                      "store": str(work_dir / "witness-promises.json"), "preset": "local",
                      "overrides": dict(lease)}}
        path = work_dir / "witness.json"
        path.write_text(json.dumps(config))
        out_path = work_dir / "witness.out"
        argv = [sys.executable, "-u", "-m", "topology.witness", "--config", str(path)]
        with open(work_dir / "witness.log", "w") as log, \
                (open(out_path, "w") if detached else contextlib.nullcontext()) as out:
            popen = subprocess.Popen(argv, stdout=out if detached else subprocess.PIPE,
                                     stderr=log, text=True, stdin=subprocess.DEVNULL,
                                     start_new_session=detached)
        deadline = time.monotonic() + READY_TIMEOUT_S
        line = ""
        while time.monotonic() < deadline and popen.poll() is None:
            if detached:
                line = next((x for x in out_path.read_text().splitlines()
                             if x.startswith("MESH_READY ")), "")
                if not line:
                    time.sleep(0.05)
            else:
                assert popen.stdout is not None
                line = popen.stdout.readline().strip()
            if line.startswith("MESH_READY "):
                break
        if not line.startswith("MESH_READY "):
            popen.kill()
            popen.wait(5)
            raise RuntimeError(f"witness did not start (see {work_dir / 'witness.log'})")
        fields = dict(part.split("=", 1) for part in line.split()[1:])
        return cls(popen.pid, fields["endpoint"], fields["control"],
                   load_public_key(public).decode(), popen)

    def call(self, op: str, **args: Any) -> Any:
        from topology.agent_process import ControlClient

        client = ControlClient(self.control, timeout_s=5.0)
        try:
            return client.call(op, **args)
        finally:
            client.close()

    def stop(self, grace_s: float = 5.0) -> None:
        if self.popen is not None:
            if self.popen.poll() is None:
                self.popen.terminate()
                try:
                    self.popen.wait(grace_s)
                except subprocess.TimeoutExpired:
                    self.popen.kill()
                    self.popen.wait(grace_s)
            return
        from cluster.local import stop_process

        stop_process(self.pid, grace_s, cmdline_has="topology.witness")


@dataclass
class Site:
    name: str
    cluster: LocalCluster
    #: node -> (endpoint, site, CURVE public key)
    agents: dict[str, tuple[str, str, str | None]] = field(default_factory=dict)
    controller: str = ""  # the head's node id


class MultiSite:
    """See the module docstring."""

    def __init__(self, sites: dict[str, Site], witness: WitnessProcess | None,
                 work_dir: Path) -> None:
        self.sites = sites
        self.witness = witness
        self.work_dir = work_dir
        self._current: str | None = None
        self._voters: list[str] = []
        self._lease_fields: dict[str, Any] = {}
        self._resources: list[str] = []
        self._preferred: dict[str, str] = {}
        self._restore: str | None = None  # the driver's own Ray cluster, re-joined at shutdown
        #: the caller's own state, saved with :meth:`save` (e.g. the deployment's)
        self.extra: dict[str, Any] = {}

    # -- start ---------------------------------------------------------------------------
    @classmethod
    def start(cls, workers: Mapping[str, int], work_dir: Path, *, resources: Sequence[str],
              preferred: Mapping[str, str], mesh_preset: str = "local",
              lease: Mapping[str, Any] | None = None, witness: bool = True,
              include_dashboard: bool = False, detached: bool = False) -> MultiSite:
        """Clusters, mesh, witness and roles, in that order; on failure all is stopped.
        ``detached``: the witness outlives this process too (the clusters always do); then
        :meth:`save` the state so that another process can :meth:`load` it."""
        from topology.config import MeshConfig
        from topology.lease import LeaseConfig

        lease_cfg = LeaseConfig.preset("local", **dict(lease or {}))
        lease_fields = lease_cfg.model_dump()
        import ray

        work_dir.mkdir(parents=True, exist_ok=True)
        out = cls({}, None, work_dir)
        if ray.is_initialized():
            out._restore = ray.get_runtime_context().gcs_address
        try:
            if witness:
                out.witness = WitnessProcess.start(work_dir / "witness", mesh_preset,
                                                   lease_fields, detached=detached)
            for name, n in workers.items():
                nodes = [NodeConfig("head", site=name, zone="a", num_cpus=0)] + [
                    NodeConfig(f"{name}-{i}", site=name, zone="abc"[(i - 1) % 3], num_cpus=4)
                    for i in range(1, n + 1)]
                cluster = LocalCluster.start(nodes, work_dir=work_dir / f"site-{name}",
                                             include_dashboard=include_dashboard)
                out.sites[name] = Site(name, cluster)
                with out.use(name):
                    import ray

                    from topology.ray_mesh import RayMesh

                    mesh = RayMesh.start(namespace=MESH_NAMESPACE, site=name,
                                         config=MeshConfig.preset(mesh_preset),
                                         keys_dir=str(work_dir / f"site-{name}" / "keys"))
                    out.sites[name].agents = mesh.endpoints()
                    out.sites[name].controller = next(
                        n["NodeID"] for n in ray.nodes()
                        if n["Alive"] and n["Labels"].get("bastion-node") == "head")
            everyone = {nid: ep for s in out.sites.values() for nid, ep in s.agents.items()}
            if out.witness is not None:
                for nid, (endpoint, site, key) in everyone.items():
                    out.witness.call("add_peer", node_id=nid, endpoint=endpoint, site=site,
                                     public_key=key)
                everyone[WITNESS_ID] = (out.witness.endpoint, WITNESS_ID,
                                        out.witness.public_key)
            voters = [s.controller for s in out.sites.values()] + (
                [WITNESS_ID] if out.witness is not None else [])
            for name in out.sites:
                with out.use(name):
                    from topology.ray_mesh import RayMesh

                    mesh = RayMesh.attach(MESH_NAMESPACE)
                    mesh.connect({k: v for k, v in everyone.items()
                                  if k not in out.sites[name].agents})
            out._voters = voters
            out._lease_fields = lease_fields
            out._resources = list(resources)
            out._preferred = dict(preferred)
        except BaseException:
            out.shutdown()
            raise
        return out

    def enable_roles(self, subscribers: Mapping[str, Mapping[str, list[tuple[str, str]]]]
                     ) -> None:
        """Start every site's failover roles; ``subscribers``: site -> resource -> actors
        (``(name, namespace)``) told of role changes. Call after the subscribers' trees exist."""
        for name, site in self.sites.items():
            with self.use(name):
                import ray

                handle = ray.get_actor(f"mesh/{site.controller}", namespace=MESH_NAMESPACE)
                ray.get(handle.enable_roles.remote(
                    self._resources, self._voters, self._lease_fields,
                    str(self.work_dir / f"site-{name}" / "promises"), self._preferred,
                    dict(subscribers.get(name, {}))), timeout=30)

    def enable_replication(self, resource: str, store_urls: Mapping[str, str],
                           streams: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
        """Replicate journal streams for ``resource`` between the sites' controllers
        (:mod:`topology.journal_ship`): ``store_urls`` site -> its journal store, ``streams``
        site -> ``{key: stream}`` shipped while that site is active. Each standby keeps them in
        ``replica/<resource>/<key>`` of its own store. Call after :meth:`enable_roles`.
        Returns site -> replica prefix."""
        out = {}
        for name in self.sites:
            with self.use(name):
                import ray

                out[name] = ray.get(self.controller(name).enable_replication.remote(
                    resource, store_urls[name], dict(streams.get(name, {}))), timeout=30)
        return out

    def replication(self, site: str) -> dict[str, Any]:
        """``site``'s controller: per resource, what was shipped and applied, and the lag."""
        import ray

        with self.use(site):
            return ray.get(self.controller(site).replication_status.remote(), timeout=10)

    # -- persistence: found again from another process -----------------------------------
    STATE_FILE = "multisite.json"

    def save(self, extra: Mapping[str, Any] | None = None) -> Path:
        """Write ``multisite.json`` in the work dir: per site its Ray address, cluster dir,
        controller node id and agents; the witness (pid, endpoints, key); the roles' inputs;
        ``extra`` (the caller's own, e.g. the deployment's), read back as :attr:`extra`."""
        state = {
            "version": 1,
            "sites": {name: {"address": s.cluster.address, "cluster_dir": str(s.cluster.work_dir),
                             "controller": s.controller,
                             "agents": {nid: list(ep) for nid, ep in s.agents.items()}}
                      for name, s in self.sites.items()},
            "witness": None if self.witness is None else {
                "pid": self.witness.pid, "endpoint": self.witness.endpoint,
                "control": self.witness.control, "public_key": self.witness.public_key},
            "voters": self._voters, "lease": self._lease_fields,
            "resources": self._resources, "preferred": self._preferred,
            "extra": dict(extra or self.extra),
        }
        path = self.work_dir / self.STATE_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, work_dir: Path, *, strict: bool = True) -> MultiSite:
        """The deployment :meth:`save` recorded in ``work_dir``. ``strict=False`` (for a
        teardown): a site whose cluster is no longer recorded is left out, not an error.

        Raises:
            ClusterError: no state file, or (strict) a site's cluster is not recorded.
        """
        from cluster.local import ClusterError

        path = Path(work_dir) / cls.STATE_FILE
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise ClusterError(f"no multi-site deployment recorded in {path}") from None
        w = state.get("witness")
        witness = None if w is None else WitnessProcess(w["pid"], w["endpoint"], w["control"],
                                                        w["public_key"])
        out = cls({}, witness, Path(work_dir))
        for name, s in state["sites"].items():
            try:
                cluster = LocalCluster.load(s["cluster_dir"])
            except ClusterError:
                if strict:
                    raise
                continue
            agents = {nid: (ep[0], ep[1], ep[2]) for nid, ep in s["agents"].items()}
            out.sites[name] = Site(name, cluster, agents, s["controller"])
        out._voters = list(state["voters"])
        out._lease_fields = dict(state["lease"])
        out._resources = list(state["resources"])
        out._preferred = dict(state["preferred"])
        out.extra = dict(state.get("extra") or {})
        return out

    def forget(self) -> None:
        """Remove the state file (after :meth:`shutdown`)."""
        with contextlib.suppress(FileNotFoundError):
            (self.work_dir / self.STATE_FILE).unlink()

    # -- the driver's connection ---------------------------------------------------------
    @contextlib.contextmanager
    def use(self, site: str) -> Iterator[Site]:
        """Point this process's Ray connection at ``site``'s cluster (for the block)."""
        import ray

        target = self.sites[site]
        if self._current != site:
            if ray.is_initialized():
                ray.shutdown()
            os.environ.setdefault("RAY_AUTH_MODE", target.cluster.auth_mode)
            ray.init(address=target.cluster.address, logging_level="ERROR",
                     log_to_driver=False)
            self._current = site
        yield target

    def controller(self, site: str) -> Any:
        """The handle of ``site``'s controller agent (inside ``use(site)``)."""
        import ray

        return ray.get_actor(f"mesh/{self.sites[site].controller}", namespace=MESH_NAMESPACE)

    def roles(self, site: str) -> dict[str, Any]:
        import ray

        with self.use(site):
            return ray.get(self.controller(site).roles_status.remote(), timeout=10)

    # -- faults ----------------------------------------------------------------------------
    def cut_off(self, site: str) -> float:
        """Drop every mesh frame between ``site``'s agents and all others, both ways, at both
        ends (a partition of that site, as the mesh and the leases see it). Returns the wall
        time at which ``site``'s own agents were cut (they are first): from then on it can
        neither hear nor renew."""
        return self._set_cut(site, 1.0)

    def heal(self) -> None:
        for name in self.sites:
            self._set_cut(name, 0.0)

    def _set_cut(self, site: str, p: float) -> float:
        import ray

        first_cut = float("nan")
        inside = self.sites[site].agents
        outside = {nid for s in self.sites.values() if s.name != site for nid in s.agents}
        if self.witness is not None:
            outside.add(WITNESS_ID)
        order = [site] + [n for n in self.sites if n != site]  # the site itself first
        for name in order:
            other = self.sites[name]
            with self.use(name):
                handles = {nid: ray.get_actor(f"mesh/{nid}", namespace=MESH_NAMESPACE)
                           for nid in other.agents}
                refs = []
                for nid, handle in handles.items():
                    peers = outside if nid in inside else set(inside)
                    for peer in peers:
                        refs.append(handle.set_link_faults.remote(peer, p, p) if p else
                                    handle.clear_link_faults.remote(peer))
                ray.get(refs, timeout=30)
            if name == site:
                first_cut = time.time()
        if self.witness is not None:
            for nid in inside:
                if p:
                    self.witness.call("set_link_faults", peer=nid, drop_out=p, drop_in=p)
                else:
                    self.witness.call("clear_link_faults", peer=nid)
        return first_cut

    # -- stop ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        self._current = None
        # all sites at once: each waits out its nodes' grace before it kills what is left
        threads = [threading.Thread(target=site.cluster.shutdown, name=f"down-{name}")
                   for name, site in self.sites.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.witness is not None:
            self.witness.stop()
        if self._restore is not None:  # hand the driver back its own cluster
            ray.init(address=self._restore, logging_level="ERROR", log_to_driver=False)
            self._restore = None


def trades_by_site(rpc: Any, instrument: str = "BTC-PERPETUAL") -> dict[str, list[tuple[int, int]]]:
    """The venue's own record, the judge of a failover: every trade of the account on
    ``instrument``, grouped by the site in its label (``e<epoch>.site-<site>-<...>``), as
    ``[(timestamp_ms, epoch)]`` oldest first. ``rpc(method, params)`` calls the venue. A trade
    whose label is unstamped or foreign raises ValueError (nothing else trades the account)."""
    import re

    label = re.compile(r"^e(\d+)\.site-([a-z0-9]+)-")
    out: dict[str, list[tuple[int, int]]] = {}
    start = 1
    while True:
        got = rpc("private/get_user_trades_by_instrument",
                  {"instrument_name": instrument, "start_seq": start, "count": 1000,
                   "sorting": "asc"})
        for t in got["trades"]:
            m = label.match(t.get("label") or "")
            if m is None:
                raise ValueError(f"a trade with an unstamped or foreign label: {t}")
            out.setdefault(m.group(2), []).append((int(t["timestamp"]), int(m.group(1))))
        if not got.get("has_more") or not got["trades"]:
            return out
        start = got["trades"][-1]["trade_seq"] + 1


def failover_tree(site: str, venue: str, ws_url: str, client_id: str, client_secret: str, *,
                  instruments: Sequence[str] = ("BTC-PERPETUAL",),
                  flow_interval_s: float | None = 0.05, replicated: bool = True) -> Any:
    """A site's tree for a venue under failover: its role-gated connector
    (``site-<site>/<venue>``; subscribe it to the venue's roles) and, unless
    ``flow_interval_s`` is None, a client order flow into it (``site-<site>/flow``).
    ``replicated``: on promotion the connector imports the replicated journal of the site it
    replaces (``replica/<venue>/<venue>``; see :func:`connector_streams`)."""
    from supervisors import ChildSpec, Placement, SupervisorSpec

    children = [ChildSpec(id=venue, cls="actors.connector:VenueConnector",
                          kwargs={"venue": venue, "ws_url": ws_url, "client_id": client_id,
                                  "client_secret": client_secret,
                                  "instruments": list(instruments), "role_gated": True,
                                  "replica": f"replica/{venue}/{venue}" if replicated
                                  else None},
                          placement=Placement(site=site))]
    if flow_interval_s is not None:
        children.append(ChildSpec(id="flow", cls="actors.order_flow:OrderFlow",
                                  kwargs={"connector": f"site-{site}/{venue}",
                                          "instrument": instruments[0],
                                          "interval_s": flow_interval_s}))
    return SupervisorSpec(id=f"site-{site}", children=children)


def connector_streams(site: str, venue: str, namespace: str = "bastion") -> dict[str, str]:
    """The journal stream of :func:`failover_tree`'s connector, keyed as its replica is."""
    return {venue: f"{namespace}/site-{site}/{venue}"}
