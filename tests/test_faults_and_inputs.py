"""Bad input and injected faults around the tree: a corrupt journal record, unknown ids, a
node-death signal that arrives before Ray notices (a hung node)."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
import uuid

import psutil
import pytest
import ray

from cluster.local import LocalCluster, NodeConfig
from supervisors import (
    ChildSpec,
    Placement,
    SpecError,
    StartError,
    SupervisorSpec,
    TreeError,
    start_tree,
)
from supervisors.journal import open_store
from supervisors.spec import Backoff
from tests.conftest import wait_until

COUNTER = "supervisors.examples:Counter"


def _flip_record(store_url: str, stream: str, seq: int) -> None:
    """Corrupt one stored record on disk, behind the store's back."""
    store = open_store(store_url)
    path = store.stream_path(stream)
    store.close()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:
        (entry,) = db.execute("SELECT entry FROM records WHERE seq = ?", (seq,)).fetchone()
        damaged = bytearray(entry)
        damaged[-1] ^= 0xFF
        db.execute("UPDATE records SET entry = ? WHERE seq = ?", (bytes(damaged), seq))


def test_stateful_child_when_journal_record_corrupt_then_start_refused_naming_the_seq(
        namespace, store_url) -> None:
    spec = SupervisorSpec(id="root", children=[
        ChildSpec(id="book", cls=COUNTER, kwargs={"snapshot_every": 0})])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    ray.get([tree.actor("root/book").add.remote(1) for _ in range(10)], timeout=30)
    tree.stop()
    _flip_record(store_url, f"{namespace}/root/book", 5)
    with pytest.raises(StartError) as err:
        start_tree(spec, namespace=namespace, store_url=store_url)
    text = str(err.value)
    assert "root/book" in text and "Corrupt" in text and "5" in text
    wait_until(lambda: not [a for a in ray.util.list_named_actors(all_namespaces=True)
                            if a["namespace"] == namespace], 30, "nothing left")


def test_tree_when_unknown_ids_or_bad_dynamic_spec_then_clear_errors(
        namespace, store_url, trees) -> None:
    tree = start_tree(SupervisorSpec(id="root", children=[
        ChildSpec(id="a", cls="supervisors.examples:Worker")]),
        namespace=namespace, store_url=store_url)
    trees.append(tree)
    with pytest.raises(Exception, match="root/nope: no such child"):
        tree.terminate_child("root/nope")
    with pytest.raises(TreeError, match="root/ghost"):
        tree.children("root/ghost")
    with pytest.raises(SpecError, match="restart='often'"):
        tree.start_child("root", ChildSpec(id="b", cls="supervisors.examples:Worker",
                                           restart="often"))
    with pytest.raises(StartError, match="root/c.*on purpose"):
        tree.start_child("root", ChildSpec(id="c", cls="supervisors.examples:FailingInit",
                                           kwargs={"message": "refused on purpose"}))
    assert [c.id for c in tree.children()] == ["a"]  # nothing half-added
    assert tree.status() == "running"


def test_start_child_when_no_node_satisfies_placement_then_start_error_names_it(
        namespace, store_url, trees) -> None:
    tree = start_tree(SupervisorSpec(id="root"), namespace=namespace, store_url=store_url)
    trees.append(tree)
    with pytest.raises(StartError, match="site='paris'"):
        tree.start_child("root", ChildSpec(id="p", cls="supervisors.examples:Worker",
                                           placement=Placement(site="paris")))


@pytest.mark.slow
def test_node_down_signal_when_node_hangs_then_children_migrate_before_ray_notices(
        ray_cluster: LocalCluster, namespace, store_url, trees) -> None:
    name = f"tokyo-h{uuid.uuid4().hex[:4]}"
    ray_cluster.add_node(NodeConfig(name, site="tokyo", zone="c", num_cpus=4))
    node_id = wait_until(lambda: next((n["NodeID"] for n in ray.nodes() if n["Alive"] and
                                       n["Labels"].get("bastion-node") == name), None),
                         30, "node registered")
    spec = SupervisorSpec(id="root", intensity=5, children=[
        ChildSpec(id="book", cls=COUNTER, backoff=Backoff(initial_s=0.0),
                  placement=Placement(site="tokyo", preferred_nodes=(name,)))])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    assert tree.child("root/book").node_id == node_id
    ray.get([tree.actor("root/book").add.remote(2) for _ in range(20)], timeout=30)
    procs = ray_cluster.nodes[name].process_tree()
    for proc in procs:  # a hung node: every process of it stopped, nothing exits
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        moved = tree.node_down(node_id, reason="mesh: node unreachable")
        assert moved == ["root/book"]
        info = wait_until(lambda: (c := tree.child("root/book")).status == "running"
                          and c.node_id != node_id and c, 20, "book migrated")
        state = ray.get(tree.actor("root/book").value.remote(), timeout=20)
        elapsed_s = time.monotonic() - t0
        assert state["total"] == 40 and state["epoch"] == 2
        alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
        assert info.node_id in alive and alive[info.node_id]
        assert elapsed_s < 15
    finally:
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.send_signal(signal.SIGCONT)
        ray_cluster.kill_node(name)
    os.sync()
