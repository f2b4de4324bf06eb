"""State that survives: a SIGKILLed stateful child keeps every acknowledged event; a crashed
node's children run elsewhere with placement honoured; a SIGKILLed supervisor re-adopts its
children with no duplicate and no orphan."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import psutil
import pytest
import ray

from cluster.local import LocalCluster, NodeConfig
from supervisors import ChildSpec, Placement, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until

COUNTER = "supervisors.examples:Counter"
NO_BACKOFF = Backoff(initial_s=0.0)


def counter(cid: str, snapshot_every: int = 50, **kw: object) -> ChildSpec:
    return ChildSpec(id=cid, cls=COUNTER, kwargs={"snapshot_every": snapshot_every},
                     backoff=NO_BACKOFF, **kw)


def named_in(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace)


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def any_store_url(request: pytest.FixtureRequest, store_url: str) -> str:
    if request.param == "sqlite":
        return store_url
    return f"{request.getfixturevalue('redis_server_url')}?prefix=t{uuid.uuid4().hex[:8]}"


def test_stateful_child_when_sigkilled_mid_stream_then_every_acked_event_survives(
        namespace, any_store_url, trees) -> None:
    tree = start_tree(SupervisorSpec(id="root", intensity=5, children=[counter("book")]),
                      namespace=namespace, store_url=any_store_url)
    trees.append(tree)
    book = tree.actor("root/book")
    assert ray.get([book.add.remote(1) for _ in range(120)], timeout=60)[-1] == 120
    # A stream of adds in flight while the worker is SIGKILLed.
    refs = [book.add.remote(1) for _ in range(400)]
    ray.wait(refs, num_returns=50, timeout=60)
    old_pid = tree.child("root/book").pid
    os.kill(old_pid, signal.SIGKILL)
    acked = []
    for ref in refs:
        with contextlib.suppress(ray.exceptions.RayActorError):
            acked.append(ray.get(ref, timeout=60))
    assert len(acked) >= 50 and acked == sorted(acked)
    info = wait_until(lambda: (c := tree.child("root/book")).status == "running"
                      and c.pid != old_pid and c, 30, "book restarted")
    assert info.restarts == 1
    state = ray.get(tree.actor("root/book").value.remote(), timeout=30)
    # Every acknowledged event is there; nothing was applied twice (each add is +1).
    assert state["seq"] >= max(acked) and state["total"] == state["count"] == state["seq"]
    recovery = ray.get(tree.actor("root/book").recovery.remote(), timeout=30)
    assert recovery["snapshot_seq"] > 0 and recovery["seq"] == state["seq"]
    assert state["epoch"] == 2  # a fresh fencing epoch for the new incarnation
    # It keeps working after recovery, continuing the same sequence.
    assert ray.get(tree.actor("root/book").add.remote(5), timeout=30) == state["seq"] + 1


def test_supervisor_when_sigkilled_then_readopts_children_without_duplicates(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", intensity=5, children=[
        SupervisorSpec(id="books", intensity=5, children=[counter("b1"), counter("b2"),
                                                          counter("b3")]),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    ray.get(tree.actor("root/books/b1").add.remote(7), timeout=30)
    before = {c.id: c.pid for c in tree.children("root/books")}
    sup_pid = tree.child("root/books").pid
    os.kill(sup_pid, signal.SIGKILL)
    # While the supervisor is down, one of its children dies too.
    os.kill(before["b3"], signal.SIGKILL)
    wait_until(lambda: (c := tree.child("root/books")).status == "running"
               and c.pid != sup_pid, 30, "books supervisor restarted")
    after = wait_until(lambda: (k := {c.id: (c.pid, c.status) for c in
                                      tree.children("root/books")})["b3"][1] == "running"
                       and k["b3"][0] != before["b3"] and k, 30, "b3 restarted")
    assert after["b1"][0] == before["b1"] and after["b2"][0] == before["b2"]  # adopted
    assert ray.get(tree.actor("root/books/b1").value.remote(), timeout=30)["total"] == 7
    assert named_in(namespace) == sorted(["root", "root/books", "root/books/b1",
                                          "root/books/b2", "root/books/b3"])
    assert not psutil.pid_exists(before["b3"]) or \
        psutil.Process(before["b3"]).status() == psutil.STATUS_ZOMBIE
    # The re-adopted children are watched by the new supervisor.
    os.kill(before["b2"], signal.SIGKILL)
    wait_until(lambda: (c := tree.child("root/books/b2")).pid != before["b2"]
               and c.status == "running", 30, "b2 restarted by the new supervisor")


def test_root_supervisor_when_sigkilled_then_ray_restarts_it_and_it_readopts(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", intensity=5, children=[counter("a"), counter("b")])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    before = {c.id: c.pid for c in tree.children()}
    root_pid = ray.get(ray.get_actor("root", namespace=namespace).__bastion_info__.remote(),
                       timeout=30)["pid"]
    os.kill(root_pid, signal.SIGKILL)
    wait_until(lambda: ray.get(ray.get_actor("root", namespace=namespace)
                               .__bastion_info__.remote(), timeout=5)["pid"] != root_pid,
               30, "root restarted by Ray")
    wait_until(lambda: tree.status() == "running", 30, "root running")
    assert {c.id: c.pid for c in tree.children()} == before
    os.kill(before["a"], signal.SIGKILL)
    wait_until(lambda: (c := tree.child("root/a")).pid != before["a"] and c.status == "running",
               30, "a restarted by the new root")
    assert named_in(namespace) == ["root", "root/a", "root/b"]


@pytest.mark.slow
def test_node_crash_when_sigkilled_then_children_run_elsewhere_with_placement_and_state(
        ray_cluster: LocalCluster, namespace, store_url, trees) -> None:
    name = f"tokyo-x{uuid.uuid4().hex[:4]}"
    ray_cluster.add_node(NodeConfig(name, site="tokyo", zone="c", num_cpus=4))
    wait_until(lambda: any(n["Alive"] and n["Labels"].get("bastion-node") == name
                           for n in ray.nodes()), 30, "new node registered")
    node_of = {n["Labels"].get("bastion-node"): n["NodeID"] for n in ray.nodes() if n["Alive"]}
    site_of = {n["NodeID"]: n["Labels"].get("site") for n in ray.nodes()}
    spec = SupervisorSpec(id="root", intensity=5, children=[
        counter("primary", placement=Placement(site="tokyo", anti_affinity="book1",
                                               preferred_nodes=(name,))),
        counter("replica", placement=Placement(site="tokyo", anti_affinity="book1",
                                               preferred_nodes=("tokyo-1",))),
        counter("solo", placement=Placement(site="tokyo", preferred_nodes=(name,))),
        counter("ldn", placement=Placement(site="london")),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    first = {c.id: c for c in tree.children()}
    assert first["primary"].node_id == node_of[name] == first["solo"].node_id
    assert first["replica"].node_id == node_of["tokyo-1"]
    assert site_of[first["ldn"].node_id] == "london"
    acked = ray.get([tree.actor("root/primary").add.remote(i) for i in range(1, 101)],
                    timeout=60)
    ray.get(tree.actor("root/solo").add.remote(42), timeout=30)
    t0 = time.monotonic()
    ray_cluster.kill_node(name)
    moved = wait_until(
        lambda: (k := {c.id: c for c in tree.children()})["primary"].status == "running"
        and k["solo"].status == "running" and k["primary"].node_id != node_of[name]
        and k["solo"].node_id != node_of[name] and k, 30, "children migrated")
    state = ray.get(tree.actor("root/primary").value.remote(), timeout=30)
    elapsed_s = time.monotonic() - t0
    assert state["seq"] == max(acked) == 100 and state["total"] == sum(range(1, 101))
    assert ray.get(tree.actor("root/solo").value.remote(), timeout=30)["total"] == 42
    for cid in ("primary", "solo"):
        assert site_of[moved[cid].node_id] == "tokyo"
    assert moved["primary"].node_id != moved["replica"].node_id  # anti-affinity held
    assert moved["replica"].pid == first["replica"].pid  # untouched siblings (one_for_one)
    assert moved["ldn"].pid == first["ldn"].pid
    assert elapsed_s < 20.0
