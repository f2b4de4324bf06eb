"""Wire frames of the mesh: versioned msgpack maps, checked field by field on the way in.

Every frame is one msgpack map ``{"v": FRAME_VERSION, "t": <kind>, <field>: <value>, ...}``
whose fields are exactly those of its dataclass below. :func:`decode` raises :class:`FrameError`
— and nothing else, whatever the bytes — when a frame is not msgpack, has another version, an
unknown kind, a missing, extra or mistyped field, a NaN/inf time, a bad view digest, or is larger
than ``max_frame_bytes``. Frames are also checked when constructed, so a frame that exists is a
valid frame and :func:`encode` only fails on size (or an unencodable ``Payload`` body).

Kinds: :class:`Heartbeat` (every ``heartbeat_interval_s`` to every peer), :class:`PingReq` /
:class:`Ack` (SWIM indirect probe through k helpers; ``Ack.ok=False`` is Lifeguard's nack), the
claims :class:`Suspect` / :class:`Alive` / :class:`Dead` / :class:`Left` about a node at an
incarnation, :class:`View` (who the sender hears, for the partition picture) and :class:`Payload`
(``kind`` + a map ``body``) so that other modules (leases, replication) ride the same codec.

:class:`ReplayGuard` sits after the decoder: per sender and frame kind it keeps the incarnation
and a sliding window of sequence numbers, refuses older incarnations, repeats and sequence
numbers older than the window, and counts every drop by reason.

Times (``sent_s``) are the sender's monotonic clock: meaningful to the sender only (round trips),
never compared with the receiver's clock.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import msgpack

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES", "FRAME_VERSION", "Ack", "Alive", "Claim", "Dead", "Frame",
    "FrameError", "Heartbeat", "Left", "Payload", "PingReq", "ReplayGuard", "Suspect", "View",
    "decode", "encode", "view_digest",
]

FRAME_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 65536
MAX_ID_CHARS = 255
MAX_VIEW_ENTRIES = 4096
_U64_MAX = 2**64 - 1


class FrameError(ValueError):
    """Raised by :func:`decode` for any frame that must be dropped, by :func:`encode` for a frame
    that cannot be sent, and by a frame's constructor for a bad field value.

    ``reason`` is a short code to count drops by (``not_msgpack``, ``wrong_version``,
    ``unknown_type``, ``missing_field``, ``extra_field``, ``bad_field``, ``not_finite``,
    ``bad_digest``, ``oversize``, ``not_a_map``, ``not_bytes``, ``not_encodable``); the message
    adds the details (which field, which value).
    """

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


# ---------------------------------------------------------------------------------------------
# Field checks (used by every frame's __post_init__)

def _check_id(frame: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise FrameError("bad_field", f"{frame}.{name} = {value!r:.80}: must be a string of "
                                      f"1..{MAX_ID_CHARS} characters")


def _check_u64(frame: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _U64_MAX:
        raise FrameError("bad_field",
                         f"{frame}.{name} = {value!r:.80}: must be an integer in [0, 2**64)")


def _check_bool(frame: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise FrameError("bad_field", f"{frame}.{name} = {value!r:.80}: must be a bool")


def _as_time(frame: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise FrameError("bad_field", f"{frame}.{name} = {value!r:.80}: must be a number (s)")
    if not math.isfinite(value):
        raise FrameError("not_finite", f"{frame}.{name} = {value!r}: must be finite")
    return float(value)


def _check_reachable(frame: str, name: str, value: Any) -> None:
    if not isinstance(value, Mapping) or len(value) > MAX_VIEW_ENTRIES:
        raise FrameError("bad_field", f"{frame}.{name}: must be a map of at most "
                                      f"{MAX_VIEW_ENTRIES} node id -> bool")
    for peer, heard in value.items():
        _check_id(frame, f"{name} key", peer)
        _check_bool(frame, f"{name}[{peer!r}]", heard)


def _check_body(frame: str, name: str, value: Any) -> None:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
        raise FrameError("bad_field", f"{frame}.{name} = {value!r:.80}: must be a map with "
                                      "string keys")


def view_digest(reachable: Mapping[str, bool]) -> int:
    """A 63-bit digest of a reachability view, independent of key order (blake2b over the
    sorted ``peer=0|1`` pairs). Heartbeats carry it so peers see at once that a view changed."""
    h = hashlib.blake2b(digest_size=8)
    for peer in sorted(reachable):
        h.update(f"{peer}={int(bool(reachable[peer]))};".encode())
    return int.from_bytes(h.digest(), "big") >> 1


# ---------------------------------------------------------------------------------------------
# Frames

@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Sent by ``node_id`` every ``heartbeat_interval_s``. ``seq`` grows by one per heartbeat
    (never reused, not even after an incarnation bump); ``view_digest`` is the digest of the
    sender's current reachability View."""

    KIND: ClassVar[str] = "hb"
    node_id: str
    site: str
    incarnation: int
    seq: int
    sent_s: float
    view_digest: int

    def __post_init__(self) -> None:
        _check_id("hb", "node_id", self.node_id)
        _check_id("hb", "site", self.site)
        _check_u64("hb", "incarnation", self.incarnation)
        _check_u64("hb", "seq", self.seq)
        object.__setattr__(self, "sent_s", _as_time("hb", "sent_s", self.sent_s))
        _check_u64("hb", "view_digest", self.view_digest)


