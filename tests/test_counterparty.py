"""Counterparty risk: the score never rises as a signal worsens, caps shrink with the score,
exposure breaches are status events with hysteresis, bad signals are refused and counted, the
monitor rebuilds from its journal, and subscribers receive breaches without being waited on."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import ray

from actors.counterparty import (
    SIGNALS,
    STATUS_TRANSITIONS,
    CounterpartyConfig,
    CounterpartyConfigError,
    CounterpartyMonitor,
    CounterpartyState,
    EventSink,
    StatusTrigger,
    VenueStatus,
    cap_factor,
    score_signals,
)
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.journal import open_store
from supervisors.spec import Backoff
from tests.conftest import wait_until

CFG = CounterpartyConfig()
GRIDS = {
    "api_error_rate": np.linspace(0.0, 1.0, 41),
    "reject_rate": np.linspace(0.0, 1.0, 41),
    "latency_s": np.linspace(0.0, 5.0, 41),
    "feed_staleness_s": np.linspace(0.0, 60.0, 41),
    "price_deviation": np.linspace(0.0, 0.05, 41),
}
BASELINES = [
    {},
    {"api_error_rate": 0.05, "reject_rate": 0.1, "latency_s": 0.5, "feed_staleness_s": 5.0,
     "price_deviation": 0.005, "withdrawals": "delayed"},
    {"api_error_rate": 0.5, "reject_rate": 0.5, "latency_s": 3.0, "feed_staleness_s": 50.0,
     "price_deviation": 0.04, "withdrawals": "suspended"},
]


@pytest.mark.parametrize("signal", list(GRIDS))
@pytest.mark.parametrize("baseline", range(len(BASELINES)))
def test_score_when_one_signal_worsens_then_never_rises(signal: str, baseline: int) -> None:
    scores = [score_signals({**BASELINES[baseline], signal: float(x)}, CFG)[0]
              for x in GRIDS[signal]]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert all(b <= a for a, b in itertools.pairwise(scores)), scores
    if baseline == 0:  # from a clean venue the signal's full weight comes off
        assert scores[0] - scores[-1] == pytest.approx(CFG.weights[signal])


def test_score_when_withdrawals_worsen_then_never_rises_and_suspension_caps_it() -> None:
    for base in BASELINES:
        scores = [score_signals({**base, "withdrawals": w}, CFG)[0]
                  for w in ("ok", "delayed", "suspended")]
        assert scores[0] >= scores[1] >= scores[2]
        assert scores[2] <= CFG.suspended_max_score


def test_score_when_all_signals_bad_or_good_then_zero_or_one_by_the_weights() -> None:
    worst = {k: float(g[-1]) for k, g in GRIDS.items()} | {"withdrawals": "suspended"}
    assert score_signals(worst, CFG)[0] == 0.0
    best = {k: 0.0 for k in GRIDS} | {"withdrawals": "ok"}
    assert score_signals(best, CFG) == (1.0, dict.fromkeys(SIGNALS, 0.0))
    assert sum(CFG.weights.values()) == pytest.approx(1.0)


def test_cap_when_score_falls_then_shrinks_to_zero_at_the_cutoff() -> None:
    factors = [cap_factor(s, CFG) for s in np.linspace(1.0, 0.0, 101)]
    assert all(b <= a for a, b in itertools.pairwise(factors))
    assert cap_factor(CFG.full_score, CFG) == 1.0 and cap_factor(CFG.cutoff_score, CFG) == 0.0
    mid = (CFG.full_score + CFG.cutoff_score) / 2
    assert cap_factor(mid, CFG) == pytest.approx(0.5)
    state = CounterpartyState({"deribit": 1_000_000.0})
    caps = []
    for rate in (0.0, 0.1, 0.15, 0.2):
        state.apply(state.prepare_observe("deribit", {"api_error_rate": rate,
                                                      "reject_rate": rate * 2}, 100.0)[0][0])
        caps.append(state.cap("deribit", 100.0))
    assert caps[0] == 1_000_000.0 and all(b < a for a, b in itertools.pairwise(caps))


def test_score_when_venue_goes_silent_then_staleness_grows_with_time() -> None:
    state = CounterpartyState({"a": 1e6})
    assert state.score("a", 0.0)[1]["feed_staleness_s"] == 1.0  # never observed: fully stale
    state.apply(state.prepare_observe("a", {"feed_staleness_s": 0.5}, 100.0)[0][0])
    assert [round(state.score("a", t)[0], 6) for t in (100.0, 110.0, 200.0)] == [
        1.0, round(1 - 0.2 * (10 - 2) / 28, 6), 0.8]


def test_price_deviation_when_one_venue_is_off_the_median_then_only_it_is_penalised() -> None:
    state = CounterpartyState({"a": 1e6, "b": 1e6, "c": 1e6})
    for venue, mid in (("a", 100.0), ("b", 100.1), ("c", 103.0)):
        state.apply(state.prepare_observe(venue, {"mid_price": mid}, 10.0)[0][0])
    assert state.price_deviation("c", 10.0) == pytest.approx(2.9 / 100.1)
    assert state.price_deviation("a", 10.0) == pytest.approx(0.1 / 100.1)
    assert state.score("c", 10.0)[0] < state.score("a", 10.0)[0] == state.score("b", 10.0)[0]
    assert state.price_deviation("c", 10.0 + CFG.mid_ttl_s + 1) is None  # stale mids dropped


def fold(state: CounterpartyState, events: list[dict]) -> list[dict]:
    for e in events:
        state.apply(e)
    return events


def test_exposure_when_cap_shrinks_below_it_then_breach_event_and_hysteresis() -> None:
    state = CounterpartyState({"x": 1_000_000.0})
    fold(state, state.prepare_observe("x", {"latency_s": 0.1}, 0.0)[0])
    fold(state, state.prepare_exposure("x", {"BTC": 600_000.0, "USDC": 200_000.0}, 300_000.0,
                                       -50_000.0, 0.0))
    assert fold(state, state.status_events(0.0)) == []  # 750k under a 1M cap: healthy
    assert state.exposure_ok("x", 200_000.0, 0.0) == (True, "ok")
    ok, why = state.exposure_ok("x", 300_000.0, 0.0)
    assert not ok and why.startswith("cap: exposure 750000.00 + 300000.00")
    # errors and rejects pile up: score 1 - 0.2 - 0.15 = 0.65 -> cap 1M * 0.35/0.6 = 583k
    fold(state, state.prepare_observe("x", {"api_error_rate": 0.5, "reject_rate": 0.5}, 1.0)[0])
    events = fold(state, state.status_events(1.0))
    assert [(e["from"], e["to"], e["trigger"]) for e in events] == [
        ("HEALTHY", "BREACHED", "over_cap")]
    assert events[0]["cap_usd"] == pytest.approx(1e6 * (0.65 - 0.3) / 0.6)
    assert state.exposure_ok("x", 1.0, 1.0)[0] is False
    assert state.exposure_ok("x", -100.0, 1.0) == (True, "reduces exposure")
    # back under the cap but not within 90 % of it: still breached (hysteresis)
    fold(state, state.prepare_exposure("x", {"BTC": 560_000.0}, 0.0, 0.0, 2.0))
    assert fold(state, state.status_events(2.0)) == []
    fold(state, state.prepare_exposure("x", {"BTC": 500_000.0}, 0.0, 0.0, 3.0))
    assert [e["to"] for e in fold(state, state.status_events(3.0))] == ["DEGRADED"]
    fold(state, state.prepare_observe("x", {"api_error_rate": 0.0, "reject_rate": 0.0}, 4.0)[0])
    assert [e["to"] for e in fold(state, state.status_events(4.0))] == ["HEALTHY"]
    assert [h["to"] for h in state.venues["x"].history] == ["BREACHED", "DEGRADED", "HEALTHY"]


def test_status_table_when_read_then_breached_leaves_only_when_within_cap() -> None:
    assert [k for k in STATUS_TRANSITIONS if k[0] is VenueStatus.BREACHED] == [
        (VenueStatus.BREACHED, StatusTrigger.WITHIN_CAP)]
    assert {to for (_, t), to in STATUS_TRANSITIONS.items()
            if t is StatusTrigger.OVER_CAP} == {VenueStatus.BREACHED}


def test_observe_when_bad_signals_then_refused_counted_and_good_ones_kept() -> None:
    state = CounterpartyState({"x": 1e6})
    events, rejected = state.prepare_observe("x", {
        "api_error_rate": 1.5, "latency_s": math.nan, "withdrawals": "maybe", "mood": 3,
        "mid_price": -1.0, "reject_rate": 0.01}, 5.0)
    fold(state, events)
    assert sorted(r["signal"] for r in rejected) == ["api_error_rate", "latency_s",
                                                     "mid_price", "mood", "withdrawals"]
    assert state.venues["x"].signals == {"reject_rate": 0.01}
    assert state.counters["signal_rejected.unknown_signal"] == 1
    for venue, signals, ts, why in (("nope", {}, 6.0, "unknown_venue"),
                                    ("x", {}, math.nan, "bad_timestamp"),
                                    ("x", [1], 6.0, "signals_not_a_dict"),
                                    ("x", {}, 4.0, "out_of_order")):
        events, rejected = state.prepare_observe(venue, signals, ts)
        fold(state, events)
        assert rejected == [{"signal": "*", "reason": why}]
    assert state.counters["observe_rejected.out_of_order"] == 1
    assert state.exposure_ok("nope", 1.0, 0.0)[0] is False


def test_config_when_bad_then_error_names_field() -> None:
    with pytest.raises(CounterpartyConfigError, match="must sum to 1"):
        CounterpartyConfig(weights={k: 0.5 for k in SIGNALS})
    with pytest.raises(CounterpartyConfigError, match="degraded_below"):
        CounterpartyConfig(degraded_below=0.8, healthy_at=0.7)
    with pytest.raises(CounterpartyConfigError, match=r"ramps\[latency_s\]"):
        CounterpartyConfig(ramps={**CFG.ramps, "latency_s": (2.0, 1.0)})
    with pytest.raises(CounterpartyConfigError, match="venues"):
        CounterpartyState({"x": -1.0})


class FakeClock:
    def __init__(self, t: float = 1_000.0) -> None:
        self.t = t

    def now_s(self) -> float:
        return self.t


def open_monitor(tmp_path, clock: FakeClock) -> CounterpartyMonitor:
    monitor = CounterpartyMonitor(venues={"deribit": 1e6, "okx": 5e5}, snapshot_every=3,
                                  clock=clock)
    url = f"sqlite://{tmp_path}"
    monitor._bastion_recover(SimpleNamespace(stream="t/cp", store_url=url), open_store(url))
    return monitor


def test_monitor_when_rebuilt_from_journal_then_status_scores_and_history_survive(
        tmp_path) -> None:
    clock = FakeClock()
    monitor = open_monitor(tmp_path, clock)
    monitor.update_exposure("deribit", {"BTC": 900_000.0})
    monitor.observe("deribit", {"api_error_rate": 0.3, "withdrawals": "delayed"})
    clock.t += 1
    monitor.observe("okx", {"latency_s": 0.1})
    assert monitor.summary()["venues"]["deribit"]["status"] == "BREACHED"
    again = open_monitor(tmp_path, clock)
    assert again.scores() == monitor.scores()
    assert again.status_history("deribit") == monitor.status_history("deribit")
    assert again.summary()["venues"] == monitor.summary()["venues"]
    assert again.exposure_ok("deribit", 1.0)[0] is False
    again.observe("okx", {"api_error_rate": 0.2, "reject_rate": 0.1})
    assert again.tick() == []
    clock.t += 100.0  # okx goes silent: staleness alone takes it below degraded_below
    assert [(e["v"], e["to"]) for e in again.tick()] == [("okx", "DEGRADED")]
    assert again.summary()["venues"]["okx"]["status"] == "DEGRADED"


# --------------------------------------------------------------------------------------------
# Subscribers on a real Ray cluster
# --------------------------------------------------------------------------------------------


def test_monitor_when_breach_then_subscribers_get_it_and_failing_ones_are_dropped(
        namespace, store_url, trees) -> None:
    spec = SupervisorSpec(id="root", intensity=5, children=[ChildSpec(
        id="cp", cls="actors.counterparty:CounterpartyMonitor", backoff=Backoff(initial_s=0.0),
        kwargs={"venues": {"deribit": 1_000_000.0}, "max_failures": 2})])
    tree = start_tree(spec, namespace=namespace, store_url=store_url)
    trees.append(tree)
    monitor = tree.actor("root/cp")
    good = ray.remote(EventSink).options(num_cpus=0).remote()
    bad = ray.remote(EventSink).options(num_cpus=0).remote(fail=True)
    try:
        ray.get([monitor.subscribe.remote(good, "receive"),
                 monitor.subscribe.remote(bad, "receive")], timeout=30)
        with pytest.raises(ray.exceptions.RayTaskError, match="no method"):
            ray.get(monitor.subscribe.remote(good, "nope"), timeout=30)
        ray.get(monitor.update_exposure.remote("deribit", {"USDC": 800_000.0}), timeout=30)
        out = ray.get(monitor.observe.remote("deribit", {"withdrawals": "suspended"}),
                      timeout=30)
        assert out["status"] == "BREACHED" and out["cap_usd"] == 0.0
        events = wait_until(lambda: ray.get(good.events.remote(), timeout=5), 20,
                            "the breach event at the good subscriber")
        assert events[0]["breach"] and events[0]["v"] == "deribit"
        assert (events[0]["from"], events[0]["to"]) == ("HEALTHY", "BREACHED")
        # a recovery, then a second failure at the bad subscriber drops it
        ray.get(monitor.observe.remote("deribit", {"withdrawals": "ok"}), timeout=30)
        ray.get(monitor.update_exposure.remote("deribit", {"USDC": 1_000.0}), timeout=30)
        stats = wait_until(lambda: (s := ray.get(monitor.delivery_stats.remote(), timeout=5))
                           ["dropped_subscribers"] == 1 and s, 20, "the failing one dropped")
        assert stats["failed"] >= 2 and len(stats["subscribers"]) == 1
        got = wait_until(lambda: len(e := ray.get(good.events.remote(), timeout=5)) >= 3 and e,
                         20, "the recovery events")
        assert [e["to"] for e in got] == ["BREACHED", "DEGRADED", "HEALTHY"]
    finally:
        ray.kill(good)
        ray.kill(bad)
