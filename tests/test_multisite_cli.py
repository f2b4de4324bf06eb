"""A geographically redundant deployment driven from the CLI, as a user runs it: ``bastion up
--deployment two_sites.yaml``, ``status``, ``failover``, ``down``, each a process of its own.
The venue's own record of trades (labels carry the site and the epoch) is the judge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import pytest

from cluster.deployment import DEFAULT_SPEC, DeploymentError, load, parse, site_tree
from supervisors.spec import validate
from tests.conftest import wait_until

BASTION = str(Path(sys.executable).with_name("bastion"))
TWO_SITES = DEFAULT_SPEC.with_name("two_sites.yaml")


def run(*args: str, env: dict[str, str], timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    return subprocess.run([BASTION, *args], env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)


# -- the deployment file ---------------------------------------------------------------------

def two_sites(**failover: Any) -> dict[str, Any]:
    venue = {"name": "deribit", "instruments": ["BTC-PERPETUAL"]}
    return {"sites": [{"name": "tokyo", "venues": [venue]}, {"name": "london", "venues": [venue]}],
            "failover": {"venues": ["deribit"], **failover}}


def test_two_sites_file_when_loaded_then_shared_venue_connectors_are_gated_with_a_replica(
        ) -> None:
    dep = load(TWO_SITES)
    assert dep.failover is not None and [s.name for s in dep.sites] == ["tokyo", "london"]
    assert dep.preferred_sites() == {"deribit": "tokyo"}
    assert dep.failover.lease_fields()["lease_s"] == 1.0  # the local preset (mesh: local)
    for site in dep.sites:
        tree = site_tree(site, {"deribit": "ws://127.0.0.1:1/ws/api/v2"},
                         gated=dep.failover.venues)
        validate(tree)
        assert [c.id for c in tree.children] == ["risk", "venues", "trading"]
        connector = tree.children[1].children[0].children[1]
        assert connector.kwargs["role_gated"] is True
        assert connector.kwargs["replica"] == "replica/deribit/deribit"
    plain = site_tree(dep.sites[0], {"deribit": "ws://127.0.0.1:1/ws/api/v2"})
    assert "role_gated" not in plain.children[1].children[0].children[1].kwargs


@pytest.mark.parametrize(("raw", "needle"), [
    (two_sites(preferred={"deribit": "paris"}), r"failover.preferred.deribit: site 'paris'"),
    (two_sites(preferred={"okx": "tokyo"}), r"failover.preferred: 'okx' is not a shared venue"),
    (two_sites(venues=["okx"]), r"'okx' is not declared in sites.0.venues"),
    (two_sites(venues=[]), r"failover.venues"),
    (two_sites(mesh="mars"), r"failover.mesh"),
    (two_sites(lease={"lease_s": -1}), r"lease.lease_s"),
    (two_sites(lease={"colour": 1}), r"lease.colour"),
    (two_sites(lease={"lease_s": 0.3}), r"renew_interval_s"),
    (two_sites(lease={"preset": "moon"}), r"lease.preset = 'moon'"),
    (two_sites(nodes_per_site=0), r"failover.nodes_per_site"),
    ({**two_sites(), "store_url": "sqlite:///tmp/j"}, r"store_url = .*\{site\}"),
    ({"sites": [{"name": "tokyo", "venues": [{"name": "deribit"}]}],
      "failover": {"venues": ["deribit"]}}, r"at least two sites"),
    ({"sites": [{"name": "tokyo", "venues": [{"name": "deribit", "seed": 2}]},
                {"name": "london", "venues": [{"name": "deribit"}]}],
      "failover": {"venues": ["deribit"]}}, r"'deribit' differs between sites.0 and sites.1 in "
                                            r"\['seed'\]"),
    ({"sites": [{"name": "tokyo", "venues": [{"name": "deribit"}]},
                {"name": "new-york", "venues": [{"name": "deribit"}]}],
      "failover": {"venues": ["deribit"]}}, r"sites.1.name = 'new-york'"),
])
def test_failover_section_when_invalid_then_error_names_the_field(raw: dict, needle: str) -> None:
    with pytest.raises(DeploymentError, match=needle):
        parse(raw)


# -- up, status, failover, down --------------------------------------------------------------

def venue_rpc(venue: dict[str, Any], method: str, params: dict[str, Any] | None = None) -> Any:
    from cluster.demo import venue_rpc as call

    site = load(TWO_SITES).sites[0].venues[0]
    return call(venue["http_url"], site.client_id, site.client_secret, method, params or {})


def by_site(venue: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
    """site -> [(timestamp_ms, epoch)] of its trades, from the venue's own record."""
    from cluster.multisite import trades_by_site

    return trades_by_site(lambda method, params: venue_rpc(venue, method, params))


def recorded(work_dir: Path) -> tuple[set[int], list[str]]:
    """Every process the deployment recorded (the sites' clusters, the witness, the venues),
    and the sites' Ray temp dirs."""
    from cluster.multisite import MultiSite

    sites = MultiSite.load(work_dir)
    pids = {p for s in sites.sites.values() for p in s.cluster.pids()}
    if sites.witness is not None:
        pids.add(sites.witness.pid)
    venues = json.loads((work_dir / "venues.json").read_text())
    return pids | {v["pid"] for v in venues.values()}, [
        str(s.cluster.temp_dir) for s in sites.sites.values()]


