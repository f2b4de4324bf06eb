"""The run history: an append-only JSONL file of typed events, written during a run (or
collected from the real sources afterwards, see ``cluster.history_sources``) and judged by
``cluster.checker``.

One event per line, ``{"t": KIND, "ts": WALL_SECONDS, ...}``. ``ts`` is when the event happened
when that is known (a venue's order log and trades, role changes, faults) and otherwise when it
was collected (a journal read after the run); the checks that depend on time use only the first
sort. The kinds and their required fields are in :data:`EVENT_FIELDS` (more fields are allowed
and kept); ``ENUMS`` lists the fields with a closed set of values:

    order_sent    venue, label            our side minted and sent it (a connector journal intent)
    venue_order   venue, account, label, outcome   what the venue received: created|duplicate|rejected
    order_ack     venue, label            the venue's answer as the connector journaled it
    fill          source, venue, account, trade_id, instrument, amount (signed: buy > 0)
    position      source, venue, account, instrument, value   a snapshot; the latest counts
    restart       child                   a supervised child came back (incarnation, node, reason)
    migration     child, to_node          it came back on another node (from_node)
    role          site, resource, epoch, state (active|standby); or an interval: from_ts, to_ts
    lease         site, resource, epoch, valid_until_ts   a grant or renewal of the acting window
    limit_change  (who, why, old, new)    a risk limit changed; the audit wants who and why
    fault         id, kind, target, bound_s   injected; recovery is due within bound_s
    recovered     fault_id                the fault's target is back
    fault_end     fault_id                the fault was undone (a heal, SIGCONT, a clock set back)
    journal       stream, last_seq, ranges   the seqs present, as [[first, last], ...] runs
                                              (compacted_upto, corrupt: [seq, ...])
    detected      fault_id, by            something noticed the fault (mesh, supervisor, role,
                                              venue, checker): the detection time is ts - fault's
    alert         severity, detector      an anomaly alert (scope, evidence)
    pnl           book, value             a P&L sample (USD) for the report's timeline

``load_history`` never raises on content: a line that is not JSON, not an object, of an unknown
kind or missing a field is reported by line number in ``History.malformed``.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_LIST = (list,)

#: Required fields per kind (besides ``t`` and ``ts``) and the JSON types they may have.
EVENT_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "order_sent": {"venue": _STR, "label": _STR},
    "venue_order": {"venue": _STR, "account": _STR, "label": _STR, "outcome": _STR},
    "order_ack": {"venue": _STR, "label": _STR},
    "fill": {"source": _STR, "venue": _STR, "account": _STR, "trade_id": _STR,
             "instrument": _STR, "amount": _NUM},
    "position": {"source": _STR, "venue": _STR, "account": _STR, "instrument": _STR,
                 "value": _NUM},
    "restart": {"child": _STR},
    "migration": {"child": _STR, "to_node": _STR},
    "role": {"site": _STR, "resource": _STR, "epoch": _INT, "state": _STR},
    "lease": {"site": _STR, "resource": _STR, "epoch": _INT, "valid_until_ts": _NUM},
    "limit_change": {},
    "fault": {"id": _STR, "kind": _STR, "target": _STR, "bound_s": _NUM},
    "recovered": {"fault_id": _STR},
    "fault_end": {"fault_id": _STR},
    "journal": {"stream": _STR, "last_seq": _INT, "ranges": _LIST},
    "detected": {"fault_id": _STR, "by": _STR},
    "alert": {"severity": _STR, "detector": _STR},
    "pnl": {"book": _STR, "value": _NUM},
}

#: Fields whose value must be one of these.
ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("venue_order", "outcome"): ("created", "duplicate", "rejected"),
    ("fill", "source"): ("venue", "connector"),
    ("position", "source"): ("venue", "connector", "risk_book"),
    ("role", "state"): ("active", "standby"),
}

#: A lease-stamped label, ``e<epoch>.site-<site>-<connector>.<seq>`` (``RoleGate.label`` on
#: the id of a connector under a site's tree, ``cluster.multisite.failover_tree``).
EPOCH_LABEL = re.compile(r"^e(\d{1,18})\.")
SITE_LABEL = re.compile(r"^e\d{1,18}\.site-([a-z0-9]+)-")


def label_epoch(label: str) -> int | None:
    """The lease epoch stamped on a label, or None for an unstamped one."""
    m = EPOCH_LABEL.match(label)
    return int(m.group(1)) if m else None


def label_site(label: str) -> str | None:
    """The site whose connector minted a stamped label, or None."""
    m = SITE_LABEL.match(label)
    return m.group(1) if m else None


#: Optional fields that must be finite numbers when present.
_OPTIONAL_NUMBERS = ("from_ts", "to_ts")


class HistoryError(ValueError):
    """An event given to :class:`HistoryWriter` is invalid; names the field and the value."""

    def __init__(self, kind: object, field_name: str, value: object, why: str) -> None:
        self.kind, self.field, self.value = kind, field_name, value
        super().__init__(f"history event {kind!r}: invalid {field_name}={value!r}: {why}")


def event_problem(obj: object) -> tuple[str, object, str] | None:
    """Why ``obj`` is not a valid event, as ``(field, value, why)``; None when it is."""
    if not isinstance(obj, dict):
        return "event", obj, "must be a JSON object"
    kind = obj.get("t")
    fields = EVENT_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        return "t", kind, f"unknown kind; known: {', '.join(EVENT_FIELDS)}"
    ts = obj.get("ts")
    if not _is_number(ts):
        return "ts", ts, "must be a finite number of wall seconds"
    for name, types in fields.items():
        value = obj.get(name)
        if types is _NUM and not _is_number(value):
            return name, value, "must be a finite number"
        if not isinstance(value, types) or isinstance(value, bool):
            return name, value, f"must be {' or '.join(t.__name__ for t in types)}"
        allowed = ENUMS.get((kind, name))
        if allowed is not None and value not in allowed:
            return name, value, f"must be one of {', '.join(allowed)}"
    for name in _OPTIONAL_NUMBERS:
        if name in obj and not _is_number(obj[name]):
            return name, obj[name], "must be a finite number"
    return None


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class Malformed:
    """A history line that is not a valid event (``line`` counts from 1)."""

    line: int
    reason: str
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "reason": self.reason, "text": self.text}


@dataclass
class History:
    """The valid events in file order (each with its ``_line``), and the malformed lines."""

    events: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[Malformed] = field(default_factory=list)
    lines: int = 0
    path: str | None = None
    _by_kind: dict[str, list[dict[str, Any]]] | None = field(default=None, repr=False)
    _indexed: int = field(default=0, repr=False)

    def of(self, kind: str) -> list[dict[str, Any]]:
        """The events of one kind, in file order (indexed on first use; append no more)."""
        if self._by_kind is None or self._indexed != len(self.events):
            self._by_kind = {}
            for e in self.events:
                self._by_kind.setdefault(e["t"], []).append(e)
            self._indexed = len(self.events)
        return self._by_kind.get(kind, [])

    @classmethod
    def from_events(cls, events: Iterable[Mapping[str, Any]]) -> History:
        """A history from events in memory (validated as ``load_history`` would)."""
        history = cls()
        for i, event in enumerate(events, 1):
            history.lines = i
            history._take(i, dict(event), None)
        return history

    def _take(self, line: int, obj: object, text: str | None) -> None:
        problem = event_problem(obj)
        if problem is not None:
            name, value, why = problem
            text = json.dumps(obj, default=str) if text is None else text
            self.malformed.append(Malformed(line, f"{name}={value!r}: {why}"[:300], text[:200]))
            return
        assert isinstance(obj, dict)
        obj["_line"] = line
        self.events.append(obj)


def load_history(path: str | Path) -> History:
    """Read a history file. Raises OSError only when the file cannot be read at all."""
    history = History(path=str(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, raw in enumerate(f, 1):
            history.lines = number
            text = raw.strip()
            if not text:
                continue
            try:
                obj = json.loads(text)
            except ValueError as exc:
                history.malformed.append(Malformed(number, f"not JSON: {exc}", text[:200]))
                continue
            history._take(number, obj, text)
    return history


class HistoryWriter:
    """Appends events to a history file; safe to share between threads. Each event is
    checked first (:class:`HistoryError` names the bad field) and gets ``ts`` from ``clock``
    (wall seconds) unless given. Lines are flushed to the OS on every append when
    ``flush_every`` is 1, else every ``flush_every`` appends and on :meth:`flush`/``close``."""

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time,
                 flush_every: int = 1) -> None:
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise HistoryError("writer", "flush_every", flush_every, "must be an int >= 1")
        self.path = Path(path)
        self._clock = clock
        self._flush_every = flush_every
        self._lock = threading.Lock()
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._unflushed = 0
        self.written = 0

    def append(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Write one event of ``kind`` (its own fields may include one named ``kind``, as a
        fault's does); returns it as written."""
        event: dict[str, Any] = {"t": kind, "ts": fields.pop("ts", None), **fields}
        if event["ts"] is None:
            event["ts"] = self._clock()
        problem = event_problem(event)
        if problem is not None:
            raise HistoryError(kind, *problem)
        line = json.dumps(event, separators=(",", ":"), default=str) + "\n"
        with self._lock:
            if self._file.closed:
                raise ValueError(f"history {self.path}: writer is closed")
            self._file.write(line)
            self.written += 1
            self._unflushed += 1
            if self._unflushed >= self._flush_every:
                self._file.flush()
                self._unflushed = 0
        return event

    def extend(self, events: Iterable[Mapping[str, Any]]) -> int:
        """Write collected events (each a dict with ``t``); returns how many."""
        n = 0
        for event in events:
            fields = {k: v for k, v in event.items() if k not in ("t", "_line")}
            self.append(str(event.get("t")), **fields)
            n += 1
        return n

    def fault(self, kind: str, target: str, bound_s: float, **fields: Any) -> str:
        """Record an injected fault; returns its id (pass it to :meth:`recovered`)."""
        fault_id = fields.pop("id", None) or f"{kind}-{uuid.uuid4().hex[:8]}"
        self.append("fault", id=fault_id, kind=kind, target=target, bound_s=bound_s, **fields)
        return fault_id

    def recovered(self, fault_id: str, **fields: Any) -> None:
        self.append("recovered", fault_id=fault_id, **fields)

    def flush(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.flush()
                self._unflushed = 0

    def close(self) -> None:
        with self._lock:
            if not self._file.closed:
                self._file.close()

    def __enter__(self) -> HistoryWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
