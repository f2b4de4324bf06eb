"""What chaos acts on: the :class:`ChaosContext` protocol, and :class:`LiveSystem`, the one
adapter that talks to a running system.

The fault code (:mod:`cluster.chaos.faults`) asks a context for targets and facts (an actor
path's worker pid, a node's processes, the mesh's links, a venue's address, a journal stream)
and does the acts that need no Ray itself: signals, bytes in a SQLite file, HTTP to a venue.
PIDs are this machine's, so chaos runs where the processes are — true of a
:class:`~cluster.local.LocalCluster` and of every site of a :class:`~cluster.multisite.MultiSite`.

Every Ray call of the chaos package is in this module (``LiveSystem``) and in
:mod:`cluster.chaos.links` (the mesh agents). Targets are named as the user sees them:

* ``actors`` / ``supervisors`` — tree paths (``site-tokyo/venues/deribit/connector``; a root
  supervisor by its id);
* ``nodes`` — LocalCluster node names (``tokyo-1``; ``<site>/<name>`` with MultiSite; NetLab
  node names); the head is never a candidate (killing it ends the cluster);
* ``sites`` — the ``site`` labels of the nodes (MultiSite: its sites);
* ``venues`` — ``<site>/<venue>`` as ``venues.json`` keys them (a shared venue by its name);
* ``streams`` — journal stream names (``<namespace>/<path>``).

Chaos refuses to act unless the context is marked ``environment == "non-production"``
(:func:`require_non_production`).
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .links import LinkControl

AMONG = ("actors", "supervisors", "nodes", "sites", "venues", "streams")
NODE_LABEL = "bastion-node"
CALL_TIMEOUT_S = 10.0


class ChaosError(RuntimeError):
    """A fault could not be applied: its target is unknown, not running, or of the wrong kind;
    the message names the target."""


class ChaosRefused(ChaosError):
    """Raised before anything is done when the deployment is not marked non-production."""


def require_non_production(environment: str | None, source: str) -> None:
    """Raise :class:`ChaosRefused` unless ``environment`` is exactly ``"non-production"``."""
    if environment != "non-production":
        said = "does not say" if environment is None else f"says {environment!r}"
        raise ChaosRefused(f"chaos refused: {source} is not marked `environment: "
                           f"non-production` (it {said}); faults run only against a "
                           f"deployment marked non-production")


@dataclass(frozen=True)
class ProcessInfo:
    """A supervised actor (or supervisor) as its tree reports it."""

    path: str
    pid: int | None
    status: str  # running | restarting | starting | stopped | failed
    node: str | None
    incarnation: int = 0


class ChaosContext(Protocol):
    """What a fault needs of the system it breaks (see the module docstring)."""

    environment: str | None

    def candidates(self, among: str) -> dict[str, str | None]:
        """Target name -> its site, for ``among`` in :data:`AMONG`."""
        ...

    def process(self, path: str) -> ProcessInfo: ...

    def node_pids(self, node: str) -> list[int]: ...

    def kill_node(self, node: str) -> list[int]: ...

    def restart_node(self, node: str) -> None: ...

    def children_on(self, node: str) -> dict[str, int | None]:
        """Tree path -> pid of every child (supervisors too) running on ``node``."""
        ...

    def links(self) -> LinkControl: ...

    def set_clock_offset(self, node: str, offset_s: float) -> float:
        """Set ``node``'s clock offset; returns the previous one."""
        ...

    def clock_skew_seen(self, node: str) -> tuple[float, float]:
        """``(node's clock - this machine's monotonic clock, uncertainty)`` in seconds."""
        ...

    def venue(self, name: str) -> VenueAccess: ...

    def journal(self, name: str) -> tuple[str, str]:
        """``(store URL, stream)`` of a stream name or of a stateful actor's path."""
        ...


