"""The connector's client of a venue's binary top-of-book feed (``actors.venue.l1_codec``).

One task: connect, ``public/auth``, ``public/subscribe`` the connector's instruments, then read
binary frames. Each ``L1`` frame is decoded with one ``np.frombuffer``, checked as a whole
(values, per-instrument ``change_id`` order: ``L1Sequencer``) and folded into an
``L1Conflator``; the connector's publisher takes the conflated marks every interval. Nothing
here is per event in Python, which is what lets one connector ingest hundreds of thousands of
events a second. Refused frames and records are counted into the connector's counters under
``l1_*`` and never reach a subscriber. Disconnects reconnect with capped, jittered backoff.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from actors.connector_core import reconnect_delay_s
from actors.venue import l1_codec

log = logging.getLogger("bastion.connector.l1")

CALL_TIMEOUT_S = 10.0


class L1FeedRefused(RuntimeError):
    """The feed refused our auth or subscription (the message says what it answered)."""


class L1Client:
    def __init__(self, url: str, client_id: str, client_secret: str, instruments: list[str],
                 counters: Counter[str], reconnect_max_s: float,
                 stopped: Callable[[], bool]) -> None:
        self.url = url
        self._client_id = client_id
        self._client_secret = client_secret
        self.instruments = list(instruments)
        self.counters = counters
        self.reconnect_max_s = reconnect_max_s
        self._stopped = stopped
        self.sequencer = l1_codec.L1Sequencer()
        self.conflator = l1_codec.L1Conflator()
        self.connected = False

    def take(self) -> dict[str, Any] | None:
        return self.conflator.take(self.sequencer.instruments)

    async def run(self) -> None:
        import aiohttp

        attempt = 0
        while not self._stopped():
            try:
                async with aiohttp.ClientSession() as session, session.ws_connect(
                        self.url, heartbeat=None, max_msg_size=8 * 1024 * 1024) as ws:
                    await self._handshake(ws)
                    self.connected = True
                    attempt = 0
                    await self._read(ws)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the loop survives; counted, logged
                self.counters["l1_connect_errors"] += 1
                log.warning("l1 feed %s: %r", self.url, exc)
            self.connected = False
            attempt += 1
            await asyncio.sleep(reconnect_delay_s(attempt, self.reconnect_max_s))

    async def _handshake(self, ws: Any) -> None:
        for rid, method, params in (
                (1, "public/auth", {"grant_type": "client_credentials",
                                    "client_id": self._client_id,
                                    "client_secret": self._client_secret}),
                (2, "public/subscribe", {"instruments": self.instruments})):
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method,
                                          "params": params}))
            msg = await asyncio.wait_for(ws.receive(), CALL_TIMEOUT_S)
            reply = json.loads(msg.data) if isinstance(msg.data, str) else {}
            if "error" in reply or reply.get("id") != rid:
                raise L1FeedRefused(f"{method}: {reply.get('error') or reply}")

    async def _read(self, ws: Any) -> None:
        import aiohttp

        async for msg in ws:
            if msg.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                break
            if msg.type != aiohttp.WSMsgType.BINARY:
                self.counters["l1_unexpected_text"] += 1
                continue
            self.on_frame(msg.data)
            # A backlog is read without ever suspending: yield so the publisher (and calls)
            # run between frames instead of after the backlog.
            await asyncio.sleep(0)

    def on_frame(self, data: bytes) -> None:
        """Decode, check and conflate one frame; a bad one is counted and dropped."""
        try:
            frame = l1_codec.decode(data)
        except l1_codec.FeedFrameError as exc:
            self.counters[f"l1_frame_{exc.reason}"] += 1
            return
        self.counters["l1_frames"] += 1
        if frame.kind == l1_codec.DIRECTORY:
            self.sequencer.set_directory(frame.instruments)
            return
        if frame.kind != l1_codec.L1 or frame.records is None:
            return
        before = Counter(self.sequencer.counts)
        good = self.sequencer.accept(frame.records)
        for key, n in (self.sequencer.counts - before).items():
            self.counters[f"l1_{key}"] += n
        self.counters["l1_events"] += len(frame.records)
        self.conflator.add(good, len(self.sequencer.instruments))
