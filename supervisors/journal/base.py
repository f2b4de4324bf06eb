"""The journal store interface: records, the on-disk codec, errors and ``open_store(url)``.

A journal store holds, per *stream* (a name such as ``"actor/risk-1"``):

* an append-only sequence of records numbered 1, 2, 3, ... with no gaps,
* the stream's owner epoch (fencing: a writer whose epoch is lower is refused),
* the newest ``keep_snapshots`` snapshots,

plus a small key/value area for supervisors' bookkeeping. Payloads are opaque bytes.

Every stored record, snapshot and value is one *entry* (see :func:`encode_entry`)::

    magic "BJ" | version u8 | kind u8 | seq u64 | epoch u64 | length u32 | payload | crc32 u32

all big-endian. The crc covers the header and the payload and is seeded with the crc32 of the
stream name (or key), so an entry copied into another stream, a flipped byte, a truncated payload
or a record stored under another seq is reported as :class:`CorruptRecordError` (or
:class:`CorruptValueError` for the key/value area) and never returned.

Threads: a store object may be shared by the threads of one process (calls are serialised by an
internal lock). It must not cross a ``fork``; each process opens its own (pickling a store, e.g.
to pass it to a Ray actor, reopens it from its URL in the receiving process).
"""

from __future__ import annotations

import abc
import dataclasses
import logging
import os
import struct
import threading
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One journal record. ``payload`` is left out of the repr (it may hold secrets)."""

    stream: str
    seq: int  # 1, 2, 3, ... per stream, no gaps
    epoch: int  # the writer's fencing epoch when appended
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot of a stream's state: it includes every record with ``seq <= self.seq``."""

    stream: str
    seq: int
    epoch: int
    payload: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class StreamInfo:
    """Where a stream stands. ``compacted_upto``: records with seq <= it were dropped."""

    stream: str
    last_seq: int
    owner_epoch: int
    compacted_upto: int


# --------------------------------------------------------------------------------------------
# Errors. Each carries its fields as attributes and pickles (Ray ships exceptions between
# processes), so ``__reduce__`` rebuilds it from those fields.
# --------------------------------------------------------------------------------------------


class JournalError(Exception):
    """Base class of every error raised by a journal store."""


class StoreConfigError(JournalError, ValueError):
    """Raised by :func:`open_store` and the config classes for a bad URL or option value."""


class StoreUnavailableError(JournalError):
    """The backend could not be reached or stayed busy/locked past its timeout.

    Raised from a write, the outcome is unknown: the write may or may not have been applied.
    Check ``last_seq`` (or pass ``expected_last_seq`` to ``append``) before retrying.
    """


class FencedError(JournalError):
    """A write carried an epoch lower than the stream's owner epoch (a zombie writer).

    Nothing was written.
    """

    def __init__(self, stream: str, epoch: int, current_epoch: int) -> None:
        super().__init__(
            f"stream {stream!r}: write with epoch {epoch} refused, "
            f"the stream is owned by epoch {current_epoch}"
        )
        self.stream = stream
        self.epoch = epoch
        self.current_epoch = current_epoch

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.epoch, self.current_epoch))


class SeqConflictError(JournalError):
    """``append(..., expected_last_seq=n)`` found the stream at another seq. Nothing written."""

    def __init__(self, stream: str, expected_last_seq: int, last_seq: int) -> None:
        super().__init__(
            f"stream {stream!r}: append expected last seq {expected_last_seq}, "
            f"the stream is at {last_seq}"
        )
        self.stream = stream
        self.expected_last_seq = expected_last_seq
        self.last_seq = last_seq

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.expected_last_seq, self.last_seq))


class CompactedError(JournalError):
    """A read asked for records that compaction dropped; recover from a snapshot instead."""

    def __init__(self, stream: str, after_seq: int, compacted_upto: int) -> None:
        super().__init__(
            f"stream {stream!r}: cannot read after seq {after_seq}, records up to seq "
            f"{compacted_upto} were compacted (load the latest snapshot first)"
        )
        self.stream = stream
        self.after_seq = after_seq
        self.compacted_upto = compacted_upto

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.after_seq, self.compacted_upto))


