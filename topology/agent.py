"""The heartbeat agent: one per node, the I/O layer around the pure mesh core.

:class:`MeshAgent` runs :class:`~topology.membership.Membership` (SWIM/Lifeguard) and a
:class:`~topology.partition.PartitionTracker` over real ZeroMQ sockets
(:mod:`topology.agent_transport`: a bound ROUTER in, one DEALER per peer out, CURVE + ZAP when
a :class:`~topology.keys.CurveIdentity` is given)::

    agent = MeshAgent("tokyo-1", "tokyo", "tcp://10.0.0.1:7100",
                      {"tokyo-2": Peer("tcp://10.0.0.2:7100", "tokyo", pub2), ...},
                      MeshConfig.preset("lan"), curve=load_identity("keys/tokyo-1.key_secret"))
    agent.subscribe(lambda ev: ev.kind == "down" and migrate_children_of(ev.node_id))
    agent.start()

Three threads: the loop (sockets, timers, membership; never runs user code), the event delivery
thread (subscribers, one event at a time, in order) and the payload thread (``on_payload``
handlers). Public methods may be called from any thread: they take the agent's lock for state,
and hand socket work to the loop through a command queue and a wake pipe.

Inbound frames pass the checks of :class:`~topology.agent_wire.Wire` (envelope, sender, CURVE
key owner, injected faults, decoding, author, :class:`~topology.frames.ReplayGuard`; every drop
counted by reason in :meth:`MeshAgent.status`), then go to ``Membership.on_frame``, to
``PartitionTracker.observe`` (Views) or to the payload handlers.

Every ``tick_interval_s`` the loop runs ``Membership.tick`` (heartbeats every
``heartbeat_interval_s``, Views every ``gossip_interval_s`` or on change, probes, suspicion
timers) and sends what it returns; every half ``gossip_interval_s`` it updates the partition
picture. A crashed node first looks isolated, then membership declares it dead and it leaves
the picture; so partition events are published only once a shape has held for
``max(2 * gossip_interval_s, probe_timeout_s + suspicion_max_s)`` — longer than a lone crash
takes to be declared — and a dead node is dropped from the picture once it is isolated in it (a
group of silent nodes that still hear each other is reported: a cut, or a common crash, look the
same from outside).

The loop survives its own exceptions: each stage's failure is logged (rate-limited), counted,
and the loop goes on; after ``FAIL_STOP_AFTER`` consecutive failed iterations the agent
fail-stops (state ``failed``, a ``failed`` event, sockets closed): it stops heartbeating, so its
peers declare it down — a node that cannot run its detector must not look alive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from topology.agent_transport import Inbound, SocketOptions, Transport
from topology.agent_types import (
    ENDPOINT_SCHEMES,
    LIFECYCLE,
    LIFECYCLE_EVENTS,
    AgentState,
    AgentStoppedError,
    LinkFaults,
    MeshEvent,
    Peer,
    UnknownPeerError,
    check_name,
    picture_to_dict,
)
from topology.agent_wire import Wire
from topology.clock import Clock, MonotonicClock
from topology.config import MeshConfig
from topology.frames import Left, Payload, ReplayGuard, View, encode
from topology.keys import CurveIdentity, check_public_key
from topology.membership import Membership, MemberState, initial_incarnation
from topology.partition import PartitionTracker, Voters

__all__ = ["LIFECYCLE", "AgentState", "AgentStoppedError", "LinkFaults", "MeshAgent",
           "MeshEvent", "Peer", "UnknownPeerError", "picture_to_dict"]

log = logging.getLogger(__name__)

_STOP = object()


@dataclass(slots=True)
class _Counters:
    errors: Counter[str] = field(default_factory=Counter)          # exceptions, by stage
    payloads: Counter[str] = field(default_factory=Counter)
    late_ticks: int = 0
    relinks: int = 0      # links re-created after the peer refused our handshake


class MeshAgent:
    """One node's heartbeat agent. See the module docstring.

    ``allow``: client keys the ZAP handler admits; default the peers' keys. Peers are always
    admitted: ``add_peer`` adds its key, ``remove_peer`` removes it unless it is in ``allow``.
    ``voter_only``: a witness (a node that only votes: membership and lease voter, no
    workload); reported in status.

    Raises (constructor):
        ValueError: a bad node id, site, endpoint or peer; a peer without a public key, or two
            nodes sharing one, with CURVE on; ``allow`` without CURVE.
    """

    MAX_INBOUND_PER_POLL = 256
    MAX_EVENTS_KEPT = 10_000
    MAX_PAYLOAD_BACKLOG = 10_000
    FAIL_STOP_AFTER = 100          # consecutive failed loop iterations
    LEAVE_LINGER_S = 0.2           # a leaving agent gives its Left frames this long to go out
    ERROR_LOG_INTERVAL_S = 5.0     # one log line per (stage, exception type) per interval
    CALL_TIMEOUT_S = 5.0           # add_peer / remove_peer / leave wait this long for the loop

    def __init__(self, node_id: str, site: str, bind_endpoint: str, peers: Mapping[str, Peer],
                 config: MeshConfig, *, curve: CurveIdentity | None = None,
                 allow: Collection[bytes] | None = None, clock: Clock | None = None,
                 incarnation: int | None = None, voter_only: bool = False,
                 socket_options: SocketOptions | None = None) -> None:
        self.node_id = check_name("node_id", node_id)
        self.site = check_name("site", site)
        if not isinstance(bind_endpoint, str) or not bind_endpoint.startswith(ENDPOINT_SCHEMES):
            raise ValueError(f"bind_endpoint = {bind_endpoint!r}: must start with one of "
                             f"{', '.join(ENDPOINT_SCHEMES)}")
        if allow is not None and curve is None:
            raise ValueError("allow: an allow-list needs CURVE (pass curve=CurveIdentity)")
        self.bind_endpoint = bind_endpoint
        self.config = config
        self.clock: Clock = clock if clock is not None else MonotonicClock()
        self.voter_only = bool(voter_only)
        self._curve = curve
        self._allow_extra = frozenset(check_public_key(k, "allow") for k in (allow or ()))
        inc = initial_incarnation(time.time()) if incarnation is None else int(incarnation)
        self._membership = Membership(node_id, site, config, incarnation=inc,
                                      seed=zlib.crc32(node_id.encode()) ^ inc)
        self._incarnation_seen = inc
        self._guard = ReplayGuard(max_frame_bytes=config.max_frame_bytes)
        self._settle_s = max(2 * config.gossip_interval_s,
                             config.probe_timeout_s + config.suspicion_max_s)
        self._tracker = PartitionTracker(node_id, stale_after_s=3 * config.gossip_interval_s,
                                         forget_after_s=config.dead_node_reap_s,
                                         settle_s=self._settle_s)
        self._views: dict[str, dict[str, bool]] = {}
        self._excluded: set[str] = set()
        self._peers: dict[str, Peer] = {}
        self._n = _Counters()
        self._transport = Transport(node_id, bind_endpoint,
                                    socket_options or SocketOptions.for_mesh(config),
                                    curve=curve)
        self._wire = Wire(self._transport, self._peers, self._guard,
                          max_frame_bytes=config.max_frame_bytes, curve=curve is not None)
        for nid, peer in peers.items():
            self._check_new_peer(nid, peer)
            self._peers[nid] = peer
            if peer.public_key is not None:
                self._wire.key_owner[peer.public_key] = nid
        self._refresh_peer_tables()

        self._lock = threading.RLock()
        self._state = AgentState.NEW
        self.lifecycle: list[tuple[float, AgentState, AgentState, str]] = []
        self._stopping = threading.Event()
        self._leave_on_exit = False
        self._commands: queue.SimpleQueue[tuple[Callable[[], Any], Future | None]] = \
            queue.SimpleQueue()
        self._wake_r = self._wake_w = -1
        self._next_tick_s = -math.inf
        self._next_picture_s = -math.inf
        self._error_logged: dict[tuple[str, str], float] = {}
        self._events: deque[MeshEvent] = deque(maxlen=self.MAX_EVENTS_KEPT)
        self._event_seq = 0
        self._event_q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._subscribers: list[Callable[[MeshEvent], None]] = []
        self._payload_q: queue.Queue[object] = queue.Queue(self.MAX_PAYLOAD_BACKLOG)
        self._payload_handlers: dict[str, Callable[[str, Mapping[str, Any]], None]] = {}
        self._threads: list[threading.Thread] = []
        self._loop_thread: threading.Thread | None = None

    # -- life -----------------------------------------------------------------------------------

    @property
    def state(self) -> AgentState:
        return self._state

    @property
    def endpoint(self) -> str | None:
        """The bound endpoint (the real port when bound to ``:*`` / ``:0``); None before start."""
        return self._transport.endpoint

    @property
    def incarnation(self) -> int:
        return self._membership.incarnation

    def start(self) -> None:
        """Bind, connect to the peers, start the threads. Idempotent while running.

        Raises:
            zmq.ZMQError: the bind failed (address in use, bad endpoint).
            AgentStoppedError: the agent was stopped (make a new one).
        """
        with self._lock:
            if self._state in (AgentState.RUNNING, AgentState.FAILED):
                return
            if self._state is AgentState.STOPPED:
                raise AgentStoppedError(f"agent {self.node_id}: stopped, cannot start again")
            self._wake_r, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            os.set_blocking(self._wake_r, False)
            try:
                self._transport.open(self._wake_r)
                for nid, peer in self._peers.items():
                    self._transport.connect(nid, peer.endpoint, peer.public_key)
                self._transport.set_allowed(self._allowed_keys())
            except BaseException:
                self._transport.close()
                self._close_wake_pipe()
                raise
            self._next_tick_s = self.clock.now_s()
            self._loop_thread = threading.Thread(target=self._run, name=f"mesh-{self.node_id}",
                                                 daemon=True)
            self._threads = [
                self._loop_thread,
                threading.Thread(target=self._deliver_events, name=f"mesh-{self.node_id}-events",
                                 daemon=True),
                threading.Thread(target=self._deliver_payloads,
                                 name=f"mesh-{self.node_id}-payloads", daemon=True)]
            self._lifecycle("start", f"bound {self.endpoint}, {len(self._peers)} peers, "
                                     f"incarnation {self.incarnation}")
            log.info("%s: mesh agent on %s (site %s, incarnation %d, CURVE %s, %d peers)",
                     self.node_id, self.endpoint, self.site, self.incarnation,
                     self._curve.public.decode() if self._curve else "off", len(self._peers))
            for t in self._threads:
                t.start()

    def stop(self, *, leave: bool = False, timeout_s: float = 5.0) -> None:
        """Stop the loop and the delivery threads and wait for them (idempotent). ``leave``:
        first announce a graceful leave, so peers mark this node ``left``, not ``down``."""
        with self._lock:
            if self._state is AgentState.STOPPED:
                return
            if self._state is AgentState.NEW:
                self._lifecycle("stop", "stopped before start")
                return
            self._leave_on_exit = leave
            self._stopping.set()
        self._wake()
        me = threading.current_thread()
        if self._loop_thread is not None and self._loop_thread is not me:
            self._loop_thread.join(timeout_s)
        with self._lock:
            self._lifecycle("stop", "leave" if leave else "stop() called")
        self._event_q.put(_STOP)
        try:
            self._payload_q.put(_STOP, timeout=timeout_s)
        except queue.Full:
            log.warning("%s: payload backlog still full after %.1f s", self.node_id, timeout_s)
        for t in self._threads[1:]:
            if t is not me:
                t.join(timeout_s)
                if t.is_alive():
                    log.warning("%s: %s still busy after %.1f s", self.node_id, t.name,
                                timeout_s)
        self._close_wake_pipe()

    def _lifecycle(self, trigger: str, reason: str) -> bool:
        to = LIFECYCLE.get((self._state, trigger))
        if to is None:
            return False
        now = self._now_or_nan()
        self.lifecycle.append((now, self._state, to, reason))
        self._state = to
        self._publish(LIFECYCLE_EVENTS[to], self.node_id, self.site, self.incarnation, now,
                      reason)
        return True

    def _now_or_nan(self) -> float:
        """The clock for paths that must not fail (the agent's own life): NaN if it raises."""
        try:
            return self.clock.now_s()
        except Exception:
            return math.nan

    def _close_wake_pipe(self) -> None:
        with self._lock:   # never close it under a concurrent _wake (the fd could be reused)
            for fd in (self._wake_r, self._wake_w):
                if fd >= 0:
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    def __repr__(self) -> str:
        key = self._curve.public.decode() if self._curve else None
        return (f"MeshAgent(node_id={self.node_id!r}, site={self.site!r}, "
                f"endpoint={self.endpoint or self.bind_endpoint!r}, state={self._state.value}, "
                f"curve_public_key={key!r}, peers={sorted(self._peers)})")

    # -- events and payloads --------------------------------------------------------------------

    def subscribe(self, fn: Callable[[MeshEvent], None]) -> Callable[[], None]:
        """Call ``fn(event)`` for every event from now on, in order, one at a time, from the
        delivery thread. A subscriber that raises is logged and counted; delivery goes on.
        Returns a function that unsubscribes."""
        with self._lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
        return unsubscribe

    def events_since(self, seq: int = 0) -> list[dict[str, Any]]:
        """Events numbered above ``seq`` (the last ``MAX_EVENTS_KEPT`` are kept), as dicts."""
        with self._lock:
            return [e.to_dict() for e in self._events if e.seq > seq]

    def on_payload(self, kind: str, fn: Callable[[str, Mapping[str, Any]], None]) -> None:
        """Handle payloads of ``kind``: ``fn(from_node, body)`` on the payload thread.

        Raises:
            ValueError: a handler for ``kind`` is already registered.
        """
        check_name("kind", kind)
        with self._lock:
            if kind in self._payload_handlers:
                raise ValueError(f"kind = {kind!r}: a payload handler is already registered")
            self._payload_handlers[kind] = fn

    def send_payload(self, to_node: str, kind: str, body: Mapping[str, Any]) -> None:
        """Send a payload to one peer (best effort: drops are counted, never raised later).

        Raises:
            FrameError: ``kind`` or ``body`` invalid, unencodable, or over ``max_frame_bytes``.
            UnknownPeerError: ``to_node`` is not a peer.
            AgentStoppedError: the agent is not running.
        """
        data = encode(Payload(kind, body), max_frame_bytes=self.config.max_frame_bytes)
        with self._lock:
            self._require_peer(to_node)
        self._call_soon(lambda: self._wire.send_bytes(to_node, data, Payload.KIND,
                                                      self.clock.now_s()))

    def broadcast_payload(self, kind: str, body: Mapping[str, Any]) -> None:
        """Send a payload to every peer.

        Raises:
            FrameError: as :meth:`send_payload`. AgentStoppedError: the agent is not running.
        """
        data = encode(Payload(kind, body), max_frame_bytes=self.config.max_frame_bytes)
        self._call_soon(lambda: self._wire.send_to_all(data, Payload.KIND, self.clock.now_s()))

    # -- scale-out, leave, faults ---------------------------------------------------------------

    def add_peer(self, node_id: str, peer: Peer) -> None:
        """Add (or re-point) a peer; takes effect before this returns.

        Raises:
            ValueError: bad id, our own id, or (CURVE) no key / a key another node uses.
        """
        self._check_new_peer(node_id, peer)
        self._call(lambda: self._apply_add_peer(node_id, peer))

    def remove_peer(self, node_id: str) -> None:
        """Forget a peer (scale-in; its agent should have called :meth:`leave`): its link is
        closed, its frames are refused from now on, and membership marks it ``left`` locally
        (nothing is broadcast). Unknown ids are ignored."""
        if node_id == self.node_id:
            raise ValueError(f"node_id = {node_id!r}: that is this agent; use leave()")
        self._call(lambda: self._apply_remove_peer(node_id))

    def leave(self) -> None:
        """Announce a graceful leave (``Membership.leave``): peers mark this node ``left``; the
        agent stops heartbeating but keeps running until :meth:`stop`.

        Raises:
            AgentStoppedError: the agent is not running.
        """
        self._call(lambda: self._wire.send_actions(self._membership.leave(self.clock.now_s()),
                                                   self.clock.now_s()), need_loop=True)

    def set_link_faults(self, peer: str, *, drop_out: float = 0.0, drop_in: float = 0.0,
                        delay_s: float = 0.0) -> LinkFaults:
        """Inject faults on the link to ``peer`` (replacing earlier ones for it).

        Raises:
            UnknownPeerError: ``peer`` is not a peer. ValueError: a value out of range.
        """
        faults = LinkFaults(drop_out, drop_in, delay_s)
        with self._lock:
            self._require_peer(peer)
            if faults.active:
                self._wire.faults[peer] = faults
            else:
                self._wire.faults.pop(peer, None)
        log.info("%s: link faults to %s: %s", self.node_id, peer, faults)
        return faults

    def clear_link_faults(self, peer: str | None = None) -> None:
        """Remove injected faults for ``peer``, or for every peer."""
        with self._lock:
            if peer is None:
                self._wire.faults.clear()
            else:
                self._wire.faults.pop(peer, None)

    # -- reading --------------------------------------------------------------------------------

    def member_state(self, node_id: str) -> MemberState:
        with self._lock:
            return self._membership.state_of(node_id)

    def peers(self) -> dict[str, Peer]:
        with self._lock:
            return dict(self._peers)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: identity, members (state, phi), counters, partition picture.
        Holds public keys only."""
        with self._lock:
            now = self.clock.now_s()
            phis = self._membership.phis(now)
            links = self._transport.link_status()
            members: dict[str, dict[str, Any]] = {}
            for info in self._membership.members(now):
                last = info.last_heartbeat_s
                members[info.node_id] = {
                    "state": info.state.value, "site": info.site,
                    "incarnation": info.incarnation, "phi": _finite(phis.get(info.node_id)),
                    "since_s": info.since_s,
                    "silent_s": None if last is None else round(now - last, 6)}
            for nid, peer in self._peers.items():
                entry = members.setdefault(nid, {"state": MemberState.UNKNOWN.value,
                                                 "site": peer.site, "incarnation": None,
                                                 "phi": None, "since_s": None,
                                                 "silent_s": None})
                entry.update(peer=True, endpoint=peer.endpoint,
                             connected=links.get(nid, {}).get("connected", False),
                             send_dropped=self._wire.counters.send_by_peer.get(nid, 0),
                             faults=_faults_dict(self._wire.faults.get(nid)))
            n = self._n
            wire = self._wire.counters.as_dict(self._guard)
            wire["dropped"]["unauthenticated"] = {
                k: v for k, v in self._transport.router_events.items()
                if k.startswith("handshake_failed")}
            wire["dropped"]["membership"] = dict(self._membership.dropped)
            picture = self._tracker.picture
            published = self._tracker.published
            return {
                "node_id": self.node_id, "site": self.site, "incarnation": self.incarnation,
                "state": self._state.value, "voter_only": self.voter_only,
                "endpoint": self.endpoint, "curve": self._curve is not None,
                "public_key": self._curve.public.decode() if self._curve else None,
                "local_health": self._membership.local_health, "members": members,
                **wire, "connections": dict(self._transport.router_events),
                "relinks": n.relinks, "errors": dict(n.errors), "late_ticks": n.late_ticks,
                "payloads": dict(n.payloads), "delayed_frames": self._wire.delayed_count,
                "events": {"last_seq": self._event_seq},
                "partition": {
                    "current": picture_to_dict(picture) if picture else None,
                    "published": picture_to_dict(published) if published else None,
                    "views": {node: sorted(p for p, ok in v.items() if ok)
                              for node, v in sorted(self._views.items())}},
            }

    # -- the loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        failed = 0
        try:
            while not self._stopping.is_set():
                failed = 0 if self._iteration() else failed + 1
                if failed >= self.FAIL_STOP_AFTER:
                    with self._lock:
                        self._lifecycle("fail", f"{failed} consecutive loop iterations failed; "
                                                f"errors {dict(self._n.errors)}")
                    log.error("%s: mesh agent fail-stopped after %d failed iterations",
                              self.node_id, failed)
                    return
        finally:
            with self._lock:
                self._shutdown_io()

    def _iteration(self) -> bool:
        ok = True
        try:
            timeout_s = self._timeout_s()
        except Exception as exc:
            self._record_error("timers", exc)
            timeout_s, ok = self.config.tick_interval_s, False
        try:
            ready = self._transport.wait(timeout_s)
        except Exception as exc:
            self._record_error("poll", exc)
            ready, ok = set(), False
        with self._lock:
            for stage, step in (("inbound", lambda: self._process(ready)),
                                ("commands", self._run_commands),
                                ("tick", self._maybe_tick),
                                ("delayed", lambda: self._wire.flush_delayed(
                                    self.clock.now_s())),
                                ("events", self._drain_events)):
                try:
                    step()
                except Exception as exc:
                    self._record_error(stage, exc)
                    ok = False
        return ok

    def _timeout_s(self) -> float:
        now = self.clock.now_s()
        delayed = self._wire.next_delayed_s()
        due = self._next_tick_s if delayed is None else min(self._next_tick_s, delayed)
        return min(max(0.0, due - now), self.config.tick_interval_s)

    def _process(self, ready: set[object]) -> None:
        if self._transport.process(ready, self._on_inbound, self.MAX_INBOUND_PER_POLL):
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)

    def _maybe_tick(self) -> None:
        now = self.clock.now_s()
        if now < self._next_tick_s:
            return
        if now - self._next_tick_s > self.config.heartbeat_interval_s:
            self._n.late_ticks += 1   # paused (SIGSTOP, GC, CPU starvation) for over a beat
        self._next_tick_s += self.config.tick_interval_s
        if self._next_tick_s <= now:
            self._next_tick_s = now + self.config.tick_interval_s
        self._wire.send_actions(self._membership.tick(now), now)
        self._n.relinks += self._transport.retry_refused(now)
        if now >= self._next_picture_s:
            self._next_picture_s = now + self.config.gossip_interval_s / 2
            self._update_picture(now)

    def _update_picture(self, now: float) -> None:
        reach = self._membership.reachable(now)
        self._tracker.update(self.node_id, reach, now)
        self._views[self.node_id] = reach
        states = {m.node_id: m.state for m in self._membership.members()}
        gone = {n for n, s in states.items() if s in (MemberState.DEAD, MemberState.LEFT)}
        left = {n for n, s in states.items() if s is MemberState.LEFT}
        before = self._tracker.picture
        isolated = set(before.isolated) if before is not None else set()
        self._excluded = (self._excluded | (gone & isolated) | left) & gone
        self._tracker.evaluate(now, down=self._excluded)

    def _run_commands(self) -> None:
        for _ in range(1000):
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result = fn()
            except Exception as exc:
                if future is None:
                    raise
                future.set_exception(exc)
            else:
                if future is not None:
                    future.set_result(result)

    def _shutdown_io(self) -> None:
        if self._leave_on_exit:
            try:
                now = self.clock.now_s()
                self._wire.send_actions(self._membership.leave(now), now)
                self._transport.linger_links(self.LEAVE_LINGER_S)
            except Exception as exc:
                self._record_error("leave", exc)
        try:
            self._drain_events()
        except Exception as exc:
            self._record_error("events", exc)
        try:
            self._transport.close()
        except Exception as exc:
            self._record_error("close", exc)
        while True:  # a caller still waiting on a command gets an answer
            try:
                _, future = self._commands.get_nowait()
            except queue.Empty:
                break
            if future is not None:
                future.set_exception(AgentStoppedError(f"agent {self.node_id}: stopped"))

    def _record_error(self, stage: str, exc: Exception) -> None:
        self._n.errors[stage] += 1
        key = (stage, type(exc).__name__)
        now = time.monotonic()
        if now - self._error_logged.get(key, -math.inf) >= self.ERROR_LOG_INTERVAL_S:
            self._error_logged[key] = now
            log.error("%s: loop stage %r failed (%d so far): %s: %s", self.node_id, stage,
                      self._n.errors[stage], type(exc).__name__, exc, exc_info=exc)

    # -- commands from other threads ------------------------------------------------------------

    def _wake(self) -> None:
        with self._lock:
            if self._wake_w >= 0:
                # A full pipe wakes the loop anyway.
                with contextlib.suppress(BlockingIOError):
                    os.write(self._wake_w, b"\0")

    def _call_soon(self, fn: Callable[[], Any]) -> None:
        if self._state is not AgentState.RUNNING:
            raise AgentStoppedError(f"agent {self.node_id}: {self._state.value}, not running")
        self._commands.put((fn, None))
        self._wake()

    def _call(self, fn: Callable[[], Any], *, need_loop: bool = False) -> Any:
        """Run ``fn`` on the loop and wait for it; while not running, run it here (it then
        touches no socket)."""
        with self._lock:
            running = self._state is AgentState.RUNNING and not self._stopping.is_set()
            if not running:
                if need_loop:
                    raise AgentStoppedError(f"agent {self.node_id}: {self._state.value}, "
                                            "not running")
                return fn()
            if threading.current_thread() is self._loop_thread:
                return fn()
            future: Future = Future()
            self._commands.put((fn, future))
        self._wake()
        return future.result(self.CALL_TIMEOUT_S)

    # -- peers ----------------------------------------------------------------------------------

    def _check_new_peer(self, node_id: str, peer: Peer) -> None:
        check_name("peer node_id", node_id)
        if node_id == self.node_id:
            raise ValueError(f"peers[{node_id!r}]: that is this agent's own id")
        if not isinstance(peer, Peer):
            raise ValueError(f"peers[{node_id!r}] = {peer!r:.80}: must be a Peer")
        if self._curve is None:
            return
        if peer.public_key is None:
            raise ValueError(f"peers[{node_id!r}].public_key: CURVE is on, the peer needs one")
        owner = self._wire.key_owner.get(peer.public_key)
        if peer.public_key == self._curve.public or owner not in (None, node_id):
            raise ValueError(f"peers[{node_id!r}].public_key: already the key of "
                             f"{owner or self.node_id!r} (each node needs its own key pair)")

    def _require_peer(self, node_id: str) -> None:
        if node_id not in self._peers:
            raise UnknownPeerError(f"{node_id!r}: not a peer of {self.node_id} "
                                   f"(peers: {sorted(self._peers)})")

    def _allowed_keys(self) -> frozenset[bytes]:
        return self._allow_extra | frozenset(self._wire.key_owner)

    def _refresh_peer_tables(self) -> None:
        self._wire.key_owner = {p.public_key: n for n, p in self._peers.items() if p.public_key}
        if self._curve is not None and self._transport.is_open:
            self._transport.set_allowed(self._allowed_keys())
        sites = {n: p.site for n, p in self._peers.items()}
        sites[self.node_id] = self.site
        self._tracker.voters = Voters.from_node_sites(sites)

    def _apply_add_peer(self, node_id: str, peer: Peer) -> None:
        old = self._peers.get(node_id)
        self._peers[node_id] = peer
        self._refresh_peer_tables()
        if self._transport.is_open and old != peer:
            self._transport.connect(node_id, peer.endpoint, peer.public_key)
        log.info("%s: peer %s added at %s (site %s)", self.node_id, node_id, peer.endpoint,
                 peer.site)

    def _apply_remove_peer(self, node_id: str) -> None:
        if self._peers.pop(node_id, None) is None:
            return
        self._wire.faults.pop(node_id, None)
        self._refresh_peer_tables()
        self._transport.disconnect(node_id)
        info = self._membership.member(node_id)
        if info is not None and info.state is not MemberState.LEFT:
            # Mark it left locally; the relay actions it returns are not sent.
            self._membership.on_claim(Left(node_id, info.incarnation, node_id),
                                      self.clock.now_s())
        self._forget(node_id)
        self._drain_events()
        log.info("%s: peer %s removed", self.node_id, node_id)

    def _forget(self, node_id: str) -> None:
        self._guard.forget(node_id)
        self._tracker.forget(node_id)
        self._views.pop(node_id, None)

    # -- inbound --------------------------------------------------------------------------------

    def _on_inbound(self, msg: Inbound) -> None:
        try:
            self._receive(msg)
        except Exception as exc:  # a bug on one message: count it, keep the loop going
            self._record_error("receive", exc)

    def _receive(self, msg: Inbound) -> None:
        admitted = self._wire.receive(msg)
        if admitted is None:
            return
        sender, frame = admitted
        now = self.clock.now_s()
        if isinstance(frame, View):
            if self._tracker.observe(frame, now):
                self._views[frame.node_id] = dict(frame.reachable)
        elif isinstance(frame, Payload):
            try:
                self._payload_q.put_nowait((sender, frame.kind, frame.body))
            except queue.Full:
                self._n.payloads["backlog_full"] += 1
        else:
            self._wire.send_actions(self._membership.on_frame(frame, now), now)

    # -- events ---------------------------------------------------------------------------------

    def _drain_events(self) -> None:
        inc = self._membership.incarnation
        if inc != self._incarnation_seen:
            old, self._incarnation_seen = self._incarnation_seen, inc
            self._publish("refuted", self.node_id, self.site, inc, self._now_or_nan(),
                          f"incarnation {old} -> {inc}: refuted a claim against this node")
        for e in self._membership.events.drain():
            self._publish(e.kind, e.node_id, e.site, e.incarnation, e.ts_s, e.reason)
            if e.kind == "reaped":
                self._forget(e.node_id)
        for p in self._tracker.events.drain():
            self._publish(p.kind, None, None, None, p.ts_s, p.reason, picture_to_dict(p.picture))

    def _publish(self, kind: str, node_id: str | None, site: str | None,
                 incarnation: int | None, ts_s: float, reason: str,
                 picture: Mapping[str, Any] | None = None) -> None:
        self._event_seq += 1
        event = MeshEvent(self._event_seq, kind, node_id, site, incarnation, ts_s, time.time(),
                          reason, picture)
        self._events.append(event)
        self._event_q.put(event)
        level = logging.INFO if kind in ("up", "started", "stopped", "healed") else \
            logging.WARNING
        log.log(level, "%s: event #%d %s %s: %s", self.node_id, event.seq, kind,
                node_id or "", reason)

    def _deliver_events(self) -> None:
        while True:
            event = self._event_q.get()
            if event is _STOP:
                return
            with self._lock:
                subscribers = list(self._subscribers)
            for fn in subscribers:
                try:
                    fn(event)  # type: ignore[arg-type]
                except Exception:
                    with self._lock:
                        self._n.errors["subscriber"] += 1
                    log.exception("%s: event subscriber %r failed", self.node_id, fn)

    def _deliver_payloads(self) -> None:
        while True:
            item = self._payload_q.get()
            if item is _STOP:
                return
            sender, kind, body = item  # type: ignore[misc]
            handler = self._payload_handlers.get(kind)
            with self._lock:
                self._n.payloads["received" if handler else "no_handler"] += 1
            if handler is None:
                continue
            try:
                handler(sender, body)
            except Exception:
                with self._lock:
                    self._n.errors["payload_handler"] += 1
                log.exception("%s: payload handler for %r failed", self.node_id, kind)


def _finite(x: float | None) -> float | None:
    return round(x, 3) if x is not None and math.isfinite(x) else None


def _faults_dict(f: LinkFaults | None) -> dict[str, float] | None:
    return None if f is None else {"drop_out": f.drop_out, "drop_in": f.drop_in,
                                   "delay_s": f.delay_s}


if __name__ == "__main__":
    import sys

    from topology.agent_process import main

    sys.exit(main())
