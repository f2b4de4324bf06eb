"""OTP semantics on a real Ray cluster: strategies x restart types x exit kinds, intensity and
escalation, start/stop order, shutdown, dynamic children, bad specs. Real processes, real
SIGKILL."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import ray

from supervisors import (
    ChildSpec,
    SpecError,
    StartError,
    SupervisorSpec,
    start_tree,
)
from supervisors.spec import Backoff
from tests.conftest import wait_until

W = "supervisors.examples:Worker"
NO_BACKOFF = Backoff(initial_s=0.0)


def worker(cid: str, log: Path | None = None, restart: str = "permanent",
           **kw: object) -> ChildSpec:
    return ChildSpec(id=cid, cls=W, kwargs={"name": cid, "log_path": str(log) if log else None},
                     restart=restart, backoff=NO_BACKOFF, **kw)


def pids(tree, sup: str = "root") -> dict[str, int | None]:
    return {c.id: c.pid for c in tree.children(sup)}


def statuses(tree, sup: str = "root") -> dict[str, str]:
    return {c.id: c.status for c in tree.children(sup)}


def lines(log: Path) -> list[str]:
    return log.read_text().split("\n")[:-1] if log.exists() else []


def named_in(namespace: str) -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == namespace)


def test_start_tree_when_valid_then_children_run_in_spec_order_and_resolve_by_name(
        namespace, store_url, trees, tmp_path) -> None:
    log = tmp_path / "order.log"
    spec = SupervisorSpec(id="root", strategy="one_for_one", children=[
        worker("a", log),
        SupervisorSpec(id="sub", children=[worker("x", log), worker("y", log)]),
        worker("b", log),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    assert tree.status() == "running"
    assert lines(log) == ["start a", "start x", "start y", "start b"]
    infos = tree.children("root")
    assert [c.id for c in infos] == ["a", "sub", "b"]
    assert all(c.status == "running" and c.restarts == 0 for c in infos)
    for c in infos:
        assert psutil_alive(c.pid)
        assert ray.get_actor(c.actor_name, namespace=namespace) is not None
    assert [c.id for c in tree.children("root/sub")] == ["x", "y"]
    assert ray.get(tree.actor("root/sub/x").ping.remote(), timeout=30) == "pong"
    # The actor knows who it is in the tree (current_context() inside the worker).
    assert ray.get(tree.actor("root/sub/x").incarnation.remote(), timeout=30) == 1
    assert named_in(namespace) == sorted(["root", "root/a", "root/sub", "root/sub/x",
                                          "root/sub/y", "root/b"])
    tree.stop()
    assert lines(log)[4:] == ["stop b", "stop y", "stop x", "stop a"]
    assert tree.status() == "stopped"
    assert named_in(namespace) == []


def psutil_alive(pid: int | None) -> bool:
    import psutil

    return pid is not None and psutil.pid_exists(pid)


def settled(tree, old_b_pid: int) -> dict[str, int | None] | None:
    """One snapshot in which b has a new process and every child is running."""
    infos = tree.children()
    snap = {c.id: c.pid for c in infos}
    if snap["b"] in (None, old_b_pid) or any(c.status != "running" for c in infos):
        return None
    return snap


def _exit_child(tree, path: str, kind: str) -> None:
    if kind == "normal":
        tree.actor(path).exit_normally.remote()
    else:
        os.kill(tree.child(path).pid, signal.SIGKILL)


EXPECTED_AFFECTED = {"one_for_one": set(), "one_for_all": {"a", "c"}, "rest_for_one": {"c"}}


@pytest.mark.parametrize("strategy", ["one_for_one", "one_for_all", "rest_for_one"])
@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
@pytest.mark.parametrize("kind", ["normal", "killed"])
def test_child_exit_when_strategy_restart_type_exit_kind_then_otp_outcome(
        strategy, restart, kind, namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", strategy=strategy, intensity=5, children=[
        worker("a"), worker("b", restart=restart), worker("c")])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    before = pids(tree)
    _exit_child(tree, "root/b", kind)
    restarted = restart == "permanent" or (restart == "transient" and kind == "killed")
    if restarted:
        after = wait_until(lambda: settled(tree, before["b"]), 30, "b restarted")
        info = tree.child("root/b")
        assert info.restarts == 1 and info.status == "running"
        assert ray.get(tree.actor("root/b").ping.remote(), timeout=30) == "pong"
        changed = {cid for cid in ("a", "c") if after[cid] != before[cid]}
        assert changed == EXPECTED_AFFECTED[strategy]
    else:
        expected = "stopped" if kind == "normal" else "failed"
        wait_until(lambda: statuses(tree)["b"] == expected, 30, f"b {expected}")
        assert tree.child("root/b").restarts == 0
        assert pids(tree)["a"] == before["a"] and pids(tree)["c"] == before["c"]
        assert tree.status() == "running"


def test_temporary_sibling_when_one_for_all_restart_then_not_restarted(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", strategy="one_for_all", intensity=5, children=[
        worker("a"), worker("t", restart="temporary"), worker("c")])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    before = pids(tree)
    os.kill(before["a"], signal.SIGKILL)
    def restarted() -> bool:
        snap = {c.id: c for c in tree.children()}
        return (snap["a"].pid != before["a"] and snap["a"].status == "running"
                and snap["c"].pid != before["c"] and snap["c"].status == "running")

    wait_until(restarted, 30, "a and c restarted")
    assert statuses(tree)["t"] == "stopped"
    assert not psutil_alive(before["t"]) or wait_until(
        lambda: not psutil_alive(before["t"]), 10, "t's process gone")
    assert "root/t" not in named_in(namespace)


def test_intensity_when_exceeded_then_escalates_two_levels_and_tree_fails(
        namespace, store_url, trees, tmp_path) -> None:
    log = tmp_path / "esc.log"
    spec = SupervisorSpec(id="root", strategy="one_for_one", intensity=0, period_s=30, children=[
        worker("r1", log),
        SupervisorSpec(id="mid", intensity=0, period_s=30, children=[
            worker("m1", log),
            SupervisorSpec(id="leaf", intensity=1, period_s=30, children=[
                worker("l1", log), worker("l2", log)]),
        ]),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    first = tree.child("root/mid/leaf/l1").pid
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: tree.child("root/mid/leaf/l1").pid not in (None, first)
               and tree.child("root/mid/leaf/l1").status == "running", 30, "first restart")
    os.kill(tree.child("root/mid/leaf/l1").pid, signal.SIGKILL)  # 2 > intensity 1: leaf gives up
    wait_until(lambda: tree.status() == "failed", 60, "the tree to fail")
    # Everything was stopped in reverse start order on the way up, nothing is left running.
    stops = [ln for ln in lines(log) if ln.startswith("stop")]
    assert stops[-1] == "stop r1"
    assert stops.index("stop l2") < stops.index("stop m1") < stops.index("stop r1")
    assert named_in(namespace) == ["root"]


def test_intensity_when_mid_level_restarts_leaf_then_subtree_comes_back_fresh(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", intensity=3, children=[
        SupervisorSpec(id="mid", intensity=3, period_s=30, children=[
            SupervisorSpec(id="leaf", intensity=0, period_s=30, children=[worker("l1")]),
        ]),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    leaf_pid = tree.child("root/mid/leaf").pid
    old = tree.child("root/mid/leaf/l1").pid
    os.kill(old, signal.SIGKILL)  # leaf's intensity 0: it gives up; mid restarts it
    wait_until(lambda: tree.child("root/mid/leaf").pid not in (None, leaf_pid)
               and tree.child("root/mid/leaf").status == "running", 30, "leaf restarted")
    info = tree.child("root/mid/leaf")
    assert info.restarts == 1 and "intensity" in (info.last_failure or "")
    l1 = wait_until(lambda: (c := tree.child("root/mid/leaf/l1")).status == "running" and c,
                    30, "l1 running again")
    assert l1.pid != old and l1.restarts == 0  # a fresh leaf starts fresh children
    assert tree.status() == "running"


def test_intensity_when_permanent_children_exit_normally_then_exits_count_together(
        namespace, store_url) -> None:
    spec = SupervisorSpec(id="root", intensity=1, period_s=60, children=[worker("a"),
                                                                        worker("b")])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    old_a = tree.child("root/a").pid
    tree.actor("root/a").exit_normally.remote()  # restart 1 of 1: still fine
    wait_until(lambda: (c := tree.child("root/a")).status == "running" and c.pid != old_a,
               30, "a restarted")
    tree.actor("root/b").exit_normally.remote()  # restart 2 (another child): too many
    wait_until(lambda: tree.status() == "failed", 30, "root to give up")
    assert named_in(namespace) == ["root"]
    tree.stop()


def test_stop_when_shutdown_exceeded_or_brutal_then_killed_without_on_stop(
        namespace, store_url, trees, tmp_path) -> None:
    log = tmp_path / "stop.log"
    spec = SupervisorSpec(id="root", children=[
        worker("graceful", log),
        ChildSpec(id="slow", cls=W, kwargs={"name": "slow", "log_path": str(log),
                                            "stop_delay_s": 30.0}, shutdown_s=0.5),
        worker("brutal", log, shutdown_s="brutal_kill"),
    ])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    tree.stop()
    stops = [ln for ln in lines(log) if ln.startswith("stop")]
    assert stops == ["stop graceful"]
    assert named_in(namespace) == []


def test_dynamic_children_when_added_and_terminated_then_tracked(
        namespace, store_url, trees) -> None:
    tree = start_tree(SupervisorSpec(id="root", strategy="one_for_one", intensity=5,
                                     children=[worker("static")]),
                      namespace=namespace, store_url=store_url)
    trees.append(tree)
    for i in range(3):
        info = tree.start_child("root", worker(f"dyn{i}", restart="transient"))
        assert info.status == "running" and info.dynamic
    assert [c.id for c in tree.children()] == ["static", "dyn0", "dyn1", "dyn2"]
    old = tree.child("root/dyn1").pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: tree.child("root/dyn1").pid not in (None, old), 30, "dyn1 restarted")
    tree.terminate_child("root/dyn0")
    assert [c.id for c in tree.children()] == ["static", "dyn1", "dyn2"]
    tree.terminate_child("root/static")  # a permanent child terminated stays stopped
    assert tree.child("root/static").status == "stopped"
    assert "root/static" not in named_in(namespace)
    with pytest.raises(ValueError, match="already running"):
        tree.start_child("root", worker("dyn1"))


def test_start_tree_when_constructor_raises_then_start_error_and_nothing_alive(
        namespace, store_url, tmp_path) -> None:
    log = tmp_path / "fail.log"
    spec = SupervisorSpec(id="root", children=[
        worker("a", log),
        SupervisorSpec(id="sub", children=[
            worker("x", log),
            ChildSpec(id="bad", cls="supervisors.examples:FailingInit",
                      kwargs={"message": "no venue keys"}),
        ]),
        worker("never", log),
    ])
    with pytest.raises(StartError, match="root/sub/bad.*no venue keys"):
        start_tree(spec, namespace=namespace, store_url=store_url)
    assert lines(log) == ["start a", "start x", "stop x", "stop a"]
    wait_until(lambda: named_in(namespace) == [], 30, "no actor left")


def test_restart_when_constructor_keeps_failing_then_intensity_gives_up(
        namespace, store_url, tmp_path) -> None:
    spec = SupervisorSpec(id="root", intensity=2, period_s=30, children=[
        ChildSpec(id="once", cls="supervisors.examples:FailAfterFirst",
                  kwargs={"marker_path": str(tmp_path / "marker")}, backoff=NO_BACKOFF)])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    os.kill(tree.child("root/once").pid, signal.SIGKILL)
    wait_until(lambda: tree.status() == "failed", 60, "root to give up")
    assert "second start refused" in (tree.child("root/once").last_failure or "")
    tree.stop()


def test_async_child_when_exits_normally_then_transient_not_restarted(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", children=[
        ChildSpec(id="aw", cls="supervisors.examples:AsyncWorker", restart="transient")])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    assert ray.get(tree.actor("root/aw").ping.remote(), timeout=30) == "pong"
    tree.actor("root/aw").exit_normally.remote()
    wait_until(lambda: statuses(tree)["aw"] == "stopped", 30, "aw stopped")


BAD_SPECS = [
    (SupervisorSpec(id="root", strategy="one_for_some"), "strategy", "one_for_some"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls=W, restart="sometimes")]),
     "restart", "sometimes"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls=W), ChildSpec(id="a", cls=W)]),
     "id", "'a'"),
    (SupervisorSpec(id="root", intensity=-1), "intensity", "-1"),
    (SupervisorSpec(id="root", period_s=0), "period_s", "0"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls="no.such.module:X")]),
     "cls", "no.such.module:X"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls="supervisors.examples:Nope")]),
     "cls", "supervisors.examples:Nope"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls="supervisors.examples:_log")]),
     "cls", "_log"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls=W, kwargs={"bogus": 1})]),
     "args/kwargs", "bogus"),
    (SupervisorSpec(id="root", children=[ChildSpec(id="a", cls=W, shutdown_s=-2)]),
     "shutdown_s", "-2"),
    (SupervisorSpec(id="root", period_s=float("nan")), "period_s", "nan"),
    (SupervisorSpec(id="bad/id"), "id", "bad/id"),
]


@pytest.mark.parametrize(("spec", "field", "value"), BAD_SPECS,
                         ids=[f"{f}={v}" for _, f, v in BAD_SPECS])
def test_start_tree_when_spec_invalid_then_refused_naming_field_and_value(
        spec, field, value, namespace, store_url) -> None:
    with pytest.raises(SpecError) as err:
        start_tree(spec, namespace=namespace, store_url=store_url)
    assert field in str(err.value) and value in str(err.value)
    assert named_in(namespace) == []
