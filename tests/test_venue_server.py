"""Venue simulator as a network peer: a real server process (``VenueProcess``), real aiohttp
WebSocket clients and real HTTP requests. Deribit API v2 auth, subscriptions, order round trips,
idempotent labels, heartbeats, cancel-on-disconnect, run-time faults and bad input.

Every wait is on a condition with a timeout; the process is stopped by its fixture."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from actors.venue.auth import (
    basic_authorization,
    client_signature_params,
    hmac_authorization,
)
from actors.venue.feed import BookUpdate, ChangeIdTracker
from actors.venue.outbox import BookAggregator, Frame, Outbox
from actors.venue.process import REPO_ROOT, VenueProcess, VenueProcessError
from tests.conftest import _alive, wait_until

KEYS = {"alice": "alice-secret-0001", "bob": "bob-secret-000002"}
BTC = "BTC-PERPETUAL"
WAIT_S = 10.0


# --- clients ------------------------------------------------------------------------------------
def now_ms() -> int:
    return int(time.time() * 1000)


def http(venue: VenueProcess, path: str, params: dict[str, Any] | None = None, *,
         headers: dict[str, str] | None = None, body: str | None = None
         ) -> tuple[int, dict[str, Any]]:
    """GET (or POST ``body``) ``/api/v2/<path>``; the status and the decoded JSON reply."""
    uri = f"/api/v2/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
    req = urllib.request.Request(venue.http_url + uri, data=None if body is None else
                                 body.encode(), headers=headers or {},
                                 method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def private(venue: VenueProcess, method: str, params: dict[str, Any] | None = None,
            account: str = "alice") -> dict[str, Any]:
    """A private HTTP call signed with deri-hmac-sha256; the reply."""
    uri = f"/api/v2/private/{method}" + (
        f"?{urllib.parse.urlencode(params)}" if params else "")
    header = hmac_authorization(account, KEYS[account], "GET", uri, timestamp_ms=now_ms())
    return http(venue, f"private/{method}", params, headers={"Authorization": header})[1]


class WsClient:
    """A JSON-RPC WebSocket client: replies by id, notifications and heartbeats in lists."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse,
                 answer_test_requests: bool) -> None:
        self.session, self.ws = session, ws
        self.answer_test_requests = answer_test_requests
        self.replies: dict[object, dict[str, Any]] = {}
        self.unmatched: list[dict[str, Any]] = []
        self.notifications: list[dict[str, Any]] = []
        self.test_requests = 0
        self.closed = asyncio.Event()
        self._next_id = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, answer_test_requests: bool = True) -> WsClient:
        session = aiohttp.ClientSession()
        ws = await session.ws_connect(url, max_msg_size=0)
        return cls(session, ws, answer_test_requests)

    async def _read(self) -> None:
        try:
            async for msg in self.ws:
                data = json.loads(msg.data)
                if data.get("method") == "heartbeat":
                    self.test_requests += 1
                    if self.answer_test_requests:
                        await self.send({"jsonrpc": "2.0", "id": "hb", "method": "public/test"})
                elif data.get("method") == "subscription":
                    self.notifications.append(data["params"])
                elif data.get("id") is not None:
                    self.replies[data["id"]] = data
                else:
                    self.unmatched.append(data)
                self._changed.set()
        finally:
            self.closed.set()
            self._changed.set()

    async def send(self, obj: object) -> None:
        await self.ws.send_str(json.dumps(obj))

    async def wait_for(self, fn: Callable[[], Any], what: str, timeout_s: float = WAIT_S
                       ) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            value = fn()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}; "
                                     f"last value {value!r}")
            self._changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)

    async def call(self, method: str, params: dict[str, Any] | None = None,
                   timeout_s: float = WAIT_S) -> dict[str, Any]:
        self._next_id += 1
        rid = self._next_id
        await self.send({"jsonrpc": "2.0", "id": rid, "method": method, "params": params or {}})
        return await self.wait_for(lambda: self.replies.pop(rid, None), f"reply to {method}",
                                   timeout_s)

    async def result(self, method: str, params: dict[str, Any] | None = None) -> Any:
        reply = await self.call(method, params)
        assert "result" in reply, reply
        return reply["result"]

    async def login(self, account: str = "alice") -> dict[str, Any]:
        return await self.result("public/auth", {"grant_type": "client_credentials",
                                                 "client_id": account,
                                                 "client_secret": KEYS[account]})

    def channel(self, name: str) -> list[Any]:
        return [n["data"] for n in self.notifications if n["channel"] == name]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await self.session.close()


def run(venue: VenueProcess, body: Callable[..., Awaitable[None]], *, clients: int = 1,
        answer_test_requests: bool = True) -> None:
    """Run ``body(*clients)`` with connected WebSocket clients, closing them afterwards."""
    async def main() -> None:
        conns = [await WsClient.connect(venue.ws_url, answer_test_requests)
                 for _ in range(clients)]
        try:
            await asyncio.wait_for(body(*conns), 60.0)
        finally:
            for c in conns:
                await c.close()
    asyncio.run(main())


