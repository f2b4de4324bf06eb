"""`bastion up / status / down` as a user runs them: separate processes, a real cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from cluster.local import LocalCluster
from tests.conftest import wait_until

BASTION = str(Path(sys.executable).with_name("bastion"))


DRIVER = """
import sys, ray
from supervisors import ChildSpec, Placement, SupervisorSpec, start_tree
ray.init(address=sys.argv[1], logging_level="ERROR")
W = "supervisors.examples:Worker"
start_tree(SupervisorSpec(id="root", children=[
    ChildSpec(id="ldn", cls=W, placement=Placement(site="london")),
    SupervisorSpec(id="sub", children=[ChildSpec(id="x", cls=W,
                                                 placement=Placement(site="tokyo"))]),
]), namespace="cli", store_url=sys.argv[2])
"""


#: Ray's own actor table (the GCS), as a separate driver sees it: name -> (state, pid, node)
ACTOR_TABLE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
out = {}
for a in ray.util.list_named_actors(all_namespaces=True):
    if a["namespace"] != "cli":
        continue
    h = ray.get_actor(a["name"], namespace="cli")
    e = ray._private.state.actors(h._actor_id.hex())
    out[a["name"]] = [e["State"], e["Pid"], e["Address"]["NodeID"]]
print(json.dumps(out))
"""


def _statuses(tree: dict) -> dict[str, dict]:
    """actor name -> the status entry of every child in a ``status --json`` tree."""
    out = {}
    for child in tree["children"]:
        out[child["actor_name"]] = child
        if isinstance(child.get("tree"), dict) and "children" in child["tree"]:
            out.update(_statuses(child["tree"]))
    return out


def run(*args: str, env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([BASTION, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.mark.slow
@pytest.mark.parametrize("auth", ["disabled", "token"])
def test_cli_when_up_status_down_then_cluster_reported_and_nothing_left(tmp_path, auth) -> None:
    env = {**os.environ, "BASTION_CLUSTER_DIR": str(tmp_path / "c"), "RAY_AUTH_MODE": auth}
    env.pop("RAY_ADDRESS", None)
    up = run("up", "--nodes", "head:tokyo,tokyo-1:tokyo:b,london-1:london", "--no-dashboard",
             "--auth", auth, env=env)
    pids: set[int] = set()
    try:
        assert up.returncode == 0, up.stderr
        assert "cluster up: 3 nodes" in up.stdout
        pids = LocalCluster.load(tmp_path / "c").pids()
        again = run("up", env=env)
        assert again.returncode == 1 and "already up" in again.stderr
        status = run("status", "--json", env=env)
        assert status.returncode == 0, status.stderr
        report = json.loads(status.stdout)
        sites = sorted((n["name"], n["site"], n["zone"]) for n in report["nodes"] if n["alive"])
        assert sites == [("head", "tokyo", "a"), ("london-1", "london", "a"),
                         ("tokyo-1", "tokyo", "b")]
        assert report["trees"] == []
        # A driver starts a tree and exits; the tree (detached actors) outlives it.
        driver = subprocess.run([sys.executable, "-c", DRIVER, report["address"],
                                 f"sqlite://{tmp_path / 'journal'}"], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert driver.returncode == 0, driver.stderr[-2000:]
        report = json.loads(run("status", "--json", env=env).stdout)
        (tree,) = report["trees"]
        assert tree["path"] == "root" and tree["namespace"] == "cli" and tree["node"] == "head"
        kids = {c["id"]: c for c in tree["children"]}
        assert kids["ldn"]["status"] == "running" and kids["ldn"]["node"] == "london-1"
        assert [c["id"] for c in kids["sub"]["tree"]["children"]] == ["x"]
        assert kids["sub"]["tree"]["children"][0]["node"] == "tokyo-1"
        # The status agrees with Ray's own actor table on every child: alive, pid, node.
        table = subprocess.run([sys.executable, "-c", ACTOR_TABLE, report["address"]], env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        assert table.returncode == 0, table.stderr[-2000:]
        ray_view = json.loads(table.stdout.strip().splitlines()[-1])
        ours = _statuses(tree)
        assert set(ours) <= set(ray_view), (sorted(ours), sorted(ray_view))
        for name, child in ours.items():
            state, pid, node_id = ray_view[name]
            assert child["status"] == "running" and state == "ALIVE", (name, child, state)
            assert child["pid"] == pid and child["node_id"] == node_id, (name, child, pid)
        text = run("status", env=env)
        assert text.returncode == 0 and "ldn" in text.stdout and "london-1" in text.stdout
    finally:
        down = run("down", env=env)
    assert down.returncode == 0, down.stderr
    wait_until(lambda: not [p for p in pids if psutil.pid_exists(p)
                            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE],
               20, "cluster processes gone")
    assert run("down", env=env).returncode == 1  # nothing recorded any more


def test_cli_when_bad_node_list_then_clear_error(tmp_path) -> None:
    env = {**os.environ, "BASTION_CLUSTER_DIR": str(tmp_path / "c")}
    out = run("up", "--nodes", "head", env=env, timeout_s=60)
    assert out.returncode != 0 and "bad node 'head'" in out.stderr
