"""A lease on the active role for a named resource: majority-granted, epoch-fenced, drift-safe.

Pure logic: no sockets, no clock reads. Every method takes ``now_s`` from the caller's
:class:`topology.clock.Clock`; every message is a frozen dataclass with ``to_body()`` /
``from_body()`` (a msgpack-friendly dict) that the mesh carries as an opaque payload and delivers
(:class:`Outgoing` says to whom). One ``resource`` (e.g. a venue) has one lease; many resources
are many independent leases sharing the same voters.

* :class:`LeaseVoter` — one per site plus an optional witness (a tiny process in a third place).
  It grants ``(holder, epoch)`` a lease unless it holds a live grant to another ``(holder,
  epoch)``; it refuses epochs below the highest it granted and another holder's equal epoch. A
  new grant is persisted (:class:`FilePromiseStore`: atomic write + fsync) *before* the reply
  leaves, so a restarted voter never grants twice; a restarted voter treats every persisted
  grant as live for a full ``lease_s * (1 + max_clock_drift)`` from its restart.
* :class:`LeaseHolder` — one per candidate (a site's agent; or an actor inside a site, against a
  single voter, the site agent). States in :data:`TRANSITIONS`: STANDBY → CANDIDATE → ACTIVE →
  DRAINING (fenced: must stop sending orders) → STANDBY. :meth:`LeaseHolder.may_act` is the
  predicate the order path checks. ``holder_id`` must be unique per incarnation (e.g.
  ``"tokyo/agent#7"``): voters tell holders apart by it, so a copy restarted by Ray while the
  cut-off copy runs on is refused (``held``) until the old copy's grant has lapsed.
* :class:`EpochFence` — the consumer side: refuses actions stamped with an epoch below the
  highest seen; :meth:`EpochFence.after_restart` refuses everything until any lease live at the
  restart has certainly lapsed.

Protocol. A round is one :class:`LeaseRequest` ``(resource, holder, epoch, request_id, lease_s)``
sent to every voter at holder time ``t_req``. A candidate proposes ``highest epoch seen + 1``; a
holder renews with its epoch every ``renew_interval_s``. Once a majority granted the round, the
holder may act until ``t_req + lease_s * (1 - ρ) - stop_margin_s`` (its own clock; ρ =
``max_clock_drift``); a voter keeps its grant live until ``t_grant + lease_s * (1 + ρ)`` (its own
clock). A holder that cannot renew enters DRAINING when its window closes, and STANDBY (sending
:class:`LeaseRelease` to all voters) at ``t_req + lease_s * (1 - ρ)``. A holder releases
voluntarily (:meth:`~LeaseHolder.release`) or hands over (:meth:`~LeaseHolder.transfer`: the
release names a successor, which voters reserve the lease for, and the successor gets a
:class:`LeaseHandoff`), so failback need not wait out the lease.

Why a rate bound, not a skew bound: clocks are local monotonic clocks with unrelated origins and
are never compared, only durations measured on each; what can differ is their *rate*. Model:
every clock runs at a rate within ``[1 - ρ, 1 + ρ]`` of real time; messages may be delayed,
lost, duplicated or reordered; nodes may crash and restart.

Safety: two holders never act at once. Let round r of key k = (holder, epoch) be sent at real
time S and win a majority Q. (1) The holder acts for local ``lease_s(1-ρ) - m``, i.e. real at
most ``lease_s - m/(1-ρ) < lease_s`` after S. (2) A voter in Q granted at real G >= S and keeps
the grant for local ``lease_s(1+ρ)``, i.e. real at least ``lease_s``: live on ``[G, S + lease_s)``
(a release ends it earlier, but only after the holder stopped). (3) Any winning round r' of
another key k' has a majority Q' meeting Q in a voter v; v granted one key first and refused the
other while that grant was live, so the second grant, and so its holder's acting, comes after the
first holder's acting window under that round ended. (4) v refuses epochs below its highest and
another holder's equal epoch, so the later key has the higher epoch: the holder that acts holds
the highest epoch ever granted by a majority, and epochs are fencing tokens. A holder paused
between ``may_act`` and the send is covered by ``stop_margin_s`` (and by the consumer's fence).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "TRANSITIONS", "BodyMessage", "EpochFence", "FenceReason", "FenceVerdict",
    "FilePromiseStore", "HolderState", "HolderTrigger", "LeaseConfig", "LeaseHandoff",
    "LeaseHolder", "LeaseMessageError", "LeaseRelease", "LeaseReply", "LeaseRequest",
    "LeaseStateChange", "LeaseVoter", "MemoryPromiseStore", "Outgoing", "Promise",
    "PromiseStore", "PromiseStoreError", "Refusal", "decode_body", "decode_lease_message",
]

# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


class LeaseConfig(BaseModel):
    """Lease timing. Every holder and voter of one resource must use the same values.

    ``lease_s``: a lease's length, measured from the holder's *request* time.
    ``renew_interval_s``: the holder starts a renewal round (a candidate retries) this often.
    ``max_clock_drift``: bound ρ on every clock's rate error (0.01 = 1 %): a holder acts for
    ``lease_s * (1 - ρ) - stop_margin_s``, a voter holds a grant for ``lease_s * (1 + ρ)``.
    ``stop_margin_s``: kept between the end of a holder's acting window and the end of its lease
    for the order path to stop (and for a pause between ``may_act`` and a send).
    ``request_timeout_s``: a round without a majority after this long has failed.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    lease_s: float = Field(default=2.0, gt=0)
    renew_interval_s: float = Field(default=0.5, gt=0)
    max_clock_drift: float = Field(default=0.01, ge=0, lt=0.5)
    stop_margin_s: float = Field(default=0.2, ge=0)
    request_timeout_s: float = Field(default=0.25, gt=0)

    @model_validator(mode="after")
    def _check_timing(self) -> Self:
        window_s = self.holder_window_s
        if window_s <= 0:
            raise ValueError(
                f"stop_margin_s={self.stop_margin_s!r} leaves no acting window: must be < "
                f"lease_s * (1 - max_clock_drift) = {self.lease_s * (1 - self.max_clock_drift)!r}")
        if self.request_timeout_s > self.renew_interval_s:
            raise ValueError(
                f"request_timeout_s={self.request_timeout_s!r} must be <= renew_interval_s="
                f"{self.renew_interval_s!r} (a round ends before the next is due)")
        if self.renew_interval_s + self.request_timeout_s > window_s:
            raise ValueError(
                f"renew_interval_s={self.renew_interval_s!r} + request_timeout_s="
                f"{self.request_timeout_s!r} must be <= lease_s * (1 - max_clock_drift) - "
                f"stop_margin_s = {window_s!r} (a renewal must be able to land before the "
                f"holder has to stop)")
        return self

    @property
    def holder_window_s(self) -> float:
        """Local seconds after ``t_req`` a holder may act on a won round."""
        return self.lease_s * (1.0 - self.max_clock_drift) - self.stop_margin_s

    @property
    def holder_lease_end_s(self) -> float:
        """Local seconds after ``t_req`` the holder's view of the lease ends (window + margin)."""
        return self.lease_s * (1.0 - self.max_clock_drift)

    @property
    def voter_hold_s(self) -> float:
        """Local seconds a voter keeps a grant live (also the restart hold-off)."""
        return self.lease_s * (1.0 + self.max_clock_drift)

    @classmethod
    def preset(cls, name: Literal["local", "lan", "wan"], **overrides: float) -> LeaseConfig:
        """``local`` (tests on one machine; takeover ~1.5 s, RTO well under 3 s), ``lan``
        (sites a few ms apart), ``wan`` (regions 100-300 ms apart)."""
        if name not in LEASE_PRESETS:
            raise ValueError(f"preset={name!r}: unknown; known: {sorted(LEASE_PRESETS)}")
        return cls(**{**LEASE_PRESETS[name], **overrides})