def to_update(data: dict[str, Any]) -> BookUpdate:
    return BookUpdate(data["instrument_name"], data["type"], data["change_id"],
                      data.get("prev_change_id"), data["timestamp"] / 1000.0,
                      tuple(tuple(x) for x in data["bids"]),  # type: ignore[misc]
                      tuple(tuple(x) for x in data["asks"]))  # type: ignore[misc]


def label() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


# --- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def venue() -> Iterator[VenueProcess]:
    proc = VenueProcess.start("test-venue", keys=KEYS, speedup=120.0, min_heartbeat_s=0.3)
    try:
        wait_until(lambda: quotes(proc)[0], WAIT_S, "BTC market data")  # the file starts later
        yield proc
    finally:
        proc.stop()
        assert not proc.alive()


@pytest.fixture
def fresh(venue: VenueProcess) -> Iterator[VenueProcess]:
    """The shared venue, put back to no faults and no open orders after the test."""
    yield venue
    if venue.alive():
        private(venue, "simulator/set_faults", {"reset": "true"})
        for account in KEYS:
            private(venue, "cancel_all", account=account)


def quotes(venue: VenueProcess, name: str = BTC) -> tuple[float, float]:
    ticker = http(venue, "public/ticker", {"instrument_name": name})[1]["result"]
    return ticker["best_bid_price"], ticker["best_ask_price"]


def passive_prices(venue: VenueProcess) -> tuple[float, float]:
    """A buy and a sell price far from the market (0.5 tick grid), so the orders rest."""
    bid, ask = quotes(venue)
    return math.floor(bid * 0.8) * 1.0, math.ceil(ask * 1.2) * 1.0


def status(venue: VenueProcess) -> dict[str, Any]:
    return http(venue, "public/simulator/status")[1]["result"]


# --- auth ---------------------------------------------------------------------------------------
def test_auth_when_client_credentials_then_private_ws_works_and_wrong_secret_is_13004(
        fresh: VenueProcess) -> None:
    async def body(c: WsClient) -> None:
        anon = await c.call("private/get_positions")
        assert anon["error"]["code"] == 13009
        bad = await c.call("public/auth", {"grant_type": "client_credentials",
                                           "client_id": "alice", "client_secret": "nope-nope"})
        assert bad["error"]["code"] == 13004
        unknown = await c.call("public/auth", {"grant_type": "client_credentials",
                                               "client_id": "mallory", "client_secret": "x" * 9})
        assert unknown["error"]["code"] == 13004
        token = await c.login()
        assert token["token_type"] == "bearer" and token["expires_in"] > 0
        assert {"access_token", "refresh_token", "scope"} <= set(token)
        assert isinstance(await c.result("private/get_positions"), list)
        summary = await c.result("private/get_account_summary", {"currency": "BTC"})
        assert summary["currency"] == "BTC" and summary["equity"] > 0
    run(fresh, body)


def test_auth_when_client_signature_then_token_and_bad_stale_or_replayed_refused(
        fresh: VenueProcess) -> None:
    async def body(c: WsClient) -> None:
        good = client_signature_params("bob", KEYS["bob"], now_ms(), data="hello")
        assert "access_token" in await c.result("public/auth", good)
        replay = await c.call("public/auth", good)
        assert replay["error"]["data"]["reason"] == "replayed_signature"
        wrong = client_signature_params("bob", "not-the-secret", now_ms())
        assert (await c.call("public/auth", wrong))["error"]["code"] == 13004
        stale = client_signature_params("bob", KEYS["bob"], now_ms() - 600_000)
        stale_reply = await c.call("public/auth", stale)
        assert stale_reply["error"]["code"] == 13004
        assert stale_reply["error"]["data"]["reason"] == "stale_timestamp"
        token = await c.login("bob")
        refreshed = await c.result("public/auth", {"grant_type": "refresh_token",
                                                   "refresh_token": token["refresh_token"]})
        assert refreshed["access_token"] != token["access_token"]
        again = await c.call("public/auth", {"grant_type": "refresh_token",
                                             "refresh_token": token["refresh_token"]})
        assert again["error"]["code"] == 13004  # a refresh token is single-use
        # an access_token param authorizes a private call on an unauthenticated connection
        other = await WsClient.connect(fresh.ws_url)
        try:
            ok = await other.call("private/get_open_orders_by_currency",
                                  {"currency": "BTC", "access_token": refreshed["access_token"]})
            assert ok["result"] == []
        finally:
            await other.close()
    run(fresh, body)


