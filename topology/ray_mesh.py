"""The mesh on a Ray cluster: one :class:`~topology.agent.MeshAgent` per Ray node, each in a
Ray actor pinned to its node (hard node affinity, no CPU), so it shares its node's fate — a
crashed or hung node takes its agent with it and the others notice in well under a second.

    mesh = RayMesh.start(namespace="bastion-mesh", site="tokyo", config=MeshConfig.preset("local"))
    mesh.subscribe(tree_root_name, tree_namespace)   # "down"/"up" events -> on_node_event(...)
    mesh.status()                                    # every agent's view
    mesh.stop()

Node ids are Ray node ids (hex), so a subscriber such as a supervisor can act on an event
directly. An agent's loop must not be starved by the work it watches: Ray runs workers at a
low CPU priority (nice 15); the actor raises its own threads to real-time ``SCHED_RR`` (or,
where that is not permitted, back to nice ``nice``: :mod:`topology.priority`) before it starts
the agent, so a saturated node does not look dead. This module is
the only one in ``topology`` that calls Ray.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from topology.agent import MeshAgent, Peer
from topology.clock import MonotonicClock, SkewedClock
from topology.config import MeshConfig
from topology.priority import Priority, raise_priority

log = logging.getLogger(__name__)

ACTOR_PREFIX = "mesh/"
CALL_TIMEOUT_S = 10.0
DELIVERY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 3.0
ROLE_LOG_KEPT = 2000  # role events a controller keeps (renewals come every ~0.3 s)


class MeshAgentActor:
    """A Ray actor hosting this node's agent. Created by :meth:`RayMesh.start`."""

    def __init__(self, site: str, host: str, config: Mapping[str, Any], *, port: int = 0,
                 nice: int | None = 0, voter_only: bool = False,
                 keys_dir: str | None = None, priority: Priority = "realtime") -> None:
        import ray

        self.node_id = ray.get_runtime_context().get_node_id()
        self.site = site
        # SCHED_RR when permitted, else nice (Ray runs workers at nice 15): topology.priority
        self.priority = raise_priority(priority, nice=nice)
        self.reniced = self.priority != "inherit"
        cfg = MeshConfig.from_mapping(dict(config))
        curve = None
        if keys_dir is not None:  # CURVE: this node's own key pair, made here, secret 0600
            from topology.keys import generate_keypair, load_identity

            _, secret = generate_keypair(keys_dir, self.node_id, overwrite=True)
            curve = load_identity(secret)
        # The node's clock as the agent and the roles it hosts read it; chaos skews it.
        self.clock = SkewedClock(MonotonicClock())
        self.agent = MeshAgent(self.node_id, site, f"tcp://{host}:{port or '*'}", {}, cfg,
                               voter_only=voter_only, curve=curve, clock=self.clock)
        self.public_key = curve.public.decode() if curve is not None else None
        self.keys_dir = keys_dir  # where a new node's agent makes its key pair too
        self.delivery: Counter[str] = Counter()
        self._subscribers: list[tuple[str, str, str]] = []
        self.roles: Any = None
        self.role_log: list[dict[str, Any]] = []
        self._role_seq = 0
        self._role_subs: dict[str, list[tuple[str, str]]] = {}
        self._shippers: dict[str, Any] = {}  # resource -> topology.journal_ship.JournalShipper
        self.agent.subscribe(self._deliver)
        self.agent.start()
        from topology.mesh_metrics import MeshMetrics

        self.metrics = MeshMetrics(self.node_id, site, self.agent.status,
                                   lambda: self.roles.status() if self.roles else None)
        self.metrics.start()

    # -- peers and faults ------------------------------------------------------------------
    def endpoint(self) -> tuple[str, str, str, str | None]:
        """``(node_id, site, endpoint, CURVE public key or None)``."""
        return self.node_id, self.site, str(self.agent.endpoint), self.public_key

    def peer_table(self) -> dict[str, tuple[str, str, str | None]]:
        """This agent's peers as ``set_peers`` takes them (public keys only)."""
        return {nid: (p.endpoint, p.site, p.public_key.decode() if p.public_key else None)
                for nid, p in self.agent.peers().items()}

    def mesh_config(self) -> dict[str, Any]:
        """The agent's :class:`~topology.config.MeshConfig` fields (a new node's agent must
        run the same)."""
        return self.agent.config.model_dump()

    def remove_peer(self, node_id: str) -> None:
        """Forget a peer that left (after ``stop(leave=True)`` on its node)."""
        self.agent.remove_peer(node_id)

    def set_peers(self, peers: Mapping[str, Sequence[str | None]]) -> list[str]:
        """Make the peers exactly these ``{node_id: (endpoint, site[, public key])}`` (self
        ignored); returns the node ids added."""
        current = self.agent.peers()
        added = []
        for nid, (endpoint, site, *key) in peers.items():
            if nid == self.node_id or nid in current:
                continue
            public = key[0] if key and key[0] else None
            self.agent.add_peer(nid, Peer(str(endpoint), str(site),
                                          public.encode() if public else None))
            added.append(nid)
        for nid in set(current) - set(peers):
            self.agent.remove_peer(nid)
        return added

    def set_link_faults(self, peer: str, drop_out: float = 0.0, drop_in: float = 0.0,
                        delay_s: float = 0.0) -> None:
        self.agent.set_link_faults(peer, drop_out=drop_out, drop_in=drop_in, delay_s=delay_s)

    def clear_link_faults(self, peer: str | None = None) -> None:
        self.agent.clear_link_faults(peer)

    def set_clock_offset(self, offset_s: float) -> float:
        """Skew this node's clock (chaos, ``cluster.chaos``): from now on the agent and the site
        roles it hosts read the monotonic clock plus ``offset_s`` (positive: ahead). A smaller
        offset than the current one steps the clock back. Returns the previous offset."""
        previous = self.clock.offset_s
        self.clock.offset_s = SkewedClock(self.clock.base, offset_s).offset_s  # checks finite
        log.warning("mesh %s: clock offset %+.3f s -> %+.3f s", self.node_id[:8], previous,
                    self.clock.offset_s)
        return previous

    def clock_status(self) -> dict[str, float]:
        """The skew and one reading of this node's clock next to the machine's monotonic
        clock (``time.monotonic`` is one clock per machine, so a process on the same machine
        can compare)."""
        return {"offset_s": self.clock.offset_s, "now_s": self.clock.now_s(),
                "monotonic_s": time.monotonic()}

    # -- reading ---------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {**self.agent.status(), "reniced": self.reniced, "priority": self.priority,
                "keys_dir": self.keys_dir,
                "delivery": dict(self.delivery),
                "subscribers": [list(s) for s in self._subscribers]}

    def events_since(self, seq: int = 0) -> list[dict[str, Any]]:
        return self.agent.events_since(seq)

    def member_states(self) -> dict[str, str]:
        return {nid: m["state"] for nid, m in self.agent.status()["members"].items()}

    # -- subscribers -----------------------------------------------------------------------
    def subscribe_actor(self, name: str, namespace: str, method: str = "on_node_event") -> None:
        """Deliver every membership event to ``method`` of the named actor, in order, one at a
        time (each call awaited before the next; a failed call is counted and delivery goes
        on — the subscriber's own watches still see deaths)."""
        entry = (name, namespace, method)
        if entry not in self._subscribers:
            self._subscribers.append(entry)

    def _deliver(self, event: Any) -> None:
        if event.kind not in ("up", "suspect", "down", "left", "reaped"):
            return
        import ray

        body = event.to_dict()
        for name, namespace, method in list(self._subscribers):
            try:
                handle = ray.get_actor(name, namespace=namespace)
                ray.get(getattr(handle, method).remote(body), timeout=DELIVERY_TIMEOUT_S)
                self.delivery[f"{event.kind}_delivered"] += 1
            except Exception as exc:  # noqa: BLE001 - counted; delivery goes on
                self.delivery["failed"] += 1
                log.warning("mesh %s: %s event to %s/%s failed: %r", self.node_id[:8],
                            event.kind, namespace, name, exc)

    # -- site roles (on the site's controller agent) --------------------------------------
    def enable_roles(self, resources: list[str], voters: list[str], lease: Mapping[str, Any],
                     promise_dir: str, preferred: Mapping[str, str],
                     subscribers: Mapping[str, list[tuple[str, str]]]) -> None:
        """Host this site's failover roles (:class:`topology.sites.SiteRoles`) on this agent
        and send each role change to the ``on_role_event`` of the actors subscribed to its
        resource (``{resource: [(name, namespace), ...]}``): ``activate`` / ``renew`` with the
        epoch and ``valid_for_s`` (the acting window left, on this clock, when sent) and
        ``sent_wall_s``; ``deactivate`` with the reason. Calls are fired in order and not
        awaited (a renewal must never wait on a busy subscriber); a subscriber restarted
        under the same name gets the next renewal."""
        from pathlib import Path

        from topology.lease import LeaseConfig
        from topology.sites import SiteRoles

        self._role_subs = {r: [tuple(x) for x in v] for r, v in subscribers.items()}
        self.roles = SiteRoles(
            self.agent, self.site, resources, voters, LeaseConfig(**dict(lease)),
            Path(promise_dir), preferred=dict(preferred),
            on_activate=lambda r, e, until: self._role_event("activate", r, e, until),
            on_renew=lambda r, e, until: self._role_event("renew", r, e, until),
            on_deactivate=lambda r, e, why: self._role_event("deactivate", r, e, None, why))
        self.roles.start()

    def _role_event(self, kind: str, resource: str, epoch: int, until_s: float | None,
                    reason: str = "") -> None:
        import ray

        event: dict[str, Any] = {"kind": kind, "resource": resource, "epoch": epoch,
                                 "sent_wall_s": time.time(), "reason": reason,
                                 "site": self.site}
        if until_s is not None:
            event["valid_for_s"] = until_s - self.roles.clock.now_s()
        self._role_seq += 1
        event["seq"] = self._role_seq
        self.role_log.append(event)
        del self.role_log[:-ROLE_LOG_KEPT]
        for name, namespace in self._role_subs.get(resource, []):
            try:
                ray.get_actor(name, namespace=namespace).on_role_event.remote(event)
                self.delivery[f"role_{kind}_sent"] += 1
            except Exception:  # noqa: BLE001 - not there (restarting): the next renewal
                self.delivery["role_undeliverable"] += 1

    def role_events_since(self, seq: int = 0) -> list[dict[str, Any]]:
        """The role events (activate / renew / deactivate) numbered above ``seq`` (the last
        ``ROLE_LOG_KEPT`` are kept): a watcher that polls loses none."""
        return [e for e in self.role_log if e["seq"] > seq]

    def roles_status(self) -> dict[str, Any]:
        return {**self.roles.status(), "events": self.role_log[-20:]}

    def enable_replication(self, resource: str, store_url: str, streams: Mapping[str, str],
                           *, replica_prefix: str | None = None,
                           store_opener: str = "supervisors.journal:open_store",
                           poll_s: float = 0.01) -> str:
        """Ship the journal ``streams`` (``{key: stream}``) of the store at ``store_url`` to
        the other sites while this site is active for ``resource``, and keep theirs in
        ``<replica_prefix>/<key>`` while it is standby (:mod:`topology.journal_ship`).
        ``store_opener`` ("module:function") opens the store: ``topology`` imports no
        application code. Call after :meth:`enable_roles`. Returns the replica prefix."""
        import importlib

        from topology.journal_ship import JournalShipper

        if self.roles is None:
            raise RuntimeError("enable_roles first: replication follows the site's roles")
        module, _, func = store_opener.partition(":")
        store = getattr(importlib.import_module(module), func)(store_url)
        prefix = replica_prefix or f"replica/{resource}"
        shipper = JournalShipper(store, streams, replica_prefix=prefix, poll_s=poll_s)
        shipper.attach(self.roles.open_log(resource, shipper.apply,
                                           on_truncate=shipper.on_truncate))
        shipper.start()
        self._shippers[resource] = shipper
        return prefix

    def replication_status(self) -> dict[str, Any]:
        """Per replicated resource: streams shipped / applied, lag, the log's status."""
        return {r: s.status() for r, s in self._shippers.items()}

    def may_act(self, resource: str) -> bool:
        return self.roles.may_act(resource)

    def transfer(self, resource: str, to_site: str) -> dict[str, Any]:
        return self.roles.transfer(resource, to_site).to_dict()

    def stop(self, leave: bool = True) -> None:
        for shipper in self._shippers.values():
            shipper.stop()
        self.metrics.stop()
        if self.roles is not None:
            self.roles.stop(release=leave)
        self.agent.stop(leave=leave)

    def __repr__(self) -> str:  # what the dashboard shows
        states = Counter(self.member_states().values())
        return f"MeshAgent({self.site} {self.node_id[:8]} {dict(states)})"