LEASE_PRESETS: dict[str, dict[str, float]] = {
    "local": {"lease_s": 1.0, "renew_interval_s": 0.25, "max_clock_drift": 0.01,
              "stop_margin_s": 0.1, "request_timeout_s": 0.2},
    "lan": {"lease_s": 2.0, "renew_interval_s": 0.5, "max_clock_drift": 0.01,
            "stop_margin_s": 0.2, "request_timeout_s": 0.25},
    "wan": {"lease_s": 5.0, "renew_interval_s": 1.0, "max_clock_drift": 0.01,
            "stop_margin_s": 0.5, "request_timeout_s": 1.0},
}

# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


class LeaseMessageError(ValueError):
    """A message body is malformed; ``field`` and ``value`` name the culprit."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"invalid message field {field_name}={value!r}: {why}")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


_FIELD_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "bool": lambda v: isinstance(v, bool),
    "float": lambda v: (_is_int(v) or isinstance(v, float)) and math.isfinite(v),  # type: ignore[arg-type]
    "str | None": lambda v: v is None or isinstance(v, str),
    "tuple[str, ...]": lambda v: isinstance(v, list | tuple) and all(isinstance(x, str) for x in v),
    "tuple[Any, ...]": lambda v: isinstance(v, list | tuple),
}


class BodyMessage:
    """Mixin for frozen dataclass messages: ``to_body()`` gives a dict with a ``type`` key and
    one entry per field; ``from_body()`` checks the type key and each field's type."""

    TYPE: ClassVar[str] = ""

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"type": self.TYPE}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            body[f.name] = list(v) if isinstance(v, tuple) else v
        return body

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Self:
        """Raises :class:`LeaseMessageError` naming the first bad field."""
        if not isinstance(body, Mapping):
            raise LeaseMessageError("body", body, "must be a mapping")
        if body.get("type") != cls.TYPE:
            raise LeaseMessageError("type", body.get("type"), f"expected {cls.TYPE!r}")
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name not in body:
                raise LeaseMessageError(f.name, None, "missing")
            v = body[f.name]
            if not _FIELD_CHECKS[str(f.type)](v):
                raise LeaseMessageError(f.name, v, f"expected {f.type}")
            values[f.name] = tuple(v) if str(f.type).startswith("tuple") else v
            if str(f.type) == "float":
                values[f.name] = float(v)
        return cls(**values)