def test_http_auth_when_hmac_bearer_or_basic_then_accepted_and_bad_ones_13009(
        fresh: VenueProcess) -> None:
    params = {"currency": "BTC"}
    uri = "/api/v2/private/get_account_summary?currency=BTC"
    status_code, reply = http(fresh, "private/get_account_summary", params, headers={
        "Authorization": hmac_authorization("alice", KEYS["alice"], "GET", uri,
                                            timestamp_ms=now_ms())})
    assert status_code == 200 and reply["result"]["currency"] == "BTC"
    signed = hmac_authorization("alice", KEYS["alice"], "GET", uri, timestamp_ms=now_ms())
    assert http(fresh, "private/get_account_summary", params,
                headers={"Authorization": signed})[0] == 200
    refused = {
        "replayed": signed,
        "wrong_secret": hmac_authorization("alice", "wrong-secret", "GET", uri,
                                           timestamp_ms=now_ms()),
        "stale": hmac_authorization("alice", KEYS["alice"], "GET", uri,
                                    timestamp_ms=now_ms() - 300_000),
        "other_uri": hmac_authorization("alice", KEYS["alice"], "GET", uri + "X",
                                        timestamp_ms=now_ms()),
        "bogus_bearer": "Bearer not-a-token",
        "wrong_basic": basic_authorization("alice", "wrong-secret"),
        "garbage": "deri-hmac-sha256 nonsense",
    }
    for case, header in refused.items():
        code, body = http(fresh, "private/get_account_summary", params,
                          headers={"Authorization": header})
        assert (code, body["error"]["code"]) == (401, 13009), case
    assert http(fresh, "private/get_account_summary", params)[1]["error"]["code"] == 13009
    basic = http(fresh, "private/get_account_summary", params,
                 headers={"Authorization": basic_authorization("bob", KEYS["bob"])})
    assert basic[0] == 200
    token = http(fresh, "public/auth", {"grant_type": "client_credentials", "client_id": "bob",
                                        "client_secret": KEYS["bob"]})[1]["result"]
    bearer = http(fresh, "private/get_positions", headers={
        "Authorization": f"Bearer {token['access_token']}"})
    assert bearer[0] == 200 and isinstance(bearer[1]["result"], list)
    body = json.dumps({"jsonrpc": "2.0", "id": 7, "method": "private/get_positions",
                       "params": {}})
    post_header = hmac_authorization("bob", KEYS["bob"], "POST", "/api/v2/private/get_positions",
                                     body, timestamp_ms=now_ms())
    posted = http(fresh, "private/get_positions", headers={
        "Authorization": post_header, "Content-Type": "application/json"}, body=body)
    assert posted[0] == 200 and posted[1]["id"] == 7
    failures = status(fresh)["auth"]["failures"]
    assert failures.get("bad_signature", 0) >= 2 and failures.get("stale_timestamp", 0) >= 1
    assert failures.get("replayed_signature", 0) >= 1


# --- market data --------------------------------------------------------------------------------
def test_subscribe_book_when_authenticated_then_snapshot_then_chained_changes(
        fresh: VenueProcess) -> None:
    raw, agg = f"book.{BTC}.raw", f"book.{BTC}.100ms"

    async def body(c: WsClient, anon: WsClient) -> None:
        left_out = await anon.result("public/subscribe", {"channels": [raw, agg]})
        assert left_out == [agg]  # raw needs an authenticated connection, as on Deribit
        await c.login()
        assert await c.result("private/subscribe", {"channels": [raw, agg, f"ticker.{BTC}.raw",
                                                                 "user.orders.any.any.raw"]}) \
            == [raw, agg, f"ticker.{BTC}.raw", "user.orders.any.any.raw"]
        for client, channel in ((c, raw), (c, agg), (anon, agg)):
            await client.wait_for(lambda cl=client, ch=channel: len(cl.channel(ch)) >= 6,
                                  f"6 messages on {channel}")
        for client, channel in ((c, raw), (c, agg), (anon, agg)):
            updates = [to_update(d) for d in client.channel(channel)]
            assert updates[0].type == "snapshot"
            tracker = ChangeIdTracker()
            verdicts = [tracker.accept(u) for u in updates]
            assert verdicts[0] == "snapshot" and set(verdicts[1:]) == {"ok"}, (channel, verdicts)
        assert c.channel(f"ticker.{BTC}.raw")[0]["instrument_name"] == BTC
        gone = await c.result("public/unsubscribe", {"channels": [raw]})
        assert gone == [raw]
    run(fresh, body, clients=2)


