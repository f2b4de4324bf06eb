"""The venue dead-man's switch (``private/cancel_all_after``) and the connector that arms it.

Venue level: a real simulator process, real WebSocket and HTTP clients: the countdown fires on
a connection that stays open and silent, only for the armed label prefix and account; a re-arm
keeps orders alive; ``timeout=0`` disarms; bad params are refused naming the param.
Connector level: a role-gated connector on the real Ray cluster arms the switch for its
epoch's labels from the lease, disarms on a clean deactivation, and when its worker is
SIGSTOPped (socket open, no renewals, no cancels) the venue cancels its orders by itself.
The pure parts (timeout policy, coalescing, outage deferral) run on fakes and a manual clock.

Waits are on conditions; "still open" is checked against a witness switch armed after the one
under test with the same countdown: once the witness has fired, the other would have too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from actors.connector_deadman import DeadmanArmer, DeadmanConfigError, DeadmanPolicy
from actors.venue.auth import basic_authorization
from actors.venue.process import VenueProcess
from tests.conftest import wait_until
from tests.test_venue_server import KEYS, WsClient, private, run

BTC = "BTC-PERPETUAL"
PASSIVE_PX = 1000.0  # far below the market: the orders rest
WAIT_S = 10.0


@pytest.fixture(scope="module")
def venue() -> Iterator[VenueProcess]:
    proc = VenueProcess.start("deadman-venue", keys=KEYS, speedup=60.0)
    try:
        yield proc
    finally:
        proc.stop()
        assert not proc.alive()


class Freezer:
    """Fault injection: SIGSTOP a process (a hung worker: its sockets stay open) and SIGCONT
    it again; whatever is still frozen is thawed when the test ends."""

    def __init__(self) -> None:
        self.frozen: list[int] = []

    def freeze(self, pid: int) -> None:
        assert pid != os.getpid()
        os.kill(pid, signal.SIGSTOP)
        self.frozen.append(pid)

    def thaw_all(self) -> None:
        while self.frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.frozen.pop(), signal.SIGCONT)


@pytest.fixture
def freezer(trees: list) -> Iterator[Freezer]:
    """Set up after ``trees``, so torn down before it: thawed before the tree is stopped."""
    f = Freezer()
    try:
        yield f
    finally:
        f.thaw_all()


def post(venue: VenueProcess, method: str, params: dict[str, Any], account: str = "alice"
         ) -> dict[str, Any]:
    """A private JSON-RPC POST (JSON types kept as sent); the whole reply."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": f"private/{method}",
                       "params": params}).encode()
    req = urllib.request.Request(f"{venue.http_url}/api/v2/private/{method}", data=body,
                                 method="POST", headers={
                                     "Content-Type": "application/json",
                                     "Authorization": basic_authorization(account,
                                                                          KEYS[account])})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read())


def result(venue: VenueProcess, method: str, params: dict[str, Any],
           account: str = "alice") -> Any:
    reply = private(venue, method, params, account)  # GET: query params coerced by type
    assert "result" in reply, reply
    return reply["result"]


def rest(venue: VenueProcess, label: str, account: str = "alice") -> str:
    order = result(venue, "buy", {"instrument_name": BTC, "amount": 10, "price": PASSIVE_PX,
                                  "label": label}, account)["order"]
    assert order["order_state"] == "open", order
    return str(order["order_id"])


def state(venue: VenueProcess, label: str, account: str = "alice") -> dict[str, Any]:
    found = result(venue, "get_order_state_by_label", {"currency": "BTC", "label": label},
                   account)
    assert isinstance(found, list) and len(found) == 1, found
    return found[0]


def deadman_counts(venue: VenueProcess) -> Counter[str]:
    reply = urllib.request.urlopen(f"{venue.http_url}/api/v2/public/simulator/status",
                                   timeout=WAIT_S)
    return Counter(json.loads(reply.read())["result"]["deadman"])


def prefix() -> str:
    return f"p{uuid.uuid4().hex[:8]}."