@dataclass(frozen=True, slots=True)
class PingReq:
    """``by`` asks a helper to vouch for ``target``: the helper answers with an :class:`Ack`
    carrying ``nonce`` once it hears ``target`` (ok) or gives up (nack)."""

    KIND: ClassVar[str] = "ping_req"
    by: str
    target: str
    nonce: int

    def __post_init__(self) -> None:
        _check_id("ping_req", "by", self.by)
        _check_id("ping_req", "target", self.target)
        _check_u64("ping_req", "nonce", self.nonce)


@dataclass(frozen=True, slots=True)
class Ack:
    """Helper ``by``'s answer to a :class:`PingReq`: ``ok`` if it heard ``target`` (at
    ``incarnation``) fresh enough, else a nack (Lifeguard: the helper itself is alive)."""

    KIND: ClassVar[str] = "ack"
    by: str
    target: str
    nonce: int
    incarnation: int
    ok: bool

    def __post_init__(self) -> None:
        _check_id("ack", "by", self.by)
        _check_id("ack", "target", self.target)
        _check_u64("ack", "nonce", self.nonce)
        _check_u64("ack", "incarnation", self.incarnation)
        _check_bool("ack", "ok", self.ok)


@dataclass(frozen=True, slots=True)
class Claim:
    """A statement by ``by`` about ``node`` at ``incarnation``. Use the subclasses."""

    KIND: ClassVar[str] = "claim"
    node: str
    incarnation: int
    by: str

    def __post_init__(self) -> None:
        _check_id(self.KIND, "node", self.node)
        _check_u64(self.KIND, "incarnation", self.incarnation)
        _check_id(self.KIND, "by", self.by)


@dataclass(frozen=True, slots=True)
class Suspect(Claim):
    """``by`` could not reach ``node`` (directly or through helpers) at ``incarnation``."""

    KIND: ClassVar[str] = "suspect"


@dataclass(frozen=True, slots=True)
class Alive(Claim):
    """``node`` is alive at ``incarnation`` (a refutation when sent by ``node`` itself)."""

    KIND: ClassVar[str] = "alive"


@dataclass(frozen=True, slots=True)
class Dead(Claim):
    """``by``'s suspicion of ``node`` at ``incarnation`` expired without refutation."""

    KIND: ClassVar[str] = "dead"


@dataclass(frozen=True, slots=True)
class Left(Claim):
    """``node`` left the mesh on purpose at ``incarnation`` (sent by ``node`` itself)."""

    KIND: ClassVar[str] = "left"


