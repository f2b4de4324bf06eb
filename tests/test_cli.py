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


def run(*args: str, env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([BASTION, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


@pytest.mark.slow
def test_cli_when_up_status_down_then_cluster_reported_and_nothing_left(tmp_path) -> None:
    env = {**os.environ, "BASTION_CLUSTER_DIR": str(tmp_path / "c"), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    up = run("up", "--nodes", "head:tokyo,tokyo-1:tokyo:b,london-1:london", "--no-dashboard",
             env=env)
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