# --- venue ------------------------------------------------------------------------------------
def test_cancel_all_after_when_countdown_expires_on_a_silent_connection_then_only_the_prefix(
        venue: VenueProcess) -> None:
    mine, other = prefix(), prefix()
    before = deadman_counts(venue)

    async def body(c: WsClient) -> None:
        await c.login()
        await c.result("private/subscribe", {"channels": [f"user.orders.{BTC}.raw"]})
        for lab in (f"{mine}1", f"{mine}2", f"{other}1"):
            await c.result("private/buy", {"instrument_name": BTC, "amount": 10,
                                           "price": PASSIVE_PX, "label": lab})
        rest(venue, f"{mine}1", account="bob")  # same label prefix, another account
        t0 = time.monotonic()
        armed = await c.result("private/cancel_all_after", {"timeout": 300,
                                                            "label_prefix": mine})
        assert armed["armed"] and armed["timeout"] == 300 and armed["label_prefix"] == mine
        assert abs(armed["trigger_time"] - armed["now"] - 300) <= 1, armed
        # From here the client sends nothing; the connection stays open.
        def cancelled_labels() -> set[str] | None:
            got = {d["label"] for d in c.channel(f"user.orders.{BTC}.raw")
                   if d["order_state"] == "cancelled"}
            return got if len(got) >= 2 else None

        cancelled = await c.wait_for(cancelled_labels,
                                     "user.orders notifications of the dead-man's cancels")
        elapsed_s = time.monotonic() - t0
        assert cancelled == {f"{mine}1", f"{mine}2"}, cancelled
        assert 0.25 <= elapsed_s < 0.3 + 3.0, elapsed_s
        assert not c.closed.is_set()
        assert await c.result("private/get_cancel_all_after") == []  # fired: disarmed

    run(venue, body)
    for lab in (f"{mine}1", f"{mine}2"):
        order = state(venue, lab)
        assert (order["order_state"], order["cancel_reason"]) == ("cancelled", "deadman")
    assert state(venue, f"{other}1")["order_state"] == "open"
    assert state(venue, f"{mine}1", account="bob")["order_state"] == "open"
    counts = deadman_counts(venue) - before
    assert (counts["arms"], counts["fired"], counts["cancelled"]) == (1, 1, 2), counts
    for account in KEYS:
        result(venue, "cancel_all", {}, account)


def test_cancel_all_after_when_rearmed_before_expiry_then_orders_stay_open(
        venue: VenueProcess) -> None:
    keep, witness = prefix(), prefix()
    rest(venue, f"{keep}1")
    rest(venue, f"{witness}1")
    triggers = [result(venue, "cancel_all_after", {"timeout": 1500, "label_prefix": keep})
                ["trigger_time"]]
    result(venue, "cancel_all_after", {"timeout": 1500, "label_prefix": witness})
    deadline = time.monotonic() + 30.0
    while state(venue, f"{witness}1")["order_state"] == "open":  # until the witness fires
        assert time.monotonic() < deadline, "the witness switch never fired"
        triggers.append(result(venue, "cancel_all_after", {"timeout": 1500,
                                                           "label_prefix": keep})
                        ["trigger_time"])
        time.sleep(0.1)  # the re-arm cadence, not a wait for a result
    assert state(venue, f"{witness}1")["cancel_reason"] == "deadman"
    assert state(venue, f"{keep}1")["order_state"] == "open"
    assert len(triggers) >= 5 and triggers == sorted(triggers), triggers
    armed = result(venue, "get_cancel_all_after", {})
    assert [s["label_prefix"] for s in armed] == [keep] and armed[0]["timeout"] == 1500
    off = result(venue, "cancel_all_after", {"timeout": 0, "label_prefix": keep})
    assert off == {"armed": False, "timeout": 0, "trigger_time": None, "label_prefix": keep,
                   "now": off["now"]}
    result(venue, "cancel_all", {})


def test_cancel_all_after_when_timeout_0_then_disarmed_and_never_fires(
        venue: VenueProcess) -> None:
    off, witness = prefix(), prefix()
    before = deadman_counts(venue)
    rest(venue, f"{off}1")
    rest(venue, f"{witness}1")
    assert result(venue, "cancel_all_after", {"timeout": 300, "label_prefix": off})["armed"]
    assert not result(venue, "cancel_all_after", {"timeout": 0, "label_prefix": off})["armed"]
    result(venue, "cancel_all_after", {"timeout": 300, "label_prefix": witness})
    wait_until(lambda: state(venue, f"{witness}1")["order_state"] == "cancelled", WAIT_S,
               "the witness switch to fire")
    assert state(venue, f"{off}1")["order_state"] == "open"
    assert result(venue, "get_cancel_all_after", {}) == []
    counts = deadman_counts(venue) - before
    assert (counts["arms"], counts["disarms"], counts["fired"]) == (2, 1, 1), counts
    result(venue, "cancel_all", {})