def test_public_market_data_when_queried_then_deribit_shaped_answers(fresh: VenueProcess) -> None:
    instruments = http(fresh, "public/get_instruments", {"currency": "BTC"})[1]["result"]
    assert {i["instrument_name"] for i in instruments} >= {BTC, "BTC_USDC"}
    assert {c["currency"] for c in http(fresh, "public/get_currencies")[1]["result"]} == {
        "BTC", "ETH", "USDC"}
    book = http(fresh, "public/get_order_book", {"instrument_name": BTC, "depth": 3})[1]
    assert len(book["result"]["bids"]) == 3 and book["result"]["change_id"] > 0
    assert book["result"]["best_bid_price"] < book["result"]["best_ask_price"]
    index = http(fresh, "public/get_index_price", {"index_name": "btc_usd"})[1]["result"]
    assert index["index_price"] > 0
    assert abs(http(fresh, "public/get_time")[1]["result"] - now_ms()) < 5_000


# --- orders -------------------------------------------------------------------------------------
def test_orders_when_buy_sell_edit_cancel_then_round_trips_and_user_orders_notified(
        fresh: VenueProcess) -> None:
    buy_px, sell_px = passive_prices(fresh)

    async def body(c: WsClient) -> None:
        await c.login()
        await c.result("private/subscribe", {"channels": [f"user.orders.{BTC}.raw"]})
        bought = await c.result("private/buy", {"instrument_name": BTC, "amount": 20,
                                                "type": "limit", "price": buy_px,
                                                "label": label()})
        order = bought["order"]
        assert order["order_state"] == "open" and bought["trades"] == []
        edited = await c.result("private/edit", {"order_id": order["order_id"], "amount": 30,
                                                 "price": buy_px - 10})
        assert (edited["order"]["amount"], edited["order"]["price"]) == (30, buy_px - 10)
        sold = await c.result("private/sell", {"instrument_name": BTC, "amount": 10,
                                               "price": sell_px})
        open_orders = await c.result("private/get_open_orders_by_instrument",
                                     {"instrument_name": BTC})
        assert {o["order_id"] for o in open_orders} == {order["order_id"],
                                                        sold["order"]["order_id"]}
        cancelled = await c.result("private/cancel", {"order_id": order["order_id"]})
        assert cancelled["order_state"] == "cancelled"
        again = await c.call("private/cancel", {"order_id": order["order_id"]})
        assert again["error"]["code"] == 11044  # not_open_order
        assert await c.result("private/cancel_all_by_instrument",
                              {"instrument_name": BTC}) == 1
        state = await c.result("private/get_order_state",
                               {"order_id": sold["order"]["order_id"]})
        assert state["order_state"] == "cancelled"
        await c.wait_for(lambda: [d for d in c.channel(f"user.orders.{BTC}.raw")
                                  if d["order_id"] == sold["order"]["order_id"]
                                  and d["order_state"] == "cancelled"],
                         "user.orders notification of the cancel_all")
        states = [d["order_state"] for d in c.channel(f"user.orders.{BTC}.raw")
                  if d["order_id"] == order["order_id"]]
        assert states == ["open", "open", "cancelled"]
        assert await c.result("private/get_open_orders_by_currency", {"currency": "BTC"}) == []
    run(fresh, body)


def test_label_when_resent_after_reconnect_then_same_order_and_one_order_at_venue(
        fresh: VenueProcess) -> None:
    buy_px, _ = passive_prices(fresh)
    tag = label()
    params = {"instrument_name": BTC, "amount": 10, "price": buy_px, "label": tag}
    first: dict[str, Any] = {}

    async def before(c: WsClient) -> None:
        await c.login()
        first.update(await c.result("private/buy", params))

    async def after(c: WsClient) -> None:
        await c.login()
        again = await c.result("private/buy", params)
        assert again["order"]["order_id"] == first["order"]["order_id"]
        by_label = await c.result("private/get_order_state_by_label",
                                  {"currency": "BTC", "label": tag})
        assert [o["order_id"] for o in by_label] == [first["order"]["order_id"]]
    run(fresh, before)
    run(fresh, after)
    mine = [o for o in private(fresh, "get_open_orders_by_instrument",
                               {"instrument_name": BTC})["result"] if o["label"] == tag]
    assert len(mine) == 1


def test_user_trades_when_filled_then_queryable_since_seq_and_notified(
        fresh: VenueProcess) -> None:
    async def body(c: WsClient) -> None:
        await c.login("bob")
        await c.result("private/subscribe", {"channels": ["user.trades.future.BTC.raw",
                                                          f"trades.{BTC}.raw"]})
        seqs = []
        for _ in range(3):
            _, ask = quotes(fresh)
            filled = await c.result("private/buy", {"instrument_name": BTC, "amount": 10,
                                                    "price": math.ceil(ask * 1.02),
                                                    "time_in_force": "immediate_or_cancel"})
            assert filled["order"]["order_state"] == "filled", filled
            seqs.append(filled["trades"][0]["trade_seq"])
        assert seqs == sorted(seqs) and len(set(seqs)) == 3
        since = await c.result("private/get_user_trades_by_instrument",
                               {"instrument_name": BTC, "start_seq": seqs[1], "count": 10})
        assert [t["trade_seq"] for t in since["trades"]] == seqs[1:]
        assert since["has_more"] is False
        one = await c.result("private/get_user_trades_by_instrument",
                             {"instrument_name": BTC, "start_seq": seqs[0], "count": 1,
                              "sorting": "asc"})
        assert [t["trade_seq"] for t in one["trades"]] == seqs[:1] and one["has_more"]
        await c.wait_for(lambda: sum(len(d) for d in c.channel("user.trades.future.BTC.raw"))
                         >= 3, "3 user.trades notifications")
        await c.wait_for(lambda: len(c.channel(f"trades.{BTC}.raw")) >= 3, "3 public trades")
        position = await c.result("private/get_position", {"instrument_name": BTC})
        assert position["size"] >= 30 and position["direction"] == "buy"
    run(fresh, body)