@dataclass(frozen=True)
class LeaseRequest(BodyMessage):
    """Holder → voter: grant (or renew) ``holder``'s lease on ``resource`` at ``epoch``."""

    TYPE: ClassVar[str] = "lease_request"
    resource: str
    holder: str
    epoch: int
    request_id: int
    lease_s: float


class Refusal(StrEnum):
    STALE_EPOCH = "stale_epoch"  # epoch below the highest this voter granted
    EPOCH_TAKEN = "epoch_taken"  # this epoch was granted to another holder (or released)
    HELD = "held"                # a live grant to another (holder, epoch)
    RESERVED = "reserved"        # released with a named successor, who is not the asker
    INVALID = "invalid"          # epoch < 1 or lease_s <= 0


@dataclass(frozen=True)
class LeaseReply(BodyMessage):
    """Voter → holder. ``reason`` is "" when granted, else a :class:`Refusal` value;
    ``highest_epoch`` is the highest the voter granted; ``current_holder`` the live grantee."""

    TYPE: ClassVar[str] = "lease_reply"
    resource: str
    voter: str
    holder: str
    epoch: int
    request_id: int
    granted: bool
    reason: str
    highest_epoch: int
    current_holder: str | None


@dataclass(frozen=True)
class LeaseRelease(BodyMessage):
    """Holder → voter: ``holder`` has stopped acting under ``epoch``; drop the grant. With a
    ``successor`` the voter grants only to it for one ``voter_hold_s``."""

    TYPE: ClassVar[str] = "lease_release"
    resource: str
    holder: str
    epoch: int
    successor: str | None


@dataclass(frozen=True)
class LeaseHandoff(BodyMessage):
    """Old holder → successor: the lease (last epoch ``epoch``) was released for you; campaign."""

    TYPE: ClassVar[str] = "lease_handoff"
    resource: str
    from_holder: str
    to_holder: str
    epoch: int


LeaseMessage = LeaseRequest | LeaseReply | LeaseRelease | LeaseHandoff
_MESSAGE_TYPES: dict[str, type[BodyMessage]] = {
    c.TYPE: c for c in (LeaseRequest, LeaseReply, LeaseRelease, LeaseHandoff)}


def decode_body(body: Mapping[str, Any], types: Mapping[str, type[BodyMessage]]) -> Any:
    """The message of one of ``types`` (by ``TYPE``) that ``body`` encodes. Raises
    :class:`LeaseMessageError` if it is malformed."""
    kind = body.get("type") if isinstance(body, Mapping) else None
    cls = types.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise LeaseMessageError("type", kind, f"unknown; known: {sorted(types)}")
    return cls.from_body(body)


