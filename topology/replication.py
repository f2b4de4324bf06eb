"""Journal replication from the active site to standbys: pure logic, transport-agnostic.

Like :mod:`topology.lease`: no sockets, no clock reads (``now_s`` is passed in), messages are
frozen dataclasses with ``to_body()`` / ``from_body()`` and :class:`~topology.lease.Outgoing`
names their destination.

* :class:`ReplicationSender` (on the active) — :meth:`~ReplicationSender.append` gives each
  record of a *stream* (one journal) the next sequence number; :meth:`~ReplicationSender.tick`
  batches unsent records per standby (a partial batch waits at most ``linger_s``), keeps at most
  ``max_in_flight_records`` unacknowledged per standby and stream, and goes back to the last
  acknowledged record when no acknowledgement came within ``ack_timeout_s`` (go-back-N).
  Every batch carries the sender's lease epoch. It retains the last ``backlog_records`` records
  per stream for resends; a standby that needs an older one is listed in
  :attr:`~ReplicationSender.needs_resync` (it must be re-seeded from a snapshot, like Redis's
  backlog and full sync). :meth:`~ReplicationSender.lag` gives records and seconds behind, on
  the sender's own clock only.
* :class:`ReplicationReceiver` (on a standby) — applies records strictly in order through an
  ``apply`` callback; drops duplicates; answers a gap with the sequence it needs next; refuses
  batches stamped with an epoch below the highest it accepted (a fenced old active still
  sending).

Divergence (Kafka's leader-epoch history, Raft's log matching): each record carries the epoch of
the active that wrote it, and both sides keep a stream's *epoch history*, ``[(epoch,
start_seq), ...]``. A sender starts a run for its epoch at its journal's tail, so every batch
(which carries the sender's history) says from which record on the two journals differ. A
standby holding records the new active does not have (the old active's unreplicated tail, seen
by this standby but not by the promoted one) answers ``diverged`` and applies nothing until the
application drops its records from :attr:`ReplicationReceiver.diverged` on and calls
:meth:`~ReplicationReceiver.truncate`. A promoted standby builds its sender with
:meth:`ReplicationSender.from_receiver`.

Acknowledgements are cumulative: :class:`ReplicationAck` ``next_seq`` is the first sequence the
standby does not have. Sequence numbers start at 1 per stream.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from topology.lease import BodyMessage, LeaseMessageError, Outgoing, decode_body

__all__ = [
    "AckStatus", "Lag", "ReplicatedRecord", "ReplicationAck", "ReplicationBatch",
    "ReplicationConfig", "ReplicationReceiver", "ReplicationSender",
    "decode_replication_message", "epoch_of", "first_divergence",
]


class ReplicationConfig(BaseModel):
    """``batch_max_records``: records per batch at most. ``linger_s``: a partial batch waits at
    most this long after its first record was appended. ``ack_timeout_s``: with no progress in
    acknowledgements for this long, resend from the last acknowledged record.
    ``max_in_flight_records``: unacknowledged records per standby and stream (the window).
    ``backlog_records``: records retained per stream for resends (>= the window)."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    batch_max_records: int = Field(default=256, ge=1)
    linger_s: float = Field(default=0.005, ge=0)
    ack_timeout_s: float = Field(default=0.5, gt=0)
    max_in_flight_records: int = Field(default=4096, ge=1)
    backlog_records: int = Field(default=100_000, ge=1)

    @model_validator(mode="after")
    def _check_sizes(self) -> Self:
        if self.batch_max_records > self.max_in_flight_records:
            raise ValueError(f"batch_max_records={self.batch_max_records!r} must be <= "
                             f"max_in_flight_records={self.max_in_flight_records!r}")
        if self.backlog_records < self.max_in_flight_records:
            raise ValueError(f"backlog_records={self.backlog_records!r} must be >= "
                             f"max_in_flight_records={self.max_in_flight_records!r} (a window "
                             f"in flight must be resendable)")
        return self


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicationBatch(BodyMessage):
    """Active → standby: ``records`` of ``stream`` numbered from ``first_seq``, sent under the
    sender's lease ``epoch``; ``history`` is the sender's epoch history of the stream
    (``[epoch, start_seq]`` pairs). Records are opaque msgpack-able values."""

    TYPE: ClassVar[str] = "repl_batch"
    source: str
    stream: str
    epoch: int
    first_seq: int
    records: tuple[Any, ...]
    history: tuple[Any, ...]