# --- sessions -----------------------------------------------------------------------------------
def test_heartbeat_when_test_requests_answered_then_open_and_unanswered_then_closed(
        fresh: VenueProcess) -> None:
    async def answering(c: WsClient) -> None:
        assert (await c.call("public/set_heartbeat", {"interval": 0.1}))["error"]["code"] \
            == -32602  # below the venue's minimum
        assert await c.result("public/set_heartbeat", {"interval": 0.3}) == "ok"
        await c.wait_for(lambda: c.test_requests >= 4, "4 test_requests")
        assert not c.closed.is_set()
        assert await c.result("public/disable_heartbeat") == "ok"

    async def silent(c: WsClient) -> None:
        assert await c.result("public/set_heartbeat", {"interval": 0.3}) == "ok"
        await c.wait_for(lambda: c.closed.is_set(), "the server to close the connection")
        assert c.test_requests >= 1
    run(fresh, answering)
    before = status(fresh)["connections"].get("closed_heartbeat_timeout", 0)
    run(fresh, silent, answer_test_requests=False)
    assert status(fresh)["connections"]["closed_heartbeat_timeout"] == before + 1
    assert http(fresh, "public/set_heartbeat", {"interval": 30})[1]["error"]["code"] == 10030


CLIENT = """
import asyncio, json, sys
import aiohttp
async def main(url, secret, price):
    async with aiohttp.ClientSession() as s, s.ws_connect(url) as ws:
        async def call(i, method, params):
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": i, "method": method,
                                          "params": params}))
            while True:
                msg = json.loads((await ws.receive()).data)
                if msg.get("id") == i:
                    return msg["result"]
        await call(1, "public/auth", {"grant_type": "client_credentials",
                                      "client_id": "alice", "client_secret": secret})
        await call(2, "private/enable_cancel_on_disconnect", {})
        await call(3, "public/subscribe", {"channels": ["book.BTC-PERPETUAL.raw"]})
        order = await call(4, "private/buy", {"instrument_name": "BTC-PERPETUAL",
                                              "amount": 10, "price": price})
        print(order["order"]["order_id"], flush=True)
        await asyncio.sleep(3600)
asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3])))
"""


