"""The frame path of one mesh agent, between its sockets and its protocol objects.

In, per message (:meth:`Wire.receive`): envelope ``[sender, frame]`` → the sender must be a
configured peer and, with CURVE, own the key that authenticated the connection → injected
``drop_in`` faults → :func:`~topology.frames.decode` (a bad frame is counted by its
:class:`~topology.frames.FrameError` reason) → the frame's own author field (heartbeat / view
``node_id``, probe ``by``) must be the sender → :class:`~topology.frames.ReplayGuard`. What
survives is handed back to the agent to dispatch.

Out (:meth:`Wire.send_actions`, :meth:`Wire.send_bytes`): encode once per action, then per
peer: injected ``drop_out`` faults, injected delay (a heap the loop flushes), and a non-blocking
send; a frame that cannot leave (no connection yet, queue full) is counted, never waited for.

Used by the agent's loop thread, under the agent's lock. Plain Python: the sockets are the
:class:`~topology.agent_transport.Transport`'s.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from topology.agent_transport import Inbound, Transport
from topology.agent_types import LinkFaults, Peer
from topology.frames import (
    Ack,
    Frame,
    FrameError,
    Heartbeat,
    PingReq,
    ReplayGuard,
    View,
    decode,
    encode,
)
from topology.membership import Action, Send

__all__ = ["Wire", "WireCounters"]


@dataclass(slots=True)
class WireCounters:
    sent: Counter[str] = field(default_factory=Counter)            # frames out, by kind
    received: Counter[str] = field(default_factory=Counter)        # admitted, by kind
    malformed: Counter[str] = field(default_factory=Counter)       # FrameError reasons
    rejected: Counter[str] = field(default_factory=Counter)        # envelope / sender checks
    faults: Counter[str] = field(default_factory=Counter)          # injected drops / delays
    send: Counter[str] = field(default_factory=Counter)            # frames that did not leave
    send_by_peer: Counter[str] = field(default_factory=Counter)

    def as_dict(self, guard: ReplayGuard) -> dict[str, Any]:
        return {"frames": {"sent": dict(self.sent), "received": dict(self.received)},
                "dropped": {"malformed": dict(self.malformed), "replayed": dict(guard.dropped),
                            "rejected": dict(self.rejected), "faults": dict(self.faults),
                            "send": dict(self.send)}}


class Wire:
    """Checks, counts and fault-injects every frame of one agent (see the module docstring).

    ``peers`` is the agent's live peer table (read, never written here); ``key_owner`` maps an
    admitted CURVE public key to the node it belongs to (``None``: CURVE is off).
    """

    MAX_DELAYED = 10_000

    def __init__(self, transport: Transport, peers: Mapping[str, Peer], guard: ReplayGuard,
                 *, max_frame_bytes: int, curve: bool) -> None:
        self.transport = transport
        self.peers = peers
        self.guard = guard
        self.max_frame_bytes = max_frame_bytes
        self.curve = curve
        self.key_owner: dict[bytes, str] = {}
        self.faults: dict[str, LinkFaults] = {}
        self.counters = WireCounters()
        self._rng = random.Random()
        self._delayed: list[tuple[float, int, str, bytes, str]] = []
        self._delay_seq = itertools.count()

    # -- in -------------------------------------------------------------------------------------

    def receive(self, msg: Inbound) -> tuple[str, Frame] | None:
        """The sender and frame of ``msg`` if it passes every check, else None (counted)."""
        n = self.counters
        if len(msg.parts) != 2:
            n.rejected["bad_envelope"] += 1
            return None
        raw_sender, data = msg.parts
        try:
            sender = raw_sender.decode("utf-8")
        except UnicodeDecodeError:
            n.rejected["bad_envelope"] += 1
            return None
        if sender not in self.peers:
            n.rejected["unknown_sender"] += 1
            return None
        if self.curve and self.key_owner.get(msg.client_key or b"") != sender:
            n.rejected["spoofed_sender"] += 1   # an admitted key speaking for another node
            return None
        faults = self.faults.get(sender)
        if faults is not None and faults.drop_in and self._rng.random() < faults.drop_in:
            n.faults["drop_in"] += 1
            return None
        try:
            frame = decode(data, max_frame_bytes=self.max_frame_bytes)
        except FrameError as exc:
            n.malformed[exc.reason] += 1
            return None
        author = _author(frame)
        if author is not None and author != sender:
            n.rejected["spoofed_sender"] += 1
            return None
        if not self.guard.admit(frame):
            return None   # counted by the guard
        n.received[frame.KIND] += 1
        return sender, frame

    # -- out ------------------------------------------------------------------------------------

    def send_actions(self, actions: Iterable[Action], now_s: float) -> None:
        """Send what membership asked for: each Send to its node, each Broadcast to all."""
        for action in actions:
            try:
                data = encode(action.frame, max_frame_bytes=self.max_frame_bytes)
            except FrameError as exc:
                self.counters.send[f"encode_{exc.reason}"] += 1
                continue
            if isinstance(action, Send):
                self.send_bytes(action.to, data, action.frame.KIND, now_s)
            else:
                self.send_to_all(data, action.frame.KIND, now_s)

    def send_to_all(self, data: bytes, kind: str, now_s: float) -> None:
        for to in list(self.peers):
            self.send_bytes(to, data, kind, now_s)

    def send_bytes(self, to: str, data: bytes, kind: str, now_s: float) -> None:
        """One encoded frame to one peer, through the injected faults."""
        if to not in self.peers:
            self.counters.send["no_route"] += 1
            return
        faults = self.faults.get(to)
        if faults is not None:
            if faults.drop_out and self._rng.random() < faults.drop_out:
                self.counters.faults["drop_out"] += 1
                return
            if faults.delay_s > 0:
                if len(self._delayed) >= self.MAX_DELAYED:
                    self.counters.send["delay_queue_full"] += 1
                    return
                heapq.heappush(self._delayed,
                               (now_s + faults.delay_s, next(self._delay_seq), to, data, kind))
                self.counters.faults["delayed"] += 1
                return
        self._transmit(to, data, kind)

    def flush_delayed(self, now_s: float) -> None:
        """Send the delayed frames whose time has come."""
        while self._delayed and self._delayed[0][0] <= now_s:
            _, _, to, data, kind = heapq.heappop(self._delayed)
            if to in self.peers:
                self._transmit(to, data, kind)

    def next_delayed_s(self) -> float | None:
        return self._delayed[0][0] if self._delayed else None

    @property
    def delayed_count(self) -> int:
        return len(self._delayed)

    def _transmit(self, to: str, data: bytes, kind: str) -> None:
        if self.transport.send(to, data):
            self.counters.sent[kind] += 1
        else:
            self.counters.send["would_block"] += 1   # not connected, or its queue is full
            self.counters.send_by_peer[to] += 1


def _author(frame: Frame) -> str | None:
    """The node a frame says sent it (None for claims, which are relayed, and payloads)."""
    if isinstance(frame, (Heartbeat, View)):
        return frame.node_id
    if isinstance(frame, (PingReq, Ack)):
        return frame.by
    return None