class AckStatus(StrEnum):
    OK = "ok"                    # applied (or duplicate); next_seq is the next one wanted
    GAP = "gap"                  # records missing: resend from next_seq
    STALE_EPOCH = "stale_epoch"  # the batch's epoch is below the highest accepted: fenced
    DIVERGED = "diverged"        # the standby has records the sender's history does not


@dataclass(frozen=True)
class ReplicationAck(BodyMessage):
    """Standby → active: ``next_seq`` is the first record of ``stream`` the standby lacks;
    ``epoch`` the highest epoch it accepted for the stream."""

    TYPE: ClassVar[str] = "repl_ack"
    standby: str
    stream: str
    epoch: int
    next_seq: int
    status: str


_MESSAGE_TYPES: dict[str, type[BodyMessage]] = {
    c.TYPE: c for c in (ReplicationBatch, ReplicationAck)}


def decode_replication_message(body: Mapping[str, Any]) -> ReplicationBatch | ReplicationAck:
    """Raises :class:`topology.lease.LeaseMessageError` if the body is malformed."""
    return decode_body(body, _MESSAGE_TYPES)


# --------------------------------------------------------------------------------------------
# Epoch histories
# --------------------------------------------------------------------------------------------

History = list[tuple[int, int]]  # [(epoch, start_seq)], start_seq strictly increasing


def epoch_of(history: Sequence[tuple[int, int]], seq: int) -> int:
    """The epoch of record ``seq`` by ``history`` (0 before its first run)."""
    epoch = 0
    for e, start in history:
        if start > seq:
            break
        epoch = e
    return epoch


def first_divergence(local: Sequence[tuple[int, int]], remote: Sequence[tuple[int, int]],
                     below_seq: int) -> int | None:
    """The first sequence below ``below_seq`` whose epoch differs between the histories."""
    for seq in sorted({1} | {s for _, s in local} | {s for _, s in remote}):
        if seq >= below_seq:
            break
        if epoch_of(local, seq) != epoch_of(remote, seq):
            return seq
    return None


def _start_run(history: History, epoch: int, seq: int) -> None:
    if history and history[-1][0] == epoch:
        return
    if history and history[-1][1] >= seq:
        history.pop()  # an empty run: no record was written under it
    history.append((epoch, seq))


def _parse_history(raw: Sequence[Any]) -> History:
    out: History = []
    for pair in raw:
        if (not isinstance(pair, list | tuple) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)
                or (out and pair[1] <= out[-1][1])):
            raise LeaseMessageError("history", raw, "must be [epoch, start_seq] pairs with "
                                                    "increasing start_seq")
        out.append((pair[0], pair[1]))
    return out


# --------------------------------------------------------------------------------------------
# Sender
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Lag:
    """How far a standby is behind: unacknowledged ``records`` and the age in seconds
    (sender's clock) of the oldest of them (0 when caught up)."""

    records: int
    seconds: float


@dataclass
class _Stream:
    next_seq: int
    history: History
    backlog: deque[tuple[Any, float]] = field(default_factory=deque)  # (record, appended_at_s)

    @property
    def first_retained_seq(self) -> int:
        return self.next_seq - len(self.backlog)


@dataclass
class _Peer:
    acked_next: int              # first seq the standby lacks (cumulative ack)
    sent_next: int               # first seq not yet sent in the current pass
    ack_deadline_s: float | None = None
    rewound_to: int = 0          # the last point a gap ack sent us back to