@dataclass(frozen=True, slots=True)
class View:
    """Who ``node_id`` hears directly (peer -> phi below threshold), gossiped every
    ``gossip_interval_s``; ``digest`` must equal :func:`view_digest` of ``reachable``."""

    KIND: ClassVar[str] = "view"
    node_id: str
    incarnation: int
    seq: int
    reachable: Mapping[str, bool]
    digest: int

    def __post_init__(self) -> None:
        _check_id("view", "node_id", self.node_id)
        _check_u64("view", "incarnation", self.incarnation)
        _check_u64("view", "seq", self.seq)
        _check_reachable("view", "reachable", self.reachable)
        _check_u64("view", "digest", self.digest)
        if self.digest != view_digest(self.reachable):
            raise FrameError("bad_digest", f"view.digest = {self.digest!r}: does not match "
                                           f"the view ({view_digest(self.reachable)})")

    @classmethod
    def of(cls, node_id: str, incarnation: int, seq: int,
           reachable: Mapping[str, bool]) -> View:
        """A View with its digest computed."""
        reach = dict(reachable)
        return cls(node_id, incarnation, seq, reach, view_digest(reach))


@dataclass(frozen=True, slots=True)
class Payload:
    """An opaque message of another module (``kind`` names it, e.g. ``lease.grant``); ``body``
    is a map with string keys and msgpack values, which that module validates itself."""

    KIND: ClassVar[str] = "payload"
    kind: str
    body: Mapping[str, Any]

    def __post_init__(self) -> None:
        _check_id("payload", "kind", self.kind)
        _check_body("payload", "body", self.body)


Frame = Heartbeat | PingReq | Ack | Suspect | Alive | Dead | Left | View | Payload
_TYPES: dict[str, type] = {cls.KIND: cls for cls in
                           (Heartbeat, PingReq, Ack, Suspect, Alive, Dead, Left, View, Payload)}
_FIELDS: dict[type, tuple[str, ...]] = {cls: tuple(f.name for f in fields(cls))
                                        for cls in _TYPES.values()}


# ---------------------------------------------------------------------------------------------
# Codec

