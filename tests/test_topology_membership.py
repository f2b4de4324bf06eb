"""Tests for topology.membership: SWIM/Lifeguard membership, driven by a fake clock.

Unit tests feed one ``Membership`` frames by hand. Scenario tests run a simulated mesh
(``SimMesh``): every node's actions are encoded, delayed, dropped on cut links and decoded through
a ReplayGuard before they reach the receiver, so codec, guard and membership run together.
Nothing sleeps: simulated time advances in ``tick_interval_s`` steps.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random

import pytest

from topology.clock import ManualClock
from topology.config import LOCAL, MeshConfig
from topology.frames import (
    Ack,
    Alive,
    Dead,
    Heartbeat,
    Left,
    PingReq,
    ReplayGuard,
    Suspect,
    View,
    decode,
    encode,
)
from topology.membership import (
    TRANSITIONS,
    Broadcast,
    EventQueue,
    Membership,
    MembershipEvent,
    MemberState,
    Send,
    initial_incarnation,
)

CFG = LOCAL


# ---------------------------------------------------------------------------------------------
# A simulated mesh

class SimMesh:
    def __init__(self, n: int = 5, config: MeshConfig = CFG, *, seed: int = 0,
                 latency_s: float = 0.0005, jitter_s: float = 0.0005, start_s: float = 0.0):
        self.cfg = config
        self.clock = ManualClock(start_s)
        self.rng = random.Random(seed)
        self.latency_s, self.jitter_s = latency_s, jitter_s
        self.ids = [f"n{i}" for i in range(n)]
        self.nodes = {nid: Membership(nid, "site-a" if i % 2 else "site-b", config,
                                      incarnation=1, seed=seed * 100 + i)
                      for i, nid in enumerate(self.ids)}
        self.guards = {nid: ReplayGuard() for nid in self.ids}
        self.cut: set[tuple[str, str]] = set()  # (src, dst) frames dropped
        self.crashed: set[str] = set()
        self.hung: set[str] = set()
        self._queue: list[tuple[float, int, str, bytes]] = []
        self._held: dict[str, list[bytes]] = {}
        self._seq = itertools.count()
        self.events: list[tuple[str, MembershipEvent]] = []  # (observer, event)
        self.sent: dict[str, int] = {}

    def _route(self, src: str, actions, now_s: float) -> None:
        for action in actions:
            targets = ([action.to] if isinstance(action, Send)
                       else [d for d in self.ids if d != src])
            data = encode(action.frame)
            kind = type(action.frame).__name__
            self.sent[kind] = self.sent.get(kind, 0) + 1
            for dst in targets:
                if (src, dst) in self.cut or dst in self.crashed:
                    continue
                at = now_s + self.latency_s + self.rng.uniform(0, self.jitter_s)
                heapq.heappush(self._queue, (at, next(self._seq), dst, data))

    def _receive(self, dst: str, data: bytes, now_s: float) -> None:
        frame = self.guards[dst].accept(data)
        if frame is not None:
            self._route(dst, self.nodes[dst].on_frame(frame, now_s), now_s)

    def _collect(self, nid: str) -> None:
        self.events.extend((nid, e) for e in self.nodes[nid].events.drain())

    def step(self) -> None:
        now = self.clock.advance(self.cfg.tick_interval_s)
        while self._queue and self._queue[0][0] <= now:
            at, _, dst, data = heapq.heappop(self._queue)
            if dst in self.crashed:
                continue
            if dst in self.hung:
                self._held.setdefault(dst, []).append(data)
                continue
            self._receive(dst, data, at)
        for nid in self.ids:
            if nid in self.crashed or nid in self.hung:
                continue
            self._route(nid, self.nodes[nid].tick(now), now)
            self._collect(nid)

    def run(self, duration_s: float) -> None:
        end = self.clock.now_s() + duration_s
        while self.clock.now_s() < end - 1e-9:
            self.step()

    def run_until(self, predicate, timeout_s: float) -> float:
        end = self.clock.now_s() + timeout_s
        while not predicate():
            assert self.clock.now_s() < end, f"condition not met in {timeout_s} s; " \
                                             f"last events: {self.events[-5:]}"
            self.step()
        return self.clock.now_s()

    def resume(self, nid: str) -> None:
        self.hung.discard(nid)
        now = self.clock.now_s()
        for data in self._held.pop(nid, []):  # a SIGCONTed process reads its backlog first
            self._receive(nid, data, now)
        self._collect(nid)

    def cut_link(self, a: str, b: str, both: bool = True) -> None:
        self.cut.add((a, b))
        if both:
            self.cut.add((b, a))

    def observers(self, node: str) -> list[str]:
        return [n for n in self.ids if n != node and n not in self.crashed]

    def kinds(self, about: str, observer: str | None = None) -> list[str]:
        return [e.kind for o, e in self.events if e.node_id == about
                and (observer is None or o == observer)]

    def first(self, kind: str, about: str, observer: str) -> float | None:
        return next((e.ts_s for o, e in self.events
                     if o == observer and e.node_id == about and e.kind == kind), None)

    def all_see(self, node: str, state: MemberState) -> bool:
        return all(self.nodes[o].state_of(node) is state for o in self.observers(node))


def _started(n: int = 5, **kw) -> SimMesh:
    mesh = SimMesh(n, **kw)
    mesh.run(1.0)
    assert all(mesh.all_see(nid, MemberState.ALIVE) for nid in mesh.ids)
    return mesh


# ---------------------------------------------------------------------------------------------
# Scenarios

def test_start_when_nodes_heartbeat_then_everyone_sees_everyone_up_once():
    mesh = _started(5)
    for nid in mesh.ids:
        for obs in mesh.observers(nid):
            assert mesh.kinds(nid, obs) == ["up"]
    assert not any(g.dropped for g in mesh.guards.values())


@pytest.mark.parametrize("seed", range(8))
def test_crash_when_local_preset_then_every_peer_declares_down_within_500ms(seed):
    mesh = _started(5, seed=seed)
    mesh.run(seed * 0.013)                 # crash at varying phases of the heartbeat cycle
    victim = mesh.ids[seed % 5]
    t_crash = mesh.clock.now_s()
    mesh.crashed.add(victim)
    mesh.run_until(lambda: mesh.all_see(victim, MemberState.DEAD), timeout_s=2.0)
    for obs in mesh.observers(victim):
        t_down = mesh.first("down", victim, obs)
        t_suspect = mesh.first("suspect", victim, obs)
        assert t_suspect is not None and t_suspect < t_down  # suspect before dead
        assert t_down - t_crash <= 0.5, (obs, t_down - t_crash)


def test_hang_when_node_stops_then_down_and_after_resume_it_refutes_and_is_up_again():
    mesh = _started(4)
    victim = "n2"
    mesh.hung.add(victim)
    mesh.run_until(lambda: mesh.all_see(victim, MemberState.DEAD), timeout_s=1.0)
    old_inc = mesh.nodes[victim].incarnation
    mesh.run(1.0)
    mesh.resume(victim)
    mesh.run_until(lambda: mesh.all_see(victim, MemberState.ALIVE), timeout_s=1.0)
    assert mesh.nodes[victim].incarnation > old_inc
    for obs in mesh.observers(victim):
        assert mesh.kinds(victim, obs) == ["up", "suspect", "down", "up"]
        assert mesh.nodes[obs].member(victim).incarnation == mesh.nodes[victim].incarnation


def test_short_hang_when_resumed_while_suspected_then_refuted_never_down():
    mesh = _started(5)
    victim = "n1"
    mesh.hung.add(victim)
    mesh.run_until(lambda: any(mesh.first("suspect", victim, o) for o in mesh.observers(victim)),
                   timeout_s=1.0)
    mesh.resume(victim)
    mesh.run(2.0)
    assert mesh.all_see(victim, MemberState.ALIVE)
    assert all("down" not in mesh.kinds(victim, o) for o in mesh.observers(victim))
    assert mesh.nodes[victim].incarnation == 2


@pytest.mark.parametrize("both", [True, False], ids=["both_ways", "one_way"])
def test_broken_link_when_other_peers_hear_the_node_then_never_suspected(both):
    mesh = _started(5)
    mesh.cut_link("n0", "n3", both=both)
    mesh.run(10.0)
    assert all(mesh.kinds(nid) == ["up"] * 4 for nid in mesh.ids)  # no suspect, no down
    assert mesh.sent.get("PingReq", 0) > 10                  # the cut was noticed and probed
    assert mesh.nodes["n3"].reachable(mesh.clock.now_s())["n0"] is False  # but not hidden


def test_jitter_when_delivery_delay_varies_by_30ms_then_no_false_suspicion():
    mesh = _started(6, jitter_s=0.03, seed=3)
    mesh.run(15.0)
    assert all(set(mesh.kinds(nid)) == {"up"} for nid in mesh.ids)


def test_crash_when_two_node_mesh_then_survivor_declares_down_without_helpers():
    mesh = _started(2)
    mesh.crashed.add("n1")
    t0 = mesh.clock.now_s()
    t = mesh.run_until(lambda: mesh.nodes["n0"].state_of("n1") is MemberState.DEAD, timeout_s=1.0)
    assert t - t0 <= 0.5  # K = 0 with no one to confirm: suspicion_min_s


def test_isolated_node_when_cut_from_all_then_majority_declares_it_down_and_it_does_likewise():
    mesh = _started(5)
    for other in mesh.ids[1:]:
        mesh.cut_link("n0", other)
    mesh.run(2.0)
    assert mesh.all_see("n0", MemberState.DEAD)
    assert all(mesh.nodes["n0"].state_of(o) is MemberState.DEAD for o in mesh.ids[1:])
    assert all("down" not in mesh.kinds(o, obs) for o in mesh.ids[1:]
               for obs in mesh.ids[1:] if obs != o)
    mesh.cut.clear()                                   # heal: n0 hears it was declared dead
    mesh.run_until(lambda: all(mesh.all_see(n, MemberState.ALIVE) for n in mesh.ids), timeout_s=2.0)


def test_restart_when_node_comes_back_with_new_incarnation_then_up_and_window_reset():
    mesh = _started(3)
    mesh.crashed.add("n2")
    mesh.run_until(lambda: mesh.all_see("n2", MemberState.DEAD), timeout_s=1.0)
    mesh.crashed.discard("n2")
    mesh.nodes["n2"] = Membership("n2", "site-b", CFG, incarnation=10)
    mesh.guards["n2"] = ReplayGuard()
    mesh.run_until(lambda: mesh.all_see("n2", MemberState.ALIVE), timeout_s=1.0)
    info = mesh.nodes["n0"].member("n2", mesh.clock.now_s())
    assert info.incarnation == 10 and info.phi < 1.0
    assert mesh.kinds("n2", "n0")[-1] == "up"


# ---------------------------------------------------------------------------------------------
# One node fed by hand

def _hb(node: str, inc: int = 1, seq: int = 1, t: float = 0.0, site: str = "s") -> Heartbeat:
    return Heartbeat(node, site, inc, seq, t, 0)


def _me(**kw) -> Membership:
    return Membership("me", "s", kw.pop("config", CFG), incarnation=kw.pop("incarnation", 1),
                      **kw)


def _feed(m: Membership, nodes, start_s: float, end_s: float, skip=()) -> None:
    """Regular heartbeats from ``nodes`` every interval, ticking in between."""
    t = start_s
    seq = int(start_s / CFG.heartbeat_interval_s) + 1
    while t <= end_s + 1e-9:
        for n in nodes:
            if n not in skip:
                m.on_heartbeat(_hb(n, seq=seq, t=t), t)
        m.tick(t)
        t += CFG.heartbeat_interval_s
        seq += 1


def _frames(actions, cls):
    return [a.frame for a in actions if isinstance(a.frame, cls)]


def test_on_heartbeat_when_first_from_node_then_up_event_with_site_and_incarnation():
    m = _me()
    m.on_heartbeat(_hb("a", inc=7, site="tokyo"), 1.0)
    [event] = m.events.drain()
    assert (event.kind, event.node_id, event.site, event.incarnation, event.ts_s) == \
        ("up", "a", "tokyo", 7, 1.0)
    assert m.state_of("a") is MemberState.ALIVE and m.state_of("zz") is MemberState.UNKNOWN


def test_phis_when_many_members_then_vectorized_values_match_each_detector():
    m = _me()
    _feed(m, ["a", "b", "c"], 0.0, 1.0, skip=())
    _feed(m, ["a", "b"], 1.05, 1.2)
    now = 1.3
    phis = m.phis(now)
    assert set(phis) == {"a", "b", "c"}
    for info in m.members(now):
        assert phis[info.node_id] == pytest.approx(info.phi, rel=1e-9, abs=1e-12)
    assert phis["c"] > phis["a"]


def test_on_heartbeat_when_older_incarnation_or_own_then_dropped_and_counted():
    m = _me()
    m.on_heartbeat(_hb("a", inc=5), 0.0)
    m.on_heartbeat(_hb("a", inc=4, seq=2), 0.1)
    m.on_heartbeat(_hb("me"), 0.1)
    assert m.dropped == {"stale_heartbeat": 1, "own_frame": 1}


def test_on_claim_when_stale_incarnation_or_unknown_node_then_dropped_and_counted():
    m = _me()
    m.on_heartbeat(_hb("a", inc=5), 0.0)
    assert m.on_claim(Suspect("a", 4, "b"), 0.1) == []
    assert m.on_claim(Dead("ghost", 1, "b"), 0.1) == []
    assert m.state_of("a") is MemberState.ALIVE
    assert m.dropped == {"stale_claim": 1, "unknown_node": 1}


def test_on_claim_when_suspect_then_relayed_once_and_alive_at_higher_incarnation_refutes():
    m = _me()
    m.on_heartbeat(_hb("a", inc=3), 0.0)
    assert m.on_claim(Suspect("a", 3, "b"), 0.1) == [Broadcast(Suspect("a", 3, "b"))]
    assert m.on_claim(Suspect("a", 3, "b"), 0.11) == []        # the same claim again
    assert m.state_of("a") is MemberState.SUSPECT
    assert m.on_claim(Alive("a", 3, "a"), 0.12) == []          # not higher: no refutation
    assert m.state_of("a") is MemberState.SUSPECT
    assert m.on_claim(Alive("a", 4, "a"), 0.13) == [Broadcast(Alive("a", 4, "a"))]
    assert m.state_of("a") is MemberState.ALIVE
    kinds = [(e.kind, e.incarnation) for e in m.events.drain()]
    assert kinds == [("up", 3), ("suspect", 3), ("up", 4)]
    assert m.history[-1].reason == "alive by a at incarnation 4"


def test_on_claim_when_dead_then_down_and_stale_suspect_after_that_ignored():
    m = _me()
    m.on_heartbeat(_hb("a", inc=2), 0.0)
    assert m.on_claim(Dead("a", 2, "b"), 0.1) == [Broadcast(Dead("a", 2, "b"))]
    assert m.on_claim(Suspect("a", 2, "c"), 0.2) == []
    assert m.on_claim(Suspect("a", 1, "c"), 0.2) == []
    assert m.state_of("a") is MemberState.DEAD
    assert m.dropped == {"ignored:suspect_claim@dead": 1, "stale_claim": 1}


def test_on_heartbeat_when_dead_member_speaks_at_same_incarnation_then_told_to_refute():
    m = _me()
    m.on_heartbeat(_hb("a", inc=2), 0.0)
    m.on_claim(Dead("a", 2, "b"), 0.1)
    actions = m.on_heartbeat(_hb("a", inc=2, seq=2), 0.2)
    assert actions == [Send("a", Dead("a", 2, "me"))]
    assert m.on_heartbeat(_hb("a", inc=2, seq=3), 0.21) == []   # rate-limited
    m.on_heartbeat(_hb("a", inc=3, seq=4), 0.3)
    assert m.state_of("a") is MemberState.ALIVE
    assert m.history[-1].reason == "heartbeat at incarnation 3 > 2"


@pytest.mark.parametrize("claim_cls", [Suspect, Dead])
def test_on_claim_when_about_me_at_my_incarnation_then_refute_with_higher_incarnation(claim_cls):
    m = _me(incarnation=5)
    actions = m.on_claim(claim_cls("me", 5, "b"), 1.0)
    assert actions == [Broadcast(Alive("me", 6, "me"))]
    assert m.incarnation == 6 and m.local_health == 1
    [hb] = _frames(m.tick(1.0), Heartbeat)
    assert hb.incarnation == 6
    assert m.on_claim(claim_cls("me", 5, "c"), 1.1) == []      # older than 6 now: stale
    assert m.dropped == {"stale_claim": 1}


def test_leave_when_called_then_left_broadcast_and_peers_mark_left_then_reap():
    m, peer = _me(), Membership("p", "s", CFG)
    peer.on_heartbeat(_hb("me", inc=1), 0.0)
    [action] = m.leave(1.0)
    assert action == Broadcast(Left("me", 1, "me"))
    assert m.tick(1.1) == [] and m.leave(1.2) == []
    peer.on_claim(action.frame, 1.0)
    assert peer.state_of("me") is MemberState.LEFT
    assert "me" not in peer.reachable(1.0)
    peer.tick(1.0 + CFG.dead_node_reap_s)
    assert peer.state_of("me") is MemberState.UNKNOWN and peer.member("me") is None
    assert [e.kind for e in peer.events.drain()] == ["up", "left", "reaped"]


def test_tick_when_time_passes_then_heartbeats_every_interval_with_growing_seq():
    m = _me()
    seqs, t = [], 0.0
    for _ in range(100):
        seqs += [f.seq for f in _frames(m.tick(t), Heartbeat)]
        t += CFG.tick_interval_s
    assert seqs == list(range(1, 21))   # 1.0 s at 50 ms


def test_tick_when_view_changes_then_view_broadcast_soon_with_matching_digest():
    m = _me()
    m.tick(0.0)
    m.on_heartbeat(_hb("a"), 0.001)
    assert _frames(m.tick(0.002), View) == []                 # rate limit: half an interval
    views = _frames(m.tick(CFG.heartbeat_interval_s / 2), View)
    assert len(views) == 1 and views[0].reachable == {"a": True}   # before gossip_interval_s
    [hb] = _frames(m.tick(0.05), Heartbeat)
    assert hb.view_digest == views[0].digest
    assert _frames(m.tick(0.06), View) == []                   # unchanged, not yet due
    assert len(_frames(m.tick(0.025 + CFG.gossip_interval_s), View)) == 1  # periodic


def test_tick_when_phi_crosses_then_ping_req_to_k_helpers_and_an_ack_keeps_it_alive():
    m = _me()
    _feed(m, ["a", "b", "c", "d", "x"], 0.0, 2.0)
    t, rounds = 2.0, []
    while t < 5.0:                                  # x is silent to us for 3 s
        t += CFG.tick_interval_s
        for n in "abcd":
            m.on_heartbeat(_hb(n, seq=int(t * 100), t=t), t)
        reqs = [a for a in m.tick(t) if isinstance(a.frame, PingReq)]
        if reqs:
            rounds.append(sorted(a.to for a in reqs))
            assert {a.frame.target for a in reqs} == {"x"}
            first = reqs[0]                         # one helper still hears x
            m.on_ack(Ack(first.to, "x", first.frame.nonce, 1, True), t + 0.002)
    assert m.state_of("x") is MemberState.ALIVE
    assert [e.kind for e in m.events.drain() if e.node_id == "x"] == ["up"]
    assert len(rounds) > 5 and all(len(r) == CFG.indirect_probes for r in rounds)
    assert m.reachable(t)["x"] is False             # still reported as not heard directly


def test_probe_when_no_helper_hears_target_then_suspect_broadcast_and_down_after_timeout():
    m = _me()
    _feed(m, ["a", "b", "c", "x"], 0.0, 2.0)
    t, probe_reqs, suspects = 2.0, [], []
    while m.state_of("x") is not MemberState.SUSPECT:
        t += CFG.tick_interval_s
        for n in "abc":
            m.on_heartbeat(_hb(n, seq=int(t * 100), t=t), t)
        actions = m.tick(t)
        probe_reqs += [a for a in actions if isinstance(a.frame, PingReq)]
        suspects += _frames(actions, Suspect)
        for a in actions:                       # the helpers cannot hear x: nack
            if isinstance(a.frame, PingReq):
                m.on_ack(Ack(a.to, "x", a.frame.nonce, 1, False), t)
        assert t < 3.0
    assert sorted(a.to for a in probe_reqs) == ["a", "b", "c"]
    assert suspects == [Suspect("x", 1, "me")]
    assert m.local_health == 0                  # every helper answered: not our fault
    t_suspect = t
    while m.state_of("x") is MemberState.SUSPECT:
        t += CFG.tick_interval_s
        dead = _frames(m.tick(t), Dead)
    assert dead == [Dead("x", 1, "me")]
    # no confirmations from a, b, c arrived: the maximum suspicion timeout applies
    assert t - t_suspect == pytest.approx(CFG.suspicion_max_s, abs=CFG.tick_interval_s * 1.5)


def test_suspicion_when_confirmed_by_k_peers_then_timeout_shrinks_to_minimum():
    def time_to_dead(confirmers: list[str]) -> float:
        m = _me()
        _feed(m, ["a", "b", "c", "d", "x"], 0.0, 1.0)
        m.on_claim(Suspect("x", 1, "a"), 1.0)
        for n in confirmers:
            m.on_claim(Suspect("x", 1, n), 1.0)
        t, seq = 1.0, 100
        while m.state_of("x") is MemberState.SUSPECT:   # we still hear x (at the suspected
            t += 0.001                            # incarnation), so we never confirm
            if round(t * 1000) % 50 == 0:
                seq += 1
                m.on_heartbeat(_hb("x", seq=seq, t=t), t)
            m.tick(t)
        return t - 1.0
    none, one, all3 = time_to_dead([]), time_to_dead(["b"]), time_to_dead(["b", "c", "d"])
    assert none == pytest.approx(CFG.suspicion_max_s, abs=0.002)
    assert all3 == pytest.approx(CFG.suspicion_min_s, abs=0.002)
    lo, hi = CFG.suspicion_min_s, CFG.suspicion_max_s
    assert one == pytest.approx(hi - (hi - lo) * math.log(2) / math.log(4), abs=0.002)


def test_on_ping_req_when_target_heard_recently_then_immediate_ack():
    m = _me()
    m.on_heartbeat(_hb("x", inc=4), 1.0)
    assert m.on_ping_req(PingReq("r", "x", 9), 1.02) == [Send("r", Ack("me", "x", 9, 4, True))]
    assert m.on_ping_req(PingReq("r", "me", 10), 1.02) == [Send("r", Ack("me", "me", 10, 1, True))]
    assert m.on_ping_req(PingReq("r", "ghost", 11), 1.02) == \
        [Send("r", Ack("me", "ghost", 11, 0, False))]


def test_on_ping_req_when_target_quiet_then_ack_on_next_heartbeat_or_nack_at_deadline():
    m = _me()
    m.on_heartbeat(_hb("x"), 1.0)
    m.on_heartbeat(_hb("y"), 1.0)
    assert m.on_ping_req(PingReq("r", "x", 1), 1.2) == []
    assert m.on_ping_req(PingReq("r", "y", 2), 1.2) == []
    assert m.on_heartbeat(_hb("x", seq=2), 1.21) == [Send("r", Ack("me", "x", 1, 1, True))]
    assert _frames(m.tick(1.2 + 0.8 * CFG.probe_timeout_s - 0.001), Ack) == []
    assert _frames(m.tick(1.2 + 0.8 * CFG.probe_timeout_s), Ack) == [Ack("me", "y", 2, 1, False)]


def test_on_ack_when_unknown_nonce_or_stranger_then_dropped_and_counted():
    m = _me()
    assert m.on_ack(Ack("h", "x", 99, 1, True), 0.0) == []
    assert m.dropped == {"unknown_nonce": 1}


def test_local_health_when_helpers_do_not_answer_then_score_rises_and_decays():
    m = _me()
    _feed(m, ["a", "b", "c", "x"], 0.0, 2.0)
    t = 2.0
    while m.state_of("x") is not MemberState.SUSPECT:   # helpers never answer at all
        t += CFG.tick_interval_s
        for n in "abc":
            m.on_heartbeat(_hb(n, seq=int(t * 100), t=t), t)
        m.tick(t)
    assert m.local_health == 1
    m.tick(t + CFG.suspicion_max_s / 2)
    assert m.local_health == 1
    m.tick(t + CFG.suspicion_max_s + 1e-6)
    assert m.local_health == 0


def test_transitions_when_random_inputs_then_history_only_follows_the_table_property():
    rng = random.Random(99)
    m = _me()
    peers = ["a", "b", "c"]
    t, seqs, base = 0.0, dict.fromkeys(peers, 0), dict.fromkeys(peers + ["me"], 1)
    for _ in range(3000):
        t += rng.uniform(0, 0.05)
        node = rng.choice(peers)
        if rng.random() < 0.05:
            base[node] += 1                       # incarnations drift upwards, claims lag
        inc = max(0, base[node] + rng.randint(-1, 1))
        r = rng.random()
        if r < 0.4:
            seqs[node] += 1
            m.on_heartbeat(_hb(node, inc=inc, seq=seqs[node], t=t), t)
        elif r < 0.8:
            cls = rng.choice([Suspect, Alive, Dead, Left])
            about = rng.choice(peers + ["me"])
            m.on_claim(cls(about, max(0, base[about] + rng.randint(-1, 1)), node), t)
        else:
            m.tick(t)
    assert len(m.history) > 50
    last: dict[str, MemberState] = {}
    for rec in m.history:
        assert TRANSITIONS[(rec.from_state, rec.trigger)] is rec.to_state
        assert last.get(rec.node_id, MemberState.UNKNOWN) is rec.from_state  # records chain up
        last[rec.node_id] = rec.to_state
    for node in peers:
        assert m.state_of(node) is last.get(node, MemberState.UNKNOWN)


def test_event_queue_when_delivered_then_in_order_one_at_a_time_despite_a_failing_listener():
    q: EventQueue[int] = EventQueue()
    seen: list[tuple[str, int]] = []
    q.subscribe(lambda e: seen.append(("first", e)))
    q.subscribe(lambda e: 1 / 0)
    unsubscribe = q.subscribe(lambda e: seen.append(("third", e)))
    for i in range(3):
        q.put(i)
    assert q.deliver(max_events=2) == 2 and len(q) == 1
    unsubscribe()
    assert q.deliver() == 1
    assert seen == [("first", 0), ("third", 0), ("first", 1), ("third", 1), ("first", 2)]
    assert q.listener_errors == 3 and q.drain() == []


def test_initial_incarnation_when_restarted_later_then_larger():
    assert initial_incarnation(1_700_000_001.5) > initial_incarnation(1_700_000_000.0)
    assert initial_incarnation(-5.0) == 0


def test_decode_when_every_action_frame_encoded_then_round_trips():
    mesh = _started(3)
    actions = mesh.nodes["n0"].tick(mesh.clock.now_s() + 1.0)
    assert {type(a.frame) for a in actions} == {Heartbeat, View}   # (SimMesh encodes the rest)
    for action in actions:
        assert decode(encode(action.frame)) == action.frame
