"""Chaos (cluster.chaos): scenario validation naming the field, seeded plans that repeat, the
non-production guard; then real faults on the shared Ray cluster, each judged by its effect:
a SIGKILLed actor restarts under a new pid and its recovery is recorded within the bound; a
paused worker is in state T, then resumed; venue faults show in a real simulator's status,
then clear; a corrupted journal record is refused by the store (recovery from a snapshot
skips it; a restart that must replay it fails until the bytes are put back); mesh partitions
and a clock jump on the nodes' agents; real nftables partitions in a NetLab; a node crash on
a node of our own; and a scenario run end to end, its history judged by ``bastion check``."""

from __future__ import annotations

import io
import json
import os
import signal
import uuid
from collections.abc import Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import psutil
import pytest
import ray
import yaml

from cluster.chaos.context import ChaosError, ChaosRefused, LiveSystem, VenueAccess
from cluster.chaos.faults import inject
from cluster.chaos.scenario import Runner, ScenarioError, load, one_shot, parse, plan
from cluster.checker import check
from cluster.history import HistoryWriter, load_history
from cluster.local import LocalCluster, NodeConfig
from supervisors import ChildSpec, Placement, SupervisorSpec, start_tree
from supervisors.journal import CorruptRecordError, open_store
from supervisors.spec import Backoff
from tests.conftest import wait_until

COUNTER = "supervisors.examples:Counter"
SCENARIOS = Path(__file__).resolve().parents[1] / "cluster" / "chaos" / "scenarios"
OK_STEP = {"at_s": 1, "fault": "kill-actor", "target": {"among": "actors"}}


def scenario_with(**step: Any) -> dict[str, Any]:
    return {"name": "t", "seed": 1, "duration_s": 30, "steps": [{**OK_STEP, **step}]}


# --- scenarios: validation, plans, refusal (no Ray) -------------------------------------------
@pytest.mark.parametrize(("change", "field"), [
    ({"target": {"among": "actors", "select": "most"}}, "steps.0.target.select"),
    ({"fault": "kil-actor"}, "steps.0.fault"),
    ({"target": {"among": "venues"}}, "steps.0.target.among"),
    ({"fault": "link-loss", "target": {"among": "nodes"}, "params": {"probability": 2}},
     "steps.0.params.probability"),
    ({"fault": "venue-outage", "target": {"among": "venues"}, "params": {"colour": 1}},
     "steps.0.params.colour"),
    ({"at_s": 31}, "steps.0.at_s"),
    ({"at_s": [5, 2]}, "steps.0.at_s"),
    ({"repeat": 3}, "steps.0.every_s"),
    ({"fault": "pause", "hold_s": 5, "recovery_bound_s": 2}, "steps.0.recovery_bound_s"),
    ({"hold_s": -1}, "steps.0.hold_s"),
    ({"colour": "red"}, "steps.0.colour"),
])
def test_scenario_when_a_field_is_invalid_then_the_error_names_it(change, field) -> None:
    with pytest.raises(ScenarioError, match=field.replace(".", r"\.")):
        parse(scenario_with(**change))


