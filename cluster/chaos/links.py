"""Links between the members of a network, and their faults: the mesh's agents (a
:class:`topology.ray_mesh.RayMesh` on one Ray cluster, or every site's of a
:class:`~cluster.multisite.MultiSite` and its witness) or the nodes of a
:class:`~cluster.chaos.netns.NetLab` (real nftables drops). A :class:`LinkControl` applies a
whole model of directed link faults at once (:class:`cluster.chaos.faults.LinkModel` composes
the rules of the faults in force), counts what the rules dropped or delayed, and says when the
members reach each other again.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from .context import CALL_TIMEOUT_S, NODE_LABEL, ChaosError


@dataclass(frozen=True)
class LinkFault:
    """One directed link's fault: ``drop`` probability of each message, added ``delay_s``."""

    drop: float = 0.0
    delay_s: float = 0.0

    @property
    def active(self) -> bool:
        return self.drop > 0.0 or self.delay_s > 0.0


class LinkControl(Protocol):
    """The links between the *members* of a network (mesh agents, or NetLab nodes)."""

    def members(self) -> dict[str, str | None]:
        """Member name -> its site (None when unknown)."""
        ...

    def apply(self, model: Mapping[tuple[str, str], LinkFault]) -> None:
        """Make the faults on every directed ``(src, dst)`` link exactly ``model`` (links not in
        it are clear)."""
        ...

    def counters(self) -> dict[str, dict[str, int]]:
        """Per member, what its fault rules did so far: ``drop_in`` (messages from a faulty
        link dropped on arrival), ``delayed``."""
        ...

    def healthy(self, members: Collection[str]) -> bool:
        """Every one of ``members`` reaches every other one again."""
        ...

    def probe(self, src: str, dst: str) -> bool | None:
        """Send one message ``src -> dst`` now: True if it arrived, None if this network has
        no active probe (the mesh's own heartbeats are its traffic)."""
        ...

    def clear_all(self) -> None:
        """Clear every link fault of every member, including those another process set."""
        ...



# ------------------------------------------------------------------------------ agent links
class _AgentLinks:
    """Link faults through mesh agents: on each receiving agent, ``drop_in`` from a faulty
    link's sender (drops happen on arrival, as a lossy network's); on each sending agent the
    link's ``delay_s``. Subclasses say how an agent is called."""

    def __init__(self) -> None:
        self._applied: dict[tuple[str, str], tuple[float, float]] = {}  # (agent, peer)

    def _agents(self) -> dict[str, tuple[str, str | None]]:
        """Member -> (agent id, site)."""
        raise NotImplementedError

    def _set(self, changes: list[tuple[str, str, float, float]]) -> None:
        """``(member, peer member, drop_in, delay_s)``; all zero clears the peer's faults."""
        raise NotImplementedError

    def _statuses(self, members: Collection[str]) -> dict[str, dict[str, Any]]:
        raise NotImplementedError

    def members(self) -> dict[str, str | None]:
        return {m: site for m, (_, site) in self._agents().items()}

    def apply(self, model: Mapping[tuple[str, str], LinkFault]) -> None:
        agents = self._agents()
        for src, dst in model:
            for m in (src, dst):
                if m not in agents:
                    raise ChaosError(f"link {src}->{dst}: no mesh agent {m!r}; agents are "
                                     f"{sorted(agents)}")
        wanted: dict[tuple[str, str], tuple[float, float]] = {}
        for (src, dst), f in model.items():
            if f.drop:
                d_in, dl = wanted.get((dst, src), (0.0, 0.0))
                wanted[(dst, src)] = (f.drop, dl)
            if f.delay_s:
                d_in, _ = wanted.get((src, dst), (0.0, 0.0))
                wanted[(src, dst)] = (d_in, f.delay_s)
        changes = [(a, p, *v) for (a, p), v in wanted.items() if self._applied.get((a, p)) != v]
        changes += [(a, p, 0.0, 0.0) for (a, p) in self._applied if (a, p) not in wanted]
        if changes:
            self._set(changes)
        self._applied = wanted

    def counters(self) -> dict[str, dict[str, int]]:
        out = {}
        for m, st in self._statuses(list(self._agents())).items():
            faults = st.get("dropped", {}).get("faults", {})
            out[m] = {"drop_in": int(faults.get("drop_in", 0)),
                      "delayed": int(faults.get("delayed", 0))}
        return out

    def healthy(self, members: Collection[str]) -> bool:
        agents = self._agents()
        wanted = [m for m in members if m in agents]
        for m, st in self._statuses(wanted).items():
            seen = st.get("members", {})
            for other in wanted:
                if other != m and seen.get(agents[other][0], {}).get("state") != "alive":
                    return False
        return True

    def probe(self, src: str, dst: str) -> bool | None:
        return None

    def clear_all(self) -> None:
        agents = self._agents()
        self._set([(m, p, 0.0, 0.0) for m in agents for p in agents if p != m])
        self._applied = {}