@pytest.mark.parametrize(("params", "param", "reason"), [
    ({}, "timeout", "timeout_missing"),
    ({"timeout": "1000"}, "timeout", "timeout_wrong_type"),
    ({"timeout": 1000.5}, "timeout", "timeout_wrong_type"),
    ({"timeout": True}, "timeout", "timeout_wrong_type"),
    ({"timeout": 99}, "timeout", "timeout_must_be_0_or_100_to_600000_ms"),
    ({"timeout": -1}, "timeout", "timeout_must_be_0_or_100_to_600000_ms"),
    ({"timeout": 600_001}, "timeout", "timeout_must_be_0_or_100_to_600000_ms"),
    ({"timeout": 1000, "label_prefix": 7}, "label_prefix", "label_prefix_wrong_type"),
    ({"timeout": 1000, "label_prefix": "x" * 65}, "label_prefix",
     "label_prefix_longer_than_64"),
])
def test_cancel_all_after_when_params_bad_then_refused_naming_the_param(
        venue: VenueProcess, params: dict[str, Any], param: str, reason: str) -> None:
    reply = post(venue, "cancel_all_after", params)
    assert reply["error"]["code"] == -32602, reply
    assert reply["error"]["data"] == {"reason": reason, "param": param}


def test_cancel_all_after_when_too_many_prefixes_then_refused_and_existing_kept(
        venue: VenueProcess) -> None:
    base = prefix()
    names = [f"{base}{i}." for i in range(16)]
    try:
        for name in names:
            assert post(venue, "cancel_all_after", {"timeout": 600_000,
                                                    "label_prefix": name})["result"]["armed"]
        again = post(venue, "cancel_all_after", {"timeout": 600_000, "label_prefix": names[0]})
        assert again["result"]["armed"]  # re-arming a known prefix is not a new switch
        refused = post(venue, "cancel_all_after", {"timeout": 1000, "label_prefix": "one.more"})
        assert refused["error"]["data"] == {"reason": "more_than_16_switches_armed",
                                            "param": "label_prefix"}
        assert post(venue, "cancel_all_after", {"timeout": 1000}, account="bob")["result"][
            "armed"]  # another account has its own budget
    finally:
        for name in names:
            post(venue, "cancel_all_after", {"timeout": 0, "label_prefix": name})
        post(venue, "cancel_all_after", {"timeout": 0}, account="bob")
    assert result(venue, "get_cancel_all_after", {}) == []


# --- pure parts -------------------------------------------------------------------------------
def test_deadman_switches_when_venue_in_outage_then_due_switch_fires_after_it() -> None:
    from actors.venue import Faults, ManualClock, VenueConfig, VenueEngine, default_instruments
    from actors.venue.deadman import DeadmanSwitches

    clock = ManualClock()
    engine = VenueEngine(VenueConfig(default_instruments(clock.now_s())), clock)
    switches = DeadmanSwitches(engine, clock)
    engine.buy("a", BTC, 10, price=PASSIVE_PX, label="s.1")
    assert switches.arm("a", {"timeout": 1000, "label_prefix": "s."})["armed"]  # type: ignore[index]
    clock.advance(0.999)
    assert switches.fire_due() == [] and switches.counts["fired"] == 0
    engine.set_faults(Faults(outage=True))
    clock.advance(0.001)
    assert switches.fire_due() == [] and switches.counts["deferred"] == 1
    engine.set_faults(Faults())
    assert switches.fire_due() == ["a"] and switches.status() == {
        "armed": 0, "arms": 1, "deferred": 1, "fired": 1, "cancelled": 1}
    assert engine.get_order_state_by_label("a", "s.1").cancel_reason == "deadman"  # type: ignore[union-attr]


def test_deadman_policy_when_lease_left_then_timeout_is_left_plus_margin_floored_and_capped(
        ) -> None:
    policy = DeadmanPolicy(margin_s=0.25, min_timeout_s=0.5)
    assert policy.lease_timeout_s(2.0) == 2.25
    assert policy.lease_timeout_s(0.1) == 0.5 and policy.lease_timeout_s(-3.0) == 0.5
    assert policy.lease_timeout_s(float("-inf")) == 0.5
    assert policy.lease_timeout_s(10_000.0) == 600.0
    for bad in ({"margin_s": -1.0}, {"min_timeout_s": 0.01}, {"periodic_s": 0.5},
                {"periodic_s": float("nan")}, {"periodic_s": True}):
        with pytest.raises(DeadmanConfigError) as err:
            DeadmanPolicy(**bad)  # type: ignore[arg-type]
        assert err.value.field == ("deadman_s" if "periodic_s" in bad else next(iter(bad)))


