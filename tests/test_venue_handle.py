"""The venue handle: its reachability table against a manual clock (no Ray), its settings and
repr; then a venue's rest_for_one subtree from the deployment (handle, then connector) on
Ray against a real simulator process: healthy, unreachable while the process is stopped,
healthy again when it is back; faults set through the handle take effect at the venue; and a
SIGKILL of the handle restarts the connector after it, which reconciles and runs again."""

from __future__ import annotations

import itertools
import json
import os
import signal
import urllib.error
import urllib.request
from typing import Any

import pytest
import ray

from actors.venue.clock import ManualClock
from actors.venue.process import VenueProcess
from actors.venue_handle import (
    TRANSITIONS,
    Check,
    HandleConfigError,
    HealthTracker,
    Reach,
    VenueHandle,
)
from cluster.demo import venue_rpc
from cluster.deployment import SiteSpec, VenueSpec, venue_subtree
from supervisors import SupervisorSpec, start_tree
from tests.conftest import wait_until

SECRET = "handle-s3cret-not-for-production"
KEYS = {"bastion": SECRET}


# --- the pure part ----------------------------------------------------------------------------
def test_transitions_when_any_state_and_check_then_defined_and_ok_always_reaches() -> None:
    assert set(TRANSITIONS) == set(itertools.product(Reach, Check))
    for state in Reach:
        assert TRANSITIONS[(state, Check.OK)] is Reach.REACHABLE
        assert TRANSITIONS[(state, Check.FAIL_LIMIT)] is Reach.UNREACHABLE
    assert TRANSITIONS[(Reach.UNREACHABLE, Check.FAIL)] is Reach.UNREACHABLE


def test_tracker_when_checks_fail_then_suspect_before_unreachable_and_back_on_an_answer(
        ) -> None:
    clock = ManualClock(100.0)
    tracker = HealthTracker(unreachable_after=3, clock=clock)
    seen = []
    for ok in (True, False, False, False, False, True):
        clock.advance(1.0)
        seen.append(tracker.record_ok(0.004) if ok else tracker.record_failure("refused"))
    assert seen == [Reach.REACHABLE, Reach.SUSPECT, Reach.SUSPECT, Reach.UNREACHABLE,
                    Reach.UNREACHABLE, Reach.REACHABLE]
    st = tracker.status()
    assert (st["checks"], st["failures"], st["consecutive_failures"]) == (6, 4, 0)
    assert st["reachable"] and st["latency_s"] == 0.004 and st["last_ok_age_s"] == 0.0
    assert [(t["ts_s"], t["to"]) for t in st["transitions"]] == [
        (101.0, "REACHABLE"), (102.0, "SUSPECT"), (104.0, "UNREACHABLE"), (106.0, "REACHABLE")]
    assert "3 failure(s) in a row: refused" in st["transitions"][2]["reason"]
    once = HealthTracker(unreachable_after=1, clock=clock)
    assert once.record_failure("timeout") is Reach.UNREACHABLE  # no SUSPECT step


def test_handle_when_settings_bad_then_error_names_field_and_repr_shows_no_secret() -> None:
    ok = {"venue": "d", "ws_url": "ws://h:1/ws/api/v2", "http_url": "http://h:1",
          "client_id": "bastion", "client_secret": SECRET}
    for change, name in [({"ws_url": "http://h:1"}, "ws_url"), ({"http_url": "h:1"}, "http_url"),
                         ({"check_interval_s": 0}, "check_interval_s"),
                         ({"check_timeout_s": float("nan")}, "check_timeout_s"),
                         ({"unreachable_after": 0}, "unreachable_after")]:
        with pytest.raises(HandleConfigError, match=name):
            VenueHandle(**{**ok, **change})
    handle = VenueHandle(**ok)
    assert repr(handle) == "VenueHandle(d UNKNOWN)"
    assert SECRET not in repr(handle) and SECRET not in repr(handle.status())


# --- on Ray, against a simulator process ------------------------------------------------------
SITE = SiteSpec(name="tokyo", venues=(VenueSpec(name="deribit", instruments=("BTC-PERPETUAL",),
                                                client_id="bastion", client_secret=SECRET),))


def venue_tree(venue: VenueProcess) -> SupervisorSpec:
    """The deployment's own subtree for one venue, under a root."""
    subtree = venue_subtree(SITE, SITE.venues[0], venue.ws_url, venue.http_url, [])
    return SupervisorSpec(id="root", intensity=10, period_s=60, children=[subtree])


