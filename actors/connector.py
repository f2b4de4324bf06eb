"""VenueConnector: one supervised, event-sourced actor per venue, speaking Deribit API v2.

Lifecycle (``actors.connector_core.TRANSITIONS``): STARTING → (connected) RECONCILING →
(reconciled) RUNNING ⇄ DEGRADED (cancel-only); any disconnect goes back to STARTING, and every
(re)start reconciles with the venue *before* a new order is accepted: unresolved intents are
looked up by label, fills missed while down are fetched by ``trade_seq``. The venue is the
source of truth for fills.

Orders: ``submit`` journals an intent first (its journal seq becomes the label), then sends.
A connector killed between the two resends nothing: the restarted one finds the label at the
venue (sent) or not (abandoned). Labels are unique forever, and the venue treats a resend of a
label as the same order, so no order is ever sent twice.

Data out: best bid/ask are conflated per instrument and published with fills to subscriber
actors in batches (numpy columns) every ``publish_interval_s`` — never one call per tick. A
subscriber that is still busy with the previous batch gets the next conflated one; skips are
counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import msgpack
import numpy as np

from actors.connector_core import (
    Ledger,
    OrderRejected,
    StateMachine,
    TopOfBook,
    derive_label,
    fill_event,
    reconnect_delay_s,
    validate_order,
)
from actors.connector_deadman import DeadmanArmer, DeadmanConfigError, DeadmanPolicy
from actors.connector_role import RoleGate
from actors.metrics import ConnectorMetrics
from supervisors import EventSourced, current_context

log = logging.getLogger("bastion.connector")

CALL_TIMEOUT_S = 10.0
#: Venue error codes that say the venue is unwell (not that our order was bad).
UNHEALTHY_CODES = {13028, 11030, 10028}
#: This many unhealthy answers in a row make the connector DEGRADED (cancel-only).
DEGRADE_AFTER = 3
HEALTH_PROBE_S = 0.5
FINAL_STATES = ("filled", "cancelled", "rejected")


class VenueError(RuntimeError):
    """The venue answered a JSON-RPC call with an error object."""

    def __init__(self, method: str, error: dict[str, Any]) -> None:
        self.method = method
        self.code = error.get("code")
        self.error = error
        super().__init__(f"{method}: {error.get('code')} {error.get('message')} "
                         f"{error.get('data') or ''}".strip())


class OptionSelectorError(ValueError):
    """An option selector setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"options: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class OptionSelector:
    """The options a connector trades besides its fixed ``instruments``, resolved on every
    connect through ``public/get_instruments`` (kind option) and ``public/get_index_price``:
    the ``expiries`` nearest expiries at least ``min_expiry_s`` away and, in each, the
    ``strikes`` strikes nearest the index, calls and puts. (Option names depend on the date,
    so a deployment file cannot list them.)"""

    currency: str = "BTC"
    expiries: int = 2
    strikes: int = 2
    min_expiry_s: float = 3600.0

    def __post_init__(self) -> None:
        if not isinstance(self.currency, str) or not re.fullmatch(r"[A-Z]{2,10}", self.currency):
            raise OptionSelectorError("currency", self.currency, "must be a coin like 'BTC'")
        for name in ("expiries", "strikes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 50:
                raise OptionSelectorError(name, value, "must be an int in 1..50")
        value = self.min_expiry_s
        if isinstance(value, bool) or not isinstance(value, int | float) or \
                not math.isfinite(value) or value < 0:
            raise OptionSelectorError("min_expiry_s", value, "must be a finite number >= 0")

    @classmethod
    def from_config(cls, config: object) -> OptionSelector:
        if not isinstance(config, Mapping):
            raise OptionSelectorError("options", config, "must be a mapping of selector fields")
        known = {f.name for f in fields(cls)}
        for key, value in config.items():
            if key not in known:
                raise OptionSelectorError(str(key), value, f"unknown field; known: {sorted(known)}")
        return cls(**config)

    def select(self, listing: list[Any], index_price: float, now_s: float) -> list[str]:
        """The names chosen from a ``public/get_instruments`` answer (malformed rows skipped)."""
        rows: list[tuple[float, float, str]] = []
        for r in listing if isinstance(listing, list) else []:
            try:
                expiry_s = float(r["expiration_timestamp"]) / 1000.0
                row = (expiry_s, float(r["strike"]), str(r["instrument_name"]))
            except (KeyError, TypeError, ValueError):
                continue
            if r.get("kind") == "option" and r.get("base_currency") == self.currency and \
                    math.isfinite(expiry_s) and expiry_s - now_s >= self.min_expiry_s:
                rows.append(row)
        chosen: list[str] = []
        for expiry_s in sorted({e for e, _, _ in rows})[:self.expiries]:
            strikes = sorted({k for e, k, _ in rows if e == expiry_s},
                             key=lambda k: (abs(k - index_price), k))[:self.strikes]
            chosen += sorted(n for e, k, n in rows if e == expiry_s and k in strikes)
        return chosen


class VenueConnector(EventSourced):
    """A venue connector. Constructor arguments come from the child spec's kwargs.
    ``options``: an :class:`OptionSelector` as a dict; the options it picks are resolved on
    every connect and added to ``instruments``. ``deadman_s`` (ungated only): keep the venue's
    dead-man's switch on this connector's orders armed with that countdown while RUNNING; a
    role-gated connector arms it from its lease (``actors.connector_deadman``)."""

    snapshot_every = 500

    def __init__(self, venue: str, ws_url: str, client_id: str, client_secret: str,
                 instruments: list[str], subscribers: list[str] | None = None,
                 publish_interval_s: float = 0.05, heartbeat_s: float = 10.0,
                 reconnect_max_s: float = 5.0, l1_url: str | None = None,
                 options: Mapping[str, Any] | None = None, role_gated: bool = False,
                 replica: str | None = None,
                 deadman_s: float | None = None) -> None:
        if not instruments:
            raise ValueError("instruments must not be empty")
        self.option_selector = None if options is None else OptionSelector.from_config(options)
        self.venue = venue
        self.ws_url = ws_url
        self._client_id = client_id
        self._client_secret = client_secret
        self.instruments = list(instruments)
        self.subscribers = list(subscribers or [])
        self.publish_interval_s = publish_interval_s
        self.heartbeat_s = heartbeat_s
        self.reconnect_max_s = reconnect_max_s
        self.l1_url = l1_url  # the venue's binary top-of-book feed, instead of book channels
        ctx = current_context()
        self.connector_id = (ctx.path.replace("/", "-") if ctx else f"conn-{venue}")
        self.ledger = Ledger()
        self.machine = StateMachine()
        self.book = TopOfBook()
        self.counters: Counter[str] = Counter()
        self._ws: Any = None
        self._session: Any = None
        self._next_id = 0
        self._pending: dict[int, asyncio.Future] = {}
        self._running: asyncio.Event | None = None  # created on the actor's loop
        self._tasks: list[asyncio.Task] = []
        self._undelivered: list[dict[str, Any]] = []
        self._in_flight: dict[str, Any] = {}
        self._booted = False
        self._unhealthy_streak = 0
        self._resyncing: set[str] = set()
        self._handles: dict[str, Any] = {}
        self._outbox: dict[str, list[dict[str, Any]]] = {}
        self._fill_refs: dict[str, tuple[Any, list[dict[str, Any]]]] = {}
        self._tracker: Any = None
        self._l1: Any = None  # actors.connector_l1.L1Client when l1_url is set
        # multi-site: orders only while this site holds the venue's lease (connector_role)
        self.role = RoleGate(role_gated, venue)
        # the venue cancels this connector's orders unless re-armed in time (connector_deadman)
        if role_gated and deadman_s is not None:
            raise DeadmanConfigError("deadman_s", deadman_s, "a role-gated connector arms the "
                                     "switch from its lease; leave deadman_s unset")
        self.deadman = DeadmanArmer(self._call, self.counters, venue,
                                    DeadmanPolicy(periodic_s=deadman_s))
        # the replicated journal of the site this one may replace (actors.connector_replica)
        self.replica = replica
        self._metrics = ConnectorMetrics(venue, self.connector_id)
        self._replica_upto = 0
        self._last_import: dict[str, Any] | None = None

    # ---------------------------------------------------------------- EventSourced
    def apply(self, event: dict[str, Any]) -> None:
        if event["t"] == "replica":  # how far the replicated journal has been imported
            self._replica_upto = max(self._replica_upto, int(event["upto"]))
            return
        self.ledger.apply(event)
        if event["t"] == "fill" and hasattr(self, "_undelivered"):
            self._undelivered.append(event)

    def snapshot_state(self) -> Any:
        return {**self.ledger.snapshot(), "replica_upto": self._replica_upto}

    def restore_state(self, state: Any) -> None:
        self.ledger = Ledger.restore(state)
        self._replica_upto = int(state.get("replica_upto", 0))

    # ---------------------------------------------------------------- public API
    async def submit(self, order: dict[str, Any], wait_s: float = 10.0) -> dict[str, Any]:
        """Send an order. Returns ``{"status": "accepted"|"rejected"|"refused"|"unknown",
        ...}``; a refusal or rejection carries its reason (never an exception)."""
        try:
            req = validate_order(order, set(self.instruments))
        except OrderRejected as exc:
            self.counters["orders_invalid"] += 1
            return {"status": "refused", "reason": str(exc)}
        if not await self._wait_running(wait_s):
            self.counters["orders_refused_state"] += 1
            return {"status": "refused", "reason": f"connector is {self.machine.state}"}
        # No await from this check to the send: a lapsed lease can never slip in between.
        if not self.role.may_send(time.monotonic()):
            self.counters["orders_refused_role"] += 1
            return {"status": "refused", "reason": self.role.refusal(time.monotonic())}
        intent = {"t": "intent", "label": "", **req}
        seq = self.journal_seq + 1
        intent["label"] = self.role.label(derive_label(self.connector_id, seq))
        acked_seq = self.emit(intent)
        assert acked_seq == seq, (acked_seq, seq)
        label = intent["label"]
        params = {"instrument_name": req["instrument"], "amount": req["amount"],
                  "type": req["type"], "label": label}
        if req["price"] is not None:
            params["price"] = req["price"]
        for key in ("post_only", "reduce_only", "time_in_force"):
            if key in req:
                params[key] = req[key]
        try:
            result = await self._call(f"private/{req['direction']}", params)
        except VenueError as exc:
            self.emit({"t": "closed", "label": label, "state": "rejected", "reason": str(exc)})
            self.counters["orders_rejected"] += 1
            self._venue_answer(exc.code)
            return {"status": "rejected", "label": label, "reason": str(exc), "code": exc.code}
        except (TimeoutError, ConnectionError) as exc:
            self.counters["orders_unknown"] += 1
            return {"status": "unknown", "label": label, "reason": repr(exc)}
        self._venue_answer(None)
        self._record_order(result.get("order", {}), label)
        self._record_trades(result.get("trades", []))
        self.counters["orders_accepted"] += 1
        return {"status": "accepted", "label": label,
                "order_id": result.get("order", {}).get("order_id"),
                "state": result.get("order", {}).get("order_state"),
                "filled": sum(t.get("amount", 0) for t in result.get("trades", []))}

    async def cancel(self, label: str) -> dict[str, Any]:
        order = self.ledger.orders.get(label)
        if order is None:
            return {"status": "refused", "reason": f"unknown label {label!r}"}
        if not self.machine.accepts_cancels or order.order_id is None:
            return {"status": "refused", "reason": f"cannot cancel in {self.machine.state}"}
        try:
            result = await self._call("private/cancel", {"order_id": order.order_id})
        except (TimeoutError, VenueError, ConnectionError) as exc:
            return {"status": "rejected", "reason": str(exc)}
        self._record_order(result, label)
        return {"status": "accepted", "state": result.get("order_state")}

    async def cancel_all(self) -> dict[str, Any]:
        try:
            n = await self._call("private/cancel_all", {})
        except (TimeoutError, VenueError, ConnectionError) as exc:
            return {"status": "rejected", "reason": str(exc)}
        return {"status": "accepted", "cancelled": n}

    def positions(self) -> dict[str, float]:
        """Signed position per instrument implied by the fills acknowledged so far."""
        return {k: v for k, v in self.ledger.position.items() if v != 0}

    def fills(self) -> list[dict[str, Any]]:
        return list(self.ledger.fills.values())

    def open_orders(self) -> list[dict[str, Any]]:
        """The ledger's orders still in flight or resting (any epoch's, imported included)."""
        return [dict(vars(o)) for o in self.ledger.unresolved()]

    def labels(self) -> list[str]:
        return list(self.ledger.orders)

    def traded_instruments(self) -> list[str]:
        """The fixed instruments and the options resolved so far."""
        return list(self.instruments)

    def state(self) -> str:
        return self.machine.state

    def status(self) -> dict[str, Any]:
        return {"venue": self.venue, "state": self.machine.state,
                "market_data": "l1" if self.l1_url else "book",
                "role": self.role.status(time.monotonic()),
                "deadman": self.deadman.status(),
                "replica": {"stream": self.replica, "imported_upto": self._replica_upto,
                            "last_import": self._last_import},
                "positions": self.positions(), "fills": len(self.ledger.fills),
                "open_orders": len(self.ledger.unresolved()),
                "journal_seq": self.journal_seq, "epoch": self.journal_epoch,
                "counters": dict(self.counters),
                "transitions": self.machine.history[-20:]}

    def __repr__(self) -> str:
        return (f"VenueConnector({self.venue} {self.machine.state} "
                f"fills={len(self.ledger.fills)} pos={self.positions()})")

    async def on_role_event(self, event: dict[str, Any]) -> dict[str, Any]:
        """A role event from the site's lease (see ``actors.connector_role``): activation
        reconciles with the venue before the first order; deactivation cancels the orders this
        connector has resting. Returns the gate's status."""
        action = self.role.on_event(event, time.monotonic(), time.time())
        loop = asyncio.get_running_loop()
        if action == "activate":
            loop.create_task(self._activate(self.role.epoch))
        elif action == "deactivate":
            loop.create_task(self._deactivate(self._deadman_prefix()))
        elif self.role.state == "ACTIVE" and event.get("kind") == "renew":
            loop.create_task(self.deadman.arm_for_lease(self._deadman_prefix(),
                                                        self.role.deadline_s))
        return self.role.status(time.monotonic())

    async def _activate(self, epoch: int) -> None:
        if not await self._wait_running(30.0):
            return  # still not connected: the next renewal retries
        try:
            self._import_replica()  # what the site we replace journaled, before the venue
            await self._reconcile()  # fills and orders are the venue's, whoever sent them
            await self._cancel_stale_epochs(epoch)
        except Exception as exc:  # noqa: BLE001 - stays ACTIVATING; lapses if not renewed
            self.counters["activation_failed"] += 1
            log.warning("%s: activation reconcile failed: %r", self.venue, exc)
            return
        if self.role.epoch == epoch and self.role.reconciled(time.monotonic()):
            self.counters["activations"] += 1
            await self.deadman.arm_for_lease(self._deadman_prefix(), self.role.deadline_s)

    def _deadman_prefix(self) -> str:
        """The labels of this connector's orders of the current epoch (``e<E>.<id>.``)."""
        return self.role.label(f"{self.connector_id}.")

    async def _deactivate(self, prefix: str) -> None:
        """Cancel what rests, then disarm the venue's switch if nothing of ours is left."""
        await self._cancel_own_open("site deactivated")
        if not any(o.state == "open" and o.label.startswith(prefix)
                   for o in self.ledger.orders.values()):
            await self.deadman.disarm(prefix)

    def _import_replica(self) -> None:
        """Journal what the replicated journal of the replaced site says that this ledger
        does not know yet (see ``actors.connector_replica``)."""
        store = getattr(self, "_es_store", None)
        if not self.replica or store is None:
            return
        from actors.connector_replica import import_replica

        t0 = time.perf_counter()
        position_before = self.positions()
        bodies = []
        for batch in store.iter_read(self.replica, after_seq=self._replica_upto):
            for record in batch:
                try:
                    body = msgpack.unpackb(record.payload, raw=False, strict_map_key=False)
                except (ValueError, msgpack.UnpackException):
                    self.counters["replica_undecodable"] += 1
                    continue
                if isinstance(body, dict):
                    body.setdefault("rseq", record.seq)
                    bodies.append((record.seq, body))
        if not bodies:
            self._last_import = {"records": 0, "ms": (time.perf_counter() - t0) * 1e3}
            return
        result = import_replica(self.ledger, [b for _, b in bodies])
        upto = bodies[-1][0]
        self.emit_many([*result.events, {"t": "replica", "upto": upto}])
        self.counters["replica_records_read"] += result.records
        self.counters["replica_events_imported"] += len(result.events)
        self._last_import = {**result.summary(), "upto": upto,
                             "position_before": position_before,
                             "position_after": self.positions(),
                             "ms": (time.perf_counter() - t0) * 1e3}
        log.info("%s: imported %s from %s", self.venue, self._last_import, self.replica)

    async def _cancel_stale_epochs(self, epoch: int) -> None:
        """Cancel what rests at the venue under an older epoch (this site's or a deposed
        one's): it belongs to no strategy of the new epoch."""
        if not self.role.enabled:
            return
        own = f"e{epoch}."
        for order in list(self.ledger.orders.values()):
            if order.state == "open" and order.order_id is not None and \
                    not order.label.startswith(own):
                try:
                    result = await self._call("private/cancel", {"order_id": order.order_id})
                    self._record_order(result, order.label)
                    self.counters["cancelled_stale_epoch"] += 1
                except VenueError as exc:  # already gone (filled or cancelled): look it up
                    self.counters["cancel_stale_epoch_failed"] += 1
                    log.info("%s: cancel of stale %s: %s", self.venue, order.label, exc)

    async def _cancel_own_open(self, why: str) -> None:
        for order in list(self.ledger.orders.values()):
            if order.state == "open" and order.order_id is not None:
                try:
                    result = await self._call("private/cancel", {"order_id": order.order_id})
                    self._record_order(result, order.label)
                    self.counters["cancelled_on_deactivate"] += 1
                except (TimeoutError, VenueError, ConnectionError) as exc:
                    log.warning("%s: cancel on %s failed: %r", self.venue, why, exc)

    async def _role_watch(self) -> None:
        """A gated connector lapses to STANDBY by itself when renewals stop."""
        while self.machine.state != "STOPPED":
            await asyncio.sleep(0.02)
            if self.role.lapse_if_due(time.monotonic()):
                await self._cancel_own_open("lease lapsed")

    def on_stop(self) -> None:
        self.machine.transition("stop", "supervisor stop")

    def _venue_answer(self, code: int | None) -> None:
        """Track the venue's health from its answers: a streak of unhealthy errors makes the
        connector DEGRADED (cancel-only) until a probe finds the venue well again."""
        if code in UNHEALTHY_CODES:
            self._unhealthy_streak += 1
            if self._unhealthy_streak >= DEGRADE_AFTER and self.machine.transition(
                    "venue_unhealthy", f"{self._unhealthy_streak} unhealthy answers ({code})"):
                self.counters["degraded"] += 1
                self._running.clear()
                asyncio.get_running_loop().create_task(self._probe_until_healthy())
        else:
            self._unhealthy_streak = 0

    async def _probe_until_healthy(self) -> None:
        currency = self.instruments[0].split("-")[0].split("_")[0]
        while self.machine.state == "DEGRADED":
            await asyncio.sleep(HEALTH_PROBE_S)
            try:
                await self._call("private/get_open_orders_by_currency",
                                 {"currency": currency}, timeout_s=2.0)
            except (VenueError, TimeoutError, ConnectionError):
                self.counters["health_probes_failed"] += 1
                continue
            self._unhealthy_streak = 0
            if self.machine.transition("venue_healthy", "health probe answered"):
                await self._reconcile()  # what happened while we could not trade
                self._running.set()

    # ---------------------------------------------------------------- the connection loop
    async def on_started(self) -> None:
        """Called by the supervisor once this incarnation is up (state already rebuilt)."""
        await self._boot()

    async def _boot(self) -> None:
        if self._booted:
            return
        self._booted = True
        self._running = asyncio.Event()
        self._undelivered = list(self.ledger.fills.values())  # at-least-once on restart
        self._tasks.append(asyncio.get_running_loop().create_task(self._main()))
        self._tasks.append(asyncio.get_running_loop().create_task(self._publisher()))
        if self.role.enabled:
            self._tasks.append(asyncio.get_running_loop().create_task(self._role_watch()))
        if self.deadman.policy.periodic_s is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.deadman.run_periodic(
                self._deadman_prefix(), lambda: self.machine.state == "RUNNING",
                lambda: self.machine.state == "STOPPED")))
        if self.l1_url:
            from actors.connector_l1 import L1Client

            self._l1 = L1Client(self.l1_url, self._client_id, self._client_secret,
                                self.instruments, self.counters, self.reconnect_max_s,
                                lambda: self.machine.state == "STOPPED")
            self._tasks.append(asyncio.get_running_loop().create_task(self._l1.run()))

    async def _wait_running(self, wait_s: float) -> bool:
        if self._running is None:
            await self._boot()
        if self.machine.state == "RUNNING":
            return True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._running.wait(), wait_s)
        return self.machine.state == "RUNNING"

    async def _main(self) -> None:
        import aiohttp

        attempt = 0
        while self.machine.state != "STOPPED":
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(
                        self.ws_url, heartbeat=None, max_msg_size=4 * 1024 * 1024) as ws:
                    self._ws = ws
                    reader = asyncio.get_running_loop().create_task(self._reader(ws))
                    try:
                        await self._on_connected()
                        attempt = 0
                        await reader
                    finally:
                        reader.cancel()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop survives; counted, logged
                self.counters["connect_errors"] += 1
                log.warning("%s: connection failed: %r", self.venue, exc)
            self._ws = None
            self._running.clear()
            self._fail_pending(ConnectionError("disconnected"))
            self.machine.transition("disconnected", "connection closed")
            attempt += 1
            await asyncio.sleep(reconnect_delay_s(attempt, self.reconnect_max_s))

    async def _on_connected(self) -> None:
        await self._call("public/auth", {"grant_type": "client_credentials",
                                         "client_id": self._client_id,
                                         "client_secret": self._client_secret})
        await self._call("public/set_heartbeat", {"interval": self.heartbeat_s})
        await self._call("private/enable_cancel_on_disconnect", {"scope": "connection"})
        await self._resolve_instruments()
        self.machine.transition("connected", "authenticated")
        await self._reconcile()
        from actors.venue.feed import ChangeIdTracker

        self._tracker = ChangeIdTracker()
        books = [] if self.l1_url else [f"book.{i}.raw" for i in self.instruments]
        channels = books + [f"user.trades.{i}.raw" for i in self.instruments] + \
                   [f"user.orders.{i}.raw" for i in self.instruments]
        await self._call("private/subscribe", {"channels": channels})
        await self._reconcile_fills()  # fills that landed between reconcile and subscribe
        self.machine.transition("reconciled", "reconciled with venue")
        self._running.set()

    async def _resolve_instruments(self) -> None:
        """Add the options the selector picks now, and those the ledger holds or has open
        while the venue still lists them (their fills must be reconciled); options resolved
        before in this incarnation stay. No index yet: raise, and connect again later."""
        sel = self.option_selector
        if sel is None:
            return
        listing = await self._call("public/get_instruments",
                                   {"currency": sel.currency, "kind": "option"})
        index = (await self._call("public/get_index_price",
                                  {"index_name": f"{sel.currency.lower()}_usd"})).get("index_price")
        if isinstance(index, bool) or not isinstance(index, int | float) or \
                not math.isfinite(index) or index <= 0:
            raise ConnectionError(f"no {sel.currency} index yet ({index!r}): options unresolved")
        chosen = sel.select(listing, float(index), time.time())
        listed = {str(r.get("instrument_name")) for r in listing if isinstance(r, dict)}
        held = [o.instrument for o in self.ledger.unresolved()] + list(self.ledger.last_trade_seq)
        self.instruments = list(dict.fromkeys(
            [*self.instruments, *chosen, *(n for n in held if n in listed)]))
        self.counters["options_resolved"] = len(chosen)

    async def _reconcile(self) -> None:
        for order in self.ledger.unresolved():
            currency = order.instrument.split("-")[0].split("_")[0]
            try:
                found = await self._call("private/get_order_state_by_label",
                                         {"currency": currency, "label": order.label})
            except VenueError:
                found = []
            if isinstance(found, dict):
                found = [found]
            if not found:
                # Never reached the venue: it will not be sent now (the caller had no ack).
                self.emit({"t": "closed", "label": order.label, "state": "abandoned",
                           "reason": "not found at the venue after restart"})
                self.counters["intents_abandoned"] += 1
                continue
            self._record_order(found[0], order.label)
            self.counters["orders_reconciled"] += 1
        await self._reconcile_fills()

    async def _reconcile_fills(self) -> None:
        for inst in self.instruments:
            while True:
                start = self.ledger.last_trade_seq.get(inst, 0) + 1
                result = await self._call("private/get_user_trades_by_instrument",
                                          {"instrument_name": inst, "start_seq": start,
                                           "count": 1000, "sorting": "asc"})
                trades = result.get("trades", []) if isinstance(result, dict) else result
                new = self._record_trades(trades)
                self.counters["fills_reconciled"] += new
                if not (isinstance(result, dict) and result.get("has_more")) or not trades:
                    break

    def _record_order(self, order: dict[str, Any], label: str) -> None:
        if not order:
            return
        known = self.ledger.orders.get(label)
        if known is not None and known.order_id is None and order.get("order_id"):
            self.emit({"t": "ack", "label": label, "order_id": str(order["order_id"]),
                       "state": order.get("order_state", "open")})
        state = order.get("order_state")
        known = self.ledger.orders.get(label)
        if state in ("cancelled", "rejected") and known is not None and \
                known.state in ("intent", "open"):
            self.emit({"t": "closed", "label": label, "state": state,
                       "reason": order.get("cancel_reason", "")})

    def _record_trades(self, trades: list[dict[str, Any]]) -> int:
        events = []
        for trade in trades:
            event = fill_event(trade)
            if event is None:
                self.counters["bad_trades"] += 1
                continue
            if event["trade_id"] in self.ledger.fills:
                self.counters["duplicate_trades"] += 1
                continue
            events.append(event)
        if events:
            self.emit_many(events)
        return len(events)

    # ---------------------------------------------------------------- JSON-RPC
    async def _call(self, method: str, params: dict[str, Any],
                    timeout_s: float = CALL_TIMEOUT_S) -> Any:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected")
        self._next_id += 1
        rid = self._next_id
        future = asyncio.get_running_loop().create_future()
        self._pending[rid] = future
        try:
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                          "params": params}))
            reply = await asyncio.wait_for(future, timeout_s)
        finally:
            self._pending.pop(rid, None)
        if "error" in reply:
            raise VenueError(method, reply["error"])
        return reply.get("result")

    def _fail_pending(self, exc: BaseException) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(exc)
        self._pending.clear()

    async def _reader(self, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                    break
                continue
            try:
                data = json.loads(msg.data)
            except ValueError:
                self.counters["bad_frames"] += 1
                continue
            try:
                await self._dispatch(data)
            except Exception as exc:  # noqa: BLE001 - a bad message never kills the reader
                self.counters["dispatch_errors"] += 1
                log.warning("%s: could not handle %r: %r", self.venue, str(data)[:200], exc)

    async def _dispatch(self, data: dict[str, Any]) -> None:
        rid = data.get("id")
        if rid is not None and rid in self._pending:
            self._pending[rid].set_result(data)
            return
        method = data.get("method")
        if method == "heartbeat":
            if (data.get("params") or {}).get("type") == "test_request":
                ws = self._ws
                if ws is not None:
                    self._next_id += 1
                    await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": self._next_id,
                                                  "method": "public/test", "params": {}}))
            return
        if method != "subscription":
            return
        params = data.get("params") or {}
        channel = str(params.get("channel", ""))
        payload = params.get("data")
        if channel.startswith("book."):
            await self._on_book(channel, payload)
        elif channel.startswith("user.trades."):
            self._record_trades(payload if isinstance(payload, list) else [payload])
        elif channel.startswith("user.orders."):
            for order in payload if isinstance(payload, list) else [payload]:
                label = order.get("label") or ""
                if label in self.ledger.orders:
                    self._record_order(order, label)

    async def _on_book(self, channel: str, payload: dict[str, Any]) -> None:
        from actors.venue.feed import BookUpdate

        try:
            update = BookUpdate(instrument_name=payload["instrument_name"],
                                type=payload.get("type", "change"),
                                change_id=int(payload["change_id"]),
                                prev_change_id=payload.get("prev_change_id"),
                                timestamp_s=int(payload.get("timestamp", 0)) / 1000.0,
                                bids=(), asks=())
        except (KeyError, TypeError, ValueError):
            self.counters["bad_book_updates"] += 1
            return
        verdict = self._tracker.accept(update) if self._tracker else "ok"
        self.counters[f"book_{verdict}"] += 1
        if verdict in ("duplicate", "out_of_order"):
            return
        if channel in self._resyncing and update.type != "snapshot":
            return  # stale changes until the fresh snapshot arrives
        if verdict == "gap":  # resynchronise from a fresh snapshot
            if channel not in self._resyncing:
                self._resyncing.add(channel)
                self.counters["resyncs"] += 1
                # Not awaited here: the reply is read by this very reader task.
                asyncio.get_running_loop().create_task(self._resync(channel))
            return
        self._resyncing.discard(channel)
        self.book.apply(payload)

    async def _resync(self, channel: str) -> None:
        try:
            await self._call("private/unsubscribe", {"channels": [channel]})
            await self._call("private/subscribe", {"channels": [channel]})
        except Exception:  # noqa: BLE001 - the next gap or reconnect tries again
            self.counters["resync_failed"] += 1
            self._resyncing.discard(channel)

    # ---------------------------------------------------------------- publishing
    async def _publisher(self) -> None:
        """Every ``publish_interval_s``: the latest book per instrument (conflated while a
        subscriber is still busy with the previous batch) and, per subscriber, the fills it has
        not confirmed. A fills call that fails (the subscriber died) is queued again, so
        delivery is at least once; subscribers dedup by ``trade_id``."""
        import ray

        namespace = current_context().namespace if current_context() else None
        while self.machine.state != "STOPPED":
            await asyncio.sleep(self.publish_interval_s)
            if self._metrics.throttle.due():  # at most 1/s: the arguments cost a ledger scan
                self._metrics.export(self.machine.state, len(self.ledger.fills),
                                     len(self.ledger.unresolved()), self.ledger.position,
                                     self.role.status(time.monotonic()), force=True)
            new_fills = [_deribit_trade(f) for f in self._undelivered]
            self._undelivered = []
            if not self.subscribers:
                self._marks_batch()  # nobody takes marks: drop them
                continue
            for name in self.subscribers:
                self._outbox.setdefault(name, []).extend(new_fills)
            batch = self._marks_batch()
            for name in self.subscribers:
                self._settle_fills(ray, name)
                self._settle_marks(ray, name)
                try:
                    handle = self._handles.get(name)
                    if handle is None:  # resolved once, again only after a failure
                        handle = self._handles[name] = ray.get_actor(name, namespace=namespace)
                    outbox = self._outbox.get(name)
                    if outbox and name not in self._fill_refs:
                        self._fill_refs[name] = (handle.on_fills.remote(outbox), outbox)
                        self._outbox[name] = []
                    if batch is None:
                        continue
                    prev = self._in_flight.get(name)
                    if prev is not None and not ray.wait([prev], timeout=0)[0]:
                        self.counters["publish_conflated"] += 1
                        continue
                    self._in_flight[name] = handle.on_marks.remote(batch)
                except Exception:  # noqa: BLE001 - subscriber restarting: retry next tick
                    self._handles.pop(name, None)
                    self.counters["publish_failed"] += 1

    def _marks_batch(self) -> dict[str, Any] | None:
        if self._l1 is not None:
            batch = self._l1.take()
            if batch is not None:
                batch["venue"], batch["ts"] = self.venue, time.time()
            return batch
        names = sorted(self.book.dirty)
        self.book.dirty.clear()
        if not names:
            return None
        best = [self.book.best(n) for n in names]
        bid = np.array([b for b, _ in best], dtype=np.float64)
        ask = np.array([a for _, a in best], dtype=np.float64)
        return {"venue": self.venue, "instrument": np.array(names), "bid": bid, "ask": ask,
                "mark_price": (bid + ask) / 2, "index_price": (bid + ask) / 2,
                "ts": time.time()}

    def _settle_marks(self, ray: Any, name: str) -> None:
        """A marks call that failed means the subscriber died: its handle is stale (a restarted
        subscriber is a new actor under the same name), so resolve it again."""
        prev = self._in_flight.get(name)
        if prev is None or not ray.wait([prev], timeout=0)[0]:
            return
        del self._in_flight[name]
        try:
            ray.get(prev, timeout=0)
        except Exception:  # noqa: BLE001 - died: look the name up again next time
            self._handles.pop(name, None)
            self.counters["marks_subscriber_lost"] += 1

    def _settle_fills(self, ray: Any, name: str) -> None:
        """Confirm a subscriber's fills call, or queue its fills again if it failed."""
        entry = self._fill_refs.get(name)
        if entry is None:
            return
        ref, fills = entry
        if not ray.wait([ref], timeout=0)[0]:
            return
        del self._fill_refs[name]
        try:
            ray.get(ref, timeout=0)
        except Exception:  # noqa: BLE001 - died before taking them: deliver again
            self._handles.pop(name, None)
            self._outbox[name] = fills + self._outbox.get(name, [])
            self.counters["fills_redelivered"] += len(fills)

def _deribit_trade(fill: dict[str, Any]) -> dict[str, Any]:
    """A journaled fill in Deribit's user-trade shape (what subscribers such as RiskBook take)."""
    return {"trade_id": fill["trade_id"], "trade_seq": fill["trade_seq"],
            "instrument_name": fill["instrument"], "direction": fill["direction"],
            "amount": fill["amount"], "price": fill["price"], "fee": fill["fee"],
            "order_id": fill["order_id"], "label": fill["label"], "timestamp": fill["ts_ms"]}