def test_deadman_armer_when_requests_overlap_then_coalesced_in_order_and_errors_counted(
        ) -> None:
    sent: list[dict[str, Any]] = []
    gate = asyncio.Event()
    now = [100.0]

    async def call(method: str, params: dict[str, Any]) -> Any:
        assert method == "private/cancel_all_after"
        sent.append(params)
        await gate.wait()
        if params["label_prefix"] == "bad.":
            raise ConnectionError("not connected")
        return {"armed": params["timeout"] > 0, "trigger_time": 1234}

    async def main() -> Counter[str]:
        counters: Counter[str] = Counter()
        armer = DeadmanArmer(call, counters, "deribit", DeadmanPolicy(margin_s=0.25),
                             now_s=lambda: now[0])
        first = asyncio.create_task(armer.arm_for_lease("e1.c.", 102.0))
        await asyncio.sleep(0)
        await armer.arm_for_lease("e1.c.", 103.0)  # in flight: coalesced, latest wins
        await armer.arm_for_lease("e1.c.", 104.0)
        await armer.disarm("e0.c.")
        await armer.arm_for("bad.", 5.0)
        now[0] = 101.0
        gate.set()
        await first
        assert armer.armed == {"e1.c.": 1234.0}
        return counters

    counters = asyncio.run(main())
    assert sent == [{"timeout": 2250, "label_prefix": "e1.c."},
                    {"timeout": 3250, "label_prefix": "e1.c."},  # 104 - 101 + 0.25
                    {"timeout": 0, "label_prefix": "e0.c."},
                    {"timeout": 5000, "label_prefix": "bad."}]
    assert counters == Counter({"deadman_coalesced": 4, "deadman_armed": 2,
                                "deadman_disarmed": 1, "deadman_arm_failed": 1})


