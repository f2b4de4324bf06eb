"""The simulator's binary top-of-book feed (``/ws/md/v1``; format in ``l1_codec``).

Session, over one WebSocket: the client sends JSON-RPC text frames ``public/auth`` (the same
credentials as the API) and then ``public/subscribe`` with ``{"instruments": [...]}``; the
server answers each as JSON-RPC, then sends a ``DIRECTORY`` frame and binary ``L1`` frames.
A client that sends anything before authenticating gets 13009 and is closed.

What the feed carries, every ``interval_s``:

* every change of an instrument's best bid/ask in the engine's public view (what the JSON
  ``book`` channels show), and
* with ``load_rate_per_s > 0``, a load generator: that many extra top-of-book events a second
  at a median market (times ``activity()``: when replaying real data, the current bar's volume
  over the file's median, so a crash minute brings its surge of events), spread over the
  subscribed instruments, each a one-tick random move of the engine's current touch. It stands in for a busy venue's event rate so the data path can be measured at
  hundreds of thousands of events a second; it never changes the engine's book.

Faults (the engine's ``Faults``): ``outage`` and ``stale_feed`` send only heartbeats;
``md_drop_probability`` / ``md_duplicate_probability`` / ``md_reorder_probability`` drop,
repeat or swap records after their change ids are assigned, so receivers see real gaps,
duplicates and reordering. Each connection has a bounded queue of frames: when a slow client
lets it fill, new frames are dropped for it and counted (it sees a change-id gap), as a
multicast feed would; the venue never blocks or grows without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import WSMsgType, web

from actors.venue import l1_codec
from actors.venue.auth import Authenticator, Session

log = logging.getLogger("bastion.venue.l1")

L1_PATH = "/ws/md/v1"
HEARTBEAT_S = 1.0
MAX_RECORDS_PER_FRAME = 4096
MIN_ACTIVITY, MAX_ACTIVITY = 0.05, 50.0  # bounds of the load generator's activity multiplier


@dataclass(frozen=True)
class Touch:
    """Best bid/ask of one instrument as the public view shows it (None: empty side)."""

    bid: float | None
    bid_amount: float
    ask: float | None
    ask_amount: float
    tick_size: float


@dataclass
class _Client:
    ws: web.WebSocketResponse
    queue: asyncio.Queue[bytes]
    session: Session | None = None
    wanted: np.ndarray | None = None  # bool mask over the directory
    sent_frames: int = 0
    queued_records: int = 0
    dropped_records: int = 0
    max_queued_frames: int = 0


class L1FeedHub:
    """Owns the feed's sequence numbers and its client connections.

    ``touch_of(name)`` reads the engine's public top of book; ``faults()`` the engine's current
    faults. Both are plain callables so the hub can be driven without a server in tests."""

    def __init__(self, instruments: tuple[str, ...], auth: Authenticator,
                 touch_of: Callable[[str], Touch], faults: Callable[[], Any], *,
                 load_rate_per_s: float = 0.0, activity: Callable[[], float] | None = None,
                 interval_s: float = 0.005, max_queue_frames: int = 64, seed: int = 0) -> None:
        if not np.isfinite(load_rate_per_s) or load_rate_per_s < 0:
            raise ValueError(f"load_rate_per_s={load_rate_per_s!r}: must be finite and >= 0")
        if not np.isfinite(interval_s) or interval_s <= 0:
            raise ValueError(f"interval_s={interval_s!r}: must be finite and > 0")
        self.instruments = tuple(instruments)
        self._index = {n: i for i, n in enumerate(self.instruments)}
        self._auth = auth
        self._touch_of = touch_of
        self._faults = faults
        self.load_rate_per_s = float(load_rate_per_s)
        self._activity = activity or (lambda: 1.0)
        self.interval_s = float(interval_s)
        self._max_queue = max_queue_frames
        self._rng = np.random.default_rng(seed)
        n = len(self.instruments)
        self._change_id = np.zeros(n, dtype=np.int64)
        self._last_touch: dict[int, Touch] = {}
        self._load_carry = 0.0
        self._clients: list[_Client] = []
        self.counts: Counter[str] = Counter()
        self._task: asyncio.Task[None] | None = None

    # --- production of records ----------------------------------------------------------------
    def _wanted(self) -> np.ndarray:
        mask = np.zeros(len(self.instruments), dtype=bool)
        for c in self._clients:
            if c.wanted is not None:
                mask |= c.wanted
        return mask

    def step(self, now_s: float, dt_s: float) -> np.ndarray:
        """The records of one interval (engine touch changes, then load events)."""
        wanted = np.flatnonzero(self._wanted())
        parts: list[np.ndarray] = []
        touches: dict[int, Touch] = {}
        for i in wanted.tolist():
            t = self._touch_of(self.instruments[i])
            if t.bid is None or t.ask is None:
                continue
            touches[i] = t
            if self._last_touch.get(i) != t:
                self._last_touch[i] = t
                parts.append(self._records([i], [t.bid], [t.bid_amount], [t.ask],
                                           [t.ask_amount], now_s))
        if self.load_rate_per_s and touches:
            level = min(max(float(self._activity()), MIN_ACTIVITY), MAX_ACTIVITY)
            self.counts["load_activity_x1000"] = int(level * 1000)
            self._load_carry += self.load_rate_per_s * level * dt_s
            n = int(self._load_carry)
            self._load_carry -= n
            if n:
                parts.append(self._load(touches, n, now_s))
        if not parts:
            return np.zeros(0, dtype=l1_codec.RECORD)
        return np.concatenate(parts)

    def _records(self, inst: Any, bid: Any, bid_amount: Any, ask: Any, ask_amount: Any,
                 now_s: float) -> np.ndarray:
        inst = np.asarray(inst, dtype=np.int64)
        out = np.zeros(len(inst), dtype=l1_codec.RECORD)
        out["instrument"] = inst
        # change ids: +1 per record, per instrument, in order
        order = np.argsort(inst, kind="stable")
        counts = np.bincount(inst, minlength=len(self._change_id))
        starts = np.cumsum(counts) - counts
        rank = np.empty(len(inst), dtype=np.int64)
        rank[order] = np.arange(len(inst)) - np.repeat(starts[counts > 0], counts[counts > 0])
        out["change_id"] = self._change_id[inst] + rank + 1
        self._change_id += counts
        out["ts_us"] = int(now_s * 1e6)
        out["bid"], out["bid_amount"] = bid, bid_amount
        out["ask"], out["ask_amount"] = ask, ask_amount
        return out

    def _load(self, touches: dict[int, Touch], n: int, now_s: float) -> np.ndarray:
        ids = np.fromiter(touches, dtype=np.int64)
        inst = ids[self._rng.integers(0, len(ids), n)]
        base = [touches[i] for i in ids.tolist()]
        pos = np.searchsorted(ids, inst)  # ids ascend: touches are filled in index order
        tick = np.array([t.tick_size for t in base])[pos]
        bid = np.array([t.bid for t in base])[pos]
        ask = np.array([t.ask for t in base])[pos]
        move = self._rng.integers(-1, 2, n) * tick
        bid = np.maximum(bid + move, tick)
        ask = np.maximum(ask + move, bid + tick)
        amount = np.round(self._rng.uniform(1.0, 50.0, (2, n)), 1)
        return self._records(inst, bid, amount[0] * 10, ask, amount[1] * 10, now_s)

    def _apply_faults(self, records: np.ndarray) -> np.ndarray:
        faults = self._faults()
        if not len(records):
            return records
        p_drop = faults.md_drop_probability
        p_dup = faults.md_duplicate_probability
        p_swap = faults.md_reorder_probability
        if p_drop or p_dup:
            u = self._rng.random(len(records))
            drop, dup = u < p_drop, (u >= p_drop) & (u < p_drop + p_dup)
            self.counts["records_dropped_fault"] += int(drop.sum())
            self.counts["records_duplicated_fault"] += int(dup.sum())
            records = np.repeat(records, np.where(drop, 0, np.where(dup, 2, 1)))
        if p_swap and len(records) > 1:
            swap = np.flatnonzero(self._rng.random(len(records) - 1) < p_swap)
            swap = swap[np.concatenate(([True], np.diff(swap) > 1))] if swap.size else swap
            records = records.copy()
            records[swap], records[swap + 1] = records[swap + 1].copy(), records[swap].copy()
            self.counts["records_reordered_fault"] += int(swap.size)
        return records

    def publish(self, records: np.ndarray, now_s: float) -> None:
        """Queue the records for each subscribed client, in frames."""
        self.counts["records_generated"] += len(records)
        records = self._apply_faults(records)
        for c in self._clients:
            if c.wanted is None:
                continue
            mine = records[c.wanted[records["instrument"]]] if len(records) else records
            for k in range(0, len(mine), MAX_RECORDS_PER_FRAME):
                self._put(c, l1_codec.encode_l1(mine[k:k + MAX_RECORDS_PER_FRAME], now_s),
                          len(mine[k:k + MAX_RECORDS_PER_FRAME]))

    def _put(self, client: _Client, frame: bytes, n_records: int) -> None:
        try:
            client.queue.put_nowait(frame)
            self.counts["records_queued"] += n_records
            client.queued_records += n_records
            client.max_queued_frames = max(client.max_queued_frames, client.queue.qsize())
        except asyncio.QueueFull:
            self.counts["frames_dropped_slow_client"] += 1
            self.counts["records_dropped_slow_client"] += n_records
            client.dropped_records += n_records

    # --- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        last = time.time()
        last_sent = last
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.time()
            try:
                faults = self._faults()
                if faults.outage or faults.stale_feed:
                    records = np.zeros(0, dtype=l1_codec.RECORD)
                    self.counts["intervals_suppressed"] += 1
                else:
                    records = self.step(now, now - last)
                if len(records):
                    self.publish(records, now)
                    last_sent = now
                elif now - last_sent >= HEARTBEAT_S:
                    last_sent = now
                    for c in self._clients:
                        if c.wanted is not None:
                            self._put(c, l1_codec.encode_heartbeat(now), 0)
            except Exception:  # noqa: BLE001 - the feed loop never dies; count and go on
                self.counts["loop_errors"] += 1
                log.exception("l1 feed step failed")
            last = now

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for c in list(self._clients):
            with contextlib.suppress(Exception):
                await c.ws.close()

    # --- connections --------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        await ws.prepare(request)
        client = _Client(ws, asyncio.Queue(self._max_queue))
        self._clients.append(client)
        self.counts["connections"] += 1
        writer = asyncio.get_running_loop().create_task(self._writer(client))
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    self.counts["bad_client_frames"] += 1
                    continue
                answer, close = self._on_request(client, msg.data)
                await ws.send_str(json.dumps(answer))
                if client.wanted is not None and not client.sent_frames:
                    client.sent_frames = 1
                    await ws.send_bytes(l1_codec.encode_directory(self.instruments,
                                                                  time.time()))
                if close:
                    break
        finally:
            writer.cancel()
            self._clients.remove(client)
            with contextlib.suppress(Exception):
                await ws.close()
        return ws

    def _on_request(self, client: _Client, text: str) -> tuple[dict[str, Any], bool]:
        try:
            req = json.loads(text)
            rid, method, params = req.get("id"), req["method"], req.get("params") or {}
            if not isinstance(params, dict):
                raise TypeError("params must be an object")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            self.counts["bad_client_frames"] += 1
            return _error(None, -32600, "Invalid Request", repr(exc)), False
        if method == "public/auth":
            result = self._auth.grant(params)
            if not isinstance(result, dict):
                self.counts["auth_failed"] += 1
                return {"jsonrpc": "2.0", "id": rid, "error": result.to_error()}, True
            session = self._auth.check_token(result["access_token"])
            client.session = session if isinstance(session, Session) else None
            return {"jsonrpc": "2.0", "id": rid, "result": result}, False
        if client.session is None:
            self.counts["unauthorized"] += 1
            return _error(rid, 13009, "unauthorized", "public/auth first"), True
        if method == "public/subscribe":
            names = params.get("instruments")
            if not isinstance(names, list) or not names:
                return _error(rid, -32602, "Invalid params", "instruments: a non-empty list"
                              ), False
            unknown = [n for n in names if n not in self._index]
            if unknown:
                self.counts["unknown_instrument"] += 1
                return _error(rid, -32602, "Invalid params",
                              f"unknown instruments: {unknown[:5]}"), False
            mask = np.zeros(len(self.instruments), dtype=bool)
            mask[[self._index[n] for n in names]] = True
            client.wanted = mask if client.wanted is None else client.wanted | mask
            return {"jsonrpc": "2.0", "id": rid,
                    "result": {"instruments": [self.instruments[i]
                                               for i in np.flatnonzero(client.wanted)]}}, False
        return _error(rid, -32601, "Method not found", method), False

    async def _writer(self, client: _Client) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            while True:
                frame = await client.queue.get()
                await client.ws.send_bytes(frame)
                client.sent_frames += 1

    def status(self) -> dict[str, Any]:
        return {"load_rate_per_s": self.load_rate_per_s, "max_queue_frames": self._max_queue,
                "counts": dict(self.counts),
                "clients": [{"account": c.session.account if c.session else None,
                             "queued_frames": c.queue.qsize(),
                             "max_queued_frames": c.max_queued_frames,
                             "queued_records": c.queued_records,
                             "dropped_records": c.dropped_records} for c in self._clients]}


def _error(rid: Any, code: int, message: str, data: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": rid, "error": {"code": code, "message": message,
                                                   "data": data}}
