"""Tests for topology.partition: groups, bridges, asymmetric links, majority of voters."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.test_topology_membership import SimMesh
from topology.config import LOCAL
from topology.frames import View
from topology.partition import PartitionTracker, Voters, analyze


def _full(nodes) -> dict[str, dict[str, bool]]:
    return {a: {b: True for b in nodes if b != a} for a in nodes}


def _cut(views, a: str, b: str, both: bool = True) -> None:
    """``a`` no longer hears ``b`` (and the reverse if ``both``)."""
    views[a][b] = False
    if both:
        views[b][a] = False


def _split(views, left, right) -> None:
    for a in left:
        for b in right:
            _cut(views, a, b)


def _groups(picture) -> list[list[str]]:
    return [list(g.nodes) for g in picture.groups]


def test_analyze_when_everyone_hears_everyone_then_one_group_not_partitioned():
    p = analyze(_full("abcde"))
    assert _groups(p) == [list("abcde")]
    assert not p.partitioned and not p.bridges and not p.isolated and not p.asymmetric
    assert p.majority == 0 and p.total_votes == 5 and p.has_majority("c")


def test_analyze_when_split_in_halves_then_two_groups_and_the_bigger_has_the_majority():
    views = _full("abcde")
    _split(views, "abc", "de")
    p = analyze(views)
    assert _groups(p) == [list("abc"), list("de")]
    assert p.partitioned and p.majority == 0
    assert p.has_majority("a") and not p.has_majority("d")


def test_analyze_when_even_halves_then_no_majority():
    views = _full("abcd")
    _split(views, "ab", "cd")
    p = analyze(views)
    assert _groups(p) == [list("ab"), list("cd")] and p.majority is None


def test_analyze_when_one_node_cut_from_all_then_isolated_singleton_group():
    views = _full("abcde")
    _split(views, "e", "abcd")
    p = analyze(views)
    assert _groups(p) == [list("abcd"), ["e"]]
    assert p.isolated == ("e",) and p.partitioned and p.majority == 0


def test_analyze_when_node_crashed_and_never_reported_then_unknown_and_isolated():
    views = _full("abcd")
    del views["d"]
    for n in "abc":
        views[n]["d"] = False
    p = analyze(views)
    assert p.unknown == ("d",) and p.isolated == ("d",)
    assert not analyze(views, down=["d"]).partitioned          # excluded by the caller
    assert analyze(views, down=["d"]).total_votes == 4          # but its vote still counts


def test_analyze_when_a_node_links_two_halves_then_it_is_a_bridge_between_them():
    views = _full("abcde")
    _split(views, "ab", "cd")          # e still hears and is heard by all
    p = analyze(views)
    assert _groups(p) == [list("ab"), list("cd")]
    assert [(b.node, b.groups) for b in p.bridges] == [("e", (0, 1))]
    assert p.partitioned and p.majority is None and p.unheld == ("e",)
    assert "bridges: e -> [0, 1]" in p.summary()


def test_analyze_when_one_link_broken_in_a_triangle_then_not_a_partition():
    views = _full("abc")
    _cut(views, "a", "c")              # b relays: a pendant is not a bridge
    p = analyze(views)
    assert _groups(p) == [list("abc")] and not p.partitioned


def test_analyze_when_single_link_between_two_groups_then_both_ends_are_bridges():
    views = _full("abcdef")
    _split(views, "abc", "def")
    views["c"]["d"] = views["d"]["c"] = True
    p = analyze(views)
    assert [b.node for b in p.bridges] == ["c", "d"]
    assert _groups(p) == [list("ab"), list("ef")]


def test_analyze_when_one_way_loss_then_asymmetric_link_and_no_partition():
    views = _full("abcd")
    _cut(views, "a", "b", both=False)  # a no longer hears b; b still hears a
    p = analyze(views)
    assert p.asymmetric == (("b", "a"),)
    assert _groups(p) == [list("abcd")] and not p.partitioned


def test_analyze_when_view_is_stale_then_no_asymmetry_invented_from_it():
    views = _full("abc")
    _cut(views, "a", "c", both=False)
    assert analyze(views, stale=["c"]).asymmetric == ()
    assert analyze(views).asymmetric == (("c", "a"),)


SITES = {"tokyo": ["t1", "t2", "t3"], "london": ["l1", "l2", "l3"], "ny": ["n1", "n2", "n3"]}


def _three_sites(witness: bool = True):
    node_sites = {n: s for s, ns in SITES.items() for n in ns}
    nodes = list(node_sites) + (["w"] if witness else [])
    return _full(nodes), Voters.from_node_sites(node_sites, ["w"] if witness else [])


def test_analyze_when_three_sites_and_witness_whole_then_all_four_votes_in_one_group():
    views, voters = _three_sites()
    p = analyze(views, voters=voters)
    assert p.total_votes == 4 and p.groups[0].votes == 4 and p.majority == 0
    assert p.groups[0].sites == ("london", "ny", "tokyo") and p.groups[0].witnesses == ("w",)


def test_analyze_when_one_site_cut_off_then_the_other_two_and_witness_hold_the_majority():
    views, voters = _three_sites()
    _split(views, SITES["tokyo"], SITES["london"] + SITES["ny"] + ["w"])
    p = analyze(views, voters=voters)
    big, tokyo = p.groups
    assert big.sites == ("london", "ny") and big.witnesses == ("w",) and p.majority == 0
    assert tokyo.nodes == ("t1", "t2", "t3") and tokyo.votes == 1
    assert not p.has_majority("t1")


def test_analyze_when_a_site_is_split_inside_then_its_vote_goes_to_its_roster_majority():
    views, voters = _three_sites()
    # t3 goes with london; t1, t2 with ny + witness
    _split(views, ["t3"] + SITES["london"], ["t1", "t2"] + SITES["ny"] + ["w"])
    p = analyze(views, voters=voters)
    holders = {s: g.nodes[0] for g in p.groups for s in g.sites}
    assert holders["tokyo"] == p.groups[p.group_of("t1")].nodes[0]
    assert p.has_majority("t1") and not p.has_majority("t3")


def test_analyze_when_site_roster_split_evenly_then_nobody_holds_that_site():
    node_sites = {"a1": "a", "a2": "a", "b1": "b", "b2": "b"}
    voters = Voters.from_node_sites(node_sites, ["w"])
    views = _full(["a1", "a2", "b1", "b2", "w"])
    _split(views, ["a1", "b1", "b2", "w"], ["a2"])
    p = analyze(views, voters=voters)
    assert p.groups[0].sites == ("b",)        # a1 is half of site a's roster: not a majority
    assert p.majority == 0                     # b + witness = 2 of 3
    assert p.unheld == ("a",)


def test_analyze_when_dead_nodes_excluded_then_roster_still_counts_them():
    node_sites = {"a1": "a", "a2": "a", "a3": "a", "b1": "b"}
    voters = Voters.from_node_sites(node_sites)
    views = _full(["a1", "b1"])
    p = analyze(views, voters=voters, members=["a1", "b1"], down=["a2", "a3"])
    assert p.groups[0].sites == ("b",)        # 1 of site a's 3 nodes is not a majority
    assert p.majority is None


def test_analyze_when_two_sites_cannot_see_each_other_but_both_see_the_witness_then_tie():
    node_sites = {"t1": "tokyo", "t2": "tokyo", "l1": "london", "l2": "london"}
    voters = Voters.from_node_sites(node_sites, ["w"])
    views = _full(list(node_sites) + ["w"])
    _split(views, ["t1", "t2"], ["l1", "l2"])
    p = analyze(views, voters=voters)
    assert [b.node for b in p.bridges] == ["w"]
    assert p.majority is None and p.unheld == ("w",)      # the lease decides, not the picture
    _cut(views, "w", "l1")
    _cut(views, "w", "l2")
    p = analyze(views, voters=voters)                     # the witness sides with tokyo
    assert p.groups[p.majority].nodes == ("t1", "t2", "w")


def test_voters_when_witness_in_a_roster_or_empty_site_then_value_error():
    with pytest.raises(ValueError, match="also in a site roster"):
        Voters({"a": frozenset({"x"})}, frozenset({"x"}))
    with pytest.raises(ValueError, match=r"voters.sites\['a'\]"):
        Voters({"a": frozenset()})


def test_analyze_when_random_views_then_groups_and_bridges_partition_the_nodes_property():
    rng = random.Random(17)
    for trial in range(300):
        nodes = [f"n{i}" for i in range(rng.randint(1, 12))]
        p_link = rng.choice([0.2, 0.5, 0.9])
        views = {a: {b: rng.random() < p_link for b in nodes if b != a} for a in nodes}
        sites = {n: f"s{rng.randrange(3)}" for n in nodes}
        voters = Voters.from_node_sites(sites)
        p = analyze(views, voters=voters)
        in_groups = [n for g in p.groups for n in g.nodes]
        bridges = [b.node for b in p.bridges]
        assert sorted(in_groups + bridges) == sorted(nodes), trial
        assert len(in_groups) == len(set(in_groups))
        linked = {(a, b) for a in nodes for b in nodes if a != b
                  and views[a][b] and views[b][a]}
        for g, h in itertools.combinations(p.groups, 2):   # groups never touch directly
            assert not any((a, b) in linked for a in g.nodes for b in h.nodes)
        assert sum(1 for g in p.groups if 2 * g.votes > p.total_votes) <= 1
        held = [s for g in p.groups for s in g.sites]
        assert len(held) == len(set(held))                  # a site's vote goes to one group
        for a, b in p.asymmetric:
            assert views[a][b] and not views[b][a]
        assert p == analyze(dict(reversed(views.items())), voters=voters)  # order-free


def test_tracker_when_views_split_and_heal_then_partitioned_then_healed_events():
    t = PartitionTracker("a", stale_after_s=0.3, forget_after_s=30.0)
    views = _full("abcd")
    for n, reach in views.items():
        t.update(n, reach, 0.0)
    assert not t.evaluate(0.0).partitioned and t.events.drain() == []
    _split(views, "ab", "cd")
    for n, reach in views.items():
        t.update(n, reach, 1.0)
    t.evaluate(1.0)
    t.evaluate(1.1)                                        # unchanged: no second event
    for n, reach in _full("abcd").items():
        t.update(n, reach, 2.0)
    t.evaluate(2.0)
    events = t.events.drain()
    assert [e.kind for e in events] == ["partitioned", "healed"]
    assert events[0].reason.startswith("2 groups: [a b] (2/4 votes) | [c d] (2/4 votes)")
    assert events[0].picture.majority is None


def test_tracker_when_shape_lasts_less_than_settle_then_not_published():
    t = PartitionTracker("a", stale_after_s=1.0, forget_after_s=30.0, settle_s=0.2)
    split = _full("abcd")
    _split(split, "ab", "cd")

    def feed(views, now_s):
        for n, reach in views.items():
            t.update(n, reach, now_s)
        return t.evaluate(now_s)

    assert feed(split, 0.0).partitioned          # computed at once ...
    feed(_full("abcd"), 0.1)                     # ... but gone before it settled
    feed(split, 0.5)
    feed(split, 0.6)
    assert t.events.drain() == []                # 0.1 s so far: still settling
    feed(split, 0.75)
    [event] = t.events.drain()
    assert event.kind == "partitioned" and event.ts_s == 0.75 and t.published.partitioned


def test_tracker_when_view_from_older_incarnation_then_ignored_and_old_views_forgotten():
    t = PartitionTracker("a", stale_after_s=0.3, forget_after_s=5.0)
    assert t.observe(View.of("b", 5, 1, {"a": True}), 0.0)
    assert not t.observe(View.of("b", 4, 9, {"a": False}), 0.1)
    t.update("a", {"b": True}, 0.1)
    assert t.evaluate(0.2).groups[0].nodes == ("a", "b")
    t.update("a", {"b": False}, 1.0)
    p = t.evaluate(1.0)
    assert p.stale == ("b",) and p.isolated == ("a", "b")
    t.update("a", {"b": False}, 6.0)
    assert t.evaluate(6.0).groups[0].nodes == ("a",)      # b forgotten


def test_tracker_when_stale_after_exceeds_forget_after_then_value_error():
    with pytest.raises(ValueError, match="stale_after_s"):
        PartitionTracker("a", stale_after_s=10.0, forget_after_s=1.0)


def test_tracker_when_fed_by_a_simulated_mesh_split_in_halves_then_both_sides_see_it():
    mesh = SimMesh(5)
    trackers = {n: PartitionTracker(n, stale_after_s=3 * LOCAL.gossip_interval_s,
                                    forget_after_s=LOCAL.dead_node_reap_s,
                                    settle_s=2 * LOCAL.gossip_interval_s) for n in mesh.ids}
    def receive(dst, data, now_s):              # the agent's job: views go to the tracker
        frame = mesh.guards[dst].accept(data)
        if isinstance(frame, View):
            trackers[dst].observe(frame, now_s)
        elif frame is not None:
            mesh._route(dst, mesh.nodes[dst].on_frame(frame, now_s), now_s)
    mesh._receive = receive

    def evaluate():
        now = mesh.clock.now_s()
        for n in mesh.ids:
            trackers[n].update(n, mesh.nodes[n].reachable(now), now)
            trackers[n].evaluate(now)

    def run(duration_s):
        end = mesh.clock.now_s() + duration_s
        while mesh.clock.now_s() < end:
            mesh.step()
            evaluate()

    run(1.0)
    assert all(not t.picture.partitioned for t in trackers.values())
    for a in ["n0", "n1", "n2"]:
        for b in ["n3", "n4"]:
            mesh.cut_link(a, b)
    run(1.0)
    for n, t in trackers.items():
        assert [list(g.nodes) for g in t.picture.groups] == [["n0", "n1", "n2"], ["n3", "n4"]]
        assert t.picture.has_majority(n) is (n in ("n0", "n1", "n2")), n
    mesh.cut.clear()
    run(2.0)
    for t in trackers.values():
        events = t.events.drain()
        assert [e.kind for e in events] == ["partitioned", "healed"], [e.reason for e in events]
        assert 1.0 < events[0].ts_s < 1.0 + 0.5    # the split is published within 0.5 s
