"""Subscription channels and who receives what: the venue's notification fan-out.

Channels (Deribit names): ``book.{instrument}.{raw|100ms}``, ``ticker.{instrument}.{raw|100ms}``,
``trades.{instrument}.{raw|100ms}``, ``user.orders.{instrument | kind.currency}.{raw|100ms}``
and ``user.trades.{...}`` (``kind`` future/option/spot/any, ``currency`` or ``any``). ``raw``
and ``user.*`` channels need an authenticated connection.

``Fanout.publish`` runs after every engine change (a request or a market-data step): book
updates the engine published go to ``raw`` subscribers at once and to ``100ms`` subscribers
merged every 100 ms (``BookAggregator``); user orders/trades go to the owning account's
connections; venue trades go once (by ``trade_id``) to ``trades`` subscribers, with the
aggressor's direction; the ticker of every touched instrument goes to ``ticker`` subscribers.

A book subscription starts with a snapshot; each connection keeps, per book channel, the
``change_id`` of the last snapshot it got (its baseline) and never receives an older change, so
the stream it sees chains by ``prev_change_id`` unless a fault broke it. Before any market data
(or during an outage) no snapshot can be taken: the channel waits in the outbox until one can.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from actors.venue.api import VenueApi
from actors.venue.auth import Session
from actors.venue.engine import VenueEngine
from actors.venue.feed import BookUpdate
from actors.venue.jsonrpc import RpcError, invalid_params, subscription
from actors.venue.outbox import BookAggregator, Frame, Outbox
from actors.venue.records import Rejection, Trade

INTERVALS = ("raw", "100ms")
KIND_TARGETS = ("future", "option", "spot", "any")
RECENT_TRADE_IDS = 10_000


@dataclass(frozen=True)
class Channel:
    """A parsed subscription channel; ``target`` is an instrument or ``kind.currency``."""

    name: str
    topic: str  # book | ticker | trades | user.orders | user.trades
    target: str
    interval: str

    @property
    def private(self) -> bool:
        return self.topic.startswith("user.") or self.interval == "raw"


def parse_channel(name: object, instruments: Mapping[str, Any]) -> Channel | None:
    """The channel ``name`` denotes, or None when it is not one this venue serves."""
    if not isinstance(name, str):
        return None
    parts = name.split(".")
    if len(parts) < 3 or parts[-1] not in INTERVALS:
        return None
    if parts[0] == "user" and len(parts) in (4, 5) and parts[1] in ("orders", "trades"):
        target = ".".join(parts[2:-1])
        if len(parts) == 4 and target not in instruments:
            return None
        if len(parts) == 5 and (parts[2] not in KIND_TARGETS or not parts[3].isalpha()):
            return None
        return Channel(name, f"user.{parts[1]}", target, parts[-1])
    if len(parts) == 3 and parts[0] in ("book", "ticker", "trades") and parts[1] in instruments:
        return Channel(name, parts[0], parts[1], parts[-1])
    return None


@dataclass(eq=False)
class Connection:
    """State of one WebSocket client."""

    id: int
    peer: str
    ws: web.WebSocketResponse
    outbox: Outbox
    inbound: asyncio.Queue[tuple[float, str | None]]
    transport: asyncio.BaseTransport | None = None
    session: Session | None = None
    channels: dict[str, Channel] = field(default_factory=dict)
    baselines: dict[str, int] = field(default_factory=dict)  # book channel -> change_id sent
    heartbeat_s: float | None = None
    awaiting_test: bool = False
    cancel_on_disconnect: bool = False
    logged_out: bool = False
    orders: set[str] = field(default_factory=set)  # created over this connection
    deferred: list[Frame] = field(default_factory=list)  # sent right after the reply
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    close_reason: str | None = None


class Fanout:
    """Subscriptions of every connection and the notifications they get (module doc)."""

    def __init__(self, engine: VenueEngine, api: VenueApi,
                 connections: Callable[[], Iterable[Connection]],
                 send: Callable[[Connection, Frame], None]) -> None:
        self._engine = engine
        self._api = api
        self._connections = connections
        self._send = send
        self._subs: dict[str, dict[Connection, None]] = {}
        self._aggregator = BookAggregator()
        self._dirty_tickers: dict[str, None] = {}
        self._recent_trade_ids: dict[str, None] = {}

    @property
    def subscription_count(self) -> int:
        return sum(len(conns) for conns in self._subs.values())

    def _subscribers(self, channel: str) -> tuple[Connection, ...]:
        return tuple(self._subs.get(channel, ()))

    # --- subscribe ---------------------------------------------------------------------------
    def subscribe(self, conn: Connection, names: Iterable[object]) -> list[str] | RpcError:
        """Subscribe ``conn``; the channels subscribed (private ones need a session). A book
        channel's snapshot goes to ``conn.deferred``, to follow the reply."""
        parsed = [(name, parse_channel(name, self._api.instruments)) for name in names]
        bad = [name for name, ch in parsed if ch is None]
        if bad:
            return invalid_params(f"channel_invalid:{str(bad[0])[:80]}", "channels")
        out = []
        for name, ch in parsed:
            assert ch is not None and isinstance(name, str)
            if ch.private and conn.session is None:
                continue  # as Deribit: not subscribed, left out of the answer
            out.append(name)
            if name in conn.channels:
                continue
            if ch.topic == "book" and ch.interval == "100ms":
                for update in self._aggregator.flush(ch.target):  # older than the snapshot
                    self._send_book(name, update)
            conn.channels[name] = ch
            self._subs.setdefault(name, {})[conn] = None
            if ch.topic == "book":
                snap = self.book_snapshot(conn, name)
                if snap is None:
                    conn.outbox.request_snapshot(name)
                else:
                    conn.deferred.append(Frame(snap, "book", name))
        return out

    def unsubscribe(self, conn: Connection, names: Iterable[object]) -> list[str]:
        out = [n for n in names if isinstance(n, str) and n in conn.channels]
        for name in out:
            self._drop(conn, name)
        return out

    def drop_all(self, conn: Connection) -> None:
        for name in list(conn.channels):
            self._drop(conn, name)

    def _drop(self, conn: Connection, name: str) -> None:
        conn.channels.pop(name, None)
        conn.baselines.pop(name, None)
        subs = self._subs.get(name)
        if subs is not None:
            subs.pop(conn, None)
            if not subs:
                del self._subs[name]

    def book_snapshot(self, conn: Connection, channel: str) -> str | None:
        """A snapshot frame for ``channel`` that also resets the connection's baseline."""
        snap = self._engine.get_book_snapshot(channel.split(".")[1])
        if isinstance(snap, Rejection) or snap.change_id == 0:
            return None  # outage, or nothing published yet: retried by the feed loop
        conn.baselines[channel] = snap.change_id
        return subscription(channel, snap.to_deribit())

    # --- publish -------------------------------------------------------------------------------
    def publish(self, accounts: Iterable[str]) -> None:
        """Send what the last engine calls changed: book updates, user events, tickers."""
        touched: dict[str, None] = {}
        for update in self._engine.drain_book_updates():
            name = update.instrument_name
            touched[name] = None
            self._send_book(f"book.{name}.raw", update)
            if self._subs.get(f"book.{name}.100ms"):
                self._aggregator.add(update)
        events = self._api.events.collect(accounts)
        for order in events.orders:
            self._send_user("orders", order.account, order.instrument_name, order.to_deribit())
        for trade in events.trades:
            touched[trade.instrument_name] = None
            self._send_user("trades", trade.account, trade.instrument_name, trade.to_deribit())
            self._send_public_trade(trade)
        for name in touched:
            self._send_ticker(f"ticker.{name}.raw", name)
            if self._subs.get(f"ticker.{name}.100ms"):
                self._dirty_tickers[name] = None

    def flush_aggregated(self) -> None:
        """Send the merged 100 ms book changes and the tickers that changed since."""
        for update in self._aggregator.flush():
            self._send_book(f"book.{update.instrument_name}.100ms", update)
        dirty, self._dirty_tickers = self._dirty_tickers, {}
        for name in dirty:
            self._send_ticker(f"ticker.{name}.100ms", name)

    def _send_book(self, channel: str, update: BookUpdate) -> None:
        text: str | None = None
        for conn in self._subscribers(channel):
            if update.type == "change" and update.change_id <= conn.baselines.get(channel, -1):
                continue
            text = text or subscription(channel, update.to_deribit())
            self._send(conn, Frame(text, "book", channel))

    def _send_ticker(self, channel: str, name: str) -> None:
        conns = self._subscribers(channel)
        if not conns:
            return
        ticker = self._api.call("public/ticker", None, {"instrument_name": name})
        if isinstance(ticker, dict):
            text = subscription(channel, ticker)
            for conn in conns:
                self._send(conn, Frame(text, "ticker", channel))

    def _send_user(self, topic: str, account: str, name: str, data: dict[str, object]) -> None:
        inst = self._api.instruments[name]
        targets = (name, "any.any", f"any.{inst.base_currency}", f"{inst.kind}.any",
                   f"{inst.kind}.{inst.base_currency}")
        for conn in list(self._connections()):
            if conn.session is None or conn.session.account != account:
                continue
            for ch in conn.channels.values():
                if ch.topic == f"user.{topic}" and ch.target in targets:
                    payload = data if topic == "orders" and ch.interval == "raw" else [data]
                    self._send(conn, Frame(subscription(ch.name, payload), "other", ch.name))

    def _send_public_trade(self, trade: Trade) -> None:
        if trade.trade_id in self._recent_trade_ids:
            return  # the other side of a trade between two of our accounts
        self._recent_trade_ids[trade.trade_id] = None
        if len(self._recent_trade_ids) > RECENT_TRADE_IDS:
            self._recent_trade_ids.pop(next(iter(self._recent_trade_ids)))
        taker = trade.direction if trade.liquidity == "T" else (
            "sell" if trade.direction == "buy" else "buy")
        data = [{"trade_id": trade.trade_id, "trade_seq": trade.trade_seq,
                 "instrument_name": trade.instrument_name, "direction": taker,
                 "price": trade.price, "amount": trade.amount,
                 "timestamp": int(round(trade.timestamp_s * 1000)),
                 "index_price": trade.index_price, "mark_price": trade.mark_price}]
        for interval in INTERVALS:
            channel = f"trades.{trade.instrument_name}.{interval}"
            for conn in self._subscribers(channel):
                self._send(conn, Frame(subscription(channel, data), "other", channel))
