"""Scale out and in on a live cluster: a node added is admitted by the mesh and takes work; a
node removed is drained first (children move with their state, gracefully), leaves the mesh as
``left``, and no fault is reported — all while the children take writes."""

from __future__ import annotations

import threading
import uuid

import pytest

from cluster.local import LocalCluster
from cluster.scale import add_node, rebalance, remove_node
from supervisors import ChildSpec, Placement, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until
from topology.config import MeshConfig
from topology.ray_mesh import RayMesh

COUNTER = "supervisors.examples:Counter"


@pytest.mark.slow
def test_scale_when_node_added_then_removed_under_load_then_admitted_used_drained_nothing_lost(
        ray_cluster: LocalCluster, namespace: str, store_url: str, trees: list) -> None:
    import ray

    mesh_ns = f"{namespace}-mesh"
    tokyo = [n["NodeID"] for n in ray.nodes() if n["Alive"] and
             n["Labels"].get("site") == "tokyo"]
    mesh = RayMesh.start(namespace=mesh_ns, site="tokyo", config=MeshConfig.preset("local"),
                         nodes=tokyo)
    name = f"tokyo-s{uuid.uuid4().hex[:4]}"
    try:
        mesh.wait_all_up(30)
        spec = SupervisorSpec(id="root", intensity=3, children=[
            ChildSpec(id=f"c{i}", cls=COUNTER, backoff=Backoff(initial_s=0.0),
                      placement=Placement(site="tokyo"), shutdown_s=5.0) for i in range(4)])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        paths = [f"root/c{i}" for i in range(4)]

        acked = dict.fromkeys(paths, 0)  # every add acknowledged must survive
        stop = threading.Event()
        errors: list[str] = []

        def load() -> None:
            while not stop.is_set():
                for path in paths:
                    try:
                        ray.get(tree.actor(path).add.remote(1), timeout=30)
                        acked[path] += 1
                    except Exception as exc:  # noqa: BLE001 - a call during a move may fail
                        errors.append(repr(exc)[:200])  # unacknowledged: not counted

        writer = threading.Thread(target=load, daemon=True)
        writer.start()

        added = add_node(ray_cluster, "tokyo", name=name, mesh_namespace=mesh_ns)
        node_id = added["node_id"]
        assert added["mesh"]
        RayMesh.attach(mesh_ns).wait_all_up(30)  # every agent sees the new one alive

        moved_in = rebalance(node_id)
        assert moved_in, "nothing moved to the new node"
        on_new = [c.id for c in tree.children("root") if c.node_id == node_id]
        assert len(on_new) == len(moved_in) >= 1

        wait_until(lambda: sum(acked.values()) >= 40, 60, "writes going on")
        result = remove_node(ray_cluster, name, mesh_namespace=mesh_ns)
        assert sorted(result["moved"]) == sorted(f"root/{c}" for c in on_new)
        assert result["mesh_left"]
        stop.set()
        writer.join(30)

        children = {c.id: c for c in tree.children("root")}
        for c in children.values():
            assert c.status == "running" and c.node_id != node_id
            assert c.restarts == 0 and c.last_failure is None  # no fault reported
        assert sum(c.migrations for c in children.values()) == 2 * len(on_new)
        for path in paths:  # nothing acknowledged was lost, nothing applied twice
            value = ray.get(tree.actor(path).value.remote(), timeout=30)
            assert value["total"] == value["count"] >= acked[path], (path, value, acked)
        # The mesh saw the node leave, not die.
        views = RayMesh.attach(mesh_ns).status()
        for nid, s in views.items():
            state = s["members"].get(node_id, {}).get("state", "unknown")
            assert state in ("left", "unknown"), (nid, state)
    finally:
        if name in ray_cluster.nodes:
            ray_cluster.remove_node(name, grace_s=5)
        RayMesh.attach(mesh_ns).stop()
