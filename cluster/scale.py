"""Scale a running local deployment out and in: ``bastion scale add-node`` / ``remove-node``.

**Adding a node** (:func:`add_node`): a new raylet joins the site's Ray cluster with the site's
labels; if the site runs a heartbeat mesh, an agent is started on the new node with the same
:class:`~topology.config.MeshConfig` and CURVE directory, given every peer the site's agents
know (its own site's and other sites' agents, the witness), and every existing agent is given
the new one, so the mesh admits it. Work spreads to it through placement: a supervisor puts a
new or restarted child on the eligible node with the fewest of its running children
(``supervisors.placement.choose_node``), so the empty node takes the next starts and restarts;
:func:`rebalance` moves running children there now, one at a time, gracefully (a planned move:
stopped with ``on_stop``, started on the new node with its state; neither a restart nor a
failure is recorded).

**Removing a node** (:func:`remove_node`): every tree drains it first (``Tree.drain_node``:
nothing is placed there any more, and each child on it is moved as above), then its agent
leaves the mesh (peers see ``left``, not ``down``), then the raylet is stopped. Nothing is
reported as a fault.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from typing import Any

from cluster.local import LocalCluster, NodeConfig

__all__ = ["ScaleError", "add_node", "live_trees", "rebalance", "remove_node"]

MESH_NAMESPACE = "bastion-mesh"


class ScaleError(RuntimeError):
    """A scale operation could not be done; the message says why."""


def live_trees() -> list[Any]:
    """Every supervision tree running on the connected Ray cluster (its root supervisors)."""
    import ray

    from supervisors import Tree

    roots = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name, ns = entry["name"], entry["namespace"]
        if "/" in name or ns == MESH_NAMESPACE:
            continue
        with contextlib.suppress(Exception):
            handle = ray.get_actor(name, namespace=ns)
            if ray.get(handle.state.remote(), timeout=5) in ("running", "recovering"):
                roots.append(Tree(name, ns, store_url=""))
    return roots


def _node_id(name: str, timeout_s: float = 30.0) -> str:
    import ray

    from cluster.local import NODE_NAME_LABEL

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for n in ray.nodes():
            if n["Alive"] and n.get("Labels", {}).get(NODE_NAME_LABEL) == name:
                return n["NodeID"]
        time.sleep(0.1)
    raise ScaleError(f"node {name!r} did not register with Ray within {timeout_s:g} s")


def add_node(cluster: LocalCluster, site: str, *, name: str | None = None, zone: str = "a",
             num_cpus: float = 4.0, labels: Mapping[str, str] | None = None,
             mesh_namespace: str = MESH_NAMESPACE, keys_dir: str | None = None
             ) -> dict[str, Any]:
    """Start a node in ``site`` and admit it to the mesh (if one runs). Returns
    ``{"name", "node_id", "mesh": bool}``. Needs a Ray connection to ``cluster``."""
    sites = {n.config.site for n in cluster.nodes.values()}
    if site not in sites:
        raise ScaleError(f"site {site!r} is not in this cluster (sites: {sorted(sites)})")
    if name is None:
        taken = set(cluster.nodes)
        name = next(f"{site}-{i}" for i in range(1, 1000) if f"{site}-{i}" not in taken)
    cluster.add_node(NodeConfig(name, site=site, zone=zone, num_cpus=num_cpus,
                                labels=dict(labels or {})))
    node_id = _node_id(name)
    admitted = _admit(node_id, site, mesh_namespace, keys_dir)
    return {"name": name, "node_id": node_id, "mesh": admitted}


def _admit(node_id: str, site: str, namespace: str, keys_dir: str | None) -> bool:
    import ray

    from topology.config import MeshConfig
    from topology.ray_mesh import RayMesh

    existing = RayMesh.attach(namespace)
    if not existing.handles:
        return False
    some = next(iter(existing.handles.values()))
    config = MeshConfig.from_mapping(ray.get(some.mesh_config.remote(), timeout=10))
    if keys_dir is None:  # the site's agents' CURVE directory, if they use CURVE
        status = ray.get(some.status.remote(), timeout=10)
        keys_dir = status.get("keys_dir") if status.get("curve") else None
    peers = ray.get(some.peer_table.remote(), timeout=10)  # other sites, the witness
    new = RayMesh.start(namespace=namespace, site=site, config=config, nodes=[node_id],
                        keys_dir=keys_dir)
    RayMesh(namespace, {**existing.handles, **new.handles}).connect(
        {k: v for k, v in peers.items() if k not in existing.handles})
    return True


def rebalance(node_id: str, *, max_moves: int = 10) -> list[str]:
    """Move running children onto ``node_id`` from the nodes that carry the most of them, one
    at a time, until it carries its share (or ``max_moves``). Returns the paths moved."""
    from supervisors.tree import ChildInfo

    moved: list[str] = []
    for tree in live_trees():
        leaves: list[ChildInfo] = []

        def walk(node: dict[str, Any], out: list[ChildInfo]) -> None:
            for child in node.get("children", []):
                if "tree" in child:
                    walk(child["tree"], out)
                elif child.get("status") == "running" and child.get("node_id"):
                    out.append(ChildInfo(**{k: v for k, v in child.items() if k != "tree"}))

        walk(tree.describe(), leaves)
        counts: dict[str, int] = {}
        for c in leaves:
            counts[c.node_id or ""] = counts.get(c.node_id or "", 0) + 1
        share = len(leaves) // max(1, len(counts) + (node_id not in counts))
        while len(moved) < max_moves and counts.get(node_id, 0) < share:
            busiest = max((n for n in counts if n != node_id), key=counts.get, default=None)
            if busiest is None or counts[busiest] <= counts.get(node_id, 0) + 1:
                break
            child = next(c for c in leaves if c.node_id == busiest)
            leaves.remove(child)
            info = tree.move_child(child.actor_name, avoid=[n for n in counts if n != node_id])
            counts[busiest] -= 1
            counts[info.node_id or ""] = counts.get(info.node_id or "", 0) + 1
            moved.append(child.actor_name)
    return moved


def remove_node(cluster: LocalCluster, name: str, *, mesh_namespace: str = MESH_NAMESPACE,
                grace_s: float = 10.0) -> dict[str, Any]:
    """Drain ``name`` (every tree moves its children off it), let its agent leave the mesh,
    then stop the node. Returns ``{"moved": [...], "mesh_left": bool}``."""
    import ray

    node = cluster.nodes.get(name)
    if node is None:
        raise ScaleError(f"unknown node {name!r}; nodes are {sorted(cluster.nodes)}")
    if node.head:
        raise ScaleError(f"{name!r} is the head node: it holds the cluster's control plane "
                         "and cannot be removed")
    node_id = _node_id(name, timeout_s=5.0)
    moved: list[str] = []
    for tree in live_trees():
        moved += tree.drain_node(node_id)
    left = False
    with contextlib.suppress(ValueError):
        agent = ray.get_actor(f"mesh/{node_id}", namespace=mesh_namespace)
        with contextlib.suppress(Exception):
            ray.get(agent.stop.remote(True), timeout=5)  # broadcasts "left"
            left = True
        ray.kill(agent)
        from topology.ray_mesh import RayMesh

        for handle in RayMesh.attach(mesh_namespace).handles.values():
            with contextlib.suppress(Exception):
                ray.get(handle.remove_peer.remote(node_id), timeout=5)
    cluster.remove_node(name, grace_s=grace_s)
    return {"moved": moved, "mesh_left": left, "node_id": node_id}