def public_error(venue: VenueProcess, method: str) -> dict[str, Any]:
    """The error a public GET answers (an HTTP 4xx carries it in its body)."""
    try:
        with urllib.request.urlopen(f"{venue.http_url}/api/v2/{method}", timeout=10) as resp:
            return json.loads(resp.read()).get("error", {})
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())["error"]


def handle_status(tree: Any) -> dict[str, Any]:
    return ray.get(tree.actor("root/deribit/handle", 10).status.remote(), timeout=10)


def test_handle_when_venue_stopped_then_unreachable_and_faults_set_through_it_take_effect(
        namespace, store_url, trees) -> None:
    venue = VenueProcess.start("handle-venue", keys=KEYS, speedup=60.0)
    port = venue.port
    try:
        tree = start_tree(venue_tree(venue), namespace=namespace, store_url=store_url)
        trees.append(tree)
        handle = tree.actor("root/deribit/handle", 10)
        st = wait_until(lambda: (s := handle_status(tree))["state"] == "REACHABLE" and s, 20,
                        "the handle to find the venue healthy")
        assert st["reachable"] and 0 < st["latency_s"] < 1.0 and st["failures"] == 0
        assert ray.get(handle.addresses.remote(), timeout=10) == {
            "venue": "deribit", "ws_url": venue.ws_url, "http_url": venue.http_url}

        out = ray.get(handle.set_faults.remote(outage=True, latency_s=0.01), timeout=10)
        assert out["status"] == "accepted" and out["faults"]["outage"] is True
        at_venue = venue_rpc(venue.http_url, "bastion", SECRET, "public/simulator/status")
        assert at_venue["faults"]["outage"] is True and at_venue["latency_s"] == 0.01
        assert public_error(venue, "public/get_instruments")["code"] == 13028  # real outage
        got = ray.get(handle.get_faults.remote(), timeout=10)
        assert got["status"] == "accepted" and got["faults"]["outage"] is True
        refused = ray.get(handle.set_faults.remote(colour="red"), timeout=10)
        assert refused["status"] == "refused" and "colour" in refused["reason"]
        bad = ray.get(handle.set_faults.remote(reject_storm_probability=2.0), timeout=10)
        assert bad["status"] == "rejected" and "reject_storm_probability" in bad["reason"]
        assert ray.get(handle.set_faults.remote(reset=True), timeout=10)["faults"]["outage"] \
            is False

        venue.stop()
        st = wait_until(lambda: (s := handle_status(tree))["state"] == "UNREACHABLE" and s,
                        20, "the handle to report the stopped venue unreachable")
        assert not st["reachable"] and st["consecutive_failures"] >= 2
        assert [t["to"] for t in st["transitions"]][-2:] == ["SUSPECT", "UNREACHABLE"]
        assert ray.get(handle.set_faults.remote(outage=True), timeout=10)["status"] == "unknown"

        venue = VenueProcess.start("handle-venue", port=port, keys=KEYS, speedup=60.0)
        st = wait_until(lambda: (s := handle_status(tree))["state"] == "REACHABLE" and s, 20,
                        "the handle to find the venue back")
        assert st["failures"] >= 2 and st["consecutive_failures"] == 0
    finally:
        venue.stop()


def test_handle_when_killed_then_rest_for_one_restarts_the_connector_which_reconciles(
        namespace, store_url, trees) -> None:
    with VenueProcess.start("handle-rfo", keys=KEYS, speedup=60.0) as venue:
        tree = start_tree(venue_tree(venue), namespace=namespace, store_url=store_url)
        trees.append(tree)
        conn_path = "root/deribit/connector"

        def conn(method: str, *args: Any) -> Any:
            return ray.get(getattr(tree.actor(conn_path, 10), method).remote(*args), timeout=30)

        wait_until(lambda: conn("state") == "RUNNING", 30, "the connector RUNNING")
        order = {"instrument": "BTC-PERPETUAL", "direction": "buy", "amount": 10.0,
                 "type": "market"}
        assert conn("submit", order, 5.0)["status"] == "accepted"
        before = wait_until(lambda: conn("positions"), 10, "the fill in the connector")
        old_handle, old_conn = tree.child("root/deribit/handle"), tree.child(conn_path)
        os.kill(old_handle.pid, signal.SIGKILL)
        wait_until(lambda: (h := tree.child("root/deribit/handle")).status == "running"
                   and h.pid != old_handle.pid
                   and (c := tree.child(conn_path)).status == "running"
                   and c.pid != old_conn.pid, 30, "handle and connector restarted")
        wait_until(lambda: conn("state") == "RUNNING", 30, "the new connector reconciled")
        assert conn("positions") == before  # rebuilt from its journal, checked at the venue
        assert handle_status(tree)["state"] in ("UNKNOWN", "REACHABLE")
