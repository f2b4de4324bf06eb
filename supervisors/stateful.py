"""Event-sourced actor state that survives restarts and migration.

A stateful child subclasses :class:`EventSourced` and implements three methods:

* ``apply(event)`` — fold one event into the in-memory state (pure; no I/O);
* ``snapshot_state()`` — the whole state as msgpack-able data;
* ``restore_state(state)`` — the inverse.

It changes its state only through ``emit(event)`` / ``emit_many(events)``: the events are
appended to the journal (durably: a SIGKILL right after ``emit`` returns loses nothing) and then
applied. Whatever ``emit`` returned is acknowledged. After a restart the supervisor's wrapper
rebuilds the state from the newest snapshot plus the journal tail *before* the actor answers any
call. The journal lives outside the actor (``supervisors.journal``), and every incarnation
writes under a fresh fencing epoch, so a cut-off old copy can never append again.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import msgpack

from .journal import FencedError, JournalStore, open_store

log = logging.getLogger(__name__)


class EventSourced:
    """Mixin for actors whose state is rebuilt from a journal. See the module docstring."""

    #: Take a snapshot after this many events since the last one (0: never).
    snapshot_every: int = 1000

    # ---- to implement -------------------------------------------------------------------
    def apply(self, event: Any) -> None:
        raise NotImplementedError

    def snapshot_state(self) -> Any:
        raise NotImplementedError

    def restore_state(self, state: Any) -> None:
        raise NotImplementedError

    # ---- provided -------------------------------------------------------------------------
    def emit(self, event: Any) -> int:
        """Journal one event, then apply it. Returns its sequence number (the ack)."""
        return self.emit_many((event,))

    def emit_many(self, events: Iterable[Any]) -> int:
        """Journal a batch atomically, then apply each. Returns the last sequence number."""
        events = list(events)
        if not events:
            return self._es_seq
        payloads = [msgpack.packb(e, use_bin_type=True) for e in events]
        store, stream, epoch = self._es_store, self._es_stream, self._es_epoch
        try:
            seq = store.append(stream, payloads, epoch=epoch)
        except FencedError:
            # A newer incarnation owns the stream: this copy is a zombie and must not go on.
            log.error("%s: fenced at epoch %d; exiting", stream, epoch)
            os._exit(3)
        for event in events:
            self.apply(event)
        self._es_seq = seq
        self._es_since_snapshot += len(events)
        if self.snapshot_every and self._es_since_snapshot >= self.snapshot_every:
            self.take_snapshot()
        return seq

    def take_snapshot(self) -> int:
        """Write a snapshot of the current state; returns the sequence it covers."""
        payload = msgpack.packb(self.snapshot_state(), use_bin_type=True)
        self._es_store.put_snapshot(self._es_stream, self._es_seq, payload, epoch=self._es_epoch)
        self._es_since_snapshot = 0
        return self._es_seq

    @property
    def journal_seq(self) -> int:
        """Sequence number of the last event applied."""
        return self._es_seq

    @property
    def journal_epoch(self) -> int:
        return self._es_epoch

    def recovery_stats(self) -> dict[str, Any]:
        return dict(self._es_recovery)

    # ---- wiring (called by the supervisor's wrapper) --------------------------------------
    def _bastion_recover(self, ctx: Any, store: JournalStore | None = None) -> None:
        self._es_store = store or open_store(ctx.store_url)
        self._es_stream = ctx.stream
        self._es_epoch = self._es_store.next_epoch(self._es_stream)
        self._es_seq = 0
        self._es_since_snapshot = 0
        snapshot = self._es_store.latest_snapshot(self._es_stream)
        if snapshot is not None:
            self.restore_state(msgpack.unpackb(snapshot.payload, raw=False,
                                               strict_map_key=False))
            self._es_seq = snapshot.seq
        replayed = 0
        for batch in self._es_store.iter_read(self._es_stream, after_seq=self._es_seq):
            for record in batch:
                self.apply(msgpack.unpackb(record.payload, raw=False, strict_map_key=False))
                self._es_seq = record.seq
            replayed += len(batch)
        self._es_since_snapshot = replayed
        self._es_recovery = {
            "snapshot_seq": snapshot.seq if snapshot else 0,
            "replayed": replayed,
            "seq": self._es_seq,
            "epoch": self._es_epoch,
        }
