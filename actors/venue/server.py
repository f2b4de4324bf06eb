"""The venue simulator as a network peer: Deribit API v2 JSON-RPC over WebSocket and HTTP.

    config = ServerConfig(name="deribit-sim", keys={"acct-a": "secret-a-123"}, speedup=60.0)
    server = VenueServer(config)
    await server.start()            # listens on 127.0.0.1; server.ws_url / server.http_url
    ...
    await server.stop()

Endpoints: WebSocket ``/ws/api/v2``; HTTP ``GET /api/v2/{public|private}/<method>?<params>`` and
``POST`` of a JSON-RPC body to the same path. Venue methods (market data, trading, account) are
in ``api.VenueApi``; this module adds the session methods -- ``public/auth``, ``public/test``,
``public/get_time``, ``public/set_heartbeat``/``disable_heartbeat``, ``(public|private)/
subscribe``/``unsubscribe``/``unsubscribe_all``, ``private/(enable|disable|get)_cancel_on_
disconnect``, ``private/logout`` -- and three simulator methods: ``private/simulator/set_faults``
(any ``Faults`` field, ``latency_s``, ``reset``), ``public/simulator/status`` (counters) and
``private/simulator/order_log`` (``after_seq``, ``count``: every buy/sell request the caller's
account sent, with its outcome; ``cluster.checker`` reads it).

Behaviour, as Deribit:

* private methods need ``public/auth`` on the WebSocket (or an ``access_token`` param), or an
  HTTP ``Authorization`` header (see ``auth``); otherwise 13009 ``unauthorized``;
* channels: ``book|ticker|trades.{instrument}.{raw|100ms}``, ``user.orders|user.trades.
  {instrument | kind.currency}.{raw|100ms}``; ``raw`` and ``user.*`` channels need an
  authenticated connection and are left out of the subscribe answer otherwise; a book
  subscription starts with a snapshot, then changes chained by ``prev_change_id``;
* heartbeats: after ``set_heartbeat(interval)`` the server sends ``test_request`` every
  interval and closes the connection when the previous one was not answered by
  ``public/test``;
* cancel on disconnect: when a connection with it enabled drops (not after ``logout``), the
  orders created over that connection are cancelled (``cod_cancels_account_orders=True``:
  every open order of the account); ``scope=account`` turns it on for new connections;
* dead-man's switch (``private/cancel_all_after``, see ``deadman``): fired from the
  market-data loop, so within ``md_interval_s`` of its trigger time even on a silent but open
  connection;
* outage (``Faults.outage``): venue methods answer 13028; session and simulator methods work.

``latency_s`` delays the handling of every request (WebSocket frames stay in order);
notifications are not delayed. Malformed frames are answered (see ``jsonrpc``) and counted in
``bad_input``; nothing a client sends ends the handler. Slow consumers: see ``outbox``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web

from actors.venue.api import VenueApi
from actors.venue.auth import AuthConfig, Authenticator, AuthFailure, Session
from actors.venue.clock import WallClock
from actors.venue.engine import VenueConfig, VenueEngine
from actors.venue.faults import Faults, FaultsError
from actors.venue.instruments import VolSurface, default_instruments
from actors.venue.jsonrpc import (
    BadFrame,
    Param,
    RpcError,
    bad_request,
    check_params,
    coerce_query,
    dumps,
    heartbeat,
    invalid_params,
    method_not_found,
    parse_request,
    reply,
    websocket_only,
)
from actors.venue.l1_feed import L1_PATH, L1FeedHub, Touch
from actors.venue.market_data import (
    MarketDataSource,
    OptionChainQuoter,
    Pacer,
    ReplayConfig,
    ReplaySeries,
    ReplaySource,
    default_replay_series,
)
from actors.venue.outbox import Frame, Outbox
from actors.venue.records import Order, Rejection
from actors.venue.subscriptions import Connection, Fanout
from actors.venue.synthetic import SyntheticConfig, SyntheticSource

log = logging.getLogger("bastion.venue.server")

VERSION = "1.2.26-bastion-sim"
WS_PATH = "/ws/api/v2"
INTERNAL_ERROR = RpcError(11094, "internal_server_error", "internal_error")
AGGREGATE_S = 0.1
CLOSE_TIMEOUT_S = 2.0


class ServerConfigError(ValueError):
    """A server setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"ServerConfig: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one simulated venue. ``speedup``: market-data seconds per wall second;
    ``md_interval_s``: how often the feed loop looks for due batches; ``max_frame_bytes``: the
    largest request answered (up to 16x larger ones are refused with an error, beyond that the
    WebSocket is closed with 1009); ``max_queue_messages``: per-connection outgoing queue."""

    name: str = "venue"
    host: str = "127.0.0.1"
    port: int = 0
    keys: Mapping[str, str] = field(default_factory=dict)
    seed: int = 0
    data: Path | None = None
    synthetic: bool = False
    speedup: float = 60.0
    with_options: bool = False
    latency_s: float = 0.0
    md_interval_s: float = 0.05
    l1_load_rate_per_s: float = 0.0
    replay_start_s: float | None = None
    l1_interval_s: float = 0.005
    heartbeat_min_interval_s: float = 10.0
    max_frame_bytes: int = 64 * 1024
    max_queue_messages: int = 2000
    max_inbound_messages: int = 10_000
    token_ttl_s: float = 3600.0
    max_clock_skew_s: float = 60.0
    cod_cancels_account_orders: bool = False
    initial_balances: tuple[tuple[str, float], ...] = (
        ("BTC", 10.0), ("ETH", 100.0), ("USDC", 1_000_000.0))

    def __post_init__(self) -> None:
        object.__setattr__(self, "keys", dict(self.keys))
        if self.data is not None:
            object.__setattr__(self, "data", Path(self.data))
            if not self.data.is_file():
                raise ServerConfigError("data", str(self.data), "not a file")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ServerConfigError("port", self.port, "must be an int in 0..65535")
        for name in ("speedup", "md_interval_s", "heartbeat_min_interval_s", "token_ttl_s",
                     "max_clock_skew_s", "l1_interval_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ServerConfigError(name, value, "must be finite and > 0")
        start = self.replay_start_s
        if start is not None and (not isinstance(start, int | float) or not math.isfinite(start)):
            raise ServerConfigError("replay_start_s", start, "must be a finite epoch time")
        rate = self.l1_load_rate_per_s
        if not isinstance(rate, int | float) or not math.isfinite(rate) or not 0 <= rate <= 1e7:
            raise ServerConfigError("l1_load_rate_per_s", rate, "must be in [0, 1e7]")
        if not isinstance(self.latency_s, int | float) or not 0 <= self.latency_s < 60:
            raise ServerConfigError("latency_s", self.latency_s, "must be in [0, 60)")
        for name in ("max_frame_bytes", "max_queue_messages", "max_inbound_messages"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 16:
                raise ServerConfigError(name, getattr(self, name), "must be an int >= 16")
        AuthConfig(self.keys, self.token_ttl_s, self.max_clock_skew_s)  # validates the keys

    def __repr__(self) -> str:  # never show secrets
        return f"ServerConfig(name={self.name!r}, port={self.port}, keys={sorted(self.keys)})"



@dataclass(frozen=True)
class Call:
    """Who is calling how: the WebSocket connection (or None over HTTP) and the session an
    HTTP header proved (None when absent)."""

    conn: Connection | None
    http_session: Session | AuthFailure | None = None


SessionHandler = Callable[[Call, dict[str, object]], object]


AUTH_PARAMS = (
    Param("grant_type", "str", True), Param("client_id", "str"), Param("client_secret", "str"),
    Param("refresh_token", "str"), Param("timestamp", "int"), Param("signature", "str"),
    Param("nonce", "str"), Param("data", "str", False, ""), Param("scope", "str"))


def _faults_params() -> tuple[Param, ...]:
    kinds = {"bool": "bool", "float": "number", "int": "int", "str | None": "str"}
    return tuple(Param(f.name, kinds[str(f.type)]) for f in dataclasses.fields(Faults)) + (  # type: ignore[arg-type]
        Param("latency_s", "number"), Param("reset", "bool", False, False))


class VenueServer:
    """One simulated venue: engine, market-data feed, auth and the aiohttp application."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.clock = WallClock()
        now = self.clock.now_s()
        instruments = default_instruments(now, with_options=config.with_options)
        self.engine = VenueEngine(VenueConfig(instruments, seed=config.seed), self.clock)
        self.api = VenueApi(self.engine, instruments, dict(config.initial_balances),
                            clock=self.clock)
        self.auth = Authenticator(AuthConfig(config.keys, config.token_ttl_s,
                                             config.max_clock_skew_s), self.clock)
        self.latency_s = float(config.latency_s)
        self.counts: dict[str, Counter[str]] = {
            k: Counter() for k in ("requests", "errors", "bad_input", "connections", "market_data",
                                   "outbox")}
        self._conns: dict[int, Connection] = {}
        self._next_conn = 0
        self.fanout = Fanout(self.engine, self.api, self._conns.values, self._send)
        self._cod_accounts: set[str] = set()
        self._call_accounts: dict[str, None] = {}  # accounts of the calls since last publish
        self._last_aggregate_s = 0.0
        self._started_s = now
        self._source_factory = self._make_source_factory(instruments)
        self._pacer = Pacer(self._source_factory(), self.clock, config.speedup)
        self._session_methods: dict[str, tuple[tuple[Param, ...], bool, bool, SessionHandler]] = {}
        self._declare_session_methods()
        by_name = {i.instrument_name: i for i in instruments}

        def touch_of(name: str) -> Touch:
            bid, bid_amount, ask, ask_amount = self.engine.touch(name)
            return Touch(bid, bid_amount, ask, ask_amount, by_name[name].tick_size)

        self.l1 = L1FeedHub(tuple(by_name), self.auth, touch_of, lambda: self.engine.faults,
                            load_rate_per_s=config.l1_load_rate_per_s,
                            activity=self.market_activity,
                            interval_s=config.l1_interval_s, seed=config.seed)
        self._runner: web.AppRunner | None = None
        self._md_task: asyncio.Task[None] | None = None
        self.port: int | None = None

    # --- market data ----------------------------------------------------------------------------
    def _make_source_factory(self, instruments: tuple[Any, ...]
                             ) -> Callable[[], MarketDataSource]:
        cfg, by_name = self.config, {i.instrument_name: i for i in instruments}
        self._replay: ReplaySource | None = None
        self._activity: dict[str, float] = {}

        def make() -> MarketDataSource:
            source: MarketDataSource
            if cfg.synthetic:
                source = SyntheticSource(SyntheticConfig(seed=cfg.seed,
                                                         start_s=self.clock.now_s()), by_name)
            else:
                series = default_replay_series() if cfg.data is None else _series_for(cfg.data)
                source = self._replay = ReplaySource(
                    ReplayConfig(series, start_s=cfg.replay_start_s), by_name)
            if cfg.with_options:
                source = OptionChainQuoter(source, instruments, VolSurface(),
                                           requote_interval_s=60.0)
            return source
        return make

    def step_market_data(self, max_batches: int = 1000) -> int:
        """Apply the batches now due and publish; restarts the replay when it ends."""
        batches = self._pacer.due(max_batches)
        for batch in batches:
            self.engine.on_market_data(batch)
            self.counts["market_data"]["ticks"] += len(batch.ticks)
            if self._replay is not None:
                for tick in batch.ticks:
                    level = self._replay.activity(tick)
                    if level is not None:
                        self._activity[tick.instrument_name] = level
        self.counts["market_data"]["batches"] += len(batches)
        if self._pacer.exhausted:
            self.counts["market_data"]["replay_restarts"] += 1
            self._pacer = Pacer(self._source_factory(), self.clock, self.config.speedup)
        if batches:
            self.publish()
        return len(batches)

    def market_activity(self) -> float:
        """How busy the replayed market is now (the busiest instrument's bar volume over its
        file's median; 1.0 for synthetic data): the binary feed's load generator scales with
        it, so a crash replays with the surge of events a crash brings."""
        return max(self._activity.values(), default=1.0)

    def fire_deadman(self) -> None:
        """Fire the dead-man's switches that ran out (``deadman``) and notify the accounts."""
        try:
            accounts = self.api.deadman.fire_due()
        except Exception:  # noqa: BLE001 - the loop never dies; count and go on
            self.counts["errors"]["deadman"] += 1
            log.exception("venue %s: dead-man's switch failed", self.config.name)
            return
        for account in accounts:
            log.warning("venue %s: dead-man's switch fired for %s", self.config.name, account)
            self._call_accounts[account] = None
        if accounts:
            self.publish()

    async def _md_loop(self) -> None:
        while True:
            self.fire_deadman()  # first: a failing market-data step must not hold it back
            try:
                self.step_market_data()
                now = time.monotonic()
                if now - self._last_aggregate_s >= AGGREGATE_S:
                    self._last_aggregate_s = now
                    self.fanout.flush_aggregated()
                for conn in self._conns.values():
                    if conn.outbox.pending_snapshots:
                        conn.outbox.retry_snapshots()
            except Exception:  # noqa: BLE001 - the feed loop never dies; count and go on
                self.counts["market_data"]["loop_errors"] += 1
                log.exception("venue %s: market-data step failed", self.config.name)
            await asyncio.sleep(self.config.md_interval_s)

    def publish(self) -> None:
        """Notify what changed since the last call (never raises: a bug in the fan-out must
        not cost the caller its reply)."""
        accounts, self._call_accounts = list(self._call_accounts), {}
        try:
            self.fanout.publish(accounts)
        except Exception:  # noqa: BLE001 - count and go on
            self.counts["errors"]["internal"] += 1
            log.exception("venue %s: publishing failed", self.config.name)

    def _send(self, conn: Connection, frame: Frame) -> None:
        if conn.close_reason is not None:
            return
        if not conn.outbox.put(frame):
            self._close_later(conn, "slow_consumer")

    # --- dispatch -------------------------------------------------------------------------------
    def _params_of(self, method: str) -> tuple[Param, ...] | None:
        if method in self._session_methods:
            return self._session_methods[method][0]
        spec = self.api.spec(method)
        return None if spec is None else spec.params

    def dispatch(self, call: Call, method: str, params: dict[str, object]) -> object:
        """The result of ``method``, or a ``Rejection``/``RpcError``/``AuthFailure``."""
        self.counts["requests"][method] += 1
        if method in self._session_methods:
            specs, private, ws_only, handler = self._session_methods[method]
            if ws_only and call.conn is None:
                return websocket_only(method)
            session = self._session(call, params) if private else None
            if isinstance(session, AuthFailure):
                return session
            if session is not None:
                self._call_accounts[session.account] = None
            checked = check_params(specs, params)
            return checked if isinstance(checked, RpcError) else handler(call, checked)
        spec = self.api.spec(method)
        if spec is None:
            return method_not_found(method)
        account = None
        if spec.private:
            session = self._session(call, params)
            if isinstance(session, AuthFailure):
                return session
            account = session.account
            self._call_accounts[account] = None
        result = self.api.call(method, account, params)
        if (call.conn is not None and method in ("private/buy", "private/sell")
                and isinstance(result, dict)):
            call.conn.orders.add(str(result["order"]["order_id"]))  # type: ignore[index]
        return result

    def _session(self, call: Call, params: dict[str, object]) -> Session | AuthFailure:
        token = params.pop("access_token", None)
        if token is not None:
            return self.auth.check_token(token)
        if call.conn is not None:
            return call.conn.session or self.auth.refuse("not_authenticated")
        return call.http_session or self.auth.refuse("authorization_missing")

    def _answer(self, rid: object, outcome: object, us_in: int) -> tuple[dict[str, Any], int]:
        """The reply object and the HTTP status for a dispatch outcome."""
        us_out = int(self.clock.now_s() * 1e6)
        if isinstance(outcome, Rejection | RpcError | AuthFailure):
            self.counts["errors"][str(outcome.code)] += 1
            status = 401 if outcome.code in (13004, 13009) else 400
            return reply(rid, error=outcome.to_error(), us_in=us_in, us_out=us_out), status  # type: ignore[arg-type]
        return reply(rid, result=outcome, us_in=us_in, us_out=us_out), 200  # type: ignore[arg-type]

    def _bad(self, frame: BadFrame) -> RpcError:
        self.counts["bad_input"][frame.error.reason] += 1
        return frame.error

    def _safe_dispatch(self, call: Call, method: str, params: dict[str, object]) -> object:
        try:
            return self.dispatch(call, method, params)
        except Exception:  # noqa: BLE001 - a request never takes the server down
            self.counts["errors"]["internal"] += 1
            log.exception("venue %s: %s failed", self.config.name, method)
            return INTERNAL_ERROR

    # --- session methods ----------------------------------------------------------------------
    def _declare_session_methods(self) -> None:
        chans = (Param("channels", "str_list", True),)
        scope = (Param("scope", "str", False, "connection", ("connection", "account")),)
        table: list[tuple[str, tuple[Param, ...], bool, bool, SessionHandler]] = [
            ("public/auth", AUTH_PARAMS, False, False, self._auth),
            ("public/test", (Param("expected_result", "str"),), False, False, self._test),
            ("public/get_time", (), False, False,
             lambda c, p: int(round(self.clock.now_s() * 1000))),
            ("public/set_heartbeat", (Param("interval", "number", True),), False, True,
             self._set_heartbeat),
            ("public/disable_heartbeat", (), False, True, self._disable_heartbeat),
            ("public/subscribe", chans, False, True, self._subscribe),
            ("private/subscribe", chans, True, True, self._subscribe),
            ("public/unsubscribe", chans, False, True,
             lambda c, p: self.fanout.unsubscribe(c.conn, p["channels"])),  # type: ignore
            ("private/unsubscribe", chans, True, True,
             lambda c, p: self.fanout.unsubscribe(c.conn, p["channels"])),  # type: ignore
            ("public/unsubscribe_all", (), False, True, self._unsubscribe_all),
            ("private/unsubscribe_all", (), True, True, self._unsubscribe_all),
            ("private/enable_cancel_on_disconnect", scope, True, False,
             lambda c, p: self._set_cod(c, p, True)),
            ("private/disable_cancel_on_disconnect", scope, True, False,
             lambda c, p: self._set_cod(c, p, False)),
            ("private/get_cancel_on_disconnect", scope, True, False, self._get_cod),
            ("private/logout", (), True, True, self._logout),
            ("private/simulator/set_faults", _faults_params(), True, False, self._set_faults),
            ("public/simulator/status", (), False, False, lambda c, p: self.status()),
            ("private/simulator/order_log", (Param("after_seq", "int", False, 0),
                                             Param("count", "int", False, 1000)),
             True, False, self._order_log),
        ]
        for name, specs, private, ws_only, handler in table:
            self._session_methods[name] = (specs, private, ws_only, handler)

    def _auth(self, call: Call, p: dict[str, object]) -> object:
        result = self.auth.grant(p)
        if isinstance(result, dict) and call.conn is not None:
            session = self.auth.check_token(result["access_token"])
            if isinstance(session, Session):
                call.conn.session = session
                if session.account in self._cod_accounts:
                    call.conn.cancel_on_disconnect = True
        return result

    def _test(self, call: Call, p: dict[str, object]) -> object:
        if call.conn is not None:
            call.conn.awaiting_test = False
        return {"version": VERSION}

    def _set_heartbeat(self, call: Call, p: dict[str, object]) -> object:
        interval = float(p["interval"])  # type: ignore[arg-type]
        if not math.isfinite(interval) or interval < self.config.heartbeat_min_interval_s:
            return invalid_params("interval_too_small", "interval")
        conn = call.conn
        assert conn is not None
        self._stop_heartbeat(conn)
        conn.heartbeat_s, conn.awaiting_test = interval, False
        conn.tasks.append(asyncio.get_running_loop().create_task(
            self._heartbeat(conn), name=f"heartbeat-{conn.id}"))
        return "ok"

    def _stop_heartbeat(self, conn: Connection) -> None:
        conn.heartbeat_s = None
        for task in [t for t in conn.tasks if t.get_name().startswith("heartbeat")]:
            task.cancel()
            conn.tasks.remove(task)

    def _disable_heartbeat(self, call: Call, p: dict[str, object]) -> object:
        assert call.conn is not None
        self._stop_heartbeat(call.conn)
        return "ok"

    async def _heartbeat(self, conn: Connection) -> None:
        while conn.heartbeat_s is not None and conn.close_reason is None:
            await asyncio.sleep(conn.heartbeat_s)
            if conn.awaiting_test:
                self._close_later(conn, "heartbeat_timeout")
                return
            conn.awaiting_test = True
            self._send(conn, Frame(heartbeat("test_request"), "other"))

    def _subscribe(self, call: Call, p: dict[str, object]) -> object:
        assert call.conn is not None
        return self.fanout.subscribe(call.conn, p["channels"])  # type: ignore[arg-type]

    def _unsubscribe_all(self, call: Call, p: dict[str, object]) -> object:
        assert call.conn is not None
        self.fanout.drop_all(call.conn)
        return "ok"

    def _set_cod(self, call: Call, p: dict[str, object], enabled: bool) -> object:
        account = self._account_of(call)
        if p["scope"] == "account":
            (self._cod_accounts.add if enabled else self._cod_accounts.discard)(account)
            return "ok"
        if call.conn is None:
            return websocket_only("cancel_on_disconnect(scope=connection)")
        call.conn.cancel_on_disconnect = enabled
        return "ok"

    def _get_cod(self, call: Call, p: dict[str, object]) -> object:
        if p["scope"] == "account":
            return {"scope": "account", "enabled": self._account_of(call) in self._cod_accounts}
        if call.conn is None:
            return websocket_only("get_cancel_on_disconnect(scope=connection)")
        return {"scope": "connection", "enabled": call.conn.cancel_on_disconnect}

    def _account_of(self, call: Call) -> str:
        session = call.conn.session if call.conn is not None else call.http_session
        assert isinstance(session, Session)
        return session.account

    def _logout(self, call: Call, p: dict[str, object]) -> object:
        assert call.conn is not None
        call.conn.logged_out = True  # closed once the reply is out, without cancel-on-disconnect
        return "ok"

    def _set_faults(self, call: Call, p: dict[str, object]) -> object:
        names = {f.name for f in dataclasses.fields(Faults)}
        base = Faults() if p["reset"] else self.engine.faults
        changes = {k: v for k, v in p.items() if k in names and v is not None}
        if p.get("price_spike_instrument") == "":
            changes["price_spike_instrument"] = None
        latency = p.get("latency_s")
        if latency is not None and (not math.isfinite(latency) or not 0 <= latency < 60):  # type: ignore[arg-type]
            return invalid_params("latency_s_invalid", "latency_s")
        try:
            faults = replace(base, **changes)  # type: ignore[arg-type]
        except FaultsError as exc:
            return invalid_params(f"{exc.field}_invalid", exc.field)
        self.engine.set_faults(faults)
        if latency is not None or p["reset"]:
            self.latency_s = float(latency or 0.0)  # type: ignore[arg-type]
        log.warning("venue %s: faults now %s, latency_s=%s", self.config.name, faults,
                    self.latency_s)
        return {"faults": dataclasses.asdict(self.engine.faults), "latency_s": self.latency_s}

    def _order_log(self, call: Call, p: dict[str, object]) -> object:
        """The caller's order log (``VenueEngine.order_log``), for the invariant checker."""
        after, count = p["after_seq"], p["count"]
        if not isinstance(after, int) or after < 0:
            return invalid_params("after_seq_invalid", "after_seq")
        if not isinstance(count, int) or not 1 <= count <= 10_000:
            return invalid_params("count_invalid", "count")
        entries, last = self.engine.order_log(self._account_of(call), after, count)
        return {"entries": [e.to_deribit() for e in entries], "last_seq": last,
                "has_more": bool(entries) and entries[-1].seq < last}

    def status(self) -> dict[str, object]:
        """Counters for tests and chaos tools."""
        outbox = Counter(self.counts["outbox"])
        for conn in self._conns.values():
            outbox.update(conn.outbox.counts)
        stats = self.engine.stats
        return {
            "name": self.config.name, "uptime_s": self.clock.now_s() - self._started_s,
            "open_connections": len(self._conns), "latency_s": self.latency_s,
            "faults": dataclasses.asdict(self.engine.faults),
            **{k: dict(v) for k, v in self.counts.items() if k != "outbox"},
            "outbox": dict(outbox), "auth": {"grants": dict(self.auth.stats.grants),
                                             "failures": dict(self.auth.stats.failures)},
            "md_faults": dict(self.engine.md_fault_counts),
            "engine": {"rejections": dict(stats.rejections), "trades": stats.trades,
                       "orders_created": stats.orders_created,
                       "duplicate_labels": stats.duplicate_labels,
                       "fenced_orders": stats.fenced_orders,
                       "ticks_applied": stats.ticks_applied,
                       "ticks_skipped": dict(stats.ticks_skipped)},
            "l1_feed": self.l1.status(), "deadman": self.api.deadman.status(),
        }

    # --- WebSocket transport ------------------------------------------------------------------
    async def _ws_handler(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=16 * self.config.max_frame_bytes,
                                   timeout=CLOSE_TIMEOUT_S)
        await ws.prepare(request)
        self._next_conn += 1
        conn = Connection(self._next_conn, str(request.remote), ws, None,  # type: ignore[arg-type]
                          asyncio.Queue(self.config.max_inbound_messages), request.transport)
        conn.outbox = Outbox(self.config.max_queue_messages,
                             lambda ch: self.fanout.book_snapshot(conn, ch))
        self._conns[conn.id] = conn
        self.counts["connections"]["opened"] += 1
        loop = asyncio.get_running_loop()
        conn.tasks += [loop.create_task(self._writer(conn)), loop.create_task(self._reader(conn))]
        log.info("venue %s: connection %d from %s", self.config.name, conn.id, conn.peer)
        try:
            async for msg in ws:
                item = (loop.time(), msg.data if msg.type == WSMsgType.TEXT else None)
                if msg.type == WSMsgType.ERROR:
                    self.counts["bad_input"]["frame_over_hard_limit"] += 1
                    break
                try:
                    conn.inbound.put_nowait(item)
                except asyncio.QueueFull:
                    self._close_later(conn, "inbound_overflow")
                    break
                if conn.close_reason is not None:
                    break
        finally:
            await self._finish(conn)
        return ws

    async def _reader(self, conn: Connection) -> None:
        loop = asyncio.get_running_loop()
        while True:
            t_recv, text = await conn.inbound.get()
            delay = t_recv + self.latency_s - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                self._handle_frame(conn, text)
            except Exception:  # noqa: BLE001 - a frame never ends the connection handler
                self.counts["errors"]["internal"] += 1
                log.exception("venue %s: frame handling failed", self.config.name)

    def _handle_frame(self, conn: Connection, text: str | None) -> None:
        us_in = int(self.clock.now_s() * 1e6)
        parsed = parse_request(text, self.config.max_frame_bytes) if text is not None else \
            BadFrame(bad_request("binary_frame"))
        if isinstance(parsed, BadFrame):
            outcome, rid = self._bad(parsed), parsed.id
        else:
            outcome, rid = self._safe_dispatch(Call(conn), parsed.method, parsed.params), \
                parsed.id
        answer, _ = self._answer(rid, outcome, us_in)
        self._send(conn, Frame(dumps(answer), "reply"))
        deferred, conn.deferred = conn.deferred, []
        for frame in deferred:
            self._send(conn, frame)
        if conn.logged_out and conn.close_reason is None:
            conn.outbox.put(Frame("logout", "close"))
            conn.close_reason = "logout"
        self.publish()

    async def _writer(self, conn: Connection) -> None:
        while True:
            frame = await conn.outbox.get()
            if frame.kind == "close":
                self.counts["connections"][f"closed_{frame.text}"] += 1
                log.info("venue %s: closing connection %d: %s", self.config.name, conn.id,
                         frame.text)
                await self._close(conn, frame.text)
                return
            await conn.ws.send_str(frame.text)

    def _close_later(self, conn: Connection, reason: str) -> None:
        if conn.close_reason is not None:
            return
        conn.close_reason = reason
        self.counts["connections"][f"closed_{reason}"] += 1
        log.warning("venue %s: closing connection %d: %s", self.config.name, conn.id, reason)
        asyncio.get_running_loop().create_task(self._close(conn, reason))

    async def _close(self, conn: Connection, reason: str) -> None:
        """Close politely; abort the TCP connection when the peer does not take the close
        frame in time (a consumer that stopped reading)."""
        code = {"logout": 1000, "server_shutdown": 1001}.get(reason, 1008)
        try:
            await asyncio.wait_for(conn.ws.close(code=code, message=reason.encode()),
                                   CLOSE_TIMEOUT_S)
        except (TimeoutError, ConnectionError):
            if conn.transport is not None:
                conn.transport.abort()

    async def _finish(self, conn: Connection) -> None:
        if self._conns.pop(conn.id, None) is None:
            return
        for task in conn.tasks:
            task.cancel()
        for task in conn.tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self.fanout.drop_all(conn)
        self.counts["outbox"].update(conn.outbox.counts)
        self.counts["connections"]["closed"] += 1
        if conn.session is not None and conn.cancel_on_disconnect and not conn.logged_out:
            self._cancel_on_disconnect(conn)
        log.info("venue %s: connection %d closed (%s)", self.config.name, conn.id,
                 conn.close_reason or "by peer")

    def _cancel_on_disconnect(self, conn: Connection) -> None:
        assert conn.session is not None
        account = conn.session.account
        cancelled = 0
        if self.config.cod_cancels_account_orders:
            out = self.engine.cancel_all(account)
            cancelled = out if isinstance(out, int) else 0
        else:
            for oid in conn.orders:
                if isinstance(self.engine.cancel(account, oid), Order):
                    cancelled += 1
        self.counts["connections"]["cod_triggered"] += 1
        self.counts["connections"]["cod_orders_cancelled"] += cancelled
        log.warning("venue %s: cancel-on-disconnect for %s cancelled %d orders",
                    self.config.name, account, cancelled)
        self._call_accounts[account] = None
        self.publish()

    # --- HTTP transport ----------------------------------------------------------------------------
    async def _http_handler(self, request: web.Request) -> web.Response:
        us_in = int(self.clock.now_s() * 1e6)
        if self.latency_s > 0:
            await asyncio.sleep(self.latency_s)
        method = f"{request.match_info['scope']}/{request.match_info['method']}"
        rid: object = None
        outcome: object
        session: Session | AuthFailure | None = None
        if request.match_info["scope"] not in ("public", "private"):
            outcome = self._bad(BadFrame(bad_request("path_invalid")))
        elif request.method == "POST":
            try:
                body = (await request.read()).decode("utf-8", "replace")
            except web.HTTPRequestEntityTooLarge:
                body = "x" * (self.config.max_frame_bytes + 1)
            parsed = parse_request(body, self.config.max_frame_bytes)
            if isinstance(parsed, BadFrame):
                outcome, rid = self._bad(parsed), parsed.id
            elif parsed.method != method:
                rid = parsed.id
                outcome = self._bad(BadFrame(bad_request("method_path_mismatch")))
            else:
                rid, session = parsed.id, self._http_session(request, method, body)
                outcome = self._safe_dispatch(Call(None, session), method, parsed.params)
        elif request.method == "GET":
            query = request.query
            if len(set(query.keys())) != len(query):
                outcome = self._bad(BadFrame(bad_request("param_repeated")))
            else:
                specs = self._params_of(method) or ()
                session = self._http_session(request, method, "")
                outcome = self._safe_dispatch(Call(None, session), method,
                                              coerce_query(specs, dict(query)))
        else:
            outcome = self._bad(BadFrame(bad_request("http_method_not_allowed")))
        answer, status = self._answer(rid, outcome, us_in)
        self.publish()
        return web.Response(text=dumps(answer), status=status, content_type="application/json")

    def _http_session(self, request: web.Request, method: str, body: str
                      ) -> Session | AuthFailure | None:
        """The session proved by the Authorization header of a private request."""
        if not method.startswith("private/"):
            return None
        session = self.auth.authorize_http(request.headers.get("Authorization"),
                                           request.method, request.raw_path, body)
        return session

    # --- lifecycle ----------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * self.config.max_frame_bytes)
        app.router.add_get(WS_PATH, self._ws_handler)
        app.router.add_get(L1_PATH, self.l1.handle)
        app.router.add_route("*", "/api/v2/{scope}/{method:.+}", self._http_handler)
        return app

    async def start(self) -> None:
        """Bind, apply the first market data and start the feed loop."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port,
                           shutdown_timeout=CLOSE_TIMEOUT_S)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self.step_market_data()
        self._md_task = asyncio.get_running_loop().create_task(self._md_loop())
        self.l1.start()

    @property
    def ws_url(self) -> str:
        return f"ws://{self.config.host}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.port}"

    @property
    def l1_url(self) -> str:
        """The binary top-of-book feed (``l1_feed``)."""
        return f"ws://{self.config.host}:{self.port}{L1_PATH}"

    async def stop(self) -> None:
        await self.l1.stop()
        if self._md_task is not None:
            self._md_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._md_task
        await asyncio.gather(*(self._close(c, "server_shutdown") for c in self._conns.values()),
                             return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()


def _series_for(path: Path) -> tuple[ReplaySeries, ...]:
    """An OHLCV file replayed into ``<COIN>-PERPETUAL`` and ``<COIN>_USDC``; the coin is ETH
    when the file name mentions it, else BTC."""
    coin = "ETH" if "ETH" in path.name.upper() else "BTC"
    return (ReplaySeries(f"{coin}-PERPETUAL", path), ReplaySeries(f"{coin}_USDC", path))
