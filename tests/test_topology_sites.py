"""Site failover roles (topology.sites) over real MeshAgents on 127.0.0.1, local presets.

Two sites, ``tokyo`` (preferred) and ``london``, one controller agent each, plus a witness
agent that only votes. Faults are the agents' socket-level link faults, injected through the
``links`` fixture. Every wait polls a condition with a bound and reports the last state seen;
invariants (never two sites acting) are sampled from a thread over the whole scenario.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_until
from topology.agent import MeshAgent
from topology.agent_types import AgentState, Peer
from topology.config import MeshConfig
from topology.lease import FilePromiseStore, LeaseConfig, LeaseMessageError, LeaseVoter
from topology.replication import ReplicationConfig
from topology.sites import (
    ActiveElsewhere,
    CampaignTiming,
    SiteBeacon,
    SiteRoles,
    campaign_decision,
)
from topology.witness import LeaseVoterService

MESH = MeshConfig.preset("local")
LEASE = LeaseConfig.preset("local")
TIMING = CampaignTiming.from_lease(LEASE)
R = "venue-a"
RTO_GOAL_S = 3.0
#: What the failover test asserts: the goal with room for a machine loaded by other work (the
#: measured RTO is printed and recorded; ~1.1 s on an idle machine).
RTO_BOUND_S = 2 * RTO_GOAL_S
UP_BOUND_S = 10.0


# ---------------------------------------------------------------------------------------------
# The deployment: two sites and a witness, in-process


@dataclass
class Site:
    name: str
    agent: MeshAgent
    roles: SiteRoles
    calls: list[tuple[float, str, str, int, Any]] = field(default_factory=list)

    def record(self, kind: str) -> Callable[..., None]:
        def fn(resource: str, epoch: int, arg: Any) -> None:
            self.calls.append((self.agent.clock.now_s(), kind, resource, epoch, arg))
        return fn

    def kinds(self, *kinds: str) -> list[tuple[float, str, str, int, Any]]:
        return [c for c in list(self.calls) if c[1] in kinds]

    def res(self) -> dict[str, Any]:
        return self.roles.status()["resources"][R]


@dataclass
class Deployment:
    sites: dict[str, Site]
    witness: MeshAgent
    witness_voter: LeaseVoterService

    def __getitem__(self, name: str) -> Site:
        return self.sites[name]

    @property
    def agents(self) -> list[MeshAgent]:
        return [s.agent for s in self.sites.values()] + [self.witness]

    def active(self) -> list[str]:
        return [n for n, s in self.sites.items() if s.roles.may_act(R)]


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Callable[..., Deployment]]:
    """Starts tokyo + london controllers and a witness, fully meshed and up, then SiteRoles on
    both controllers (tokyo preferred); stops all afterwards and checks no thread is left."""
    made: list[tuple[list[SiteRoles], list[MeshAgent]]] = []

    def make(*, together: bool = False) -> Deployment:
        """``together``: start both sites' roles at once (the start-up race); else tokyo's
        first and london's once tokyo is active (a known state to inject faults into)."""
        agents = {n: MeshAgent(n, site, "tcp://127.0.0.1:*", {}, MESH,
                               voter_only=(site == "witness"))
                  for n, site in (("tokyo-ctl", "tokyo"), ("london-ctl", "london"),
                                  ("witness", "witness"))}
        witness_voter = LeaseVoterService(agents["witness"], LeaseVoter(
            "witness", LEASE, FilePromiseStore(tmp_path / "witness.json"),
            agents["witness"].clock.now_s()))
        for a in agents.values():
            a.start()
        for a in agents.values():
            for b in agents.values():
                if a is not b:
                    a.add_peer(b.node_id, Peer(b.endpoint, b.site))
        voters = list(agents)
        sites: dict[str, Site] = {}
        for name in ("tokyo", "london"):
            agent = agents[f"{name}-ctl"]
            site = Site(name, agent, None)  # type: ignore[arg-type]
            site.roles = SiteRoles(agent, name, [R], voters, LEASE, tmp_path / name,
                                   preferred={R: "tokyo"}, on_activate=site.record("activate"),
                                   on_renew=site.record("renew"),
                                   on_deactivate=site.record("deactivate"))
            sites[name] = site
        made.append(([s.roles for s in sites.values()], list(agents.values())))
        dep = Deployment(sites, agents["witness"], witness_voter)
        wait_all_alive(dep.agents)
        sites["tokyo"].roles.start()
        if not together:
            wait_active(dep, "tokyo")
        sites["london"].roles.start()
        return dep

    yield make
    for roles, agents in made:
        for r in roles:
            r.stop()
        for a in agents:
            a.stop()
    left = [t.name for t in threading.enumerate()
            if t.is_alive() and t.name.startswith(("sites-", "mesh-"))]
    assert not left, f"threads still running: {left}"