@dataclass
class RayMesh:
    """The agents of one Ray cluster, by node id."""

    namespace: str
    handles: dict[str, Any]

    @classmethod
    def start(cls, *, namespace: str, site: str | Mapping[str, str], config: MeshConfig,
              host: str | None = None, nodes: Iterable[str] | None = None,
              external_peers: Mapping[str, Sequence[str | None]] | None = None,
              nice: int | None = 0, keys_dir: str | None = None) -> RayMesh:
        """An agent on every alive node (or on ``nodes``), named ``mesh/<node id>`` in
        ``namespace`` (detached), all peered with each other and with ``external_peers``
        (agents elsewhere, e.g. another site's or a witness: ``{node_id: (endpoint, site[,
        public key])}``). ``site``: one site for all, or ``{node_id: site}``. ``host``: the
        address agents bind (default each node's Ray address). ``keys_dir``: CURVE on — each
        agent makes its own key pair there (a directory on its node; the secret never leaves
        it) and peers learn the public keys with the endpoints."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        alive = {n["NodeID"]: n for n in ray.nodes() if n["Alive"]}
        wanted = list(nodes) if nodes is not None else list(alive)
        remote = ray.remote(MeshAgentActor)
        handles: dict[str, Any] = {}
        for nid in wanted:
            node_site = site if isinstance(site, str) else site[nid]
            name = ACTOR_PREFIX + nid
            with contextlib.suppress(ValueError):
                ray.kill(ray.get_actor(name, namespace=namespace))
            handles[nid] = remote.options(
                name=name, namespace=namespace, lifetime="detached", num_cpus=0,
                max_restarts=0, max_concurrency=8,
                scheduling_strategy=NodeAffinitySchedulingStrategy(nid, soft=False),
            ).remote(node_site, host or alive[nid]["NodeManagerAddress"],
                     config.model_dump(), nice=nice, keys_dir=keys_dir)
        mesh = cls(namespace, handles)
        mesh.connect(external_peers or {})
        return mesh

    @classmethod
    def attach(cls, namespace: str) -> RayMesh:
        """The agents already running in ``namespace``."""
        import ray

        handles = {}
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == namespace and entry["name"].startswith(ACTOR_PREFIX):
                with contextlib.suppress(ValueError):
                    handles[entry["name"][len(ACTOR_PREFIX):]] = ray.get_actor(
                        entry["name"], namespace=namespace)
        return cls(namespace, handles)

    def endpoints(self) -> dict[str, tuple[str, str, str | None]]:
        """``{node_id: (endpoint, site, public key or None)}`` of every agent."""
        import ray

        got = ray.get([h.endpoint.remote() for h in self.handles.values()],
                      timeout=CALL_TIMEOUT_S * 3)
        return {nid: (endpoint, site, key) for nid, site, endpoint, key in got}

    def connect(self, external_peers: Mapping[str, Sequence[str | None]]) -> None:
        """Peer every agent with every other one and with ``external_peers``."""
        import ray

        peers = {**self.endpoints(), **external_peers}
        ray.get([h.set_peers.remote(peers) for h in self.handles.values()],
                timeout=CALL_TIMEOUT_S * 3)

    def subscribe(self, name: str, namespace: str, *, on_nodes: Iterable[str] | None = None,
                  method: str = "on_node_event") -> None:
        """Have the agents on ``on_nodes`` (default: all) deliver their events to an actor."""
        import ray

        targets = [self.handles[n] for n in on_nodes] if on_nodes is not None else \
            list(self.handles.values())
        ray.get([h.subscribe_actor.remote(name, namespace, method) for h in targets],
                timeout=CALL_TIMEOUT_S)

    def status(self) -> dict[str, Any]:
        import ray

        out: dict[str, Any] = {}
        for nid, h in self.handles.items():
            try:
                out[nid] = ray.get(h.status.remote(), timeout=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - a dead node's agent: say so
                out[nid] = {"error": repr(exc)[:200]}
        return out

    def wait_all_up(self, timeout_s: float = 30.0) -> None:
        """Until every agent sees every other one ``up``; raises TimeoutError with the views."""
        import ray

        deadline = time.monotonic() + timeout_s
        views: dict[str, Any] = {}
        while time.monotonic() < deadline:
            views = {nid: ray.get(h.member_states.remote(), timeout=CALL_TIMEOUT_S)
                     for nid, h in self.handles.items()}
            if all(set(v) >= set(self.handles) - {nid} and
                   all(views[nid][o] == "alive" for o in set(self.handles) - {nid})
                   for nid, v in views.items()):
                return
            time.sleep(0.05)
        raise TimeoutError(f"mesh not all up after {timeout_s:g} s: {views}")

    def stop(self) -> None:
        import ray

        refs = [h.stop.remote() for h in self.handles.values()]
        with contextlib.suppress(Exception):  # agents on dead nodes never answer
            ray.wait(refs, num_returns=len(refs), timeout=STOP_TIMEOUT_S)
        for h in self.handles.values():
            with contextlib.suppress(Exception):
                ray.kill(h)
        self.handles.clear()
