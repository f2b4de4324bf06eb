"""Journal shipping: the active site's journal streams, copied into every standby's store.

:class:`JournalShipper` sits on a site's controller beside the resource's
:class:`~topology.sites_log.ReplicatedLog`. It knows the application's journal only through a
small protocol (:class:`JournalStoreLike`: ``read`` / ``latest_snapshot`` / ``append`` /
``next_epoch``, which :mod:`supervisors.journal` stores satisfy), so ``topology`` stays free of
any application code:

* **active**: :meth:`~JournalShipper.poll` (every ``poll_s`` on the shipper's thread) reads the
  records appended to each source stream since the last poll and appends each to the replicated
  log as ``{"src": seq, "p": payload, "t": wall time read}``. The first time a stream is
  shipped (and after a gap, e.g. the source was compacted), the newest snapshot goes first as
  ``{"snap": seq, "p": payload, ...}``, so a standby that joined late still gets the whole state.
* **standby**: the log's ``apply(stream, seq, record)`` appends the record, as msgpack with
  ``rseq`` (the replicated sequence) and ``at`` (applied, wall time), to the local stream
  ``<replica_prefix>/<stream key>`` under this controller's own fencing epoch. The application
  imports from there when its site is promoted (what to import and how is its business: see
  ``actors.connector_replica``).

Replication is asynchronous: the shipper lags the source by at most ``poll_s`` plus the log's
batching, and the sender's :meth:`~topology.sites_log.ReplicatedLog.lag` says how far each
standby is behind. Records shipped under an earlier activation may arrive again after a
failover and back (the source is re-read from the newest snapshot when a shipper restarts):
importers must be idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import msgpack

__all__ = ["JournalShipper", "JournalStoreLike", "replica_stream"]

log = logging.getLogger(__name__)

READ_BATCH = 1000
LAG_SAMPLES = 2000


class _RecordLike(Protocol):
    seq: int
    payload: bytes


class JournalStoreLike(Protocol):
    """What the shipper needs of a journal store (``supervisors.journal.JournalStore``)."""

    def read(self, stream: str, after_seq: int = 0, limit: int | None = None
             ) -> Sequence[_RecordLike]: ...

    def latest_snapshot(self, stream: str) -> _RecordLike | None: ...

    def append(self, stream: str, payloads: Sequence[bytes], *, epoch: int) -> int: ...

    def next_epoch(self, stream: str) -> int: ...


def replica_stream(prefix: str, key: str) -> str:
    """The local stream where a standby keeps the replicated records of stream ``key``."""
    return f"{prefix}/{key}"


class JournalShipper:
    """Ships ``streams`` (``{key: source stream}``) of ``store`` through a replicated log.

    Create it, open the log with ``apply=shipper.apply``, then :meth:`attach` the log and
    :meth:`start` the polling thread. See the module docstring.
    """

    def __init__(self, store: JournalStoreLike, streams: Mapping[str, str], *,
                 replica_prefix: str, poll_s: float = 0.01) -> None:
        if poll_s <= 0:
            raise ValueError(f"poll_s = {poll_s!r}: must be > 0")
        self.store = store
        self.streams = dict(streams)
        self.replica_prefix = replica_prefix
        self.poll_s = poll_s
        self.counters: Counter[str] = Counter()
        self._log: Any = None
        self._shipped: dict[str, int] = {}       # key -> last source seq appended to the log
        self._epochs: dict[str, int] = {}        # replica stream -> our fencing epoch
        self._applied: dict[str, int] = {}       # key -> last replicated seq applied here
        self._lag_s: deque[float] = deque(maxlen=LAG_SAMPLES)  # read at active -> applied here
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def attach(self, rlog: Any) -> None:
        """The :class:`~topology.sites_log.ReplicatedLog` to ship through (opened with
        ``apply=self.apply``)."""
        self._log = rlog

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="journal-ship", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    # -- active: source -> log ------------------------------------------------------------------

    def poll(self) -> int:
        """Ship what is new in every source stream if this site is active; returns how many
        records went into the log."""
        rlog = self._log
        if rlog is None or rlog.roles.epoch(rlog.resource) is None:
            return 0
        sent = 0
        for key, source in self.streams.items():
            sent += self._ship_stream(rlog, key, source)
        return sent

    def _ship_stream(self, rlog: Any, key: str, source: str) -> int:
        shipped = self._shipped.get(key)
        sent = 0
        records = self.store.read(source, after_seq=shipped or 0, limit=READ_BATCH)
        if shipped is None or (records and records[0].seq > shipped + 1):
            # First time (or the source lost records to compaction): the state first.
            snap = self.store.latest_snapshot(source)
            if snap is not None and (shipped is None or snap.seq > shipped):
                if not self._append(rlog, key, {"snap": snap.seq, "p": snap.payload,
                                                "t": time.time()}):
                    return 0
                sent += 1
                self._shipped[key] = shipped = snap.seq
                records = self.store.read(source, after_seq=shipped, limit=READ_BATCH)
            elif shipped is None:
                self._shipped[key] = shipped = 0
        now = time.time()
        for rec in records:
            if rec.seq <= shipped:
                continue
            if not self._append(rlog, key, {"src": rec.seq, "p": rec.payload, "t": now}):
                break
            self._shipped[key] = shipped = rec.seq
            sent += 1
        return sent

    def _append(self, rlog: Any, key: str, record: dict[str, Any]) -> bool:
        result = rlog.append(key, record)
        if not result.accepted:
            self.counters[f"append_refused_{result.reason}"] += 1
            return False
        self.counters["shipped"] += 1
        return True

    # -- standby: log -> local replica stream ---------------------------------------------------

    def apply(self, key: str, seq: int, record: Any) -> None:
        """The replicated log's ``apply``: keep the record in the local replica stream.
        Raises (so the record is not acknowledged and comes again) if the store fails."""
        stream = replica_stream(self.replica_prefix, key)
        if not isinstance(record, Mapping) or not isinstance(record.get("p"), bytes):
            self.counters["apply_malformed"] += 1
            log.warning("journal ship %s: record #%d is malformed; skipped", key, seq)
            return
        body = {**record, "rseq": seq, "at": time.time()}
        payload = msgpack.packb(body, use_bin_type=True)
        with self._lock:
            epoch = self._epochs.get(stream)
            if epoch is None:
                epoch = self._epochs[stream] = self.store.next_epoch(stream)
            try:
                self.store.append(stream, [payload], epoch=epoch)
            except Exception:  # fenced by a newer controller incarnation, or the store is down
                self._epochs.pop(stream, None)
                self.counters["apply_failed"] += 1
                raise
            self._applied[key] = seq
        self.counters["applied"] += 1
        if isinstance(record.get("t"), (int, float)):
            self._lag_s.append(max(0.0, body["at"] - float(record["t"])))

    def on_truncate(self, key: str, from_seq: int) -> None:
        """The active does not have our records from ``from_seq`` on (an old active's tail):
        they stay in the replica stream (what they say did happen at the venue) and are
        counted; importers dedupe."""
        self.counters["truncated_notices"] += 1
        log.info("journal ship %s: active lacks records from #%d (kept, deduped on import)",
                 key, from_seq)

    # -- status -----------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        lags = sorted(self._lag_s)

        def pct(q: float) -> float | None:
            return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else None

        rlog = self._log
        return {
            "streams": dict(self.streams), "shipped_upto": dict(self._shipped),
            "applied_upto": dict(self._applied), "counters": dict(self.counters),
            "apply_lag_s": {"n": len(lags), "p50": pct(0.5), "p99": pct(0.99),
                            "max": lags[-1] if lags else None},
            "log": None if rlog is None else rlog.status(),
        }

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the store may be briefly unavailable
                self.counters["poll_failed"] += 1
                log.warning("journal ship: poll failed: %r", exc)