# --- connector --------------------------------------------------------------------------------
def test_gated_connector_when_worker_frozen_then_venue_cancels_its_epoch_orders_in_time(
        namespace, store_url, trees, freezer: Freezer) -> None:
    import ray

    from supervisors import ChildSpec, SupervisorSpec, start_tree
    from tests.test_connector import KEYS as CONNECTOR_KEYS
    from tests.test_connector import rpc

    (cid, secret), = CONNECTOR_KEYS.items()
    with VenueProcess.start("deribit", seed=11, keys=CONNECTOR_KEYS, speedup=60.0) as venue:
        spec = SupervisorSpec(id="root", children=[ChildSpec(
            id="tokyo", cls="actors.connector:VenueConnector", kwargs={
                "venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                "client_secret": secret, "instruments": [BTC], "role_gated": True})])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        tokyo = tree.actor("root/tokyo")
        wait_until(lambda: ray.get(tokyo.state.remote(), timeout=5) == "RUNNING", 60,
                   "connector RUNNING")

        def role(kind: str, epoch: int, valid_for_s: float = 30.0) -> None:
            ray.get(tokyo.on_role_event.remote(
                {"kind": kind, "resource": "deribit", "epoch": epoch, "valid_for_s": valid_for_s,
                 "sent_wall_s": time.time(), "reason": "test"}), timeout=10)

        def switches() -> list[dict[str, Any]]:
            return rpc(venue, "private/get_cancel_all_after")  # type: ignore[return-value]

        # Active: armed for this epoch's labels, with the lease's window as the countdown.
        role("activate", 1)
        armed = wait_until(lambda: switches(), 20, "switch armed on activation")
        assert [s["label_prefix"] for s in armed] == ["e1.root-tokyo."]
        assert 29_000 <= armed[0]["timeout"] <= 30_300, armed
        # A clean deactivation (nothing left resting) disarms it.
        role("deactivate", 1)
        wait_until(lambda: switches() == [], 20, "switch disarmed on deactivation")

        role("activate", 2)
        wait_until(lambda: ray.get(tokyo.status.remote(), timeout=5)["role"]["state"]
                   == "ACTIVE", 20, "tokyo ACTIVE")
        orders = [ray.get(tokyo.submit.remote({"instrument": BTC, "direction": "buy",
                                               "amount": 10, "type": "limit",
                                               "price": PASSIVE_PX}, 1.0), timeout=30)
                  for _ in range(2)]
        assert all(o["status"] == "accepted" and o["state"] == "open" for o in orders), orders
        # The site that took over on the same account (epoch 3) has an order resting too.
        london = rpc(venue, "private/buy", {"instrument_name": BTC, "amount": 10,
                                            "price": PASSIVE_PX, "label": "e3.root-london.1"})
        # The last renewal: 2.5 s of lease left. Freeze the worker once it is armed.
        role("renew", 2, valid_for_s=2.5)
        armed = wait_until(lambda: [s for s in switches() if s["timeout"] <= 3000], 20,
                           "switch re-armed by the renewal")
        timeout_s = armed[0]["timeout"] / 1000.0
        pid = tree.child("root/tokyo").pid
        assert pid is not None
        freezer.freeze(pid)
        try:
            t0 = time.monotonic()
            wait_until(lambda: all(rpc(venue, "private/get_order_state", {
                "order_id": o["order_id"]})["order_state"] == "cancelled" for o in orders),
                timeout_s + 10.0, "the venue to cancel the frozen connector's orders")
            elapsed_s = time.monotonic() - t0
            print(f"frozen connector's orders cancelled by the venue after {elapsed_s:.2f} s "
                  f"(countdown {timeout_s:.2f} s)")
            for o in orders:
                got = rpc(venue, "private/get_order_state", {"order_id": o["order_id"]})
                assert got["cancel_reason"] == "deadman", got  # not the connector, not COD
            kept = rpc(venue, "private/get_order_state",
                       {"order_id": london["order"]["order_id"]})  # type: ignore[index]
            assert kept["order_state"] == "open"
            status = rpc(venue, "public/simulator/status")
            assert status["deadman"]["fired"] == 1 and status["deadman"]["cancelled"] == 2
            assert status["connections"].get("cod_triggered", 0) == 0
        finally:
            freezer.thaw_all()
        # Thawed: it lapses (no renewal came) and its ledger hears of the cancels.
        status = wait_until(lambda: (s := ray.get(tokyo.status.remote(), timeout=5))
                            ["open_orders"] == 0 and s["role"]["state"] == "STANDBY" and s,
                            30, "connector thawed, lapsed, ledger up to date")
        assert status["counters"]["deadman_armed"] >= 3
        assert status["counters"]["deadman_disarmed"] == 1
        assert not status["counters"].get("deadman_arm_failed")


def test_ungated_connector_when_deadman_s_then_rearmed_while_running_and_fires_when_frozen(
        namespace, store_url, trees, freezer: Freezer) -> None:
    import ray

    from actors.connector import VenueConnector
    from supervisors import ChildSpec, SupervisorSpec, start_tree
    from tests.test_connector import KEYS as CONNECTOR_KEYS
    from tests.test_connector import rpc

    with pytest.raises(DeadmanConfigError, match="deadman_s"):
        VenueConnector("deribit", "ws://127.0.0.1:9", "c", "s", [BTC], role_gated=True,
                       deadman_s=5.0)
    (cid, secret), = CONNECTOR_KEYS.items()
    with VenueProcess.start("deribit", seed=12, keys=CONNECTOR_KEYS, speedup=60.0) as venue:
        spec = SupervisorSpec(id="root", children=[ChildSpec(
            id="solo", cls="actors.connector:VenueConnector", kwargs={
                "venue": "deribit", "ws_url": venue.ws_url, "client_id": cid,
                "client_secret": secret, "instruments": [BTC], "deadman_s": 1.0})])
        tree = start_tree(spec, namespace=namespace, store_url=store_url)
        trees.append(tree)
        solo = tree.actor("root/solo")
        wait_until(lambda: ray.get(solo.state.remote(), timeout=5) == "RUNNING", 60,
                   "connector RUNNING")
        order = ray.get(solo.submit.remote({"instrument": BTC, "direction": "buy",
                                            "amount": 10, "type": "limit",
                                            "price": PASSIVE_PX}, 1.0), timeout=30)
        assert order["status"] == "accepted" and order["label"].startswith("root-solo.")

        def switch() -> dict[str, Any] | None:
            found = rpc(venue, "private/get_cancel_all_after")
            return found[0] if found else None  # type: ignore[index]

        first = wait_until(switch, 20, "switch armed while RUNNING")
        assert (first["label_prefix"], first["timeout"]) == ("root-solo.", 1000)
        wait_until(lambda: (s := switch()) and s["trigger_time"] >= first["trigger_time"] + 600,
                   20, "switch re-armed while RUNNING")
        assert rpc(venue, "private/get_order_state",
                   {"order_id": order["order_id"]})["order_state"] == "open"
        freezer.freeze(tree.child("root/solo").pid)
        try:
            got = wait_until(lambda: (o := rpc(venue, "private/get_order_state", {
                "order_id": order["order_id"]}))["order_state"] == "cancelled" and o,
                1.0 + 10.0, "the venue to cancel the frozen connector's order")
            assert got["cancel_reason"] == "deadman", got
        finally:
            freezer.thaw_all()
        counters = wait_until(lambda: (c := ray.get(solo.status.remote(), timeout=5)[
            "counters"]).get("deadman_armed", 0) > 3 and c, 20, "re-arming again after thaw")
        assert not counters.get("deadman_arm_failed")
