"""The ZeroMQ side of one mesh agent: every socket, socket option, monitor and the ZAP handler.

Pattern: one ROUTER bound at the agent's endpoint receives from every peer; one DEALER per peer
connects to that peer's ROUTER and only sends. So each direction of each pair is its own TCP
connection with its own send queue: a slow or dead peer fills only its own queue (a drop counted
against it, never a blocked loop), and a one-way link fault is one connection's business. PUB/SUB
would send a broadcast once, but cannot address one node (probes, payloads) and drops silently;
REQ/REP would block on a dead peer. Every message is two parts, ``[sender node id, frame]``:
the ROUTER's routing id of a DEALER is not used (it would have to be unique and would need
handover after a restart); with CURVE the sender is checked against the key that authenticated
the connection (the ``User-Id`` ZAP gives it).

Options (durations in seconds here, converted to ms only at the ZeroMQ call):

- ``ZMQ_LINGER`` 0: closing never waits for a dead peer.
- ``ZMQ_IMMEDIATE`` on DEALERs: a message is queued only on a finished connection, so a peer that
  is down makes sends fail at once (counted) instead of piling stale heartbeats up for its return.
- ``ZMQ_SNDHWM`` / ``ZMQ_RCVHWM``: bounded queues; all sends are ``NOBLOCK``.
- ``ZMQ_RECONNECT_IVL`` one heartbeat interval, doubling up to ``reconnect_interval_max_s``: a
  restarted peer is reached again within about a second.
- ``ZMQ_HEARTBEAT_IVL`` / ``_TIMEOUT``: ZMTP pings close a connection whose far end vanished
  (a host gone without a TCP reset), so a reconnect can happen after a partition heals.
- ``ZMQ_MAXMSGSIZE``: a hard cap (4 x ``max_frame_bytes``) above which libzmq drops the
  connection; frames between the two limits arrive and are counted as ``oversize``.
- ``ZMQ_HANDSHAKE_IVL``: a client that connects and never finishes the handshake is dropped.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import parse_monitor_message

from topology.config import MeshConfig
from topology.keys import CurveIdentity

__all__ = ["Inbound", "SocketOptions", "Transport", "ZAP_DOMAIN"]

log = logging.getLogger(__name__)

ZAP_DOMAIN = "bastion-mesh"
#: Socket monitor events counted, by the name used in status (``HANDSHAKE_FAILED_*`` are the
#: unauthenticated clients: an unknown key gives ``..._AUTH``, a plaintext client
#: ``..._PROTOCOL``).
_EVENT_NAMES = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "handshake_failed_auth",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_failed_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed_no_detail",
    zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake_succeeded",
    zmq.EVENT_ACCEPTED: "accepted",
    zmq.EVENT_CONNECTED: "connected",
    zmq.EVENT_DISCONNECTED: "disconnected",
}
_MONITORED = 0
for _event in _EVENT_NAMES:
    _MONITORED |= _event


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True, slots=True)
class SocketOptions:
    """ZeroMQ tunables of an agent (see the module docstring for why each exists)."""

    send_hwm: int = 1000
    recv_hwm: int = 1000
    reconnect_interval_s: float = 0.1
    reconnect_interval_max_s: float = 1.0
    connect_timeout_s: float = 1.0
    handshake_timeout_s: float = 2.0
    zmtp_heartbeat_s: float = 1.0
    zmtp_heartbeat_timeout_s: float = 3.0
    max_message_bytes: int = 4 * 65536

    def __post_init__(self) -> None:
        for name in ("send_hwm", "recv_hwm", "max_message_bytes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"socket.{name} = {getattr(self, name)!r}: must be an int >= 1")
        for name in ("reconnect_interval_s", "reconnect_interval_max_s", "connect_timeout_s",
                     "handshake_timeout_s", "zmtp_heartbeat_s", "zmtp_heartbeat_timeout_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0 < value < 3600:
                raise ValueError(f"socket.{name} = {value!r}: must be in (0, 3600) seconds")

    @classmethod
    def for_mesh(cls, config: MeshConfig) -> SocketOptions:
        """Options scaled to a mesh config: reconnect every heartbeat interval (at most 10 x),
        ZMTP pings every max(1 s, 10 x heartbeat interval)."""
        hb = config.heartbeat_interval_s
        ping_s = max(1.0, 10 * hb)
        return cls(reconnect_interval_s=hb, reconnect_interval_max_s=max(1.0, 10 * hb),
                   connect_timeout_s=max(1.0, 10 * hb), handshake_timeout_s=max(2.0, 10 * hb),
                   zmtp_heartbeat_s=ping_s, zmtp_heartbeat_timeout_s=3 * ping_s,
                   max_message_bytes=4 * config.max_frame_bytes)


@dataclass(frozen=True, slots=True)
class Inbound:
    """One message read from the ROUTER: its parts after the routing id, and the Z85 public key
    that authenticated the connection (None without CURVE)."""

    parts: tuple[bytes, ...]
    client_key: bytes | None


class _AllowList:
    """ZAP credentials provider: admits a client whose key is in ``keys`` (swapped whole, so
    the authenticator thread reads a consistent set)."""

    def __init__(self, keys: Collection[bytes]) -> None:
        self.keys: frozenset[bytes] = frozenset(keys)

    def callback(self, domain: str, key: bytes) -> bool:
        return key in self.keys


class _Link:
    """The outbound DEALER to one peer and its monitor."""

    def __init__(self, socket: zmq.Socket, monitor: zmq.Socket, endpoint: str,
                 server_key: bytes | None) -> None:
        self.socket = socket
        self.monitor = monitor
        self.endpoint = endpoint
        self.server_key = server_key
        self.connected = False
        self.handshake_failed = False
        self.refusals = 0                    # handshakes refused in a row
        self.retry_at_s: float | None = None
        self.events: Counter[str] = Counter()


class Transport:
    """All sockets of one agent. Built and opened by the thread that starts the agent, used by
    the agent's loop thread only from then on (ZeroMQ sockets are not thread-safe)."""

    def __init__(self, node_id: str, bind_endpoint: str, options: SocketOptions, *,
                 curve: CurveIdentity | None = None,
                 allow: Collection[bytes] = ()) -> None:
        self.node_id = node_id
        self._sender = node_id.encode()
        self.bind_endpoint = bind_endpoint
        self.options = options
        self.curve = curve
        self._allow = _AllowList(allow)
        self._ctx: zmq.Context | None = None
        self._auth: ThreadAuthenticator | None = None
        self._router: zmq.Socket | None = None
        self._router_monitor: zmq.Socket | None = None
        self._links: dict[str, _Link] = {}
        self._poller = zmq.Poller()
        self.endpoint: str | None = None
        #: ROUTER monitor events by name (accepted, handshake_failed_auth, ...).
        self.router_events: Counter[str] = Counter()

    # -- life -----------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        return self._ctx is not None

    def open(self, wake_fd: int) -> str:
        """Start the ZAP handler (with CURVE), bind the ROUTER, watch ``wake_fd``; returns the
        bound endpoint (``tcp://host:*`` or ``:0`` picks a free port).

        Raises:
            zmq.ZMQError: the bind failed (address in use, bad endpoint).
        """
        self._ctx = zmq.Context()
        try:
            if self.curve is not None:
                self._auth = ThreadAuthenticator(self._ctx, log=log.getChild("zap"))
                self._auth.start()
                self._auth.configure_curve_callback(ZAP_DOMAIN, self._allow)
            r = self._router = self._ctx.socket(zmq.ROUTER)
            self._common(r)
            r.setsockopt(zmq.RCVHWM, self.options.recv_hwm)
            r.setsockopt(zmq.MAXMSGSIZE, self.options.max_message_bytes)
            r.setsockopt(zmq.HANDSHAKE_IVL, _ms(self.options.handshake_timeout_s))
            if self.curve is not None:
                r.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN.encode())
                r.setsockopt(zmq.CURVE_SERVER, 1)
                r.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
                r.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
            self._router_monitor = r.get_monitor_socket(_MONITORED)
            endpoint = self.bind_endpoint
            if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
                endpoint = endpoint[:-2] + ":*"
            r.bind(endpoint)
            self.endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
            self._poller.register(r, zmq.POLLIN)
            self._poller.register(self._router_monitor, zmq.POLLIN)
            self._poller.register(wake_fd, zmq.POLLIN)
        except BaseException:
            self.close()
            raise
        return self.endpoint

    def close(self) -> None:
        """Close every socket, stop the ZAP handler, end the context. Idempotent."""
        for node in list(self._links):
            self.disconnect(node)
        if self._router is not None:
            with contextlib.suppress(zmq.ZMQError):
                self._router.disable_monitor()
            self._router.close(linger=0)
            self._router = None
        if self._router_monitor is not None:
            self._router_monitor.close(linger=0)
            self._router_monitor = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None

    def _common(self, s: zmq.Socket) -> None:
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, _ms(self.options.reconnect_interval_s))
        s.setsockopt(zmq.RECONNECT_IVL_MAX, _ms(self.options.reconnect_interval_max_s))
        s.setsockopt(zmq.HEARTBEAT_IVL, _ms(self.options.zmtp_heartbeat_s))
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, _ms(self.options.zmtp_heartbeat_timeout_s))

    # -- peers ----------------------------------------------------------------------------------

    def set_allowed(self, keys: Collection[bytes]) -> None:
        """Replace the client keys the ZAP handler admits (new connections only)."""
        self._allow.keys = frozenset(keys)

    def connect(self, node_id: str, endpoint: str, server_key: bytes | None) -> None:
        """Open the DEALER to ``node_id`` (replacing an existing one)."""
        if self._ctx is None:
            raise RuntimeError("transport is not open")
        self.disconnect(node_id)
        d = self._ctx.socket(zmq.DEALER)
        self._common(d)
        d.setsockopt(zmq.IMMEDIATE, 1)
        d.setsockopt(zmq.SNDHWM, self.options.send_hwm)
        d.setsockopt(zmq.CONNECT_TIMEOUT, _ms(self.options.connect_timeout_s))
        d.setsockopt(zmq.HANDSHAKE_IVL, _ms(self.options.handshake_timeout_s))
        # No ZMQ_ROUTING_ID: the peer's ROUTER gives each connection its own. A fixed one made
        # a link re-dialled while the peer still held our old, half-open connection (after a
        # partition) unheard for good: libzmq ignores a duplicate id without ROUTER_HANDOVER.
        if self.curve is not None:
            if server_key is None:
                d.close(linger=0)
                raise ValueError(f"peer {node_id!r}: CURVE is on but it has no public key")
            d.setsockopt(zmq.CURVE_SERVERKEY, server_key)
            d.setsockopt(zmq.CURVE_PUBLICKEY, self.curve.public)
            d.setsockopt(zmq.CURVE_SECRETKEY, self.curve.secret)
        monitor = d.get_monitor_socket(_MONITORED)
        d.connect(endpoint)
        self._links[node_id] = _Link(d, monitor, endpoint, server_key)
        self._poller.register(monitor, zmq.POLLIN)

    def disconnect(self, node_id: str) -> None:
        link = self._links.pop(node_id, None)
        if link is None:
            return
        self._poller.unregister(link.monitor)
        with contextlib.suppress(zmq.ZMQError):
            link.socket.disable_monitor()
        link.socket.close()  # with the socket's ZMQ_LINGER (0 unless linger_links was called)
        link.monitor.close(linger=0)

    def retry_refused(self, now_s: float) -> int:
        """Re-create the links whose server refused our handshake (our key not allow-listed
        there yet, or a key mismatch): libzmq treats that as a protocol error and never
        reconnects such a socket by itself. Back-off per peer: ``reconnect_interval_s`` doubled
        per refusal in a row, at most ``reconnect_interval_max_s``. Returns how many were
        re-created."""
        redone = 0
        for node, link in list(self._links.items()):
            if not link.handshake_failed:
                continue
            if link.retry_at_s is None:
                delay_s = min(self.options.reconnect_interval_max_s,
                              self.options.reconnect_interval_s * 2 ** link.refusals)
                link.retry_at_s = now_s + delay_s
            elif now_s >= link.retry_at_s:
                refusals = link.refusals + 1
                self.connect(node, link.endpoint, link.server_key)
                self._links[node].refusals = refusals
                redone += 1
        return redone

    def linger_links(self, linger_s: float) -> None:
        """Give queued messages ``linger_s`` to leave when the DEALERs close (a farewell)."""
        for link in self._links.values():
            link.socket.setsockopt(zmq.LINGER, _ms(linger_s))

    def link_status(self) -> dict[str, dict[str, object]]:
        return {n: {"endpoint": link.endpoint, "connected": link.connected,
                    "events": dict(link.events)} for n, link in sorted(self._links.items())}

    # -- traffic --------------------------------------------------------------------------------

    def send(self, node_id: str, frame: bytes) -> bool:
        """Queue ``frame`` for ``node_id`` without blocking: False if there is no link, no
        finished connection, or its queue is full."""
        link = self._links.get(node_id)
        if link is None:
            return False
        try:
            link.socket.send_multipart((self._sender, frame), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    def wait(self, timeout_s: float) -> set[object]:
        """Block up to ``timeout_s`` for traffic; returns what is ready (pass it to
        :meth:`process`). Touches no shared state, so the caller may hold no lock."""
        return {s for s, _ in self._poller.poll(_ms(timeout_s) if timeout_s > 0 else 0)}

    def process(self, ready: set[object], on_inbound: Callable[[Inbound], None],
                max_messages: int) -> bool:
        """Absorb monitor events and hand at most ``max_messages`` inbound messages to
        ``on_inbound`` (bounded, so a flood cannot starve the loop's timers). Returns whether
        the wake fd was ready."""
        if self._router_monitor in ready:
            self._drain_monitor(self._router_monitor, None)
        for link in list(self._links.values()):
            if link.monitor in ready:
                self._drain_monitor(link.monitor, link)
        if self._router in ready:
            self._drain_router(on_inbound, max_messages)
        return any(isinstance(k, int) for k in ready)

    def _drain_router(self, on_inbound: Callable[[Inbound], None], max_messages: int) -> None:
        r = self._router
        assert r is not None
        for _ in range(max_messages):
            try:
                frames = r.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            key = None
            if self.curve is not None:
                try:
                    key = frames[-1].get("User-Id").encode()
                except (zmq.ZMQError, AttributeError):
                    key = None
            on_inbound(Inbound(tuple(f.bytes for f in frames[1:]), key))

    def _drain_monitor(self, monitor: zmq.Socket, link: _Link | None) -> None:
        for _ in range(1000):
            try:
                msg = monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(msg)["event"]
            name = _EVENT_NAMES.get(event)
            if name is None:
                continue
            if link is None:
                self.router_events[name] += 1
            else:
                link.events[name] += 1
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    link.connected = True
                    link.refusals = 0
                elif event == zmq.EVENT_DISCONNECTED:
                    link.connected = False
                elif name.startswith("handshake_failed"):
                    link.handshake_failed = True
