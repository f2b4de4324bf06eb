"""The heartbeat mesh on a real Ray cluster: one agent actor per node, subscribed supervisors,
and children migrated off a node the mesh declares down before Ray itself notices."""

from __future__ import annotations

import contextlib
import re
import signal
import time
import uuid
from collections.abc import Iterator

import psutil
import pytest
import ray

from cluster.local import LocalCluster, NodeConfig
from supervisors import ChildSpec, Placement, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until
from topology.config import MeshConfig
from topology.ray_mesh import RayMesh

COUNTER = "supervisors.examples:Counter"


@pytest.fixture
def mesh(ray_cluster: LocalCluster, namespace: str, tmp_path) -> Iterator[RayMesh]:
    m = RayMesh.start(namespace=namespace, site="tokyo", config=MeshConfig.preset("local"),
                      keys_dir=str(tmp_path / "keys"))
    try:
        yield m
    finally:
        m.stop()


def _node_id(name: str) -> str:
    return wait_until(lambda: next((n["NodeID"] for n in ray.nodes() if n["Alive"] and
                                    n["Labels"].get("bastion-node") == name), None),
                      30, f"node {name} registered")


def _ray_alive(node_id: str) -> bool:
    return any(n["NodeID"] == node_id and n["Alive"] for n in ray.nodes())


def test_mesh_when_started_on_every_node_then_all_up_over_curve_and_agents_reniced(
        mesh, tmp_path) -> None:
    mesh.wait_all_up(30)
    status = mesh.status()
    assert len(status) == len([n for n in ray.nodes() if n["Alive"]])
    for nid, s in status.items():
        assert s["node_id"] == nid and s["state"] == "running"
        assert s["curve"] and s["public_key"]  # every link encrypted and authenticated
        secret = (tmp_path / "keys" / f"{nid}.key_secret")
        assert secret.stat().st_mode & 0o777 == 0o600
        key = re.search(r'secret-key = "([^"]+)"', secret.read_text())
        assert key and key.group(1) not in str(s)  # never in status
        # root here: SCHED_RR (nice 0 where real-time is not permitted), never Ray's nice 15
        assert s["reniced"] and s["priority"] in ("realtime", "nice"), s["priority"]
    # Each agent exports its peers' phi and liveness as Ray metrics (what Grafana plots).
    from tests.test_metrics import sample, scrape

    first = next(iter(status))[:12]
    text = wait_until(lambda: (t := scrape()) and sample(
        t, "bastion_mesh_peer_alive", node=first) == 1.0 and t, 60, "mesh metrics scraped")
    assert sample(text, "bastion_mesh_phi", node=first) is not None


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_node_when_hung_or_crashed_then_mesh_declares_it_down_and_children_migrate_before_ray(
        ray_cluster: LocalCluster, namespace, store_url, trees, fault) -> None:
    name = f"tokyo-m{uuid.uuid4().hex[:4]}"
    ray_cluster.add_node(NodeConfig(name, site="tokyo", zone="c", num_cpus=4))
    node_id = _node_id(name)
    mesh = RayMesh.start(namespace=namespace, site="tokyo", config=MeshConfig.preset("local"))
    procs: list[psutil.Process] = []
    try:
        mesh.wait_all_up(30)
        spec = SupervisorSpec(id="root", intensity=5, children=[
            ChildSpec(id="book", cls=COUNTER, backoff=Backoff(initial_s=0.0),
                      placement=Placement(site="tokyo", preferred_nodes=(name,)))])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        assert tree.child("root/book").node_id == node_id
        ray.get([tree.actor("root/book").add.remote(3) for _ in range(10)], timeout=30)
        head = next(n["NodeID"] for n in ray.nodes()
                    if n["Alive"] and n["Labels"].get("bastion-node") == "head")
        mesh.subscribe("root", namespace, on_nodes=[head])
        head_agent = mesh.handles[head]
        seq0 = max((e["seq"] for e in ray.get(head_agent.events_since.remote(0))), default=0)

        procs = ray_cluster.nodes[name].process_tree()
        t0 = time.monotonic()
        if fault == "hang":
            for proc in procs:  # every process of the node stopped: nothing exits
                with contextlib.suppress(psutil.NoSuchProcess):
                    proc.send_signal(signal.SIGSTOP)
        else:
            ray_cluster.kill_node(name)
        down = wait_until(lambda: next((e for e in ray.get(
            head_agent.events_since.remote(seq0), timeout=10)
            if e["kind"] == "down" and e["node_id"] == node_id), None), 10, "mesh: down")
        detected_s = time.monotonic() - t0
        ray_alive_at_detection = _ray_alive(node_id)
        info = wait_until(lambda: (c := tree.child("root/book")).status == "running"
                          and c.node_id != node_id and c, 20, "book migrated")
        migrated_s = time.monotonic() - t0
        assert ray.get(tree.actor("root/book").value.remote(), timeout=20)["total"] == 30
        ray_dead_s = wait_until(lambda: not _ray_alive(node_id) and time.monotonic() - t0,
                                90, "Ray to notice")
        timing = (f"mesh down after {detected_s:.2f} s, migrated after {migrated_s:.2f} s, "
                  f"Ray noticed after {ray_dead_s:.2f} s ({down['reason']})")
        # Generous: ~0.4 s unloaded, measured in bench/bench_mesh.py; Ray's default needs ~13 s
        # for a crash and ~63 s for a hang. CI's 2 shared cores have taken 2.15 s.
        assert detected_s < 6.0, timing
        if fault == "hang":  # Ray needs ~2.8 s for a hang with tuned health checks
            assert ray_alive_at_detection and detected_s < ray_dead_s, timing
            assert migrated_s < ray_dead_s, timing
        # A crash Ray's tuned health checks see in ~1.4 s: the mesh's bound is the claim here
        # (~0.4 s unloaded; bench/bench_mesh.py measures both in the same run).
        assert info.node_id != node_id
        delivered = ray.get(head_agent.status.remote(), timeout=10)["delivery"]
        assert delivered.get("down_delivered", 0) >= 1, delivered
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
        with contextlib.suppress(Exception):
            ray_cluster.kill_node(name)
        mesh.stop()