def wait_all_alive(agents: list[MeshAgent], timeout_s: float = UP_BOUND_S) -> None:
    def alive() -> dict[str, dict[str, str]]:
        seen = {a.node_id: {b.node_id: a.member_state(b.node_id).value for b in agents
                            if b is not a} for a in agents}
        assert all(s == "alive" for m in seen.values() for s in m.values()), seen
        return seen
    wait_until(alive, timeout_s, "every agent to see every other alive")


@pytest.fixture
def links() -> Iterator[Any]:
    """Socket-level link faults between agents, cut on both ends; cleared afterwards."""

    class Links:
        touched: list[MeshAgent] = []

        def cut(self, a: MeshAgent, b: MeshAgent) -> None:
            for x, y in ((a, b), (b, a)):
                x.set_link_faults(y.node_id, drop_out=1.0, drop_in=1.0)
                self.touched.append(x)

        def isolate(self, agent: MeshAgent, others: list[MeshAgent]) -> None:
            for o in others:
                if o is not agent:
                    self.cut(agent, o)

        def heal(self) -> None:
            for a in self.touched:
                if a.state is AgentState.RUNNING:
                    a.clear_link_faults()

    ln = Links()
    yield ln
    ln.heal()


class ActingSampler:
    """Samples every site's ``may_act`` in a tight loop from a thread; counts overlaps (two
    sites acting in one sample) and records who acted when."""

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        self.samples = 0
        self.overlaps = 0
        self.timeline: list[tuple[float, tuple[str, ...]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="acting-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last: tuple[str, ...] | None = None
        while not self._stop.is_set():
            acting = tuple(self.dep.active())
            self.samples += 1
            if len(acting) > 1:
                self.overlaps += 1
            if acting != last:
                self.timeline.append((time.monotonic(), acting))
                last = acting
            time.sleep(0.0002)

    def stop(self) -> ActingSampler:
        self._stop.set()
        self._thread.join(5)
        return self


@pytest.fixture
def sampler() -> Iterator[Callable[[Deployment], ActingSampler]]:
    started: list[ActingSampler] = []

    def start(dep: Deployment) -> ActingSampler:
        s = ActingSampler(dep)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def expect(value: Any, state: Any) -> Any:
    """``value`` if truthy, else an AssertionError showing ``state`` (for wait_until)."""
    assert value, state
    return value


def hold(seconds: float, check: Callable[[], None], interval_s: float = 0.02) -> None:
    """Assert ``check`` throughout ``seconds`` (an invariant over a window)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        check()
        time.sleep(interval_s)


def wait_active(dep: Deployment, site: str, timeout_s: float = 5.0) -> None:
    wait_until(lambda: expect(dep[site].roles.may_act(R), dep[site].res()), timeout_s,
               f"{site} to be active")


def wait_tokyo_leads(dep: Deployment) -> None:
    """tokyo active and renewing, and london has heard it say so."""
    tokyo, london = dep["tokyo"], dep["london"]
    wait_active(dep, "tokyo")
    wait_until(lambda: expect(len(tokyo.kinds("renew")) >= 2, tokyo.calls), 5.0,
               "tokyo to renew twice")
    wait_until(lambda: expect(london.res()["active_elsewhere"], london.res()), 5.0,
               "london to hear tokyo's beacon")


def transition_ts(site: Site, *, to: str | None = None, frm: str | None = None) -> list[float]:
    return [c["ts_s"] for c in site.res()["changes"]
            if (to is None or c["to"] == to) and (frm is None or c["from"] == frm)]


def cut_active_site(dep: Deployment, links: Any) -> dict[str, float]:
    """tokyo active and renewing; then cut it from london and the witness (both ends). Waits
    for london to take over and tokyo to deactivate; returns the timestamps."""
    tokyo, london = dep["tokyo"], dep["london"]
    wait_tokyo_leads(dep)
    t_cut = tokyo.agent.clock.now_s()
    assert dep.active() == ["tokyo"], (tokyo.res(), london.res())
    links.isolate(tokyo.agent, dep.agents)

    def after_cut(site: Site, kind: str) -> list[tuple[float, str, str, int, Any]]:
        return expect([c for c in site.kinds(kind) if c[0] > t_cut], site.res())
    wait_until(lambda: after_cut(london, "activate"), RTO_BOUND_S, "london to activate")
    wait_until(lambda: after_cut(tokyo, "deactivate"), 5.0, "tokyo to deactivate")
    [(t_deact_cb, _, _, old_epoch, reason)] = after_cut(tokyo, "deactivate")
    old_until_s = max(c[4] for c in tokyo.kinds("activate", "renew") if c[0] <= t_deact_cb)
    [(t_act_cb, _, _, new_epoch, new_until_s)] = after_cut(london, "activate")
    return {"t_cut": t_cut, "t_deact_cb": t_deact_cb, "old_epoch": old_epoch,
            "old_until_s": old_until_s, "t_deact": transition_ts(tokyo, frm="ACTIVE")[-1],
            "t_act": transition_ts(london, to="ACTIVE")[-1], "t_act_cb": t_act_cb,
            "new_epoch": new_epoch, "reason": reason, "new_until_s": new_until_s}


# ---------------------------------------------------------------------------------------------
# The campaign rule and messages (pure)


@pytest.mark.parametrize(("kw", "wanted", "needle"), [
    ({}, True, "preferred site: no active site heard"),
    ({"preferred": False}, False, "listening"),
    ({"preferred": False, "listening_since_s": 9.99 - TIMING.standby_listen_s}, True,
     "standby: no active site heard"),
    ({"voters_reached": 1}, False, "minority: reaches 1/3"),
    ({"active_elsewhere": [ActiveElsewhere("london", "l", "l#1", 4, 10.5)]}, False,
     "site london active at epoch 4"),
    ({"active_elsewhere": [ActiveElsewhere("london", "l", "l#1", 4, 9.9)]}, True, "preferred"),
    ({"voters_reached": 1, "handoff_until_s": 11.0, "handoff_from": "l#1"}, True,
     "handoff from l#1"),
    ({"yielded_until_s": 11.0, "yielded_to": "london"}, False, "transferred to london"),
    ({"listening_since_s": None}, False, "listening"),
])
def test_campaign_decision_when_inputs_vary_then_first_matching_rule_decides(kw, wanted, needle):
    args = {"preferred": True, "voters_reached": 2, "voters": 3,
            "listening_since_s": 9.99 - TIMING.preferred_listen_s, "timing": TIMING, **kw}
    c = campaign_decision(10.0, **args)
    assert (c.wanted, needle in c.reason) == (wanted, True), c


def test_timing_when_derived_from_local_lease_then_standby_listens_past_a_voters_hold():
    assert TIMING.standby_listen_s > LEASE.voter_hold_s > TIMING.preferred_listen_s
    assert TIMING.presume_slack_s >= 2 * LEASE.max_clock_drift * LEASE.lease_s
    assert TIMING.tick_s == LEASE.renew_interval_s / 4


def test_beacon_when_entry_malformed_then_error_names_the_field():
    ok = SiteBeacon("tokyo", "t", (["venue", "t#1", "ACTIVE", 3, 0.5],))
    assert SiteBeacon.from_body(ok.to_body()).entries()[0][3] == 3
    bad = SiteBeacon("tokyo", "t", (["venue", "t#1", "BOSS", 3, 0.5],))
    with pytest.raises(LeaseMessageError, match="holders"):
        SiteBeacon.from_body(bad.to_body()).entries()


@pytest.mark.parametrize(("kw", "needle"), [
    ({"site": "paris"}, "site = 'paris'"),
    ({"resources": []}, "resources = []"),
    ({"voters": ["x", "y"]}, "voters = ['x', 'y']"),
    ({"preferred": {"other": "tokyo"}}, "preferred = {'other': 'tokyo'}"),
])
def test_roles_when_constructed_with_a_bad_field_then_error_names_it(tmp_path, kw, needle):
    agent = MeshAgent("t", "tokyo", "tcp://127.0.0.1:*", {}, MESH)
    args = {"site": "tokyo", "resources": [R], "voters": ["t", "w"], "preferred": {}, **kw}
    with pytest.raises(ValueError, match=None) as err:
        SiteRoles(agent, args["site"], args["resources"], args["voters"], LEASE, tmp_path,
                  preferred=args["preferred"])
    assert needle in str(err.value)
    agent.stop()


# ---------------------------------------------------------------------------------------------
# Over the mesh


def test_start_when_all_reachable_then_preferred_site_active_other_standby_garbage_counted(
        deployment):
    dep = deployment(together=True)
    tokyo, london = dep["tokyo"], dep["london"]
    wait_tokyo_leads(dep)
    t_act, _, _, epoch, until_s = tokyo.kinds("activate")[-1]
    assert epoch >= 1 and tokyo.roles.epoch(R) == epoch
    renewals = [c[4] for c in tokyo.kinds("renew") if c[0] > t_act]
    assert renewals == sorted(renewals) and renewals[0] > until_s
    assert not london.roles.may_act(R) and london.roles.epoch(R) is None
    st = london.res()
    assert st["state"] == "STANDBY" and not st["campaign"]["wanted"], st
    assert f"site tokyo active at epoch {epoch}" in st["campaign"]["reason"], st
    assert not london.calls
    witness_grant = dep.witness_voter.voter.grant(R, dep.witness.clock.now_s())
    grants = [tokyo.res()["voter"]["grant"], london.res()["voter"]["grant"],
              list(witness_grant or ())]
    assert all(g[0] == tokyo.roles.holder_id for g in grants), grants  # promised by all
    status = tokyo.roles.status()
    json.dumps(status)   # JSON-able
    assert status["resources"][R]["window_left_s"] > 0 and status["voters_reached"] == 3
    assert status["peers"]["london-ctl"]["holders"][R]["state"] == "STANDBY"
    for kind, body in (("lease", {"type": "lease_request", "epoch": "x"}),
                       ("site", {"type": "site_beacon", "site": "london", "node": "london-ctl",
                                 "holders": [[R, "h", "BOSS", 1, 0.0]]}),
                       ("repl", {"resource": R, "type": "repl_ack"})):
        london.agent.send_payload("tokyo-ctl", kind, body)
    c = tokyo.roles.counters
    wait_until(lambda: expect(c["malformed_lease"] == c["malformed_site"] == c["repl_no_log"]
                              == 1, c), 5.0, "garbage payloads to be counted")
    assert tokyo.roles.may_act(R)      # and nothing else happened


def test_cut_when_active_site_partitioned_away_then_it_stops_before_its_lease_ends_and_standby_takes_over_after(  # noqa: E501
        deployment, links, sampler, record_property):
    dep = deployment()
    acting = sampler(dep)
    t = cut_active_site(dep, links)
    tokyo, london = dep["tokyo"], dep["london"]
    old_lease_end_s = t["old_until_s"] + LEASE.stop_margin_s
    rto_s = t["t_act_cb"] - t["t_cut"]
    record_property("rto_s", rto_s)
    print(f"\nfailover: RTO {rto_s:.3f} s (cut -> on_activate); tokyo's window closed, its "
          f"ticker noticed {t['t_deact'] - t['old_until_s']:.3f} s later, on_deactivate came "
          f"{old_lease_end_s - t['t_deact_cb']:.3f} s before its lease end; london acted "
          f"{t['t_act'] - old_lease_end_s:.3f} s after that end")
    assert t["reason"].startswith("window_closed"), t
    assert t["t_deact"] >= t["old_until_s"] - 1e-6 or "fenced" in t["reason"], t
    assert t["t_deact_cb"] < old_lease_end_s, t          # stopped before its lease ended
    assert t["t_deact"] < t["t_act"], t                  # the old stopped before the new began
    assert t["t_act"] >= old_lease_end_s, t              # ... after the old lease ended
    assert t["new_epoch"] > t["old_epoch"], t
    assert rto_s <= RTO_BOUND_S, t
    hold(0.5, lambda: expect(not tokyo.roles.may_act(R), tokyo.res()))
    assert "minority" in tokyo.res()["campaign"]["reason"], tokyo.res()
    acting.stop()
    print(f"overlap samples: {acting.overlaps} of {acting.samples}")
    assert acting.samples > 1000 and acting.overlaps == 0, acting.timeline
    assert london.roles.may_act(R)


def test_heal_when_old_active_returns_then_it_stays_standby_until_transfer_moves_the_role_back(
        deployment, links, sampler):
    dep = deployment()
    acting = sampler(dep)
    t = cut_active_site(dep, links)
    tokyo, london = dep["tokyo"], dep["london"]
    links.heal()
    wait_all_alive(dep.agents)
    wait_until(lambda: expect("site london active" in tokyo.res()["campaign"]["reason"],
                              tokyo.res()["campaign"]), 5.0, "tokyo to hear london")

    def one_active_london() -> None:
        assert dep.active() == ["london"], (dep.active(), tokyo.res(), london.res())
    hold(2.0, one_active_london)        # no automatic failback to the preferred site
    assert len(tokyo.kinds("activate")) == 1 and len(london.kinds("deactivate")) == 0
    refused = tokyo.roles.transfer(R, "london")
    assert not refused.accepted and "not active here" in refused.reason
    moved = london.roles.transfer(R, "tokyo")
    t_transfer = london.agent.clock.now_s()
    assert moved.accepted and moved.to_holder == tokyo.roles.holder_id, moved
    assert not london.roles.may_act(R)          # stops at once
    wait_active(dep, "tokyo", 2.0)
    t_back = tokyo.kinds("activate")[-1][0]
    [(_, _, _, london_epoch, reason)] = london.kinds("deactivate")
    assert "transferred to" in reason and tokyo.roles.epoch(R) > london_epoch > t["old_epoch"]
    assert t_back - t_transfer < LEASE.lease_s, "the transfer waited for the lease to lapse"
    hold(1.0, lambda: expect(dep.active() == ["tokyo"], dep.active()))
    assert "transferred to tokyo" in london.res()["campaign"]["reason"], london.res()
    acting.stop()
    assert acting.overlaps == 0, acting.timeline


def test_isolation_when_a_site_reaches_no_voter_then_it_never_campaigns_nor_activates(
        deployment, links, sampler):
    dep = deployment()
    tokyo, london = dep["tokyo"], dep["london"]
    wait_tokyo_leads(dep)
    acting = sampler(dep)
    links.isolate(london.agent, dep.agents)
    t_cut = london.agent.clock.now_s()

    def minority_quiet() -> None:
        assert dep.active() == ["tokyo"], (dep.active(), tokyo.res())
        assert not london.kinds("activate"), london.calls
    hold(TIMING.standby_listen_s + 2 * LEASE.lease_s, minority_quiet)
    st = london.res()
    assert "minority: reaches 1/3 voters" in st["campaign"]["reason"], st
    assert not [c for c in st["changes"] if c["ts_s"] > t_cut], st["changes"]  # no campaign
    assert not tokyo.kinds("deactivate")
    acting.stop()
    assert acting.overlaps == 0 and acting.timeline[-1][1] == ("tokyo",)


def test_replication_when_active_appends_then_standby_applies_in_order_and_after_failover_it_continues_and_old_tail_is_fenced(  # noqa: E501
        deployment, links, record_property):
    dep = deployment()
    tokyo, london = dep["tokyo"], dep["london"]
    applied: dict[str, list[tuple[str, int, Any]]] = {"tokyo": [], "london": []}
    truncated: dict[str, list[tuple[str, int]]] = {"tokyo": [], "london": []}
    cfg = ReplicationConfig(ack_timeout_s=0.3, linger_s=0.002)
    logs = {n: dep[n].roles.open_log(
        R, lambda s, q, r, n=n: applied[n].append((s, q, r)), config=cfg,
        on_truncate=lambda s, q, n=n: truncated[n].append((s, q))) for n in ("tokyo", "london")}
    wait_active(dep, "tokyo")
    wait_until(lambda: expect("london-ctl" in logs["tokyo"].lag(), logs["tokyo"].status()),
               5.0, "tokyo's log to replicate to london")
    e1 = tokyo.roles.epoch(R)
    t0 = time.monotonic()
    results = [logs["tokyo"].append("orders", {"n": i}) for i in range(100)]
    assert [(r.accepted, r.seq, r.epoch) for r in results] == [
        (True, i + 1, e1) for i in range(100)]
    lag_after_burst = logs["tokyo"].lag()["london-ctl"]
    wait_until(lambda: expect(len(applied["london"]) == 100, len(applied["london"])), 5.0,
               "london to apply 100 records")
    catch_up_s = time.monotonic() - t0
    wait_until(lambda: logs["tokyo"].lag()["london-ctl"].records == 0, 5.0, "zero lag")
    record_property("replication_catch_up_s", catch_up_s)
    print(f"\nreplication: 100 records applied at london {catch_up_s * 1e3:.1f} ms after the "
          f"first append; lag right after the burst {lag_after_burst}")
    assert [(s, q, r["n"]) for s, q, r in applied["london"]] == [
        ("orders", i + 1, i) for i in range(100)]
    assert london.roles.status()["logs"][R]["role"] == "standby"

    links.isolate(tokyo.agent, dep.agents)
    tail = [logs["tokyo"].append("orders", {"n": 1000 + i}) for i in range(5)]
    assert [r.seq for r in tail if r.accepted] == [101, 102, 103, 104, 105], tail
    wait_until(lambda: tokyo.kinds("deactivate"), 5.0, "tokyo to deactivate")
    late = logs["tokyo"].append("orders", {"n": 2000})
    assert (late.accepted, late.reason) == (False, "not_active"), late
    wait_active(dep, "london")
    e2 = london.roles.epoch(R)
    cont = [logs["london"].append("orders", {"n": 100 + i}) for i in range(10)]
    assert [(r.seq, r.epoch) for r in cont] == [(101 + i, e2) for i in range(10)] and e2 > e1

    links.heal()

    def converged() -> bool:
        t_recs, l_recs = logs["tokyo"].records("orders"), logs["london"].records("orders")
        assert t_recs == l_recs, (len(t_recs), len(l_recs), logs["tokyo"].status())
        # the old tail, resent by tokyo's retired sender, refused by london: fenced
        assert logs["tokyo"].status()["counters"].get("retired_fenced"), logs["tokyo"].status()
        return True
    wait_until(converged, 10.0, "tokyo's journal to match london's, its old tail fenced")
    lst, tst = logs["london"].status(), logs["tokyo"].status()
    assert lst["counters"]["refused_stale_epoch"] >= 1, lst
    assert tst["counters"]["retired_fenced"] == 1 and tst["retired_epoch"] is None, tst
    assert truncated["tokyo"] == [("orders", 101)], truncated
    assert [q for _, q, _ in applied["london"]] == list(range(1, 101))   # nothing of the tail
    assert [(q, r["n"]) for _, q, r in applied["tokyo"]] == [(101 + i, 100 + i)
                                                             for i in range(10)]
    assert lst["streams"]["orders"]["history"] == [[e1, 1], [e2, 101]], lst
    json.dumps(london.roles.status())