def test_cancel_on_disconnect_when_client_killed_then_its_orders_cancelled_server_lives(
        fresh: VenueProcess) -> None:
    buy_px, _ = passive_prices(fresh)
    other = private(fresh, "buy", {"instrument_name": BTC, "amount": 10, "price": buy_px})
    client = subprocess.Popen([sys.executable, "-c", CLIENT, fresh.ws_url, KEYS["alice"],
                               str(buy_px)], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        order_id = client.stdout.readline().strip()
        assert order_id, "the client did not place its order"
        assert private(fresh, "get_order_state",
                       {"order_id": order_id})["result"]["order_state"] == "open"
        client.send_signal(signal.SIGKILL)
        client.wait(WAIT_S)
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(WAIT_S)
    wait_until(lambda: private(fresh, "get_order_state", {"order_id": order_id})["result"]
               ["order_state"] == "cancelled", WAIT_S, "cancel-on-disconnect")
    # orders made over another connection stay, as Deribit documents
    kept = private(fresh, "get_order_state", {"order_id": other["result"]["order"]["order_id"]})
    assert kept["result"]["order_state"] == "open"
    assert fresh.alive() and status(fresh)["connections"]["cod_triggered"] >= 1
    wait_until(lambda: status(fresh)["open_connections"] == 0, WAIT_S, "connections to close")

    async def scope(c: WsClient) -> None:
        await c.login()
        assert await c.result("private/get_cancel_on_disconnect") == {
            "scope": "connection", "enabled": False}
        await c.result("private/enable_cancel_on_disconnect", {"scope": "account"})
        fresh_conn = await WsClient.connect(fresh.ws_url)
        try:
            await fresh_conn.login()
            assert (await fresh_conn.result("private/get_cancel_on_disconnect"))["enabled"]
        finally:
            await fresh_conn.close()
        await c.result("private/disable_cancel_on_disconnect", {"scope": "account"})
        await c.result("private/enable_cancel_on_disconnect")
        kept = await c.result("private/buy", {"instrument_name": BTC, "amount": 10,
                                              "price": buy_px})
        assert await c.result("private/logout") == "ok"  # a logout is not a disconnect
        await c.wait_for(c.closed.is_set, "the server to close after logout")
        state = private(fresh, "get_order_state", {"order_id": kept["order"]["order_id"]})
        assert state["result"]["order_state"] == "open"
    run(fresh, scope)


# --- faults ---------------------------------------------------------------------------------------
def test_faults_when_set_at_run_time_then_outage_storm_latency_and_gaps_observable(
        fresh: VenueProcess) -> None:
    buy_px, _ = passive_prices(fresh)

    async def body(c: WsClient) -> None:
        await c.login()
        await c.result("private/simulator/set_faults", {"outage": True})
        down = await c.call("private/buy", {"instrument_name": BTC, "amount": 10,
                                            "price": buy_px})
        assert down["error"]["code"] == 13028
        assert (await c.call("public/ticker", {"instrument_name": BTC}))["error"]["code"] \
            == 13028
        assert "version" in await c.result("public/test")  # the session layer still answers
        await c.result("private/simulator/set_faults", {"outage": False,
                                                        "reject_storm_probability": 1.0})
        storm = await c.call("private/buy", {"instrument_name": BTC, "amount": 10,
                                             "price": buy_px})
        assert (storm["error"]["code"], storm["error"]["data"]["reason"]) == (
            11030, "reject_storm")
        bad = await c.call("private/simulator/set_faults", {"md_drop_probability": 2.0})
        assert bad["error"]["data"]["param"] == "md_drop_probability"
        await c.result("private/simulator/set_faults", {"reset": True, "latency_s": 0.25})
        t0 = time.monotonic()
        await c.result("public/test")
        slow_s = time.monotonic() - t0
        await c.result("private/simulator/set_faults", {"latency_s": 0.0,
                                                        "md_drop_probability": 0.5})
        t0 = time.monotonic()
        await c.result("public/test")
        fast_s = time.monotonic() - t0
        assert slow_s >= 0.25 > fast_s, (slow_s, fast_s)
        await c.result("private/subscribe", {"channels": [f"book.{BTC}.raw"]})
        tracker = ChangeIdTracker()
        await c.wait_for(lambda: [tracker.accept(to_update(d)) for d in
                                  c.channel(f"book.{BTC}.raw")[sum(tracker.counts.values()):]]
                         and tracker.counts["gap"] >= 2, "gaps from dropped book updates")
        await c.result("private/simulator/set_faults", {"reset": True})
    run(fresh, body)
    state = status(fresh)
    assert state["engine"]["rejections"]["outage"] >= 2
    assert state["engine"]["rejections"]["reject_storm"] >= 1
    assert state["md_faults"]["dropped"] >= 2 and state["faults"]["outage"] is False


# --- bad input ------------------------------------------------------------------------------------
BAD_FRAMES: list[tuple[str, Any, int, str]] = [
    ("not json", "{nope", -32700, "invalid_json"),
    ("array", "[1, 2]", -32600, "not_an_object"),
    ("no method", '{"jsonrpc": "2.0", "id": 1}', -32600, "method_missing"),
    ("old version", '{"jsonrpc": "1.0", "id": 2, "method": "public/test"}', -32600,
     "jsonrpc_not_2.0"),
    ("bad id", '{"jsonrpc": "2.0", "id": [1], "method": "public/test"}', -32600, "id_invalid"),
    ("params list", '{"jsonrpc": "2.0", "id": 3, "method": "public/test", "params": [1]}',
     -32602, "params_not_object"),
    ("unknown method", '{"jsonrpc": "2.0", "id": 4, "method": "public/teleport"}', -32601,
     "method_unknown"),
    ("oversized", json.dumps({"jsonrpc": "2.0", "id": 5, "method": "public/test",
                              "params": {"pad": "x" * 70_000}}), 11050, "frame_too_large"),
    ("binary", b"\x00\x01", 11050, "binary_frame"),
]


def test_bad_input_when_malformed_frames_then_answered_counted_and_connection_usable(
        fresh: VenueProcess) -> None:
    before = status(fresh)["bad_input"]

    async def body(c: WsClient) -> None:
        await c.login()
        for case, frame, code, reason in BAD_FRAMES:
            seen = len(c.unmatched) + len(c.replies)
            if isinstance(frame, bytes):
                await c.ws.send_bytes(frame)
            else:
                await c.ws.send_str(frame)
            await c.wait_for(lambda s=seen: len(c.unmatched) + len(c.replies) > s, case)
            answer = c.unmatched.pop() if c.unmatched else c.replies.popitem()[1]
            assert (answer["error"]["code"], answer["error"]["data"]["reason"]) == (
                code, reason), case
            assert "version" in await c.result("public/test"), case
        typed = {
            "amount as text": ({"instrument_name": BTC, "amount": "ten", "price": 1.0},
                               "amount"),
            "missing instrument": ({"amount": 10, "price": 1.0}, "instrument_name"),
            "flag not bool": ({"instrument_name": BTC, "amount": 10, "price": 1.0,
                               "post_only": "yes"}, "post_only"),
            "nan price": ({"instrument_name": BTC, "amount": 10, "price": math.nan}, "price"),
        }
        for case, (params, param) in typed.items():
            answer = await c.call("private/buy", params)
            assert answer["error"]["code"] == -32602, case
            assert answer["error"]["data"]["param"] == param, case
        unknown = await c.call("private/buy", {"instrument_name": "DOGE-PERPETUAL",
                                               "amount": 10, "price": 1.0})
        assert unknown["error"]["code"] == 10020
        assert await c.result("private/get_open_orders_by_currency", {"currency": "BTC"}) == []
    run(fresh, body)
    after = status(fresh)["bad_input"]
    for _, _, _, reason in BAD_FRAMES:
        if reason != "method_unknown":
            assert after.get(reason, 0) > before.get(reason, 0), reason
    assert fresh.alive()


def test_bad_input_over_http_when_malformed_then_json_rpc_errors(fresh: VenueProcess) -> None:
    cases = {
        "not json": (http(fresh, "public/test", body="{nope"), -32700),
        "wrong method in body": (http(fresh, "public/test", body=json.dumps(
            {"jsonrpc": "2.0", "id": 1, "method": "public/get_time"})), 11050),
        "unknown method": (http(fresh, "public/teleport"), -32601),
        "bad scope": (http(fresh, "secret/test"), 11050),
        "depth not int": (http(fresh, "public/get_order_book",
                               {"instrument_name": BTC, "depth": "deep"}), -32602),
        "repeated param": (http(fresh, "public/ticker?instrument_name=a&instrument_name=b"),
                           11050),
        "oversized": (http(fresh, "public/test", body=json.dumps(
            {"jsonrpc": "2.0", "id": 2, "method": "public/test",
             "params": {"pad": "x" * 70_000}})), 11050),
    }
    for case, ((code, reply), expected) in cases.items():
        assert code == 400 and reply["error"]["code"] == expected, (case, code, reply)
    assert http(fresh, "public/test")[0] == 200


def test_server_when_subscribed_client_killed_then_survives_and_forgets_it(
        fresh: VenueProcess) -> None:
    script = CLIENT.replace('order = await call(4, "private/buy"', 'await call(4, "public/test"')
    script = script.replace('print(order["order"]["order_id"], flush=True)',
                            'print("ready", flush=True)')
    client = subprocess.Popen([sys.executable, "-c", script, fresh.ws_url, KEYS["alice"], "1"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "ready"
        wait_until(lambda: status(fresh)["open_connections"] >= 1, WAIT_S, "client connected")
    finally:
        client.kill()
        client.wait(WAIT_S)
    wait_until(lambda: status(fresh)["open_connections"] == 0, WAIT_S, "server to notice")
    assert fresh.alive() and http(fresh, "public/test")[0] == 200


def raw_ws_connect(url: str, rcvbuf_bytes: int = 4096) -> socket.socket:
    """A WebSocket handshake on a plain socket with a tiny receive buffer (a slow reader)."""
    u = urllib.parse.urlparse(url)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf_bytes)
    sock.settimeout(WAIT_S)
    sock.connect((u.hostname, u.port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET {u.path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
                 f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += sock.recv(1)  # byte by byte: leave the frames that follow unread
    assert b" 101 " in head.split(b"\r\n")[0], head
    return sock


def raw_ws_send(sock: socket.socket, obj: object) -> None:
    payload, mask = json.dumps(obj).encode(), os.urandom(4)
    assert len(payload) < 65536
    size = bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes(
        [0x80 | 126]) + len(payload).to_bytes(2, "big")
    sock.sendall(b"\x81" + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))


def test_slow_consumer_when_not_reading_then_market_data_conflated_and_others_served() -> None:
    with VenueProcess.start("slow-reader", keys=KEYS, synthetic=True, speedup=200.0,
                            max_queue_messages=32) as proc:
        sock = raw_ws_connect(proc.ws_url)
        try:
            raw_ws_send(sock, {"jsonrpc": "2.0", "id": 1, "method": "public/auth", "params": {
                "grant_type": "client_credentials", "client_id": "alice",
                "client_secret": KEYS["alice"]}})
            names = ("BTC-PERPETUAL", "ETH-PERPETUAL", "BTC_USDC", "ETH_USDC")
            raw_ws_send(sock, {"jsonrpc": "2.0", "id": 2, "method": "private/subscribe",
                               "params": {"channels": [f"{topic}.{n}.raw" for n in names
                                                       for topic in ("book", "ticker")]}})
            wait_until(lambda: status(proc)["outbox"].get("conflations", 0) >= 3, 40.0,
                       "the slow reader's queue to be conflated")
            state = status(proc)
            assert state["outbox"]["book_dropped"] > 0 and state["outbox"]["snapshots"] > 0
            assert state["open_connections"] == 1  # market data alone never disconnects it
            assert http(proc, "public/test")[0] == 200
        finally:
            sock.close()


# --- pure pieces: outbox and 100 ms aggregation ------------------------------------------------
def test_outbox_when_full_then_book_conflated_to_snapshot_and_replies_kept() -> None:
    snaps: list[str] = []

    def resnapshot(channel: str) -> str:
        snaps.append(channel)
        return f"snapshot:{channel}"
    box = Outbox(6, resnapshot)
    for i in range(3):
        assert box.put(Frame(f"b{i}", "book", "book.X.raw"))
    assert box.put(Frame("r1")) and box.put(Frame("t1", "ticker", "ticker.X.raw"))
    assert box.put(Frame("t2", "ticker", "ticker.X.raw"))
    assert box.put(Frame("b3", "book", "book.X.raw"))  # full: conflate
    assert [f.text for f in iter(box.pop, None)] == ["r1", "t2", "snapshot:book.X.raw"]
    assert box.counts["book_dropped"] == 4 and box.counts["ticker_dropped"] == 1
    assert snaps == ["book.X.raw"]
    for i in range(6):
        assert box.put(Frame(f"r{i}"))
    assert not box.put(Frame("one too many"))  # only replies: a slow consumer


def test_outbox_when_no_snapshot_possible_then_book_dropped_until_retry() -> None:
    available = False
    box = Outbox(2, lambda ch: "snap" if available else None)
    box.put(Frame("b1", "book", "c"))
    box.put(Frame("b2", "book", "c"))
    box.put(Frame("b3", "book", "c"))
    assert box.pending_snapshots == ["c"] and len(box) == 0
    box.put(Frame("b4", "book", "c"))
    assert len(box) == 0
    available = True
    box.retry_snapshots()
    assert [f.text for f in iter(box.pop, None)] == ["snap"] and not box.pending_snapshots


def test_book_aggregator_when_chain_then_merged_and_gap_passed_through() -> None:
    def change(cid: int, prev: int, bids: tuple[Any, ...]) -> BookUpdate:
        return BookUpdate("X", "change", cid, prev, float(cid), bids, ())
    agg = BookAggregator()
    agg.add(change(2, 1, (("new", 10.0, 1.0), ("change", 9.0, 2.0))))
    agg.add(change(3, 2, (("delete", 10.0, 0.0), ("change", 9.0, 3.0), ("new", 8.0, 1.0))))
    agg.add(change(5, 4, (("delete", 8.0, 0.0),)))  # gap: 4 never arrived
    merged, gapped = agg.flush()
    assert (merged.change_id, merged.prev_change_id) == (3, 1)
    assert merged.bids == (("change", 9.0, 3.0), ("new", 8.0, 1.0))
    assert (gapped.change_id, gapped.prev_change_id) == (5, 4)
    assert agg.flush() == []


# --- the process itself ---------------------------------------------------------------------------
def test_venue_process_when_started_and_stopped_then_serves_and_nothing_left() -> None:
    with pytest.raises(ValueError, match="keys"):
        VenueProcess.start("bad", keys={"a": "short"})
    with pytest.raises(VenueProcessError, match="exited"):
        VenueProcess.start("bad-data", data="/nonexistent.csv.gz", start_timeout_s=20)
    with VenueProcess.start("lifecycle", synthetic=True, seed=3, speedup=5.0) as proc:
        assert proc.ws_url.startswith("ws://127.0.0.1:") and proc.alive()
        assert list(proc.keys) == ["sim-lifecycle"]
        ticker = http(proc, "public/ticker", {"instrument_name": BTC})[1]["result"]
        assert ticker["best_bid_price"] < ticker["best_ask_price"]
        assert any(line.startswith("venue lifecycle: WebSocket") for line in proc.output)
        pid = proc.pid
    assert proc.popen.returncode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


PARENT = """
import sys
from actors.venue.process import VenueProcess
proc = VenueProcess.start("orphan", synthetic=True, speedup=1.0)
print(proc.pid, flush=True)
sys.stdin.read()
"""


def test_venue_process_when_parent_killed_then_server_exits_too() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.kill()
        parent.wait(WAIT_S)
        wait_until(lambda: not _alive(child), WAIT_S, "the orphaned venue to exit")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(WAIT_S)