class MeshLinks(_AgentLinks):
    """The agents of a :class:`topology.ray_mesh.RayMesh` on the connected Ray cluster, each
    named by its node's name."""

    def __init__(self, mesh: Any, node_names: Mapping[str, str],
                 node_sites: Mapping[str, str | None]) -> None:
        super().__init__()
        self.mesh = mesh
        self._by_member = {node_names.get(nid, nid): (nid, node_sites.get(nid))
                           for nid in mesh.handles}

    def _agents(self) -> dict[str, tuple[str, str | None]]:
        return dict(self._by_member)

    def _set(self, changes: list[tuple[str, str, float, float]]) -> None:
        import ray

        refs = []
        for member, peer, drop_in, delay_s in changes:
            handle = self.mesh.handles[self._by_member[member][0]]
            peer_id = self._by_member[peer][0]
            refs.append(handle.set_link_faults.remote(peer_id, 0.0, drop_in, delay_s)
                        if drop_in or delay_s else handle.clear_link_faults.remote(peer_id))
        ray.get(refs, timeout=CALL_TIMEOUT_S)

    def _statuses(self, members: Collection[str]) -> dict[str, dict[str, Any]]:
        import ray

        members = list(members)
        refs = [self.mesh.handles[self._by_member[m][0]].status.remote() for m in members]
        return dict(zip(members, ray.get(refs, timeout=CALL_TIMEOUT_S), strict=True))


class MultiSiteLinks(_AgentLinks):
    """The agents of every site of a :class:`~cluster.multisite.MultiSite` (``<site>/<node>``)
    and its witness (``witness``); each site's agents are called inside ``use(site)``."""

    def __init__(self, sites: Any) -> None:
        super().__init__()
        self.sites = sites
        self._by_member: dict[str, tuple[str, str | None]] = {}
        for name, site in sites.sites.items():
            names = node_names_of(sites, name)
            for nid in site.agents:
                self._by_member[f"{name}/{names.get(nid, nid)}"] = (nid, name)
        if sites.witness is not None:
            from cluster.multisite import WITNESS_ID

            self._by_member[WITNESS_ID] = (WITNESS_ID, WITNESS_ID)

    def _agents(self) -> dict[str, tuple[str, str | None]]:
        """The agents on nodes still running: a crashed node's agent is gone with it (a
        partition after a node kill must not look it up)."""
        alive = {f"{name}/{n.config.name}" for name, site in self.sites.sites.items()
                 for n in site.cluster.nodes.values() if n.alive()}
        return {m: v for m, v in self._by_member.items()
                if v[1] not in self.sites.sites or m in alive}

    def _set(self, changes: list[tuple[str, str, float, float]]) -> None:
        import ray

        from cluster.multisite import MESH_NAMESPACE, WITNESS_ID

        agents = self._agents()
        changes = [c for c in changes if c[0] in agents and c[1] in agents]

        by_site: dict[str, list[tuple[str, str, float, float]]] = {}
        for member, peer, drop_in, delay_s in changes:
            site = self._by_member[member][1] or ""
            by_site.setdefault(site, []).append((self._by_member[member][0],
                                                 self._by_member[peer][0], drop_in, delay_s))
        for site, items in by_site.items():
            if site == WITNESS_ID:
                for _, peer, drop_in, delay_s in items:
                    if drop_in or delay_s:
                        self.sites.witness.call("set_link_faults", peer=peer, drop_out=0.0,
                                                drop_in=drop_in, delay_s=delay_s)
                    else:
                        self.sites.witness.call("clear_link_faults", peer=peer)
                continue
            with self.sites.use(site):
                refs = []
                for agent, peer, drop_in, delay_s in items:
                    h = ray.get_actor(f"mesh/{agent}", namespace=MESH_NAMESPACE)
                    refs.append(h.set_link_faults.remote(peer, 0.0, drop_in, delay_s)
                                if drop_in or delay_s else h.clear_link_faults.remote(peer))
                ray.get(refs, timeout=CALL_TIMEOUT_S)

    def _statuses(self, members: Collection[str]) -> dict[str, dict[str, Any]]:
        import ray

        from cluster.multisite import MESH_NAMESPACE, WITNESS_ID

        out: dict[str, dict[str, Any]] = {}
        for m in members:
            agent, site = self._by_member[m]
            if site == WITNESS_ID:
                out[m] = self.sites.witness.call("status")
                continue
            with self.sites.use(site or ""):
                h = ray.get_actor(f"mesh/{agent}", namespace=MESH_NAMESPACE)
                out[m] = ray.get(h.status.remote(), timeout=CALL_TIMEOUT_S)
        return out