class CorruptionError(JournalError):
    """Base class of the errors for stored bytes that fail verification."""


class CorruptRecordError(CorruptionError):
    """A stored record (or snapshot) failed its checksum/length/seq check, or is missing."""

    def __init__(self, stream: str, seq: int, reason: str) -> None:
        super().__init__(f"corrupt record in stream {stream!r} at seq {seq}: {reason}")
        self.stream = stream
        self.seq = seq
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.stream, self.seq, self.reason))


class CorruptValueError(CorruptionError):
    """A value of the key/value area failed its checksum/length check."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"corrupt value under key {key!r}: {reason}")
        self.key = key
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.key, self.reason))


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------

KIND_RECORD = 1
KIND_SNAPSHOT = 2
KIND_VALUE = 3

_MAGIC = b"BJ"
_VERSION = 1
_HEADER = struct.Struct(">2sBBQQI")  # magic, version, kind, seq, epoch, length
_CRC = struct.Struct(">I")
ENTRY_OVERHEAD_BYTES = _HEADER.size + _CRC.size  # 28


class EntryError(Exception):
    """Internal: an entry failed verification; callers turn it into a CorruptionError."""


def name_seed(name: str) -> int:
    """The crc seed of a stream name or key: binds each entry to the name it is stored under."""
    return zlib.crc32(name.encode("utf-8"))


def encode_entry(kind: int, seed: int, seq: int, epoch: int, payload: bytes) -> bytes:
    """Frame ``payload`` as one entry (header, payload, crc32)."""
    head = _HEADER.pack(_MAGIC, _VERSION, kind, seq, epoch, len(payload))
    crc = zlib.crc32(payload, zlib.crc32(head, seed))
    return b"".join((head, payload, _CRC.pack(crc)))


def decode_entry(kind: int, seed: int, blob: bytes) -> tuple[int, int, bytes]:
    """Verify one entry and return ``(seq, epoch, payload)``; raises EntryError(reason)."""
    size = len(blob)
    if size < ENTRY_OVERHEAD_BYTES:
        raise EntryError(
            f"truncated entry: {size} bytes, less than the {ENTRY_OVERHEAD_BYTES}-byte frame"
        )
    magic, version, got_kind, seq, epoch, length = _HEADER.unpack_from(blob)
    if magic != _MAGIC or version != _VERSION:
        raise EntryError(f"bad magic/version {magic!r}/{version}")
    if got_kind != kind:
        raise EntryError(f"entry kind is {got_kind}, expected {kind}")
    if length != size - ENTRY_OVERHEAD_BYTES:
        raise EntryError(
            f"length field says {length} bytes, entry holds {size - ENTRY_OVERHEAD_BYTES}"
        )
    (crc,) = _CRC.unpack_from(blob, size - _CRC.size)
    if zlib.crc32(memoryview(blob)[: size - _CRC.size], seed) != crc:
        raise EntryError("checksum mismatch")
    return seq, epoch, blob[_HEADER.size : size - _CRC.size]


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def check_name(what: str, name: object) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty str, got {name!r}")
    if "\x00" in name:
        raise ValueError(f"{what} must not contain NUL, got {name!r}")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} must be encodable as UTF-8, got {name!r}") from exc
    return name


def check_count(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return value


def check_payloads(payloads: Sequence[bytes]) -> list[bytes]:
    if isinstance(payloads, bytes | bytearray | memoryview | str):
        raise TypeError("payloads must be a sequence of bytes, not a single bytes/str object")
    out = []
    for i, p in enumerate(payloads):
        if isinstance(p, bytes):
            out.append(p)
        elif isinstance(p, bytearray | memoryview):
            out.append(bytes(p))
        else:
            raise TypeError(f"payloads[{i}] must be bytes, got {type(p).__name__}")
    return out


def check_payload(what: str, payload: object) -> bytes:
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise TypeError(f"{what} must be bytes, got {type(payload).__name__}")


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------

C = TypeVar("C")


def require_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise StoreConfigError(f"{owner}.{name} must be an int >= {minimum}, got {value!r}")


def require_positive_s(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise StoreConfigError(f"{owner}.{name} must be a number of seconds > 0, got {value!r}")


def config_from_options(cls: type[C], options: Mapping[str, object], *, url: str) -> C:
    """Build a frozen config dataclass from keyword options and/or URL query strings.

    Strings (from a URL query) are converted to the type of the field's default.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, object] = {}
    for name, raw in options.items():
        f = fields.get(name)
        if f is None:
            raise StoreConfigError(
                f"unknown option {name!r}={raw!r} for {redact_url(url)}; known: {sorted(fields)}"
            )
        kind = type(f.default)
        value = raw
        if isinstance(raw, str) and kind is not str:
            try:
                value = {"true": True, "false": False}[raw.lower()] if kind is bool else kind(raw)
            except (KeyError, ValueError) as exc:
                raise StoreConfigError(
                    f"option {name}={raw!r} for {redact_url(url)} is not a valid {kind.__name__}"
                ) from exc
        kwargs[name] = value
    return cls(**kwargs)