def test_scenario_when_top_level_wrong_or_shipped_examples_then_named_or_valid(tmp_path) -> None:
    with pytest.raises(ScenarioError, match="seed"):
        parse({"name": "t", "duration_s": 1, "steps": [OK_STEP]})
    with pytest.raises(ScenarioError, match="steps"):
        parse({"name": "t", "seed": 1, "duration_s": 1, "steps": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ScenarioError, match="not valid YAML"):
        load(bad)
    for path in sorted(SCENARIOS.glob("*.yaml")):
        assert load(path).steps  # the shipped examples are valid


class FakeSystem:
    """Candidates only: a fixed system for plans (nothing can be injected into it)."""

    environment = "non-production"
    source = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def candidates(self, among: str) -> dict[str, str | None]:
        self.calls.append(among)
        sites = ("tokyo", "london")
        if among == "actors":
            return {f"site-{s}/{g}/{i}": s for s in sites for g in ("risk", "venues")
                    for i in range(4)}
        if among == "nodes":
            return {f"{s}-{i}": s for s in sites for i in range(1, 4)}
        return {"tokyo/deribit": "tokyo", "london/deribit": "london"}

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the fake system was asked to act: {name}")


def test_plan_when_same_seed_then_same_targets_and_times_and_another_seed_differs() -> None:
    raw = {"name": "p", "seed": 42, "duration_s": 120, "steps": [
        {"at_s": [1, 10], "fault": "kill-actor", "repeat": 4, "every_s": [5, 15],
         "target": {"select": "one", "among": "actors", "match": "site-*/risk/*"}},
        {"at_s": [20, 30], "fault": "partition", "hold_s": 5,
         "target": {"select": "majority", "among": "nodes"}},
        {"at_s": 40, "fault": "pause", "hold_s": 2, "target": {"select": "site", "among": "actors"}},
        {"at_s": 50, "fault": "link-loss", "params": {"probability": 0.3},
         "target": {"select": "minority", "among": "nodes"}}]}
    first = plan(parse(raw), FakeSystem().candidates)
    again = plan(parse(raw), FakeSystem().candidates)
    assert first.to_dict() == again.to_dict()
    other = plan(parse({**raw, "seed": 43}), FakeSystem().candidates)
    assert [(f.at_s, f.targets) for f in other.faults] != [(f.at_s, f.targets) for f in first.faults]
    kinds = [f.kind for f in first.faults]
    assert kinds.count("kill-actor") == 4 and len(first.faults) == 7
    by_kind = {f.kind: f for f in first.faults}
    assert len(by_kind["partition"].targets) == 4  # majority of 6
    assert len(by_kind["link-loss"].targets) == 2  # minority of 6
    site = by_kind["pause"]
    assert site.site in ("tokyo", "london") and len(site.targets) == 8
    assert all(t.startswith(f"site-{site.site}/") for t in site.targets)
    assert all(f.targets[0].startswith("site-") and "/risk/" in f.targets[0]
               for f in first.faults if f.kind == "kill-actor")
    assert [f.at_s for f in first.faults] == sorted(f.at_s for f in first.faults)
    assert "kill-actor" in first.render() and "recovery within" in first.render()


def test_chaos_when_not_marked_non_production_then_refused_before_anything(
        tmp_path, capsys) -> None:
    from cluster.cli import main

    scenario = tmp_path / "s.yaml"
    scenario.write_text(yaml.safe_dump(scenario_with()))
    for env, said in (("production", "says 'production'"), (None, "does not say")):
        dep = {"name": "d", "sites": [{"name": "tokyo"}]} | (
            {"environment": env} if env else {})
        path = tmp_path / f"dep-{env}.yaml"
        path.write_text(yaml.safe_dump(dep))
        for argv in (["chaos", "run", str(scenario), "--dry-run"],
                     ["chaos", "kill-actor", "root/a"]):
            assert main([*argv, "--deployment", str(path)]) == 3
            err = capsys.readouterr().err
            assert "chaos refused" in err and said in err and str(path) in err
    fake = FakeSystem()
    fake.environment = "production"
    with pytest.raises(ChaosRefused, match="not marked `environment: non-production`"):
        Runner(fake).run(parse(scenario_with()))
    with pytest.raises(ChaosRefused):
        inject(fake, "kill-actor", ("site-tokyo/risk/0",))
    assert fake.calls == []  # refused before even listing targets


# --- on the shared Ray cluster ------------------------------------------------------------------
def counter(cid: str, **kw: Any) -> ChildSpec:
    return ChildSpec(id=cid, cls=COUNTER, kwargs={"snapshot_every": kw.pop("snapshot_every", 50)},
                     backoff=kw.pop("backoff", Backoff(initial_s=0.0)), **kw)


@pytest.fixture
def small_tree(namespace, store_url, trees) -> Any:
    spec = SupervisorSpec(id="root", intensity=50, period_s=60, children=[
        counter("a"), counter("b", snapshot_every=10,
                              backoff=Backoff(initial_s=0.2, max_s=0.5)),
        SupervisorSpec(id="books", intensity=10, children=[counter("c")])])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    return tree


def system(tree: Any = None, **kw: Any) -> LiveSystem:
    return LiveSystem(environment="non-production", source="test",
                      trees=[tree] if tree is not None else [], **kw)


def test_kill_actor_when_injected_then_child_restarts_with_new_pid_and_recovered_in_bound(
        small_tree, tmp_path) -> None:
    ctx = system(small_tree)
    assert set(ctx.candidates("actors")) == {"root/a", "root/b", "root/books/c"}
    assert set(ctx.candidates("supervisors")) == {"root", "root/books"}
    old = small_tree.child("root/a").pid
    with HistoryWriter(tmp_path / "h.jsonl") as history:
        report = Runner(ctx, history=history).run(
            one_shot("kill-actor", "actors", ["root/a"], bound_s=20))
    assert report.ok, report.errors
    new = small_tree.child("root/a")
    assert new.status == "running" and new.pid != old
    assert report.injected[0]["evidence"]["pid_gone"] == old
    events = load_history(tmp_path / "h.jsonl").events
    assert [e["t"] for e in events] == ["fault", "recovered"]
    fault, back = events
    assert fault["target"] == "root/a" and fault["pids"] == [old] and fault["bound_s"] == 20
    assert back["fault_id"] == fault["id"] and 0 < back["ts"] - fault["ts"] < 20
    assert check(load_history(tmp_path / "h.jsonl")).check("recovery").passed


def test_pause_when_injected_then_worker_in_state_t_then_resumed_and_answering(
        small_tree) -> None:
    ctx = system(small_tree)
    pid = small_tree.child("root/books/c").pid
    done = inject(ctx, "pause", ("root/books/c",))
    assert psutil.Process(pid).status() == psutil.STATUS_STOPPED
    assert done.record.evidence == {"state": "stopped"} and done.record.pids == (pid,)
    ref = small_tree.actor("root/books/c").add.remote(1)
    assert not ray.wait([ref], timeout=0.3)[0]  # a stopped worker answers nothing
    assert done.recovered is not None and not done.recovered()
    assert done.undo is not None
    undone = done.undo()
    assert psutil.Process(pid).status() != psutil.STATUS_STOPPED
    assert undone.action == "undo" and ray.get(ref, timeout=30) == 1
    assert done.recovered() and small_tree.child("root/books/c").pid == pid  # same process


def test_venue_fault_when_injected_then_the_simulator_reports_it_then_clears(
        namespace) -> None:
    from actors.venue.process import VenueProcess

    secret = "chaos-s3cret-not-for-production"
    with VenueProcess.start("chaos-venue", keys={"bastion": secret}, speedup=60.0) as venue:
        access = VenueAccess("sim", "tokyo", venue.http_url, "bastion", secret)
        ctx = system(venues={"tokyo/sim": access})
        assert ctx.candidates("venues") == {"tokyo/sim": "tokyo"}
        assert secret not in repr(access)
        outage = inject(ctx, "venue-outage", ("sim",))  # a bare name resolves
        storm = inject(ctx, "venue-reject-storm", ("tokyo/sim",), {"probability": 0.5})
        status = access.status()
        assert status["faults"]["outage"] is True
        assert status["faults"]["reject_storm_probability"] == 0.5
        assert outage.record.evidence["faults"]["outage"] is True
        with pytest.raises(Exception, match="13028|temporarily_unavailable"):
            _public_get(venue.http_url, "public/get_instruments")
        assert outage.recovered is not None and not outage.recovered()
        assert outage.undo is not None and storm.undo is not None
        outage.undo()
        assert access.status()["faults"]["outage"] is False
        assert access.status()["faults"]["reject_storm_probability"] == 0.5  # its own undo
        storm.undo()
        assert access.status()["faults"]["reject_storm_probability"] == 0.0
        assert outage.recovered() and storm.recovered()
        assert "result" in json.loads(_public_get(venue.http_url, "public/get_instruments"))
        wrong = VenueAccess("sim", None, venue.http_url, "bastion", "not-the-key")
        with pytest.raises(Exception, match="refused"):
            inject(system(venues={"x": wrong}), "venue-outage", ("x",))


def _public_get(http_url: str, method: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"{http_url}/api/v2/{method}", timeout=10) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        raise RuntimeError(exc.read().decode()) from None


def test_corrupt_journal_when_a_record_is_flipped_then_the_store_refuses_it_and_recovery_shows(
        small_tree, store_url, namespace) -> None:
    ctx = system(small_tree)
    b = small_tree.actor("root/b")
    assert ray.get([b.add.remote(1) for _ in range(25)], timeout=30)[-1] == 25
    stream = f"{namespace}/root/b"
    assert stream in ctx.candidates("streams")

    # A record under the newest snapshot (seq 20): refused on read, and recovery skips it.
    under = inject(ctx, "corrupt-journal", ("root/b",), {"seq": "snapshot"})
    assert under.record.evidence["seq"] == 20 and under.record.target == stream
    store = open_store(store_url)
    with pytest.raises(CorruptRecordError) as err:
        store.read(stream)
    assert err.value.seq == 20 and store.latest_snapshot(stream).seq == 20
    old = small_tree.child("root/b").pid
    os.kill(old, signal.SIGKILL)
    wait_until(lambda: (c := small_tree.child("root/b")).status == "running" and c.pid != old,
               30, "b restarted from its snapshot")
    b = small_tree.actor("root/b")
    assert ray.get(b.value.remote(), timeout=30)["total"] == 25
    assert ray.get(b.recovery.remote(), timeout=30)["snapshot_seq"] == 20
    under.undo()
    assert len(store.read(stream)) == 25

    # The newest record (replayed on restart): the restart is refused, naming the record,
    # until the bytes are put back; then the child comes back with all 25.
    tail = inject(ctx, "corrupt-journal", (stream,), {"seq": "last"})
    assert tail.record.evidence["seq"] == 25
    old = small_tree.child("root/b").pid
    os.kill(old, signal.SIGKILL)
    failing = wait_until(lambda: (c := small_tree.child("root/b")).last_failure and
                         "corrupt record" in c.last_failure and c, 30,
                         "the restart refused on the corrupt record")
    assert failing.status == "restarting" and "at seq 25" in failing.last_failure
    tail.undo()
    wait_until(lambda: (c := small_tree.child("root/b")).status == "running" and c.pid != old,
               30, "b restarted once the record was repaired")
    assert ray.get(small_tree.actor("root/b").value.remote(), timeout=30)["total"] == 25
    store.close()


def test_scenario_when_run_end_to_end_then_history_passes_the_recovery_check(
        small_tree, tmp_path, namespace, ray_cluster, monkeypatch) -> None:
    raw = {"name": "e2e", "seed": 5, "duration_s": 1.5, "steps": [
        {"at_s": 0.0, "fault": "pause", "hold_s": 0.5, "recovery_bound_s": 10,
         "target": {"among": "actors", "match": "root/books/*"}},
        {"at_s": 0.7, "fault": "kill-actor", "recovery_bound_s": 20,
         "target": {"select": "one", "among": "actors", "match": "root/[ab]"}},
        {"at_s": 1.0, "fault": "kill-supervisor", "recovery_bound_s": 20,
         "target": {"among": "supervisors", "match": "root/books"}}]}
    path = tmp_path / "e2e.yaml"
    path.write_text(yaml.safe_dump(raw))
    dep = tmp_path / "dep.yaml"
    dep.write_text(yaml.safe_dump({"name": "t", "environment": "non-production",
                                   "namespace": namespace, "store_url": small_tree.store_url,
                                   "sites": [{"name": "tokyo"}]}))
    # The dry run, through the command line, against the live system: the same plan twice.
    from cluster.cli import main

    monkeypatch.setenv("BASTION_CLUSTER_DIR", str(ray_cluster.work_dir))
    dry = []
    for _ in range(2):
        buf = io.StringIO()
        with redirect_stdout(buf):
            assert main(["chaos", "run", str(path), "--dry-run", "--json", "--deployment",
                         str(dep)]) == 0
        dry.append(json.loads(buf.getvalue().strip().splitlines()[-1]))
    assert dry[0] == dry[1] and [f["fault"] for f in dry[0]["faults"]] == [
        "pause", "kill-actor", "kill-supervisor"]
    target = dry[0]["faults"][1]["targets"][0]
    before = {p: small_tree.child(p).pid for p in ("root/a", "root/b", "root/books")}
    history = tmp_path / "run.jsonl"
    with HistoryWriter(history) as writer:
        report = Runner(system(small_tree), history=writer).run(load(path))
    assert report.ok, (report.errors, report.not_recovered)
    assert [i["target"] for i in report.injected] == ["root/books/c", target, "root/books"]
    assert small_tree.child(target).pid != before[target]
    assert small_tree.child("root/books").pid != before["root/books"]
    verdict = check(load_history(history))
    assert verdict.check("recovery").passed and verdict.check("history").passed
    assert verdict.check("recovery").counts["faults"] == 3
    assert verdict.check("recovery").counts["recovered"] == 3
    kinds = [e["t"] for e in load_history(history).events]
    assert kinds.count("fault") == 3 and kinds.count("fault_end") == 1  # the pause's SIGCONT


# --- the mesh: partitions and a clock jump on the nodes' agents ---------------------------------
@pytest.fixture
def mesh(ray_cluster: LocalCluster, namespace: str) -> Iterator[Any]:
    from topology.config import MeshConfig
    from topology.ray_mesh import RayMesh

    m = RayMesh.start(namespace=namespace, site="tokyo", config=MeshConfig.preset("local"))
    try:
        m.wait_all_up(30)
        yield m
    finally:
        m.stop()


def test_mesh_partition_and_clock_skew_when_injected_then_seen_by_the_agents_then_healed(
        ray_cluster, mesh, tmp_path) -> None:
    ctx = system(cluster=ray_cluster, mesh=mesh)
    members = ctx.links().members()
    assert {"head", "tokyo-1", "tokyo-2", "london-1"} <= set(members)
    assert members["london-1"] == "london"
    with HistoryWriter(tmp_path / "h.jsonl") as history:
        report = Runner(ctx, history=history).run(parse({
            "name": "mesh", "seed": 1, "duration_s": 2.0, "steps": [
                {"at_s": 0, "fault": "partition", "hold_s": 1.5, "recovery_bound_s": 20,
                 "target": {"select": "site", "among": "sites", "site": "london"}},
                {"at_s": 0.1, "fault": "link-delay", "params": {"delay_s": 0.05},
                 "hold_s": 0.5, "target": {"among": "nodes", "match": "tokyo-2"}},
                {"at_s": 0.2, "fault": "clock-skew", "params": {"offset_s": 0.5},
                 "hold_s": 0.5, "target": {"among": "nodes", "match": "tokyo-1"}}]}))
    assert report.ok, (report.errors, report.not_recovered)
    cut, delay, skew = report.injected
    assert sum(cut["evidence"]["drop_in"].values()) > 0  # heartbeats dropped on arrival
    assert set(cut["nodes"]) >= {"london-1"}
    assert sum(delay["evidence"]["delayed"].values()) > 0
    assert abs(skew["evidence"]["skew_seen_s"] - 0.5) < 0.1
    assert abs(ctx.clock_skew_seen("tokyo-1")[0]) < 0.1  # set back
    london = next(nid for nid, n in ctx._ray_nodes().items() if n[0] == "london-1")
    heard = [e["kind"] for h in mesh.handles.values()
             for e in ray.get(h.events_since.remote(0), timeout=10) if e["node_id"] == london]
    assert "suspect" in heard or "down" in heard, heard  # the cut was noticed ...
    status = mesh.status()
    assert all(not any(m.get("faults") for m in s["members"].values()) for s in status.values())
    assert all(s["members"][london]["state"] == "alive" for nid, s in status.items()
               if nid != london)  # ... and healed
    assert check(load_history(tmp_path / "h.jsonl")).check("recovery").passed


def test_netlab_partition_when_injected_then_packets_dropped_then_heal_passes_them() -> None:
    from cluster.chaos.netns import NetLab

    ok, why = NetLab.available()
    if not ok:
        pytest.skip(why)
    with NetLab(["a", "b", "c"]) as lab:
        ctx = system(netlab=lab)
        assert set(ctx.candidates("nodes")) == {"a", "b", "c"}
        links = ctx.links()
        assert links.probe("a", "b")
        cut = inject(ctx, "partition", ("a",))
        assert cut.record.evidence["probe_arrived"] is False
        assert lab.faults()["blocked"] and not links.probe("b", "a")
        one_way = inject(ctx, "partition-one-way", ("b",))
        assert not links.probe("b", "c") and links.probe("c", "b") is False  # no reply back
        cut.undo()
        assert not links.probe("b", "c") and not links.probe("a", "b")  # b's rule remains
        one_way.undo()
        assert links.healthy(["a", "b", "c"]) and lab.faults()["blocked"] == []
        with pytest.raises(ChaosError, match="no netem"):
            inject(ctx, "link-delay", ("a",), {"delay_s": 0.1})


# --- a node crash, on a node of our own ---------------------------------------------------------
@pytest.mark.slow
def test_kill_node_when_injected_then_its_children_run_elsewhere_within_the_bound(
        ray_cluster: LocalCluster, namespace, store_url, trees, tmp_path) -> None:
    name = f"tokyo-k{uuid.uuid4().hex[:4]}"
    ray_cluster.add_node(NodeConfig(name, site="tokyo", zone="c", num_cpus=4))
    wait_until(lambda: any(n["Alive"] and n["Labels"].get("bastion-node") == name
                           for n in ray.nodes()), 30, "our node registered")
    spec = SupervisorSpec(id="root", intensity=5, children=[
        counter("x", placement=Placement(site="tokyo", preferred_nodes=(name,)))])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    ctx = system(tree, cluster=ray_cluster)
    assert ctx.children_on(name) == {"root/x": tree.child("root/x").pid}
    ray.get(tree.actor("root/x").add.remote(7), timeout=30)
    with HistoryWriter(tmp_path / "h.jsonl") as history:
        report = Runner(ctx, history=history).run(one_shot("kill-node", "nodes", [name],
                                                           bound_s=45))
    assert report.ok, (report.errors, report.not_recovered)
    assert not ray_cluster.nodes[name].alive()
    moved = tree.child("root/x")
    assert moved.status == "running" and ctx.process("root/x").node != name
    assert ray.get(tree.actor("root/x").value.remote(), timeout=30)["total"] == 7
    assert report.recovered[0]["took_s"] < 45  # ~2 s when the machine is idle
    assert check(load_history(tmp_path / "h.jsonl")).check("recovery").passed
