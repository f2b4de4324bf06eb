"""The order router: the pure policy; the actor's journal and re-routing against a scripted
stand-in for its calls (no Ray); and the real thing — router, risk book and two connectors to
two venue simulator processes under a supervision tree: idempotent retries (also across a
router SIGKILL) and an outage re-routed to the other venue."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import signal
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import ray

from actors.limits import OrderAccepted, OrderDenied
from actors.router import (
    CallFailed,
    OrderRouter,
    Routed,
    RouteDenied,
    RouteLog,
    RouterConfigError,
    RoutingPolicy,
    VenueView,
    added_notional_usd,
    retry_elsewhere,
)
from actors.venue.clock import ManualClock
from actors.venue.process import VenueProcess
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.journal import open_store
from supervisors.spec import Backoff
from tests.conftest import wait_until

PERP = "BTC-PERPETUAL"
BUY = {"instrument": PERP, "direction": "buy", "amount": 10.0, "type": "market"}
OK = OrderAccepted(PERP, "buy", 10.0)


def view(venue: str, state: str | None = "RUNNING", bid: float = 100.0, ask: float = 101.0,
         **kw: Any) -> VenueView:
    return VenueView(venue, state, bid, ask, **kw)


# --- the pure policy ---------------------------------------------------------------------------
def test_policy_when_several_healthy_venues_then_best_price_per_side_and_others_as_fallbacks(
        ) -> None:
    views = [view("a", bid=99.0, ask=101.0), view("b", bid=100.0, ask=100.5),
             view("c", bid=99.5, ask=102.0)]
    buy = RoutingPolicy().choose(BUY, views, OK)
    assert isinstance(buy, Routed)
    assert (buy.venue, buy.fallbacks) == ("b", ("a", "c"))
    assert "best ask 100.5" in buy.reason
    sell = RoutingPolicy().choose({**BUY, "direction": "sell"}, views, OK)
    assert (sell.venue, sell.fallbacks) == ("b", ("c", "a"))


def test_policy_when_venue_has_no_quote_then_it_ranks_after_priced_ones_and_ties_keep_order(
        ) -> None:
    views = [view("a", bid=math.nan, ask=math.nan), view("b", ask=101.0), view("c", ask=101.0)]
    decision = RoutingPolicy().choose(BUY, views, OK)
    assert (decision.venue, decision.fallbacks) == ("b", ("c", "a"))


@pytest.mark.parametrize(("bad", "why"), [
    (view("a", state="DEGRADED", ask=90.0), "connector is DEGRADED"),
    (view("a", state="STARTING", ask=90.0), "connector is STARTING"),
    (view("a", state=None, ask=90.0), "connector unreachable"),
    (view("a", ask=90.0, exposure_ok=False, exposure_reason="cap: 10 > 5"),
     "counterparty: cap: 10 > 5"),
    (view("a", ask=90.0, cooling_down="cooling down 3.0 s"), "cooling down 3.0 s"),
])
def test_policy_when_best_venue_is_unhealthy_then_skipped_with_reason(bad: VenueView,
                                                                       why: str) -> None:
    decision = RoutingPolicy().choose(BUY, [bad, view("b", ask=101.0)], OK)
    assert isinstance(decision, Routed)
    assert decision.venue == "b" and decision.fallbacks == ()
    assert decision.skipped == {"a": why}


def test_policy_when_no_venue_is_healthy_then_denied_as_data_naming_each_venue() -> None:
    decision = RoutingPolicy().choose(BUY, [view("a", state="DEGRADED"),
                                            view("b", state=None)], OK)
    assert isinstance(decision, RouteDenied) and not decision.ok
    assert decision.reason == "no_venue"
    assert decision.skipped == {"a": "connector is DEGRADED", "b": "connector unreachable"}
    out = decision.to_outcome()
    assert out["status"] == "denied" and "a: connector is DEGRADED" in out["detail"]


def test_policy_when_risk_denies_then_denied_with_the_risk_reason_before_any_venue() -> None:
    denied = OrderDenied("max_position_usd", "max_position_usd", 2e6, 1e6, "too big", PERP)
    decision = RoutingPolicy().choose(BUY, [view("a")], denied)
    assert isinstance(decision, RouteDenied)
    assert decision.reason == "risk_denied" and decision.detail.startswith("max_position_usd")
    assert decision.risk["reason"] == "max_position_usd" and decision.risk["value"] == 2e6
    assert decision.to_outcome()["risk"]["threshold"] == 1e6


@pytest.mark.parametrize("order", [None, {"instrument": PERP, "direction": "up", "amount": 1},
                                   {**BUY, "amount": float("nan")}, {**BUY, "colour": "red"}])
def test_policy_when_order_malformed_then_denied_invalid_order(order: Any) -> None:
    decision = RoutingPolicy().choose(order, [view("a")], OK)
    assert isinstance(decision, RouteDenied) and decision.reason == "invalid_order"


def test_reroute_rule_when_replies_differ_then_only_proof_of_not_taken_reroutes() -> None:
    assert retry_elsewhere({"status": "refused", "reason": "connector is STARTING"})
    assert retry_elsewhere({"status": "rejected", "code": 13028})
    for reply in ({"status": "accepted"}, {"status": "unknown"},
                  {"status": "rejected", "code": 11030}):
        assert not retry_elsewhere(reply)


def test_notional_when_inverse_or_linear_or_reducing_then_usd_added() -> None:
    assert added_notional_usd(BUY, 50_000.0, reducing=False) == 10.0
    spot = {"instrument": "BTC_USDC", "direction": "buy", "amount": 0.5}
    assert added_notional_usd(spot, 50_000.0, reducing=False) == 25_000.0
    assert added_notional_usd({**spot, "price": 40_000.0}, 50_000.0, reducing=True) == -20_000.0


def test_route_log_when_more_done_than_max_then_oldest_done_dropped_pending_kept() -> None:
    log = RouteLog(max_done=2)
    log.apply({"t": "send", "coid": "p", "order": {}, "venue": "a"})
    for coid in "xyz":
        log.apply({"t": "done", "coid": coid, "order": {}, "outcome": {"status": "denied"}})
    assert list(log.records) == ["p", "y", "z"] and log.pending() == ["p"]


def test_router_when_config_bad_then_error_names_field() -> None:
    with pytest.raises(RouterConfigError, match="venues"):
        OrderRouter(venues={}, risk_book="root/book")
    with pytest.raises(RouterConfigError, match="instruments_by_venue"):
        OrderRouter(venues={"a": "root/a"}, risk_book="root/book",
                    instruments_by_venue={"b": [PERP]})
    with pytest.raises(RouterConfigError, match="submit_timeout_s"):
        OrderRouter(venues={"a": "root/a"}, risk_book="root/book", submit_timeout_s=-1)


# --- the actor's logic against scripted calls (no Ray) --------------------------------------
class ScriptedCalls:
    """Stands in for ``ActorCalls``: connectors ``a`` and ``b`` with scripted states and submit
    replies, a risk book that accepts; records every submit."""

    def __init__(self) -> None:
        self.states = {"root/a": "RUNNING", "root/b": "RUNNING"}
        self.replies: dict[str, list[dict[str, Any]]] = {"root/a": [], "root/b": []}
        self.submits: list[tuple[str, dict[str, Any]]] = []
        # A submit with no scripted reply sets ``reached`` and hangs until ``release`` is set
        # (both made by the test inside its event loop).
        self.reached: asyncio.Event | None = None
        self.release: asyncio.Event | None = None

    async def call(self, path: str, method: str, *args: Any, timeout_s: float) -> Any:
        if method == "check_order":
            return OrderAccepted(args[0]["instrument_name"], args[0]["direction"],
                                 args[0]["amount"])
        if method == "state":
            if self.states[path] is None:
                raise CallFailed(f"{path}: dead")
            return self.states[path]
        if method == "submit":
            self.submits.append((path, args[0]))
            if self.replies[path]:
                return self.replies[path].pop(0)
            assert self.reached is not None and self.release is not None
            self.reached.set()
            await self.release.wait()
            return {"status": "accepted", "label": "late"}
        raise AssertionError(f"unexpected call {path}.{method}")


def make_router(tmp_path, calls: ScriptedCalls, clock: ManualClock | None = None
                ) -> OrderRouter:
    router = OrderRouter(venues={"a": "root/a", "b": "root/b"}, risk_book="root/book",
                         calls=calls, clock=clock or ManualClock())
    url = f"sqlite://{tmp_path}"
    router._bastion_recover(SimpleNamespace(stream="t/router", store_url=url), open_store(url))
    return router


def marks(router: OrderRouter, venue: str, bid: float, ask: float) -> None:
    router.on_marks({"venue": venue, "instrument": [PERP], "bid": [bid], "ask": [ask]})


def test_router_when_best_venue_refuses_as_down_then_next_venue_and_cooldown_on_13028(
        tmp_path) -> None:
    calls, clock = ScriptedCalls(), ManualClock()
    router = make_router(tmp_path, calls, clock)
    marks(router, "a", 100.0, 100.5)
    marks(router, "b", 100.0, 101.0)
    calls.replies["root/a"] = [{"status": "rejected", "code": 13028, "reason": "outage"}]
    calls.replies["root/b"] = [{"status": "accepted", "label": "b.1", "state": "filled"}]
    out = asyncio.run(router.route(BUY, "c1"))
    assert out["status"] == "accepted" and out["venue"] == "b"
    assert [a["venue"] for a in out["attempts"]] == ["a", "b"]
    assert [p for p, _ in calls.submits] == ["root/a", "root/b"]
    # a is cooling down: the next order goes straight to b; after the cool-down, a again
    calls.replies["root/b"] = [{"status": "accepted", "label": "b.2"}]
    assert asyncio.run(router.route(BUY, "c2"))["attempts"] == [
        {"venue": "b", "status": "accepted", "reason": ""}]
    clock.advance(router.venue_cooldown_s + 0.1)
    marks(router, "a", 100.0, 100.5)
    calls.replies["root/a"] = [{"status": "refused", "reason": "connector is STARTING"}]
    calls.replies["root/b"] = [{"status": "accepted", "label": "b.3"}]
    assert asyncio.run(router.route(BUY, "c3"))["venue"] == "b"
    assert len(calls.submits) == 5


def test_router_when_venue_answers_unknown_or_other_reject_then_no_second_send(
        tmp_path) -> None:
    calls = ScriptedCalls()
    router = make_router(tmp_path, calls)
    calls.replies["root/a"] = [{"status": "unknown", "label": "a.1", "reason": "timeout"},
                               {"status": "rejected", "code": 11030, "reason": "storm"}]
    assert asyncio.run(router.route(BUY, "u1"))["status"] == "unknown"
    assert asyncio.run(router.route(BUY, "u2"))["status"] == "rejected"
    assert [p for p, _ in calls.submits] == ["root/a", "root/a"]


def test_router_when_every_venue_refuses_or_is_down_then_refused_or_denied_as_data(
        tmp_path) -> None:
    calls = ScriptedCalls()
    router = make_router(tmp_path, calls)
    calls.replies["root/a"] = [{"status": "refused", "reason": "connector is STARTING"}]
    calls.replies["root/b"] = [{"status": "refused", "reason": "connector is DEGRADED"}]
    out = asyncio.run(router.route(BUY, "r1"))
    assert out["status"] == "refused" and out["reason"] == "all_venues_refused"
    assert "a: connector is STARTING" in out["detail"]
    calls.states = {"root/a": "DEGRADED", "root/b": None}
    out = asyncio.run(router.route(BUY, "r2"))
    assert out["status"] == "denied" and out["reason"] == "no_venue"
    assert out["skipped"] == {"a": "connector is DEGRADED", "b": "connector unreachable"}
    assert len(calls.submits) == 2


def test_router_when_same_id_retried_in_flight_done_or_after_crash_then_one_send(
        tmp_path) -> None:
    calls = ScriptedCalls()

    async def concurrent() -> list[dict[str, Any]]:
        calls.reached, calls.release = asyncio.Event(), asyncio.Event()
        router = make_router(tmp_path / "one", calls)
        first = asyncio.ensure_future(router.route(BUY, "k1"))
        await calls.reached.wait()
        second = asyncio.ensure_future(router.route(BUY, "k1"))
        calls.release.set()
        return [await first, await second, await router.route(BUY, "k1")]

    first, second, third = asyncio.run(concurrent())
    assert first["status"] == "accepted" and len(calls.submits) == 1
    assert second == {**first, "duplicate": True} == third
    conflict = asyncio.run(make_router(tmp_path / "one", calls).route(
        {**BUY, "amount": 20.0}, "k1"))
    assert conflict["status"] == "denied" and "different order" in conflict["detail"]

    async def crash_mid_send() -> None:  # "send" journaled, then the router dies
        calls.reached, calls.release = asyncio.Event(), asyncio.Event()
        router = make_router(tmp_path / "two", calls)
        task = asyncio.ensure_future(router.route(BUY, "k2"))
        await calls.reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(crash_mid_send())
    assert len(calls.submits) == 2
    reborn = make_router(tmp_path / "two", calls)
    assert reborn.log.pending() == ["k2"]
    out = asyncio.run(reborn.route(BUY, "k2"))
    assert out["status"] == "unknown" and out["venue"] == "a" and "never resent" in out["reason"]
    assert asyncio.run(reborn.route(BUY, "k2"))["duplicate"] is True
    assert len(calls.submits) == 2  # never a second send


# --- the real thing: Ray, two venue processes, connectors, a risk book -----------------------
KEYS = {"bastion-test": "s3cret-not-for-production"}


@pytest.fixture(scope="module")
def venues() -> Iterator[dict[str, VenueProcess]]:
    procs: dict[str, VenueProcess] = {}
    try:
        for name, seed in (("v1", 1), ("v2", 2)):
            procs[name] = VenueProcess.start(name, seed=seed, keys=KEYS, speedup=60.0)
        yield procs
    finally:
        for proc in procs.values():
            proc.stop()


@pytest.fixture
def fresh(venues: dict[str, VenueProcess]) -> Iterator[dict[str, VenueProcess]]:
    yield venues
    for proc in venues.values():
        if proc.alive():
            rpc(proc, "private/simulator/set_faults", {"reset": True})


def rpc(venue: VenueProcess, method: str, params: dict | None = None) -> Any:
    (cid, secret), = KEYS.items()
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": method,
                       "params": params or {}}).encode()
    req = urllib.request.Request(
        f"{venue.http_url}/api/v2/{method}", data=body, method="POST",
        headers={"Content-Type": "application/json", "Authorization": "Basic " +
                 base64.b64encode(f"{cid}:{secret}".encode()).decode()})
    with urllib.request.urlopen(req, timeout=10) as resp:
        reply = json.loads(resp.read())
    assert "error" not in reply, reply
    return reply["result"]


def orders_created(venue: VenueProcess) -> int:
    return rpc(venue, "public/simulator/status")["engine"]["orders_created"]


def routing_tree(venues: dict[str, VenueProcess]) -> SupervisorSpec:
    (cid, secret), = KEYS.items()
    subscribers = ["root/book", "root/router"]
    children: list[ChildSpec] = [ChildSpec(
        id="book", cls="actors.risk_book:RiskBook", backoff=Backoff(initial_s=0.0),
        kwargs={"book_id": "main", "instruments": [PERP],
                "limits": {"max_orders_per_s": 100.0}})]
    for name, proc in venues.items():
        children.append(ChildSpec(
            id=name, cls="actors.connector:VenueConnector", backoff=Backoff(initial_s=0.0),
            kwargs={"venue": name, "ws_url": proc.ws_url, "client_id": cid,
                    "client_secret": secret, "instruments": [PERP],
                    "subscribers": subscribers}))
    children.append(ChildSpec(
        id="router", cls="actors.router:OrderRouter", backoff=Backoff(initial_s=0.0),
        kwargs={"venues": {name: f"root/{name}" for name in venues}, "risk_book": "root/book",
                "instruments_by_venue": {name: [PERP] for name in venues},
                "venue_cooldown_s": 30.0}))
    return SupervisorSpec(id="root", intensity=10, period_s=60, children=children)


def get(tree: Any, path: str, method: str, *args: Any, timeout_s: float = 30.0) -> Any:
    return ray.get(getattr(tree.actor(path, 10), method).remote(*args), timeout=timeout_s)


def start_routing(fresh: dict[str, VenueProcess], namespace: str, store_url: str,
                  trees: list) -> Any:
    tree = start_tree(routing_tree(fresh), namespace=namespace, store_url=store_url)
    trees.append(tree)
    for name in fresh:
        wait_until(lambda n=name: get(tree, f"root/{n}", "state", timeout_s=5) == "RUNNING",
                   60, f"connector {name} RUNNING")

    def quoted() -> bool:  # marks reached the risk book and the router from both venues
        st = get(tree, "root/router", "status", timeout_s=5)
        book_ok = get(tree, "root/book", "check_order", {"instrument_name": PERP,
                                                         "direction": "buy", "amount": 10.0},
                      timeout_s=5).ok
        return book_ok and len(st["quotes"]) == len(fresh)

    wait_until(quoted, 60, "marks at the risk book and the router")
    return tree


def test_route_when_retried_with_same_id_and_after_router_sigkill_then_venue_saw_one_order(
        fresh, namespace, store_url, trees) -> None:
    tree = start_routing(fresh, namespace, store_url, trees)
    before = {n: orders_created(p) for n, p in fresh.items()}
    first = get(tree, "root/router", "route", BUY, "mm.1")
    assert first["status"] == "accepted", first
    assert first["venue"] in fresh and first["label"] and "best ask" in first["route_reason"]
    again = get(tree, "root/router", "route", BUY, "mm.1")
    assert again == {**first, "duplicate": True}
    os.kill(tree.child("root/router").pid, signal.SIGKILL)
    wait_until(lambda: tree.child("root/router").restarts == 1
               and tree.child("root/router").status == "running", 30, "router restarted")
    after_crash = get(tree, "root/router", "route", BUY, "mm.1")
    assert after_crash == {**first, "duplicate": True}
    created = {n: orders_created(p) - before[n] for n, p in fresh.items()}
    assert created == {n: int(n == first["venue"]) for n in fresh}, created
    denied = get(tree, "root/router", "route", {**BUY, "amount": 5e6}, "mm.2")
    assert denied["status"] == "denied" and denied["reason"] == "risk_denied"
    assert denied["risk"]["reason"] == "max_position_usd"
    assert sum(orders_created(p) - before[n] for n, p in fresh.items()) == 1


def test_route_when_chosen_venue_has_outage_then_rerouted_and_with_both_out_refused(
        fresh, namespace, store_url, trees) -> None:
    tree = start_routing(fresh, namespace, store_url, trees)
    probe = get(tree, "root/router", "route", BUY, "probe")
    assert probe["status"] == "accepted", probe
    down = probe["venue"]
    other = next(n for n in fresh if n != down)
    rpc(fresh[down], "private/simulator/set_faults", {"outage": True})
    out = get(tree, "root/router", "route", {**BUY, "direction": "sell"}, "after-outage")
    # the venue with the outage is either tried first and answers 13028, or already skipped
    assert out["status"] == "accepted" and out["venue"] == other, out
    tried = [a["venue"] for a in out["attempts"]]
    assert tried in ([down, other], [other]), out["attempts"]
    rpc(fresh[other], "private/simulator/set_faults", {"outage": True})
    both = get(tree, "root/router", "route", BUY, "both-out")
    assert both["status"] in ("refused", "denied"), both
    text = json.dumps(both)
    assert other in text and ("temporarily_unavailable" in text or "13028" in text
                              or "cooling down" in text), both
    status = get(tree, "root/router", "status")
    assert status["by_status"]["accepted"] == 2 and not status["pending"]