def redact_url(url: str) -> str:
    """The URL without its password (for messages and reprs)."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)[1]
        user = f"{parts.username}:***@" if parts.username else ":***@"
        return urlunsplit(parts._replace(netloc=user + netloc))
    except ValueError:
        return "<unparsable url>"


# --------------------------------------------------------------------------------------------
# The store interface
# --------------------------------------------------------------------------------------------

COUNTER_NAMES = (
    "appends",  # records appended
    "append_batches",
    "records_read",
    "snapshots_written",
    "compacted_records",
    "fenced_writes",
    "seq_conflicts",
    "corrupt_records",
    "corrupt_snapshots",
    "corrupt_values",
)


class JournalStore(abc.ABC):
    """A durable journal of streams, snapshots and a small key/value area.

    Backends implement the abstract methods; reading, verification and snapshot fallback are
    shared here. Epoch rules: a write (``append``, ``put_snapshot``, ``claim``) whose epoch is
    lower than the stream's owner epoch raises :class:`FencedError`; a higher epoch becomes the
    new owner epoch. The owner epoch survives ``delete_stream`` so a zombie cannot resurrect it.
    """

    url: str
    counters: dict[str, int]

    def __init__(self, url: str, *, keep_snapshots: int, read_page_records: int) -> None:
        self.url = url
        self.counters = dict.fromkeys(COUNTER_NAMES, 0)
        self._keep_snapshots = keep_snapshots
        self._read_page_records = read_page_records
        self._lock = threading.RLock()
        self._pid = os.getpid()
        self._closed = False

    # ---- writes (backend) -----------------------------------------------------------------
    @abc.abstractmethod
    def claim(self, stream: str, epoch: int) -> int:
        """Make ``epoch`` the owner epoch if it is >= the current one, else raise FencedError.

        Returns the stream's last seq (0 for a new stream, which this creates).
        """

    @abc.abstractmethod
    def next_epoch(self, stream: str) -> int:
        """Atomically claim the stream with its owner epoch + 1 and return that epoch."""

    @abc.abstractmethod
    def append(
        self,
        stream: str,
        payloads: Sequence[bytes],
        *,
        epoch: int,
        expected_last_seq: int | None = None,
    ) -> int:
        """Append a batch atomically (all or nothing), durably, and return the last seq.

        Raises FencedError (epoch lower than the owner's) or, when ``expected_last_seq`` is
        given and the stream is elsewhere, SeqConflictError; in both cases nothing is written.
        An empty batch writes nothing but is still fenced; it returns the current last seq.
        """

    @abc.abstractmethod
    def put_snapshot(self, stream: str, seq: int, payload: bytes, *, epoch: int) -> None:
        """Store a snapshot covering records ``<= seq``; keeps the newest ``keep_snapshots``.

        Fenced like append. ``seq`` above the stream's last seq raises ValueError.
        """

    @abc.abstractmethod
    def compact(self, stream: str, upto_seq: int) -> int:
        """Drop records with seq <= ``upto_seq`` that every retained valid snapshot covers.

        The bound is the *oldest* retained snapshot that verifies, so recovery still works if
        the newest snapshot later turns out corrupt. Returns how many records were dropped.
        """

    @abc.abstractmethod
    def delete_stream(self, stream: str) -> None:
        """Drop the stream's records and snapshots; its owner epoch is kept (fencing)."""

    @abc.abstractmethod
    def kv_put(self, key: str, value: bytes) -> None: ...

    @abc.abstractmethod
    def kv_delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is a no-op."""

    @abc.abstractmethod
    def kv_keys(self, prefix: str = "") -> list[str]: ...

    @abc.abstractmethod
    def streams(self, prefix: str = "") -> list[str]:
        """Names of the existing streams starting with ``prefix``, sorted."""

    @abc.abstractmethod
    def stream_info(self, stream: str) -> StreamInfo | None:
        """The stream's seqs and owner epoch, or None if the stream does not exist."""

    @abc.abstractmethod
    def close(self) -> None: ...

    # ---- backend primitives ---------------------------------------------------------------
    @abc.abstractmethod
    def _read_page(self, stream: str, after_seq: int, upto_seq: int) -> list[tuple[int, bytes]]:
        """Stored ``(seq, entry)`` pairs with ``after_seq < seq <= upto_seq``, by seq."""

    @abc.abstractmethod
    def _snapshot_entries(self, stream: str) -> list[tuple[int, bytes]]:
        """Stored ``(seq, entry)`` snapshot pairs, newest (highest seq) first."""

    @abc.abstractmethod
    def _kv_entry(self, key: str) -> bytes | None: ...

    # ---- shared -----------------------------------------------------------------------------
    def last_seq(self, stream: str) -> int:
        info = self.stream_info(stream)
        return 0 if info is None else info.last_seq

    def read(self, stream: str, after_seq: int = 0, limit: int | None = None) -> list[Record]:
        """Records with seq > ``after_seq`` in order (at most ``limit``), all verified.

        Raises CorruptRecordError naming the first bad or missing seq (nothing is returned),
        or CompactedError if ``after_seq`` is below the compaction point.
        """
        out: list[Record] = []
        for batch in self.iter_read(stream, after_seq, limit):
            out.extend(batch)
        return out

    def iter_read(
        self,
        stream: str,
        after_seq: int = 0,
        limit: int | None = None,
        *,
        batch_records: int | None = None,
    ) -> Iterator[list[Record]]:
        """Like :meth:`read`, in verified batches of up to ``batch_records`` records.

        Reads up to the last seq as of the call. A bad record raises before the batch
        holding it is yielded; earlier batches have been yielded already.
        """
        check_name("stream", stream)
        check_count("after_seq", after_seq)
        if limit is not None:
            check_count("limit", limit)
        page = self._read_page_records if batch_records is None else batch_records
        if isinstance(page, bool) or not isinstance(page, int) or page < 1:
            raise ValueError(f"batch_records must be an int >= 1, got {batch_records!r}")
        return self._iter_read(stream, after_seq, limit, page)

    def _iter_read(
        self, stream: str, after_seq: int, limit: int | None, page: int
    ) -> Iterator[list[Record]]:
        info = self.stream_info(stream)
        if info is None:
            return
        if after_seq < info.compacted_upto:
            raise CompactedError(stream, after_seq, info.compacted_upto)
        end = info.last_seq if limit is None else min(info.last_seq, after_seq + limit)
        seed = name_seed(stream)
        cursor = after_seq
        while cursor < end:
            upto = min(end, cursor + page)
            batch: list[Record] = []
            expected = cursor + 1
            for seq, blob in self._read_page(stream, cursor, upto):
                if seq != expected:
                    self._raise_missing(stream, expected)
                try:
                    got_seq, epoch, payload = decode_entry(KIND_RECORD, seed, blob)
                    if got_seq != seq:
                        raise EntryError(f"entry header says seq {got_seq}")
                except EntryError as exc:
                    self._count("corrupt_records")
                    log.error("journal %r seq %d is corrupt: %s", stream, seq, exc)
                    raise CorruptRecordError(stream, seq, str(exc)) from None
                batch.append(Record(stream, seq, epoch, payload))
                expected += 1
            if expected <= upto:
                self._raise_missing(stream, expected)
            self._count("records_read", len(batch))
            cursor = upto
            yield batch

    def _raise_missing(self, stream: str, seq: int) -> None:
        info = self.stream_info(stream)
        if info is None:
            raise JournalError(f"stream {stream!r} was deleted while being read")
        if seq <= info.compacted_upto:
            raise CompactedError(stream, seq - 1, info.compacted_upto)
        self._count("corrupt_records")
        log.error("journal %r seq %d is missing", stream, seq)
        raise CorruptRecordError(stream, seq, "record is missing (gap in the sequence)")

    def latest_snapshot(self, stream: str) -> Snapshot | None:
        """The newest snapshot that verifies; corrupt newer ones are logged and counted."""
        valid = self._valid_snapshots(stream, first_only=True)
        return valid[0] if valid else None

    def _valid_snapshots(self, stream: str, *, first_only: bool) -> list[Snapshot]:
        check_name("stream", stream)
        seed = name_seed(stream)
        out: list[Snapshot] = []
        for seq, blob in self._snapshot_entries(stream):
            try:
                got_seq, epoch, payload = decode_entry(KIND_SNAPSHOT, seed, blob)
                if got_seq != seq:
                    raise EntryError(f"entry header says seq {got_seq}")
            except EntryError as exc:
                self._count("corrupt_snapshots")
                log.warning(
                    "journal %r: snapshot at seq %d is corrupt (%s); falling back to an older one",
                    stream,
                    seq,
                    exc,
                )
                continue
            out.append(Snapshot(stream, seq, epoch, payload))
            if first_only:
                break
        return out

    def _compaction_bound(self, stream: str, upto_seq: int) -> int:
        """``min(upto_seq, oldest retained valid snapshot seq)``; 0 without a valid snapshot."""
        valid = self._valid_snapshots(stream, first_only=False)
        return min(upto_seq, valid[-1].seq) if valid else 0

    def kv_get(self, key: str) -> bytes | None:
        """The value under ``key`` or None; a value failing its checksum: CorruptValueError."""
        check_name("key", key)
        blob = self._kv_entry(key)
        if blob is None:
            return None
        try:
            return decode_entry(KIND_VALUE, name_seed(key), blob)[2]
        except EntryError as exc:
            self._count("corrupt_values")
            log.error("journal kv %r is corrupt: %s", key, exc)
            raise CorruptValueError(key, str(exc)) from None

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n

    def _check_usable(self) -> None:
        """Call with the lock held before touching the backend."""
        if self._closed:
            raise JournalError(f"store {redact_url(self.url)} is closed")
        if os.getpid() != self._pid:
            raise JournalError(
                f"store {redact_url(self.url)} was opened in process {self._pid} and used in "
                f"process {os.getpid()}: open one store per process"
            )

    def __enter__(self) -> JournalStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({redact_url(self.url)!r})"


# --------------------------------------------------------------------------------------------
# open_store
# --------------------------------------------------------------------------------------------


def open_store(url: str, **options: object) -> JournalStore:
    """Open a journal store.

    * ``sqlite:///abs/dir`` or ``sqlite://relative/dir`` or a plain filesystem path: the SQLite
      backend in that directory (created if missing; shared by the processes of a host);
    * ``redis://host:port/db`` (also ``rediss://``), optionally ``?prefix=bastion``: Redis Streams.

    Options (keyword or URL query) are the fields of ``SqliteStoreConfig`` /
    ``RedisStoreConfig``; keywords win over the query. Raises StoreConfigError naming the URL
    for anything else.
    """
    if not isinstance(url, str) or not url.strip():
        raise StoreConfigError(f"store URL must be a non-empty str, got {url!r}")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        from .redis_streams import RedisStreamsStore

        return RedisStreamsStore.from_url(url, **options)
    if scheme in ("sqlite", ""):
        from .sqlite import SqliteJournalStore

        return SqliteJournalStore.from_url(url, **options)
    raise StoreConfigError(
        f"unsupported store URL {redact_url(url)!r}: use sqlite:///dir, a directory path, "
        f"or redis://host:port/db"
    )