def decode_lease_message(body: Mapping[str, Any]) -> LeaseMessage:
    """The lease message a body encodes. Raises :class:`LeaseMessageError` if malformed."""
    return decode_body(body, _MESSAGE_TYPES)


@dataclass(frozen=True)
class Outgoing:
    """A message for the I/O layer to deliver to the node ``to`` (a voter, holder, standby)."""

    to: str
    message: BodyMessage  # LeaseMessage here; replication messages in topology.replication


# --------------------------------------------------------------------------------------------
# Voter and its persisted promises
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promise:
    """What a voter persisted for one resource: the highest ``epoch`` it granted, to whom
    (``holder``; None once released) and for how long (``lease_s``)."""

    epoch: int
    holder: str | None
    lease_s: float


class PromiseStoreError(RuntimeError):
    """A promise file cannot be read. Raised at voter start: a voter that forgot its promises
    could grant twice, so it must not start."""


class PromiseStore(Protocol):
    def load(self) -> dict[str, Promise]: ...

    def save(self, promises: Mapping[str, Promise]) -> None:
        """Durably replace every promise; returns only once they survive a crash."""
        ...


class MemoryPromiseStore:
    """A store in memory (tests, simulations): survives a voter object, not a process."""

    def __init__(self) -> None:
        self.promises: dict[str, Promise] = {}
        self.saves = 0

    def load(self) -> dict[str, Promise]:
        return dict(self.promises)

    def save(self, promises: Mapping[str, Promise]) -> None:
        self.promises = dict(promises)
        self.saves += 1