def processes_of(work_dir: Path, pids: set[int], temp_dirs: list[str]) -> list[str]:
    """Running processes that are ours: recorded, naming the work dir or a site's Ray temp
    dir on their command line, or writing to a file in the work dir."""
    markers = [str(work_dir), *temp_dirs]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
            if proc.pid in pids or any(m in cmdline for m in markers) or any(
                    f.path.startswith(str(work_dir)) for f in proc.open_files()):
                found.append(f"{proc.pid} {cmdline[:120]}")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.mark.slow
@pytest.mark.timeout(600)  # ~2 min on a quiet machine; starting 24 actors on 2 busy cores is slow
def test_two_sites_when_up_then_failover_hands_the_venue_over_with_no_overlap_and_down_leaves_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cluster.sites_deploy import render_sites_status

    work_dir = tmp_path / "w"
    env = {**os.environ, "BASTION_CLUSTER_DIR": str(work_dir), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    pids: set[int] = set()
    temp_dirs: list[str] = []
    try:
        up = run("up", "--deployment", str(TWO_SITES), "--no-dashboard", env=env,
                 timeout_s=420)
        assert up.returncode == 0, up.stdout + up.stderr[-3000:]
        assert "deribit: tokyo ACTIVE" in up.stdout, up.stdout
        pids, temp_dirs = recorded(work_dir)  # `up` has exited; all this outlives it
        again = run("up", "--deployment", str(TWO_SITES), env=env)
        assert again.returncode == 1 and "already up" in again.stderr, again

        status = run("status", "--json", env=env)
        assert status.returncode == 0, status.stderr[-3000:]
        report = json.loads(status.stdout)
        sites = report["sites"]
        assert {n: s["roles"]["deribit"]["state"] for n, s in sites.items()} == {
            "tokyo": "ACTIVE", "london": "STANDBY"}, sites
        assert sites["tokyo"]["roles"]["deribit"]["window_left_s"] > 0
        assert sites["tokyo"]["replication"]["deribit"]["role"] == "active"
        assert sites["london"]["replication"]["deribit"]["role"] == "standby"
        assert "london" in sites["tokyo"]["replication"]["deribit"]["lag"]
        for name, site in sites.items():
            (tree,) = site["cluster"]["trees"]
            assert tree["path"] == f"site-{name}" and tree["status"] == "running", tree
            assert {n["site"] for n in site["cluster"]["nodes"]} == {name}
        assert report["witness"]["alive"]
        capsys.readouterr()
        render_sites_status(report)  # the text form of the same report
        text = capsys.readouterr().out
        assert "ACTIVE" in text and "STANDBY" in text and "site-london" in text, text

        venue = json.loads((work_dir / "venues.json").read_text())["deribit"]
        wait_until(lambda: len(by_site(venue).get("tokyo", [])) >= 3, 90,
                   "tokyo's market maker trading at the venue")
        assert "london" not in by_site(venue)  # the standby's orders never reach the venue

        refused = run("failover", "--venue", "deribit", "--to", "paris", env=env)
        assert refused.returncode == 1 and "no site 'paris'" in refused.stderr, refused

        moved = run("failover", "--venue", "deribit", "--to", "london", env=env)
        assert moved.returncode == 0, moved.stdout + moved.stderr[-3000:]
        assert "tokyo released deribit" in moved.stdout and "london ACTIVE" in moved.stdout

        wait_until(lambda: len(by_site(venue).get("london", [])) >= 3, 90,
                   "london's market maker trading at the venue")
        trades = by_site(venue)
        tokyo, london = trades["tokyo"], trades["london"]
        # Never two active sites: every tokyo trade precedes london's first, under older epochs.
        assert max(t for t, _ in tokyo) < min(t for t, _ in london), (tokyo[-3:], london[:3])
        assert max(e for _, e in tokyo) < min(e for _, e in london), (tokyo[-1], london[0])
        assert venue_rpc(venue, "public/simulator/status")["engine"]["duplicate_labels"] == 0

        again = run("failover", "--venue", "deribit", "--to", "london", env=env)
        assert again.returncode == 0 and "already ACTIVE" in again.stdout, again
        assert by_site(venue)["tokyo"] == tokyo  # tokyo stayed quiet
    finally:
        down = run("down", env=env, timeout_s=180)
    assert down.returncode == 0, down.stderr[-3000:]
    assert "sites down" in down.stdout
    left: list[str] = []

    def nothing_left() -> bool:
        left[:] = processes_of(work_dir, pids, temp_dirs)
        return not left

    try:
        wait_until(nothing_left, 30, "no process of the deployment left")
    except AssertionError:
        raise AssertionError(f"left running after down: {left}") from None
    assert not (work_dir / "multisite.json").exists()
    assert run("down", env=env).returncode == 1  # nothing recorded any more
