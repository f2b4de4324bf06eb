"""The replicated journal of one resource, between the sites' controllers.

:class:`ReplicatedLog` drives :mod:`topology.replication` over the mesh for
:class:`~topology.sites.SiteRoles` (open one with :meth:`SiteRoles.open_log`; payload kind
``repl``, each body tagged with its resource). Its role follows the resource's lease:

* **active** (``SiteRoles.epoch(resource)`` is not None): :meth:`~ReplicatedLog.append` gives a
  record of a stream the next sequence number under the lease's epoch, and a
  :class:`~topology.replication.ReplicationSender` ships it to every other site's controller
  heard from (batches, acks, go-back-N; :meth:`~ReplicatedLog.lag` per standby). On each
  activation the sender is rebuilt from the local journal, so a promoted standby continues the
  sequence where the old active's replicated records end, under its own (higher) epoch.
* **standby**: a :class:`~topology.replication.ReplicationReceiver` applies records strictly in
  order through ``apply(stream, seq, record)`` and acknowledges them.

Fencing: a batch stamped with an epoch below the highest this site knows was granted (its own,
a beacon's ACTIVE epoch, the highest it accepted) is refused with a ``stale_epoch`` ack, which
fences the sender. A site that loses its lease keeps its old sender *retired*: it refuses new
appends (``not_active``) but keeps resending its unacknowledged tail, so what it wrote under its
lease is not lost while no one else took over; once a new active exists those resends are
refused and the retired sender stops. If a standby holds records the new active does not have
(that old tail), the receiver reports the divergence; the log drops them from its journal, calls
``on_truncate(stream, from_seq)`` so the application drops them too, and asks the active to
resend from there (a ``gap`` ack).

The local journal kept here is the replication backlog (the last ``backlog_records`` per stream,
in memory); durable storage is the application's, through ``apply`` and its own appends.
Records are msgpack-able values; a batch must fit in the mesh's ``max_frame_bytes``.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from topology.lease import LeaseMessageError, Outgoing
from topology.replication import (
    AckStatus,
    Lag,
    ReplicatedRecord,
    ReplicationAck,
    ReplicationBatch,
    ReplicationConfig,
    ReplicationReceiver,
    ReplicationSender,
)

if TYPE_CHECKING:
    from topology.sites import SiteRoles

__all__ = ["AppendResult", "ReplicatedLog"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppendResult:
    """What :meth:`ReplicatedLog.append` did. ``reason`` is "" when accepted, else
    ``not_active`` (this site may not act for the resource now) or ``fenced`` (a standby has
    seen a higher epoch: this site's lease is gone, it just does not know yet)."""

    accepted: bool
    stream: str
    seq: int | None
    epoch: int | None
    reason: str


@dataclass
class _Journal:
    next_seq: int
    history: list[tuple[int, int]]
    records: deque[tuple[int, int, Any]]   # (seq, epoch, record): the retained tail

    def add(self, seq: int, epoch: int, record: Any) -> None:
        if seq != self.next_seq:
            raise AssertionError(f"journal at {self.next_seq}, record {seq} out of order")
        if not self.history or self.history[-1][0] != epoch:
            self.history.append((epoch, seq))
        self.records.append((seq, epoch, record))
        self.next_seq += 1

    def truncate(self, from_seq: int) -> int:
        """Drop records from ``from_seq`` on; returns how many retained ones went."""
        dropped = 0
        while self.records and self.records[-1][0] >= from_seq:
            self.records.pop()
            dropped += 1
        self.next_seq = from_seq
        self.history = [(e, s) for e, s in self.history if s < from_seq]
        return dropped


@dataclass
class _Change:
    ts_s: float
    what: str
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts_s": self.ts_s, "what": self.what, "detail": self.detail}


class ReplicatedLog:
    """The replicated journal of ``resource`` on this site's controller (see the module
    docstring). ``apply(stream, seq, record)`` is called on a standby, in order, once per new
    record (if it raises, the record is not acknowledged and will be resent).
    ``next_seqs`` / ``histories`` restore the position and epoch history of each stream from
    the application's durable journal after a restart.

    Raises (constructor):
        ValueError: a stream continued (``next_seq > 1``) without its history.
    """

    MAX_CHANGES = 50

    def __init__(self, roles: SiteRoles, resource: str, apply: Callable[[str, int, Any], None],
                 config: ReplicationConfig, *, wake: Callable[[], None],
                 on_truncate: Callable[[str, int], None] | None = None,
                 next_seqs: Mapping[str, int] | None = None,
                 histories: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        self.roles = roles
        self.resource = resource
        self.config = config
        self.node_id = roles.node_id
        self._apply = apply
        self._on_truncate = on_truncate
        self._wake = wake
        self._lock = threading.RLock()
        self._journals: dict[str, _Journal] = {}
        for name, next_seq in (next_seqs or {}).items():
            history = [(int(e), int(s)) for e, s in (histories or {}).get(name, ())]
            if next_seq > 1 and not history:
                raise ValueError(f"histories[{name!r}]: needed to continue stream {name!r} at "
                                 f"next_seq={next_seq!r}")
            self._journals[name] = _Journal(next_seq, history,
                                            deque(maxlen=config.backlog_records))
        self._fence_epoch = max((e for j in self._journals.values() for e, _ in j.history),
                                default=0)
        self._sender: ReplicationSender | None = None
        self._retired: ReplicationSender | None = None
        self._receiver: ReplicationReceiver | None = None
        self._standbys: list[str] = []
        self._dirty_since_s: float | None = None
        self.counters: Counter[str] = Counter()
        self.changes: deque[_Change] = deque(maxlen=self.MAX_CHANGES)

    # -- the application's side -----------------------------------------------------------------

    def append(self, stream: str, record: Any) -> AppendResult:
        """Append ``record`` to ``stream`` if this site is active for the resource; the result
        says the sequence number and epoch, or why it was refused."""
        now = self.roles.clock.now_s()
        epoch = self.roles.epoch(self.resource)
        with self._lock:
            if epoch is None:
                self.counters["refused_not_active"] += 1
                return AppendResult(False, stream, None, None, "not_active")
            self._sync(now, epoch)
            sender = self._sender
            assert sender is not None
            if sender.fenced:
                self.counters["refused_fenced"] += 1
                return AppendResult(False, stream, None, epoch, "fenced")
            seq = sender.append(stream, record, now)
            self._journal(stream).add(seq, epoch, record)
            self.counters["appended"] += 1
            wake = self._dirty_since_s is None
            if wake:
                self._dirty_since_s = now
        if wake:
            self._wake()
        return AppendResult(True, stream, seq, epoch, "")

    def lag(self) -> dict[str, Lag]:
        """Per standby (node id), how far behind it is (records, seconds on this clock); empty
        unless this site is active."""
        now = self.roles.clock.now_s()
        with self._lock:
            if self._sender is None:
                return {}
            return {sb: self._sender.lag(sb, now) for sb in self._standbys}

    def next_seq(self, stream: str) -> int:
        """The next sequence number of ``stream`` in the local journal."""
        with self._lock:
            j = self._journals.get(stream)
            return 1 if j is None else j.next_seq

    def records(self, stream: str) -> list[tuple[int, int, Any]]:
        """The retained records of ``stream`` as ``(seq, epoch, record)``, oldest first."""
        with self._lock:
            j = self._journals.get(stream)
            return [] if j is None else list(j.records)

    def status(self) -> dict[str, Any]:
        """JSON-able: role, epochs, streams (next seq, epoch history), lag per standby,
        counters (this log's and its sender's / receiver's), recent role changes."""
        now = self.roles.clock.now_s()
        with self._lock:
            s, r = self._sender, self._receiver
            counters = dict(self.counters)
            for prefix, part in (("sender", s), ("retired", self._retired), ("receiver", r)):
                if part is not None:
                    counters.update({f"{prefix}_{k}": v for k, v in part.counters.items()})
            return {
                "resource": self.resource,
                "role": "active" if s is not None else "standby",
                "epoch": None if s is None else s.epoch,
                "fenced": None if s is None else s.fenced,
                "retired_epoch": None if self._retired is None else self._retired.epoch,
                "fence_epoch": self._fence_epoch,
                "streams": {n: {"next_seq": j.next_seq, "history": [list(p) for p in j.history],
                                "retained": len(j.records)} for n, j in self._journals.items()},
                "lag": {} if s is None else {
                    sb: {"records": (lag := s.lag(sb, now)).records, "seconds": lag.seconds}
                    for sb in self._standbys},
                "needs_resync": [] if s is None else sorted(list(p) for p in s.needs_resync),
                "diverged": {} if r is None else dict(r.diverged),
                "counters": counters,
                "changes": [c.to_dict() for c in self.changes],
            }

    # -- driven by SiteRoles --------------------------------------------------------------------

    def tick(self, now_s: float) -> list[Outgoing]:
        """Follow the lease; the batches (and resends) due now."""
        epoch = self.roles.epoch(self.resource)
        peers = self.roles.peer_nodes()
        with self._lock:
            self._sync(now_s, epoch)
            out: list[Outgoing] = []
            if self._sender is not None:
                for node in peers:
                    if node not in self._standbys:
                        self._standbys.append(node)
                        self._sender.add_standby(node)
                out.extend(self._sender.tick(now_s))
            retired = self._retired
            if retired is not None:
                out.extend(retired.tick(now_s))
                if not retired.fenced and all(retired.lag(sb, now_s).records == 0
                                              for sb in self._standbys):
                    self._retired = None
                    self._change(now_s, "retired_drained",
                                 f"epoch {retired.epoch}: every standby has its records")
            if self._dirty_since_s is not None and (
                    now_s >= self._dirty_since_s + self.config.linger_s):
                self._dirty_since_s = None
            return out

    def next_deadline_s(self) -> float | None:
        """When a lingering partial batch is due (None: nothing waiting)."""
        with self._lock:
            if self._dirty_since_s is None:
                return None
            return self._dirty_since_s + self.config.linger_s

    def handle(self, from_node: str, msg: ReplicationBatch | ReplicationAck,
               now_s: float) -> list[Outgoing]:
        """A batch or ack from ``from_node``; returns the ack to send back (if any).

        Raises:
            LeaseMessageError: a batch's history is malformed.
        """
        epoch = self.roles.epoch(self.resource)
        known = self.roles.known_epoch(self.resource)
        with self._lock:
            self._sync(now_s, epoch)
            self._fence_epoch = fence = max(self._fence_epoch, known)
            if isinstance(msg, ReplicationAck):
                self._on_ack(msg, now_s)
                return []
            if msg.source != from_node:
                self.counters["refused_source_mismatch"] += 1
                return []
            if msg.epoch < fence:
                self.counters["refused_stale_epoch"] += 1
                if self.counters["refused_stale_epoch"] == 1 or msg.first_seq == 1:
                    self._change(now_s, "refused_stale", f"{from_node} sent {msg.stream} "
                                 f"#{msg.first_seq} under epoch {msg.epoch} < {fence}")
                return [Outgoing(from_node, ReplicationAck(
                    self.node_id, msg.stream, fence, self._journal(msg.stream).next_seq,
                    AckStatus.STALE_EPOCH.value))]
            if self._sender is not None:
                self.counters["ignored_while_active"] += 1  # a higher epoch: our lease will tell
                return []
            receiver = self._ensure_receiver()
            try:
                ack = receiver.handle(msg, now_s)
            except LeaseMessageError:
                raise
            except Exception as exc:   # the application's apply failed: no ack, it is resent
                self.counters["apply_failed"] += 1
                log.exception("%s: apply of %s #%d failed: %s", self.node_id, msg.stream,
                              msg.first_seq, exc)
                return []
            if ack.status == AckStatus.DIVERGED.value:
                ack = self._truncate(msg.stream, receiver, now_s)
            if ack.status != AckStatus.STALE_EPOCH.value:
                self._fence_epoch = max(self._fence_epoch, msg.epoch)
            return [Outgoing(from_node, ack)]

    # -- internals (locked) ---------------------------------------------------------------------

    def _journal(self, stream: str) -> _Journal:
        j = self._journals.get(stream)
        if j is None:
            j = self._journals[stream] = _Journal(1, [], deque(maxlen=self.config.backlog_records))
        return j

    def _sync(self, now_s: float, epoch: int | None) -> None:
        if epoch is not None and (self._sender is None or self._sender.epoch != epoch):
            self._become_active(now_s, epoch)
        elif epoch is None and self._sender is not None:
            self._become_standby(now_s)

    def _become_active(self, now_s: float, epoch: int) -> None:
        js = self._journals
        sender = ReplicationSender(self.node_id, self._standbys, self.config, epoch,
                                   next_seqs={n: j.next_seq for n, j in js.items()},
                                   histories={n: j.history for n, j in js.items()})
        for name, j in js.items():
            if j.records:
                sender.preload(name, [r for _, _, r in j.records], now_s)
        self._sender, self._retired, self._receiver = sender, None, None
        self._fence_epoch = max(self._fence_epoch, epoch)
        self._change(now_s, "active", f"epoch {epoch}, streams "
                     f"{ {n: j.next_seq for n, j in js.items()} }")

    def _become_standby(self, now_s: float) -> None:
        old = self._sender
        assert old is not None
        self._sender = None
        self._retired = old
        self._ensure_receiver()
        self._change(now_s, "standby", f"lease of epoch {old.epoch} gone; its sender retired")

    def _ensure_receiver(self) -> ReplicationReceiver:
        if self._receiver is None:
            js = self._journals
            self._receiver = ReplicationReceiver(
                self.node_id, self._on_record, next_seqs={n: j.next_seq for n, j in js.items()},
                histories={n: list(j.history) for n, j in js.items()})
        return self._receiver

    def _on_record(self, rec: ReplicatedRecord) -> None:
        self._apply(rec.stream, rec.seq, rec.record)   # first: a failed apply is not journaled
        self._journal(rec.stream).add(rec.seq, rec.epoch, rec.record)

    def _on_ack(self, ack: ReplicationAck, now_s: float) -> None:
        if self._sender is not None:
            self._sender.handle(ack, now_s)
            if self._sender.fenced:
                self.counters["fenced"] += 1
        retired = self._retired
        if retired is not None:
            retired.handle(ack, now_s)
            if retired.fenced:
                self._retired = None
                self.counters["retired_fenced"] += 1
                self._change(now_s, "retired_fenced", f"{ack.standby} has epoch {ack.epoch} > "
                             f"{retired.epoch}: the old tail is not replicated further")

    def _truncate(self, stream: str, receiver: ReplicationReceiver,
                  now_s: float) -> ReplicationAck:
        fork = receiver.diverged[stream]
        dropped = self._journal(stream).truncate(fork)
        receiver.truncate(stream, fork)
        self.counters["truncated_records"] += dropped
        self._change(now_s, "truncated", f"{stream} from #{fork} ({dropped} records the "
                                         f"active does not have)")
        if self._on_truncate is not None:
            self._on_truncate(stream, fork)
        # ask for a resend from the fork at once rather than after the sender's ack timeout
        return ReplicationAck(self.node_id, stream, receiver.epochs.get(stream, 0), fork,
                              AckStatus.GAP.value)

    def _change(self, now_s: float, what: str, detail: str) -> None:
        self.changes.append(_Change(now_s, what, detail))
        log.info("%s: log %s %s: %s", self.node_id, self.resource, what, detail)