class FilePromiseStore:
    """Promises in one JSON file, replaced atomically: write a temp file, fsync, rename over,
    fsync the directory."""

    VERSION = 1

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Promise]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        try:
            data = json.loads(raw)
            if data.get("version") != self.VERSION:
                raise ValueError(f"version {data.get('version')!r} != {self.VERSION}")
            out = {}
            for resource, p in data["promises"].items():
                if not (_is_int(p["epoch"]) and p["epoch"] >= 0
                        and (p["holder"] is None or isinstance(p["holder"], str))
                        and _FIELD_CHECKS["float"](p["lease_s"]) and p["lease_s"] >= 0):
                    raise ValueError(f"bad promise for {resource!r}: {p!r}")
                out[resource] = Promise(p["epoch"], p["holder"], float(p["lease_s"]))
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PromiseStoreError(f"{self.path}: unreadable promise file: {exc}") from None

    def save(self, promises: Mapping[str, Promise]) -> None:
        data = {"version": self.VERSION, "promises": {
            r: dataclasses.asdict(p) for r, p in sorted(promises.items())}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(data, sort_keys=True).encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


_NO_PROMISE = Promise(0, None, 0.0)


class LeaseVoter:
    """Grants leases (see the module docstring for the rules). ``store`` is loaded at
    construction (``now_s`` is the start time: persisted grants stay live ``voter_hold_s``
    from it) and written before any reply that changes a promise."""

    def __init__(self, voter_id: str, config: LeaseConfig, store: PromiseStore,
                 now_s: float) -> None:
        self.voter_id = voter_id
        self.config = config
        self._store = store
        self._promises = store.load()
        self._live_until_s = {r: now_s + p.lease_s * (1 + config.max_clock_drift)
                              for r, p in self._promises.items() if p.holder is not None}
        self._reserved: dict[str, tuple[str, float]] = {}  # resource -> (successor, until_s)

    def handle(self, msg: LeaseMessage, now_s: float) -> LeaseReply | None:
        """A request gets a reply (granted or refused, with the reason); a release none."""
        if isinstance(msg, LeaseRequest):
            return self._on_request(msg, now_s)
        if isinstance(msg, LeaseRelease):
            self._on_release(msg, now_s)
        return None

    def grant(self, resource: str, now_s: float) -> tuple[str, int] | None:
        """The live grant ``(holder, epoch)`` for ``resource``, if any."""
        p = self._promises.get(resource, _NO_PROMISE)
        if p.holder is None or now_s >= self._live_until_s.get(resource, -math.inf):
            return None
        return p.holder, p.epoch

    def highest_epoch(self, resource: str) -> int:
        return self._promises.get(resource, _NO_PROMISE).epoch

    def _refusal(self, msg: LeaseRequest, p: Promise, live: tuple[str, int] | None,
                 now_s: float) -> Refusal | None:
        if msg.epoch < 1 or not msg.lease_s > 0:
            return Refusal.INVALID
        if msg.epoch < p.epoch:
            return Refusal.STALE_EPOCH
        if msg.epoch == p.epoch and msg.holder != p.holder:
            return Refusal.EPOCH_TAKEN
        if live is not None and live != (msg.holder, msg.epoch):
            return Refusal.HELD
        successor, until_s = self._reserved.get(msg.resource, (msg.holder, -math.inf))
        if successor != msg.holder and now_s < until_s:
            return Refusal.RESERVED
        return None

    def _on_request(self, msg: LeaseRequest, now_s: float) -> LeaseReply:
        p = self._promises.get(msg.resource, _NO_PROMISE)
        live = self.grant(msg.resource, now_s)
        refusal = self._refusal(msg, p, live, now_s)
        if refusal is None:
            new = Promise(msg.epoch, msg.holder, msg.lease_s)
            if new != p:  # a renewal of the same grant changes nothing durable
                self._save(msg.resource, new)
            self._live_until_s[msg.resource] = now_s + msg.lease_s * (
                1 + self.config.max_clock_drift)
            self._reserved.pop(msg.resource, None)
            live = (msg.holder, msg.epoch)
        return LeaseReply(
            resource=msg.resource, voter=self.voter_id, holder=msg.holder, epoch=msg.epoch,
            request_id=msg.request_id, granted=refusal is None,
            reason="" if refusal is None else refusal.value,
            highest_epoch=self._promises.get(msg.resource, _NO_PROMISE).epoch,
            current_holder=None if live is None else live[0])

    def _on_release(self, msg: LeaseRelease, now_s: float) -> None:
        p = self._promises.get(msg.resource, _NO_PROMISE)
        if p.holder is None or (p.holder, p.epoch) != (msg.holder, msg.epoch):
            return  # not the grant this voter holds: a stale or duplicate release
        self._save(msg.resource, dataclasses.replace(p, holder=None))
        self._live_until_s.pop(msg.resource, None)
        if msg.successor is not None:
            self._reserved[msg.resource] = (msg.successor, now_s + self.config.voter_hold_s)

    def _save(self, resource: str, promise: Promise) -> None:
        promises = {**self._promises, resource: promise}
        self._store.save(promises)  # durable first: a reply never leaves unrecorded
        self._promises = promises


# --------------------------------------------------------------------------------------------
# Holder state machine
# --------------------------------------------------------------------------------------------


class HolderState(StrEnum):
    STANDBY = "STANDBY"      # not holding; campaigns when wanted
    CANDIDATE = "CANDIDATE"  # an acquire round is out
    ACTIVE = "ACTIVE"        # holds the lease; may act until its window closes
    DRAINING = "DRAINING"    # fenced: must not act; waits for its lease to end, then releases


class HolderTrigger(StrEnum):
    CAMPAIGN = "campaign"                  # wanted and due: send an acquire round
    MAJORITY_GRANTED = "majority_granted"  # a majority granted the acquire round
    ROUND_FAILED = "round_failed"          # refused by too many voters, or timed out
    WINDOW_CLOSED = "window_closed"        # acting window over without a renewal
    FENCED = "fenced"                      # a majority refused a renewal
    LAPSED = "lapsed"                      # the holder's lease is over: release, stand by
    RELEASE = "release"                    # voluntary release / transfer / give up


H, T = HolderState, HolderTrigger
TRANSITIONS: dict[tuple[HolderState, HolderTrigger], HolderState] = {
    (H.STANDBY, T.CAMPAIGN): H.CANDIDATE,
    (H.CANDIDATE, T.MAJORITY_GRANTED): H.ACTIVE,
    (H.CANDIDATE, T.ROUND_FAILED): H.STANDBY,
    (H.CANDIDATE, T.RELEASE): H.STANDBY,
    (H.ACTIVE, T.WINDOW_CLOSED): H.DRAINING,
    (H.ACTIVE, T.FENCED): H.DRAINING,
    (H.ACTIVE, T.RELEASE): H.STANDBY,
    (H.DRAINING, T.LAPSED): H.STANDBY,
}
"""The whole holder state machine. A renewal that succeeds keeps ACTIVE (no transition)."""
del H, T


@dataclass(frozen=True)
class LeaseStateChange:
    ts_s: float
    from_state: HolderState
    to_state: HolderState
    trigger: HolderTrigger
    reason: str
    epoch: int

    def to_dict(self) -> dict[str, Any]:
        return {"ts_s": self.ts_s, "from": self.from_state.value, "to": self.to_state.value,
                "trigger": self.trigger.value, "reason": self.reason, "epoch": self.epoch}


@dataclass
class _Round:
    request_id: int
    epoch: int
    sent_at_s: float
    granted: set[str] = dataclasses.field(default_factory=set)
    refused: dict[str, str] = dataclasses.field(default_factory=dict)


class LeaseHolder:
    """One candidate for the lease on ``resource``. Drive it with :meth:`tick` (returns the
    messages to send) and :meth:`handle` (replies and handoffs addressed to it).

    ``wanted`` (constructor, :meth:`acquire`, :meth:`release`): a wanted holder in STANDBY
    campaigns every ``renew_interval_s`` (after a failed campaign, a per-holder jitter of up to
    one more interval, so two candidates do not keep splitting the vote)."""

    def __init__(self, resource: str, holder_id: str, voters: Iterable[str],
                 config: LeaseConfig, *, wanted: bool = True,
                 on_change: Callable[[LeaseStateChange], None] | None = None,
                 max_history: int = 1000) -> None:
        self.resource = resource
        self.holder_id = holder_id
        self.voters = tuple(dict.fromkeys(voters))
        if not self.voters:
            raise ValueError("voters=(): a lease needs at least one voter")
        self.config = config
        self.majority = len(self.voters) // 2 + 1
        self.wanted = wanted
        self.state = HolderState.STANDBY
        self.epoch = 0                 # the lease's epoch (ACTIVE / DRAINING), else last held
        self.highest_epoch_seen = 0
        self.safe_until_s = -math.inf  # may act strictly before this (own clock)
        self.lease_end_s = -math.inf   # own view of the lease's end (safe_until + margin)
        self.history: deque[LeaseStateChange] = deque(maxlen=max_history)
        self._on_change = on_change
        self._round: _Round | None = None
        self._next_round_s = -math.inf
        self._request_ids = 0
        self._outbox: list[Outgoing] = []
        self._jitter = random.Random(holder_id)

    # -- what the order path asks -------------------------------------------------------------

    def may_act(self, now_s: float) -> bool:
        """True only while ACTIVE and inside the acting window (checked against ``now_s``, so
        a holder that is not ticked still stops in time)."""
        return self.state is HolderState.ACTIVE and now_s < self.safe_until_s

    def acting_epoch(self, now_s: float) -> int | None:
        """The epoch to stamp on an action now, or None if the holder may not act."""
        return self.epoch if self.may_act(now_s) else None

    # -- driving --------------------------------------------------------------------------------

    def tick(self, now_s: float) -> list[Outgoing]:
        """Advance timers; returns requests / releases to send."""
        r = self._round
        if r is not None and now_s >= r.sent_at_s + self.config.request_timeout_s:
            self._round_failed(now_s, f"round {r.request_id} (epoch {r.epoch}) timed out with "
                                      f"{len(r.granted)}/{self.majority} grants")
        if self.state is HolderState.ACTIVE and now_s >= self.safe_until_s:
            self._transition(HolderTrigger.WINDOW_CLOSED, now_s,
                             f"no renewal by safe_until_s={self.safe_until_s:.6g}")
        if self.state is HolderState.DRAINING and now_s >= self.lease_end_s:
            self._transition(HolderTrigger.LAPSED, now_s,
                             f"lease ended at {self.lease_end_s:.6g}")
            self._queue_release(self.epoch, None)
        if self.state is HolderState.STANDBY and self.wanted and now_s >= self._next_round_s:
            self._start_round(now_s, self.highest_epoch_seen + 1)
            self._transition(HolderTrigger.CAMPAIGN, now_s,
                             f"campaigning with epoch {self._round.epoch}")  # type: ignore[union-attr]
        elif (self.state is HolderState.ACTIVE and self._round is None
              and now_s >= self._next_round_s):
            self._start_round(now_s, self.epoch)
        out, self._outbox = self._outbox, []
        return out

    def handle(self, msg: LeaseMessage, now_s: float) -> None:
        """Take a :class:`LeaseReply` or :class:`LeaseHandoff` addressed to this holder; others
        (and stale replies from earlier rounds) are ignored."""
        if isinstance(msg, LeaseHandoff):
            if msg.resource == self.resource and msg.to_holder == self.holder_id:
                self.highest_epoch_seen = max(self.highest_epoch_seen, msg.epoch)
                self.acquire(now_s)
            return
        if (not isinstance(msg, LeaseReply) or msg.resource != self.resource
                or msg.holder != self.holder_id or msg.voter not in self.voters):
            return
        self.highest_epoch_seen = max(self.highest_epoch_seen, msg.highest_epoch)
        r = self._round
        if r is None or msg.request_id != r.request_id or msg.epoch != r.epoch:
            return
        if msg.granted:
            r.granted.add(msg.voter)
            r.refused.pop(msg.voter, None)
        elif msg.voter not in r.granted:
            r.refused[msg.voter] = msg.reason
        if len(r.granted) >= self.majority:
            self._round_won(r, now_s)
        elif len(r.refused) > len(self.voters) - self.majority:
            self._round_failed(now_s, f"round {r.request_id} (epoch {r.epoch}) refused by "
                                      f"{dict(sorted(r.refused.items()))}")

    def acquire(self, now_s: float) -> None:
        """Want the lease: campaign at the next tick (if STANDBY) and whenever it is lost."""
        self.wanted = True
        self._next_round_s = min(self._next_round_s, now_s)

    def release(self, now_s: float, reason: str = "released") -> list[Outgoing]:
        """Stop wanting the lease; if ACTIVE or CANDIDATE give it up now (``may_act`` is False
        from this call on: call it once the order path has stopped). Returns the releases."""
        return self._give_up(now_s, reason, successor=None)

    def transfer(self, to_holder: str, now_s: float) -> list[Outgoing]:
        """Failback / planned move: release the lease for ``to_holder`` (voters reserve it for
        that holder for ``voter_hold_s``) and tell it to campaign. Only from ACTIVE."""
        if self.state is not HolderState.ACTIVE:
            raise ValueError(f"transfer from state={self.state.value}: only an ACTIVE holder "
                             f"can hand the lease over")
        epoch = self.epoch
        out = self._give_up(now_s, f"transferred to {to_holder}", successor=to_holder)
        return out + [Outgoing(to_holder, LeaseHandoff(self.resource, self.holder_id,
                                                       to_holder, epoch))]

    def snapshot(self, now_s: float) -> dict[str, Any]:
        return {"resource": self.resource, "holder": self.holder_id, "state": self.state.value,
                "epoch": self.epoch, "may_act": self.may_act(now_s),
                "safe_for_s": max(0.0, self.safe_until_s - now_s),
                "highest_epoch_seen": self.highest_epoch_seen, "wanted": self.wanted}

    # -- internals ------------------------------------------------------------------------------

    def _give_up(self, now_s: float, reason: str, successor: str | None) -> list[Outgoing]:
        self.wanted = False
        if self.state in (HolderState.ACTIVE, HolderState.CANDIDATE):
            epoch = self.epoch if self.state is HolderState.ACTIVE else self._round.epoch  # type: ignore[union-attr]
            self._round = None
            self.safe_until_s = -math.inf
            self._transition(HolderTrigger.RELEASE, now_s, reason)
            self._queue_release(epoch, successor)
        out, self._outbox = self._outbox, []
        return out

    def _start_round(self, now_s: float, epoch: int) -> None:
        self._request_ids += 1
        self._round = _Round(self._request_ids, epoch, now_s)
        self.highest_epoch_seen = max(self.highest_epoch_seen, epoch)
        self._next_round_s = now_s + self.config.renew_interval_s
        req = LeaseRequest(self.resource, self.holder_id, epoch, self._request_ids,
                           self.config.lease_s)
        self._outbox.extend(Outgoing(v, req) for v in self.voters)

    def _round_won(self, r: _Round, now_s: float) -> None:
        self._round = None
        safe_until_s = r.sent_at_s + self.config.holder_window_s
        if now_s >= safe_until_s:
            self._round_failed(now_s, f"round {r.request_id} won after its window closed",
                               failed=r)
            return
        self.safe_until_s = max(self.safe_until_s, safe_until_s)
        self.lease_end_s = max(self.lease_end_s, r.sent_at_s + self.config.holder_lease_end_s)
        if self.state is HolderState.CANDIDATE:
            self.epoch = r.epoch
            self._transition(HolderTrigger.MAJORITY_GRANTED, now_s,
                             f"{len(r.granted)}/{len(self.voters)} voters granted epoch {r.epoch}")

    def _round_failed(self, now_s: float, reason: str, failed: _Round | None = None) -> None:
        r = failed or self._round
        self._round = None
        if self.state is HolderState.CANDIDATE and r is not None:
            self._transition(HolderTrigger.ROUND_FAILED, now_s, reason)
            self._queue_release(r.epoch, None)  # undo partial grants: we never acted on them
            self._next_round_s = now_s + self.config.renew_interval_s * (
                1 + self._jitter.random())
        elif self.state is HolderState.ACTIVE and r is not None and len(r.refused) > (
                len(self.voters) - self.majority):
            self._transition(HolderTrigger.FENCED, now_s, reason)
        # a renewal that only timed out: keep acting until the window closes, retry when due

    def _queue_release(self, epoch: int, successor: str | None) -> None:
        msg = LeaseRelease(self.resource, self.holder_id, epoch, successor)
        self._outbox.extend(Outgoing(v, msg) for v in self.voters)

    def _transition(self, trigger: HolderTrigger, now_s: float, reason: str) -> LeaseStateChange:
        to = TRANSITIONS.get((self.state, trigger))
        if to is None:
            raise AssertionError(f"no transition {self.state.value} --{trigger.value}-->")
        change = LeaseStateChange(float(now_s), self.state, to, trigger, reason, self.epoch)
        self.state = to
        if to is not HolderState.ACTIVE:
            self.safe_until_s = min(self.safe_until_s, now_s)
            if to is HolderState.DRAINING:
                self._round = None  # a late renewal does not revive a fenced holder
        self.history.append(change)
        if self._on_change is not None:
            self._on_change(change)
        return change


# --------------------------------------------------------------------------------------------
# Consumer-side fence
# --------------------------------------------------------------------------------------------


class FenceReason(StrEnum):
    ACCEPTED = "accepted"
    STALE_EPOCH = "stale_epoch"          # below the highest epoch seen: a fenced old holder
    RESTART_HOLDOFF = "restart_holdoff"  # restarted without memory: waiting out old leases
    INVALID = "invalid"                  # not an epoch (< 1)


@dataclass(frozen=True)
class FenceVerdict:
    accepted: bool
    epoch: int
    highest_epoch: int
    reason: FenceReason


class EpochFence:
    """Refuses actions stamped with an epoch below the highest seen (a refusal is data, not an
    exception). ``highest_epoch`` seeds it (e.g. from a journal); ``not_before_s`` refuses
    everything before that time (see :meth:`after_restart`)."""

    def __init__(self, highest_epoch: int = 0, not_before_s: float = -math.inf) -> None:
        self.highest_epoch = highest_epoch
        self.not_before_s = not_before_s
        self.refused = 0

    @classmethod
    def after_restart(cls, config: LeaseConfig, now_s: float,
                      highest_epoch: int = 0) -> EpochFence:
        """A consumer restarted without its memory (Ray restarted it elsewhere while the
        cut-off copy may still run): accept nothing for ``voter_hold_s``, by when any lease
        granted before the restart has lapsed and any holder acting under it has stopped."""
        return cls(highest_epoch=highest_epoch, not_before_s=now_s + config.voter_hold_s)

    def check(self, epoch: int, now_s: float) -> FenceVerdict:
        if not _is_int(epoch) or epoch < 1:
            reason = FenceReason.INVALID
        elif now_s < self.not_before_s:
            reason = FenceReason.RESTART_HOLDOFF
        elif epoch < self.highest_epoch:
            reason = FenceReason.STALE_EPOCH
        else:
            reason = FenceReason.ACCEPTED
            self.highest_epoch = epoch
        if reason is not FenceReason.ACCEPTED:
            self.refused += 1
        return FenceVerdict(reason is FenceReason.ACCEPTED, epoch, self.highest_epoch, reason)