_TCP_PROBE = """
import socket, sys
s = socket.socket()
s.settimeout(float(sys.argv[2]))
try:
    s.connect((sys.argv[1], 9))
    print("arrived")
except ConnectionRefusedError:
    print("arrived")
except OSError as exc:
    print("lost", exc)
"""


class NetLabLinks:
    """Real network faults between the nodes of a :class:`~cluster.chaos.netns.NetLab`
    (nftables drops at the receiver; no delay: the kernel here has no netem). The probe is one
    TCP SYN from the sender's namespace to a closed port of the receiver: refused (a RST came
    back) means the round trip works; a timeout means one way or the other dropped it."""

    PROBE_TIMEOUT_S = 0.5

    def __init__(self, lab: Any) -> None:
        self.lab = lab
        self._applied: dict[tuple[str, str], LinkFault] = {}

    def members(self) -> dict[str, str | None]:
        return {n: None for n in self.lab.nodes}

    def apply(self, model: Mapping[tuple[str, str], LinkFault]) -> None:
        for (src, dst), f in model.items():
            if f.delay_s:
                raise ChaosError(f"link {src}->{dst}: a NetLab cannot delay (no netem in this "
                                 f"kernel); delay mesh links or use cluster.chaos.delay_proxy")
        pairs = {tuple(sorted(p)) for p in set(model) | set(self._applied)
                 if model.get(p) != self._applied.get(p)}
        for a, b in sorted(pairs):
            self.lab.heal_link(a, b)
            for src, dst in ((a, b), (b, a)):
                f = model.get((src, dst))
                if f is None or not f.drop:
                    continue
                if f.drop >= 1.0:
                    self.lab.one_way(src, dst)
                else:
                    self.lab.loss(src, dst, f.drop)
        self._applied = {k: v for k, v in model.items() if v.active}

    def counters(self) -> dict[str, dict[str, int]]:
        return {n: {"drop_in": sum(self.lab.dropped(n).values()), "delayed": 0}
                for n in self.lab.nodes}

    def clear_all(self) -> None:
        self.lab.heal()
        self._applied = {}

    def probe(self, src: str, dst: str) -> bool | None:
        import sys

        out = self.lab.check_output(src, [sys.executable, "-c", _TCP_PROBE,
                                          self.lab.address(dst), str(self.PROBE_TIMEOUT_S)],
                                    timeout_s=self.PROBE_TIMEOUT_S + 30)
        return out.startswith("arrived")

    def healthy(self, members: Collection[str]) -> bool:
        members = sorted(members)
        return all(self.probe(a, b) for a in members for b in members if a != b)


def node_names_of(sites: Any, site: str) -> dict[str, str]:
    """Ray node id -> node name within one MultiSite site."""
    import ray

    with sites.use(site):
        return {n["NodeID"]: n["Labels"].get(NODE_LABEL, n["NodeID"]) for n in ray.nodes()}