class ReplicationSender:
    """Replicates streams from ``source`` to ``standbys`` under lease ``epoch``. A sender that
    continues journals (a promoted standby) passes their ``next_seqs`` and epoch
    ``histories`` (see :meth:`from_receiver`)."""

    def __init__(self, source: str, standbys: Iterable[str], config: ReplicationConfig,
                 epoch: int, next_seqs: Mapping[str, int] | None = None,
                 histories: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        self.source = source
        self.config = config
        self.epoch = epoch
        self.fenced = False  # a standby saw a higher epoch: stop replicating
        self.needs_resync: set[tuple[str, str]] = set()  # (standby, stream) beyond the backlog
        self.counters: Counter[str] = Counter()
        self._streams: dict[str, _Stream] = {}
        for name, next_seq in (next_seqs or {}).items():
            history = [(int(e), int(start)) for e, start in (histories or {}).get(name, ())]
            if next_seq > 1 and not history:
                raise ValueError(f"histories[{name!r}]: needed to continue the stream at "
                                 f"next_seq={next_seq!r}")
            self._streams[name] = _Stream(next_seq, history)
            _start_run(self._streams[name].history, epoch, next_seq)
        self._peers: dict[tuple[str, str], _Peer] = {}
        self._standbys: list[str] = []
        for standby in standbys:
            self.add_standby(standby)

    @classmethod
    def from_receiver(cls, receiver: ReplicationReceiver, source: str,
                      standbys: Iterable[str], config: ReplicationConfig,
                      epoch: int) -> ReplicationSender:
        """The sender of a standby promoted to active, continuing what it replicated."""
        return cls(source, standbys, config, epoch, next_seqs=receiver.next_seqs,
                   histories=receiver.histories)

    def add_standby(self, standby: str) -> None:
        """Start replicating to ``standby``, from the oldest retained record of each stream
        (its first ack says where it really is)."""
        if standby not in self._standbys:
            self._standbys.append(standby)
            for name, s in self._streams.items():
                self._peers[standby, name] = _Peer(s.first_retained_seq, s.first_retained_seq)

    def remove_standby(self, standby: str) -> None:
        self._standbys = [x for x in self._standbys if x != standby]
        self._peers = {k: p for k, p in self._peers.items() if k[0] != standby}
        self.needs_resync = {k for k in self.needs_resync if k[0] != standby}

    def set_epoch(self, epoch: int) -> None:
        """The sender's lease was re-acquired with ``epoch`` (must not go back)."""
        if epoch < self.epoch:
            raise ValueError(f"epoch={epoch!r}: below the current epoch {self.epoch!r}")
        if epoch > self.epoch:
            self.epoch, self.fenced = epoch, False
            for st in self._streams.values():
                _start_run(st.history, epoch, st.next_seq)

    def preload(self, stream: str, records: Sequence[Any], now_s: float) -> None:
        """Retain the journal's last records of ``stream`` (ending at its ``next_seq - 1``)
        for resends, e.g. what a promoted standby replicated, for standbys that were behind
        it. Only before anything is appended to the stream; keeps the last
        ``backlog_records``."""
        s = self._streams.get(stream)
        if s is None or s.backlog:
            raise ValueError(f"stream={stream!r}: preload needs a continued stream (next_seqs) "
                             f"with nothing appended yet")
        records = list(records)
        n = min(self.config.backlog_records, s.next_seq - 1, len(records))
        s.backlog.extend((r, now_s) for r in records[len(records) - n:])
        for (_, name), peer in self._peers.items():
            if name == stream:
                peer.acked_next = peer.sent_next = s.first_retained_seq

    def append(self, stream: str, record: Any, now_s: float) -> int:
        """Add a record to ``stream``; returns its sequence number."""
        s = self._streams.get(stream)
        if s is None:
            s = self._streams[stream] = _Stream(1, [(self.epoch, 1)])
            for standby in self._standbys:
                self._peers[standby, stream] = _Peer(1, 1)
        seq = s.next_seq
        s.backlog.append((record, now_s))
        s.next_seq += 1
        if len(s.backlog) > self.config.backlog_records:
            s.backlog.popleft()
        return seq

    def tick(self, now_s: float) -> list[Outgoing]:
        """The batches due now (new records, and resends after an ack timeout)."""
        if self.fenced:
            return []
        out: list[Outgoing] = []
        for (standby, name), peer in self._peers.items():
            s = self._streams[name]
            if peer.ack_deadline_s is not None and now_s >= peer.ack_deadline_s:
                self.counters["ack_timeouts"] += 1
                peer.sent_next, peer.ack_deadline_s = peer.acked_next, None
            if peer.sent_next < s.next_seq and peer.sent_next < s.first_retained_seq:
                self.needs_resync.add((standby, name))
                continue
            while (batch := self._next_batch(s, peer, now_s)) is not None:
                out.append(Outgoing(standby, ReplicationBatch(
                    self.source, name, self.epoch, peer.sent_next, batch,
                    tuple(list(p) for p in s.history))))
                peer.sent_next += len(batch)
                if peer.ack_deadline_s is None:
                    peer.ack_deadline_s = now_s + self.config.ack_timeout_s
        self.counters["batches_sent"] += len(out)
        return out

    def _next_batch(self, s: _Stream, peer: _Peer, now_s: float) -> tuple[Any, ...] | None:
        window = self.config.max_in_flight_records - (peer.sent_next - peer.acked_next)
        n = min(s.next_seq - peer.sent_next, self.config.batch_max_records, window)
        if n <= 0:
            return None
        start = peer.sent_next - s.first_retained_seq
        if n < self.config.batch_max_records and now_s - s.backlog[start][1] < (
                self.config.linger_s):
            return None  # a partial batch of fresh records: let it fill
        return tuple(s.backlog[i][0] for i in range(start, start + n))

    def handle(self, ack: ReplicationAck, now_s: float) -> None:
        """Take a standby's acknowledgement."""
        peer = self._peers.get((ack.standby, ack.stream))
        if peer is None:
            return
        self.counters[f"ack_{ack.status}"] += 1
        if ack.status == AckStatus.STALE_EPOCH:
            if ack.epoch > self.epoch:
                self.fenced = True
            return
        if ack.status == AckStatus.DIVERGED:
            return  # the standby must truncate first; the ack timeout resends afterwards
        s = self._streams[ack.stream]
        next_seq = min(ack.next_seq, s.next_seq)
        if ack.status == AckStatus.GAP or next_seq < peer.acked_next:
            # records from next_seq are missing (lost in flight, or truncated): go back once;
            # later gap acks for the same point come from batches already in flight
            if next_seq != peer.rewound_to or peer.sent_next <= next_seq:
                self.counters["rewinds"] += 1
                peer.acked_next = peer.sent_next = peer.rewound_to = next_seq
                peer.ack_deadline_s = None
        elif next_seq > peer.acked_next:
            peer.acked_next = next_seq
            peer.sent_next = max(peer.sent_next, next_seq)
            peer.ack_deadline_s = (None if next_seq >= peer.sent_next
                                   else now_s + self.config.ack_timeout_s)
            self.needs_resync.discard((ack.standby, ack.stream))

    def lag(self, standby: str, now_s: float, stream: str | None = None) -> Lag:
        """``standby``'s lag on ``stream`` (or the worst over all streams)."""
        lags = [self._lag(self._streams[name], peer, now_s)
                for (sb, name), peer in self._peers.items()
                if sb == standby and stream in (None, name)]
        if not lags:
            return Lag(0, 0.0)
        return Lag(max(x.records for x in lags), max(x.seconds for x in lags))

    @staticmethod
    def _lag(s: _Stream, peer: _Peer, now_s: float) -> Lag:
        records = s.next_seq - peer.acked_next
        if records <= 0:
            return Lag(0, 0.0)
        i = peer.acked_next - s.first_retained_seq
        oldest_s = s.backlog[max(i, 0)][1] if s.backlog else now_s
        return Lag(records, max(0.0, now_s - oldest_s))


# --------------------------------------------------------------------------------------------
# Receiver
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicatedRecord:
    stream: str
    seq: int
    epoch: int
    record: Any


class ReplicationReceiver:
    """Applies replicated records in order through ``apply`` (called once per new record; if
    it raises, the record is not counted as applied and the exception propagates).
    ``next_seqs`` / ``histories`` restore the position and epoch history per stream from the
    standby's own journal."""

    def __init__(self, standby: str, apply: Callable[[ReplicatedRecord], None],
                 next_seqs: Mapping[str, int] | None = None,
                 histories: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        self.standby = standby
        self._apply = apply
        self.next_seqs: dict[str, int] = dict(next_seqs or {})
        self.histories: dict[str, History] = {
            k: [(int(e), int(s)) for e, s in v] for k, v in (histories or {}).items()}
        self.epochs: dict[str, int] = {  # highest sender epoch accepted, for fencing
            k: max((e for e, _ in v), default=0) for k, v in self.histories.items()}
        self.diverged: dict[str, int] = {}  # stream -> first seq that differs from the sender
        self.counters: Counter[str] = Counter()

    def handle(self, batch: ReplicationBatch, now_s: float) -> ReplicationAck:
        """Apply what is new in ``batch``; the ack says what the standby needs next. Raises
        :class:`~topology.lease.LeaseMessageError` if the batch's history is malformed."""
        name = batch.stream
        remote = _parse_history(batch.history)
        local = self.histories.setdefault(name, [])
        next_seq = self.next_seqs.get(name, 1)
        if batch.epoch < self.epochs.get(name, 0):
            status = AckStatus.STALE_EPOCH
        else:
            self.epochs[name] = batch.epoch  # fence older senders at once, even on a gap
            fork = first_divergence(local, remote, next_seq)
            if fork is not None:
                status = AckStatus.DIVERGED
                self.diverged[name] = fork
            elif batch.first_seq > next_seq:
                status = AckStatus.GAP
            else:
                status = AckStatus.OK
                self._apply_new(batch, remote, next_seq)
        self.counters[status.value] += 1
        return ReplicationAck(self.standby, name, self.epochs.get(name, 0),
                              self.next_seqs.get(name, 1), status.value)

    def _apply_new(self, batch: ReplicationBatch, remote: History, next_seq: int) -> None:
        name, first = batch.stream, batch.first_seq
        last_seq = first + len(batch.records) - 1
        self.counters["duplicates"] += max(0, min(next_seq, last_seq + 1) - first)
        for seq in range(next_seq, last_seq + 1):
            epoch = epoch_of(remote, seq)
            self._apply(ReplicatedRecord(name, seq, epoch, batch.records[seq - first]))
            _start_run(self.histories[name], epoch, seq)
            self.next_seqs[name] = seq + 1
            self.counters["applied"] += 1

    def truncate(self, stream: str, next_seq: int) -> None:
        """The application dropped its records of ``stream`` from ``next_seq`` on (after a
        divergence: ``next_seq = diverged[stream]``); the next batch from there is accepted.
        The highest epoch stays, so older senders stay fenced."""
        if next_seq < 1 or next_seq > self.next_seqs.get(stream, 1):
            raise ValueError(f"next_seq={next_seq!r}: must be in [1, "
                             f"{self.next_seqs.get(stream, 1)}] for stream {stream!r}")
        self.next_seqs[stream] = next_seq
        self.histories[stream] = [(e, s) for e, s in self.histories.get(stream, [])
                                  if s < next_seq]
        self.diverged.pop(stream, None)