def encode(frame: Frame, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> bytes:
    """The wire bytes of ``frame``.

    Raises:
        FrameError: ``not_encodable`` (not a frame, or a Payload body msgpack cannot pack),
            ``oversize`` (longer than ``max_frame_bytes``).
    """
    cls = type(frame)
    if cls not in _FIELDS:
        raise FrameError("not_encodable", f"{cls.__name__} is not a frame type")
    doc: dict[str, Any] = {"v": FRAME_VERSION, "t": cls.KIND}
    for name in _FIELDS[cls]:
        value = getattr(frame, name)
        doc[name] = dict(value) if isinstance(value, Mapping) else value
    try:
        data = msgpack.packb(doc, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise FrameError("not_encodable", f"{cls.KIND}: {exc}") from None
    if len(data) > max_frame_bytes:
        raise FrameError("oversize", f"{cls.KIND}: {len(data)} bytes > max_frame_bytes = "
                                     f"{max_frame_bytes}")
    return data


def decode(data: bytes, *, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """The frame in ``data``.

    Raises:
        FrameError: for every way ``data`` can be wrong (see the class); never anything else.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise FrameError("not_bytes", f"got {type(data).__name__}")
    if len(data) > max_frame_bytes:
        raise FrameError("oversize", f"{len(data)} bytes > max_frame_bytes = {max_frame_bytes}")
    try:
        doc = msgpack.unpackb(bytes(data), raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, ValueError…)
        raise FrameError("not_msgpack", f"{type(exc).__name__}: {exc}"[:200]) from None
    if not isinstance(doc, dict):
        raise FrameError("not_a_map", f"top level is {type(doc).__name__}")
    version = doc.pop("v", None)
    if version != FRAME_VERSION or isinstance(version, bool):
        raise FrameError("wrong_version",
                         f"v = {version!r:.40} (this build speaks {FRAME_VERSION})")
    kind = doc.pop("t", None)
    cls = _TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise FrameError("unknown_type", f"t = {kind!r:.40}")
    names = _FIELDS[cls]
    missing = [n for n in names if n not in doc]
    if missing:
        raise FrameError("missing_field", f"{kind}: missing {', '.join(missing)}")
    extra = sorted(str(k) for k in doc if k not in names)
    if extra:
        raise FrameError("extra_field", f"{kind}: unexpected {', '.join(extra)[:120]}")
    try:
        return cls(**doc)
    except FrameError:
        raise
    except Exception as exc:  # a value our checks did not foresee: still just a bad frame
        raise FrameError("bad_field", f"{kind}: {type(exc).__name__}: {exc}"[:200]) from None


# ---------------------------------------------------------------------------------------------
# Replay guard

class ReplayGuard:
    """Drops replayed and stale frames, and counts every frame it drops by reason.

    Sequenced frames (:class:`Heartbeat`, :class:`View`) are tracked per (sender, kind) as
    (incarnation, highest seq, bitmap of the last ``window`` seqs), as IPsec's anti-replay
    window (RFC 4303 §3.4.3):

    - an older incarnation than the one seen: ``stale_incarnation``;
    - a newer incarnation: accepted, the window restarts (the sender restarted or refuted);
    - a seq above the highest: accepted, the window slides;
    - a seq within the window not yet seen: accepted (counted in ``reordered``);
      one already seen: ``duplicate``; older than the window: ``too_old``.

    Why a window and not strictly increasing seqs: ZeroMQ keeps order on one connection, but a
    reconnect (a new TCP connection while frames of the old one are still queued) or a frame
    relayed another way can arrive a few places late; a strict rule would drop those live
    frames, a window of 32 (1.6 s of 50 ms heartbeats) accepts them and still refuses every
    exact replay. ``window=1`` gives the strict rule.

    Other kinds carry no sequence: claims are ordered by incarnation (membership drops stale
    ones), Acks by one-shot nonces, Payloads by their own module. They pass through.
    """

    def __init__(self, *, window: int = 32, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 max_senders: int = 65536) -> None:
        if window < 1:
            raise ValueError(f"window = {window!r}: must be >= 1")
        self.window = window
        self.max_frame_bytes = max_frame_bytes
        self.max_senders = max_senders
        #: Dropped frames by reason: FrameError reasons from :meth:`accept` and the replay
        #: reasons above (``stale_incarnation``, ``duplicate``, ``too_old``, ``too_many_senders``).
        self.dropped: Counter[str] = Counter()
        self.accepted = 0
        self.reordered = 0
        # (sender, kind) -> [incarnation, highest seq, bitmap (bit i: highest - i seen)]
        self._state: dict[tuple[str, str], list[int]] = {}

    def accept(self, data: bytes) -> Frame | None:
        """Decode ``data`` and admit it: the frame, or ``None`` when dropped (and counted)."""
        try:
            frame = decode(data, max_frame_bytes=self.max_frame_bytes)
        except FrameError as exc:
            self.dropped[exc.reason] += 1
            return None
        return frame if self.admit(frame) else None

    def admit(self, frame: Frame) -> bool:
        """Whether a decoded frame is fresh; counts a drop by reason when not."""
        if isinstance(frame, (Heartbeat, View)):
            return self.check(frame.node_id, frame.KIND, frame.incarnation, frame.seq)
        self.accepted += 1
        return True

    def check(self, sender: str, channel: str, incarnation: int, seq: int) -> bool:
        """The sliding-window rule for one (sender, channel): True to accept."""
        key = (sender, channel)
        state = self._state.get(key)
        if state is None:
            if len(self._state) >= self.max_senders:
                return self._drop("too_many_senders")
            self._state[key] = [incarnation, seq, 1]
            self.accepted += 1
            return True
        known_inc, top, bitmap = state
        if incarnation < known_inc:
            return self._drop("stale_incarnation")
        if incarnation > known_inc:
            state[:] = [incarnation, seq, 1]
        elif seq > top:
            shift = seq - top
            state[1:] = [seq, ((bitmap << shift) | 1) & ((1 << self.window) - 1)
                         if shift < self.window else 1]
        else:
            offset = top - seq
            if offset >= self.window:
                return self._drop("too_old")
            if bitmap >> offset & 1:
                return self._drop("duplicate")
            state[2] = bitmap | (1 << offset)
            self.reordered += 1
        self.accepted += 1
        return True

    def forget(self, sender: str) -> None:
        """Drop all state about ``sender`` (it was reaped from membership)."""
        for key in [k for k in self._state if k[0] == sender]:
            del self._state[key]

    def _drop(self, reason: str) -> bool:
        self.dropped[reason] += 1
        return False