# ----------------------------------------------------------------------------------- venues
@dataclass(frozen=True)
class VenueAccess:
    """A venue simulator reached directly over HTTP, private calls signed with its key
    (``deri-hmac-sha256``: the secret never travels). Independent of the tree under test: a
    restarting venue handle does not stop the injector."""

    name: str
    site: str | None
    http_url: str
    client_id: str
    client_secret: str = field(repr=False)
    timeout_s: float = 5.0

    def set_faults(self, **fields: Any) -> dict[str, Any]:
        """``private/simulator/set_faults``; returns the faults now in force (and latency)."""
        return self._call("private/simulator/set_faults", fields)

    def status(self) -> dict[str, Any]:
        """``public/simulator/status``: faults in force, counters."""
        return self._call("public/simulator/status", {})

    def _call(self, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        from actors.venue.auth import hmac_authorization

        path = f"/api/v2/{method}"
        body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": dict(params)})
        headers = {"Content-Type": "application/json"}
        if method.startswith("private/"):
            headers["Authorization"] = hmac_authorization(
                self.client_id, self.client_secret, "POST", path, body,
                timestamp_ms=int(time.time() * 1000))
        req = urllib.request.Request(self.http_url.rstrip("/") + path, data=body.encode(),
                                     method="POST", headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                reply = json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            reply = json.loads(exc.read() or b"{}")
        except (OSError, ValueError) as exc:
            raise ChaosError(f"venue {self.name}: {method} got no answer: {exc!r}") from None
        if "error" in reply:
            raise ChaosError(f"venue {self.name}: {method} refused: {reply['error']}")
        return reply["result"]


# ----------------------------------------------------------------------------- the system
class LiveSystem:
    """A running system as a :class:`ChaosContext`: supervision trees (``Tree`` handles, by
    root id; with MultiSite, ``tree_sites`` maps a root id to its site), the local cluster or
    the sites, the mesh (a ``RayMesh``; MultiSite brings its own), a NetLab, venues, and the
    journal store. Pass only what the system has; a fault needing something absent raises
    :class:`ChaosError` saying so. ``environment`` must be ``"non-production"`` for any
    fault to run; ``source`` names where that marking came from (a deployment file)."""

    def __init__(self, *, environment: str | None, source: str = "<live system>",
                 trees: Sequence[Any] = (), cluster: Any = None, sites: Any = None,
                 tree_sites: Mapping[str, str] | None = None, mesh: Any = None,
                 netlab: Any = None, venues: Mapping[str, VenueAccess] | None = None,
                 store_url: str | None = None) -> None:
        self.environment = environment
        self.source = source
        self.trees = {t.root_id: t for t in trees}
        self.cluster = cluster
        self.sites = sites
        self.tree_sites = dict(tree_sites or {})
        self.mesh = mesh
        self.netlab = netlab
        self.venues = dict(venues or {})
        self.store_url = store_url
        self._links: LinkControl | None = None

    def __repr__(self) -> str:
        return (f"LiveSystem({self.source}, {self.environment}, trees={sorted(self.trees)}, "
                f"venues={sorted(self.venues)})")

    # -- Ray connection per site (MultiSite) ---------------------------------------------
    @contextlib.contextmanager
    def _on(self, site: str | None) -> Iterator[None]:
        if self.sites is not None and site is not None:
            with self.sites.use(site):
                yield
        else:
            yield

    def _tree_of(self, path: str) -> Any:
        root = path.split("/", 1)[0]
        tree = self.trees.get(root)
        if tree is None:
            raise ChaosError(f"{path}: no tree with root {root!r}; trees are "
                             f"{sorted(self.trees)}")
        return tree

    def _ray_nodes(self) -> dict[str, tuple[str, str | None, bool]]:
        """Node id -> (name, site, is head) on the connected cluster."""
        import ray

        out = {}
        for n in ray.nodes():
            labels = n.get("Labels") or {}
            out[n["NodeID"]] = (labels.get(NODE_LABEL, n["NodeID"][:12]), labels.get("site"),
                                labels.get(NODE_LABEL) == "head")
        return out

    def _describe(self) -> list[tuple[str, dict[str, Any], dict[str, tuple]]]:
        """(root id, describe(), node table) for every tree."""
        out = []
        for root_id, tree in self.trees.items():
            with self._on(self.tree_sites.get(root_id)):
                out.append((root_id, tree.describe(timeout_s=CALL_TIMEOUT_S),
                            self._ray_nodes()))
        return out

    # -- candidates -----------------------------------------------------------------------
    def candidates(self, among: str) -> dict[str, str | None]:
        if among not in AMONG:
            raise ChaosError(f"among = {among!r}: must be one of {', '.join(AMONG)}")
        return getattr(self, f"_candidates_{among}")()

    def _children(self) -> Iterator[tuple[str, dict[str, Any], str | None]]:
        """(root id, child entry, the site it runs in) for every child of every tree."""
        for root_id, desc, nodes in self._describe():
            fixed = self.tree_sites.get(root_id)

            def walk(sup: dict[str, Any], nodes=nodes, fixed=fixed,
                     root_id=root_id) -> Iterator[tuple[str, dict[str, Any], str | None]]:
                for child in sup.get("children", []):
                    site = fixed or nodes.get(child.get("node_id") or "", (None, None))[1]
                    yield root_id, child, site
                    if isinstance(child.get("tree"), dict):
                        yield from walk(child["tree"])

            yield from walk(desc)

    def _candidates_actors(self) -> dict[str, str | None]:
        return {c["actor_name"]: site for _, c, site in self._children()
                if not c.get("is_supervisor")}

    def _candidates_supervisors(self) -> dict[str, str | None]:
        out: dict[str, str | None] = {}
        for root_id, desc, nodes in self._describe():
            out[root_id] = self.tree_sites.get(root_id) or \
                nodes.get(desc.get("node_id") or "", (None, None))[1]
        out.update({c["actor_name"]: site for _, c, site in self._children()
                    if c.get("is_supervisor")})
        return out

    def _candidates_nodes(self) -> dict[str, str | None]:
        if self.sites is not None:
            return {f"{s}/{n.config.name}": s for s, site in self.sites.sites.items()
                    for n in site.cluster.nodes.values() if not n.head and n.alive()}
        if self.cluster is not None:
            return {n.config.name: n.config.site for n in self.cluster.nodes.values()
                    if not n.head and n.alive()}
        if self.netlab is not None:
            return {n: None for n in self.netlab.nodes}
        return {}

    def _candidates_sites(self) -> dict[str, str | None]:
        if self.sites is not None:
            return {s: s for s in self.sites.sites}
        if self.cluster is not None:
            return {n.config.site: n.config.site for n in self.cluster.nodes.values()}
        return {}

    def _candidates_venues(self) -> dict[str, str | None]:
        return {k: v.site for k, v in self.venues.items()}

    def _candidates_streams(self) -> dict[str, str | None]:
        from supervisors.journal import open_store

        urls = {self.store_url} if self.store_url else {t.store_url for t in self.trees.values()}
        namespaces = {t.namespace for t in self.trees.values()}
        out: dict[str, str | None] = {}
        for url in sorted(u for u in urls if u):
            store = open_store(url)
            try:
                for ns in sorted(namespaces) or [""]:
                    out.update({s: None for s in store.streams(f"{ns}/" if ns else "")})
            finally:
                store.close()
        return out

    # -- processes ------------------------------------------------------------------------
    def process(self, path: str) -> ProcessInfo:
        import ray

        tree = self._tree_of(path)
        with self._on(self.tree_sites.get(tree.root_id)):
            nodes = self._ray_nodes()
            if "/" not in path:
                try:
                    status = tree.status(timeout_s=CALL_TIMEOUT_S)
                    root = ray.get_actor(path, namespace=tree.namespace)
                    info = ray.get(root.__bastion_info__.remote(), timeout=CALL_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - gone, restarting or hung
                    raise ChaosError(f"{path}: the root supervisor does not answer: "
                                     f"{type(exc).__name__}: {exc}"[:300]) from None
                return ProcessInfo(path, info["pid"], status,
                                   nodes.get(info["node_id"], (None,))[0])
            try:
                child = tree.child(path, timeout_s=CALL_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - TreeError, or its supervisor is away
                raise ChaosError(f"{path}: {exc}") from None
            return ProcessInfo(path, child.pid, child.status,
                               nodes.get(child.node_id or "", (None,))[0], child.incarnation)

    def _local_node(self, node: str) -> tuple[Any, str]:
        """(the LocalCluster holding ``node``, its name there)."""
        if self.sites is not None:
            site, _, name = node.partition("/")
            if site not in self.sites.sites or not name:
                raise ChaosError(f"node {node!r}: name a MultiSite node as <site>/<node>; "
                                 f"sites are {sorted(self.sites.sites)}")
            return self.sites.sites[site].cluster, name
        if self.cluster is None:
            raise ChaosError(f"node {node!r}: this system has no local cluster to act on")
        return self.cluster, node

    def node_pids(self, node: str) -> list[int]:
        cluster, name = self._local_node(node)
        if name not in cluster.nodes:
            raise ChaosError(f"node {node!r}: unknown; nodes are {sorted(cluster.nodes)}")
        return [p.pid for p in cluster.nodes[name].process_tree()]

    def kill_node(self, node: str) -> list[int]:
        cluster, name = self._local_node(node)
        if name not in cluster.nodes or cluster.nodes[name].head:
            raise ChaosError(f"node {node!r}: not a worker node of the cluster "
                             f"(workers: {sorted(n for n, p in cluster.nodes.items() if not p.head)})")
        return cluster.kill_node(name)

    def restart_node(self, node: str) -> None:
        cluster, name = self._local_node(node)
        cluster.add_node(cluster.nodes[name].config)

    def children_on(self, node: str) -> dict[str, int | None]:
        site = node.partition("/")[0] if self.sites is not None else None
        name = node.partition("/")[2] if self.sites is not None else node
        out: dict[str, int | None] = {}
        for root_id, desc, nodes in self._describe():
            if site is not None and self.tree_sites.get(root_id) != site:
                continue
            ids = {nid for nid, (n, _, _) in nodes.items() if n == name}

            def walk(sup: dict[str, Any], ids=ids) -> None:
                for child in sup.get("children", []):
                    if child.get("node_id") in ids:
                        out[child["actor_name"]] = child.get("pid")
                    if isinstance(child.get("tree"), dict):
                        walk(child["tree"])

            if desc.get("node_id") in ids:
                out[root_id] = desc.get("pid")
            walk(desc)
        return out

    # -- links and clocks -----------------------------------------------------------------
    def links(self) -> LinkControl:
        from .links import MeshLinks, MultiSiteLinks, NetLabLinks

        if self._links is None:
            if self.netlab is not None:
                self._links = NetLabLinks(self.netlab)
            elif self.sites is not None:
                self._links = MultiSiteLinks(self.sites)
            elif self.mesh is not None:
                nodes = self._ray_nodes()
                self._links = MeshLinks(self.mesh, {k: v[0] for k, v in nodes.items()},
                                        {k: v[1] for k, v in nodes.items()})
            else:
                raise ChaosError("link faults need a mesh (RayMesh), MultiSite or a NetLab; "
                                 "this system has none")
        return self._links

    def _agent(self, node: str) -> tuple[Any, str | None]:
        """The mesh agent actor of ``node`` and the site whose Ray cluster holds it."""
        import ray

        if self.sites is not None:
            from cluster.multisite import MESH_NAMESPACE

            from .links import node_names_of

            site, _, name = node.partition("/")
            if site not in self.sites.sites:
                raise ChaosError(f"node {node!r}: name a MultiSite node as <site>/<node>")
            ids = {n: i for i, n in node_names_of(self.sites, site).items()}
            if name not in ids:
                raise ChaosError(f"node {node!r}: no such node in site {site!r}")
            with self.sites.use(site):
                return ray.get_actor(f"mesh/{ids[name]}", namespace=MESH_NAMESPACE), site
        if self.mesh is None:
            raise ChaosError(f"node {node!r}: clock skew needs the node's mesh agent; this "
                             f"system has no mesh")
        ids = {n: nid for nid, (n, _, _) in self._ray_nodes().items()}
        if ids.get(node) not in self.mesh.handles:
            raise ChaosError(f"node {node!r}: no mesh agent on it")
        return self.mesh.handles[ids[node]], None

    def set_clock_offset(self, node: str, offset_s: float) -> float:
        import ray

        handle, site = self._agent(node)
        with self._on(site):
            return float(ray.get(handle.set_clock_offset.remote(offset_s),
                                 timeout=CALL_TIMEOUT_S))

    def clock_skew_seen(self, node: str) -> tuple[float, float]:
        import ray

        handle, site = self._agent(node)
        with self._on(site):
            t0 = time.monotonic()
            got = ray.get(handle.clock_status.remote(), timeout=CALL_TIMEOUT_S)
            t1 = time.monotonic()
        return got["now_s"] - (t0 + t1) / 2.0, (t1 - t0) / 2.0

    # -- venues and journals --------------------------------------------------------------
    def venue(self, name: str) -> VenueAccess:
        if name in self.venues:
            return self.venues[name]
        hits = [v for k, v in self.venues.items() if k.rpartition("/")[2] == name]
        if len(hits) == 1:
            return hits[0]
        raise ChaosError(f"venue {name!r}: {'ambiguous' if hits else 'unknown'}; venues are "
                         f"{sorted(self.venues)}")

    def journal(self, name: str) -> tuple[str, str]:
        root = name.split("/", 1)[0]
        if root in self.trees:  # an actor path: its stream is <namespace>/<path>
            tree = self.trees[root]
            return self.store_url or tree.store_url, f"{tree.namespace}/{name}"
        if self.store_url is None and not self.trees:
            raise ChaosError(f"stream {name!r}: this system names no journal store")
        return self.store_url or next(iter(self.trees.values())).store_url, name


def local_system(work_dir: Path, deployment: Any, source: str) -> LiveSystem:
    """The deployment ``bastion up --deployment`` runs from ``work_dir`` (its ``cluster.json``
    and ``venues.json``), with this process connected to its Ray cluster: its trees (every
    root supervisor in the deployment's namespace), its venues (keys from the deployment),
    its journal store, and a mesh if one runs in ``bastion-mesh``."""
    import os

    from cluster.local import LocalCluster

    cluster = LocalCluster.load(work_dir)
    os.environ.setdefault("RAY_AUTH_MODE", cluster.auth_mode)
    import ray

    if not ray.is_initialized():
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    from supervisors import Tree
    from supervisors import _ray as sray

    store_url = deployment.store_url or f"sqlite://{work_dir / 'journal'}"
    trees = []
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["namespace"] != deployment.namespace or "/" in actor["name"]:
            continue
        handle = sray.get_named(actor["name"], actor["namespace"])
        with contextlib.suppress(Exception):  # not a supervisor, or unreachable
            ray.get(handle.describe.remote(), timeout=CALL_TIMEOUT_S)
            trees.append(Tree(actor["name"], actor["namespace"], store_url))
    venues: dict[str, VenueAccess] = {}
    path = work_dir / "venues.json"
    if path.exists():
        for key, info in json.loads(path.read_text()).items():
            spec = next((v for s in deployment.sites for v in s.venues
                         if v.name == info["name"] and info["site"] in (s.name, "*")), None)
            if spec is not None:
                venues[key] = VenueAccess(info["name"], None if info["site"] == "*"
                                          else info["site"], info["http_url"],
                                          spec.client_id, spec.client_secret)
    from topology.ray_mesh import RayMesh

    mesh = RayMesh.attach("bastion-mesh")
    return LiveSystem(environment=deployment_environment(deployment), source=source,
                      trees=trees, cluster=cluster, mesh=mesh if mesh.handles else None,
                      venues=venues, store_url=store_url)


def deployment_environment(deployment: Any) -> str | None:
    """The deployment's ``environment`` as its file says it (None when the file does not say:
    chaos wants it marked, not defaulted)."""
    if "environment" not in getattr(deployment, "model_fields_set", {"environment"}):
        return None
    return str(deployment.environment)
