"""The embedded journal backend: SQLite in WAL mode, one database file per stream.

Layout of the store directory (shared by every process of a host)::

    <dir>/streams/<sanitised name>-<blake2b-64 of the name>.db   one per stream
    <dir>/kv.db                                                  the key/value area

One file per stream keeps unrelated streams from queueing on a single writer lock; the hash
suffix keeps distinct names (``a/b`` and ``a_b``, or names differing only in case on a
case-insensitive filesystem) in distinct files, and each file records the exact name it holds.

Durability: each write is one transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``). With the
default ``synchronous=FULL`` the WAL is fsynced before ``COMMIT`` returns, so an acknowledged
append survives a SIGKILL of the caller, an OS crash and a power cut. ``synchronous=NORMAL``
skips that fsync: the committed transaction is still in the WAL file (in the kernel's page
cache) when the call returns, so it survives a SIGKILL of the process; only an OS crash or power
cut may lose the last commits.

Threads: connections are opened lazily, cached per stream (the ``max_open_streams`` most
recently used) with ``check_same_thread=False``, and every use holds the store's lock, so a store
object may be called from any thread of the process that opened it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, unquote

from .base import (
    KIND_RECORD,
    KIND_SNAPSHOT,
    KIND_VALUE,
    CorruptRecordError,
    FencedError,
    JournalError,
    JournalStore,
    SeqConflictError,
    StoreConfigError,
    StoreUnavailableError,
    StreamInfo,
    check_count,
    check_name,
    check_payload,
    check_payloads,
    config_from_options,
    encode_entry,
    name_seed,
    require_int,
    require_positive_s,
)

__all__ = ["SqliteJournalStore", "SqliteStoreConfig"]

_SCHEMA_VERSION = 1
_APPLICATION_ID = 0x424A524E  # "BJRN"
_MAX_SAFE_CHARS = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_JOURNAL_SIZE_LIMIT_BYTES = 64 * 1024 * 1024

_STREAM_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS stream (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        name TEXT NOT NULL,
        owner_epoch INTEGER NOT NULL,
        last_seq INTEGER NOT NULL,
        compacted_upto INTEGER NOT NULL,
        live INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshots (seq INTEGER PRIMARY KEY, entry BLOB NOT NULL)",
)
_KV_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, entry BLOB NOT NULL) WITHOUT ROWID",
)


@dataclass(frozen=True, slots=True)
class SqliteStoreConfig:
    """Options of the SQLite backend (keywords of ``open_store`` or URL query parameters)."""

    #: Snapshots kept per stream (the newest ones).
    keep_snapshots: int = 2
    #: Records fetched per query (and per ``iter_read`` batch by default).
    read_page_records: int = 10_000
    #: ``FULL`` (fsync per commit) or ``NORMAL`` (survives a process kill, not a power cut).
    synchronous: str = "FULL"
    #: How long a write waits for another process's write lock on the same file.
    busy_timeout_s: float = 30.0
    #: Per-stream connections kept open (least recently used ones are closed).
    max_open_streams: int = 64

    def __post_init__(self) -> None:
        owner = type(self).__name__
        require_int(owner, "keep_snapshots", self.keep_snapshots, 1)
        require_int(owner, "read_page_records", self.read_page_records, 1)
        require_int(owner, "max_open_streams", self.max_open_streams, 1)
        require_positive_s(owner, "busy_timeout_s", self.busy_timeout_s)
        if self.synchronous not in ("FULL", "NORMAL"):
            raise StoreConfigError(
                f"{owner}.synchronous must be 'FULL' or 'NORMAL', got {self.synchronous!r}"
            )


def _file_stem(stream: str) -> str:
    digest = hashlib.blake2b(stream.encode("utf-8"), digest_size=8).hexdigest()
    return f"{_UNSAFE.sub('_', stream[:_MAX_SAFE_CHARS])}-{digest}"


class SqliteJournalStore(JournalStore):
    """Journal store in a directory of SQLite files. Use :func:`open_store` to create one."""

    def __init__(self, root: str | os.PathLike[str], config: SqliteStoreConfig | None = None):
        self.config = config or SqliteStoreConfig()
        self._root = Path(os.path.abspath(os.fspath(root)))
        super().__init__(
            f"sqlite://{self._root}",
            keep_snapshots=self.config.keep_snapshots,
            read_page_records=self.config.read_page_records,
        )
        try:
            (self._root / "streams").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreConfigError(
                f"cannot use {str(self._root)!r} as a store directory: {exc}"
            ) from exc
        self._conns: OrderedDict[str, sqlite3.Connection] = OrderedDict()
        self._kv_conn: sqlite3.Connection | None = None

    @classmethod
    def from_url(cls, url: str, **options: object) -> SqliteJournalStore:
        """``sqlite:///abs/dir``, ``sqlite://relative/dir`` (query = options) or a plain path."""
        query: dict[str, str] = {}
        if "://" in url:
            rest = url.split("://", 1)[1]
            rest, _, raw_query = rest.partition("?")
            path = unquote(rest)
            try:
                query = dict(
                    parse_qsl(raw_query, keep_blank_values=True, strict_parsing=bool(raw_query))
                )
            except ValueError as exc:
                raise StoreConfigError(f"bad query string in store URL {url!r}: {exc}") from exc
        else:
            path = os.path.expanduser(url)
        if not path:
            raise StoreConfigError(f"store URL {url!r} names no directory")
        config = config_from_options(SqliteStoreConfig, {**query, **options}, url=url)
        return cls(path, config)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (str(self._root), self.config))

    # ---- paths & connections ----------------------------------------------------------------
    @property
    def root(self) -> Path:
        return self._root

    def stream_path(self, stream: str) -> Path:
        """The database file of ``stream`` (for tooling and fault-injection tests)."""
        return self._root / "streams" / f"{_file_stem(check_name('stream', stream))}.db"

    def kv_path(self) -> Path:
        return self._root / "kv.db"

    def _connect(
        self, path: Path, *, create: bool, schema: Sequence[str], name: str | None
    ) -> sqlite3.Connection | None:
        if not create and not path.exists():
            return None
        conn = sqlite3.connect(
            path.as_uri() + ("?mode=rwc" if create else "?mode=rw"),
            uri=True,
            isolation_level=None,
            check_same_thread=False,
            timeout=self.config.busy_timeout_s,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_s * 1000)}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                if not create:  # being created by another process right now: not there yet
                    conn.close()
                    return None
                self._init_schema(conn, schema, name)
            elif version != _SCHEMA_VERSION:
                raise JournalError(
                    f"{path} has schema version {version}, expected {_SCHEMA_VERSION}"
                )
            conn.execute(f"PRAGMA synchronous = {self.config.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {_JOURNAL_SIZE_LIMIT_BYTES}")
            if name is not None:
                row = conn.execute("SELECT name FROM stream").fetchone()
                if row is None or row[0] != name:
                    raise JournalError(f"{path} holds stream {row and row[0]!r}, not {name!r}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _init_schema(
        self, conn: sqlite3.Connection, schema: Sequence[str], name: str | None
    ) -> None:
        # Switching a new file to WAL can report "locked" without waiting on the busy handler
        # while another process does the same; retry until the busy timeout.
        deadline = time.monotonic() + self.config.busy_timeout_s
        while True:
            try:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        if str(mode).lower() != "wal":
            raise JournalError(f"cannot switch {conn} to WAL mode (got {mode!r})")
        with self._transaction(conn):
            for statement in schema:
                conn.execute(statement)
            if name is not None:
                conn.execute("INSERT OR IGNORE INTO stream VALUES (1, ?, 0, 0, 0, 0)", (name,))
            conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    def _stream_conn(self, stream: str, *, create: bool) -> sqlite3.Connection | None:
        conn = self._conns.get(stream)
        if conn is not None:
            self._conns.move_to_end(stream)
            return conn
        conn = self._connect(
            self.stream_path(stream), create=create, schema=_STREAM_SCHEMA, name=stream
        )
        if conn is None:
            return None
        self._conns[stream] = conn
        while len(self._conns) > self.config.max_open_streams:
            self._conns.popitem(last=False)[1].close()
        return conn

    def _kv(self, *, create: bool) -> sqlite3.Connection | None:
        if self._kv_conn is None:
            self._kv_conn = self._connect(
                self.kv_path(), create=create, schema=_KV_SCHEMA, name=None
            )
        return self._kv_conn

    @contextlib.contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _using(self, what: str) -> Iterator[None]:
        """Hold the lock, check the store is usable and translate sqlite errors."""
        with self._lock:
            self._check_usable()
            try:
                yield
            except sqlite3.OperationalError as exc:
                raise StoreUnavailableError(f"sqlite store {self._root} ({what}): {exc}") from exc
            except sqlite3.DatabaseError as exc:
                raise JournalError(f"sqlite store {self._root} ({what}) is damaged: {exc}") from exc

    @staticmethod
    def _row(conn: sqlite3.Connection, stream: str) -> tuple[int, int, int, int]:
        row = conn.execute(
            "SELECT owner_epoch, last_seq, compacted_upto, live FROM stream"
        ).fetchone()
        if row is None:
            raise JournalError(f"stream {stream!r}: its database lost its header row")
        return row

    def _check_tail(self, conn: sqlite3.Connection, stream: str, last: int) -> None:
        """Refuse to append unless the newest stored record is ``last`` (or none is left)."""
        (top,) = conn.execute("SELECT MAX(seq) FROM records").fetchone()
        if top is None or top == last:
            return
        self._count("corrupt_records")
        if top > last:
            (stray,) = conn.execute(
                "SELECT MIN(seq) FROM records WHERE seq > ?", (last,)
            ).fetchone()
            raise CorruptRecordError(
                stream, stray, f"a record is stored beyond the stream's last seq {last}"
            )
        raise CorruptRecordError(stream, top + 1, f"record is missing (the log ends at seq {top})")

    def _fence(self, stream: str, epoch: int, owner: int) -> None:
        if epoch < owner:
            self._count("fenced_writes")
            raise FencedError(stream, epoch, owner)

    # ---- writes -------------------------------------------------------------------------------
    def claim(self, stream: str, epoch: int) -> int:
        check_name("stream", stream)
        check_count("epoch", epoch)
        with self._using(f"claim {stream!r}"):
            conn = self._stream_conn(stream, create=True)
            assert conn is not None
            with self._transaction(conn):
                owner, last, _, _ = self._row(conn, stream)
                self._fence(stream, epoch, owner)
                conn.execute("UPDATE stream SET owner_epoch = ?, live = 1", (epoch,))
        return last

    def next_epoch(self, stream: str) -> int:
        check_name("stream", stream)
        with self._using(f"next_epoch {stream!r}"):
            conn = self._stream_conn(stream, create=True)
            assert conn is not None
            with self._transaction(conn):
                epoch = self._row(conn, stream)[0] + 1
                conn.execute("UPDATE stream SET owner_epoch = ?, live = 1", (epoch,))
        return epoch

    def append(
        self,
        stream: str,
        payloads: Sequence[bytes],
        *,
        epoch: int,
        expected_last_seq: int | None = None,
    ) -> int:
        check_name("stream", stream)
        check_count("epoch", epoch)
        if expected_last_seq is not None:
            check_count("expected_last_seq", expected_last_seq)
        items = check_payloads(payloads)
        seed = name_seed(stream)
        with self._using(f"append to {stream!r}"):
            conn = self._stream_conn(stream, create=True)
            assert conn is not None
            with self._transaction(conn):
                owner, last, _, _ = self._row(conn, stream)
                self._fence(stream, epoch, owner)
                if expected_last_seq is not None and expected_last_seq != last:
                    self._count("seq_conflicts")
                    raise SeqConflictError(stream, expected_last_seq, last)
                self._check_tail(conn, stream, last)
                rows = [
                    (seq, encode_entry(KIND_RECORD, seed, seq, epoch, p))
                    for seq, p in enumerate(items, last + 1)
                ]
                conn.executemany("INSERT INTO records (seq, entry) VALUES (?, ?)", rows)
                last += len(rows)
                conn.execute(
                    "UPDATE stream SET owner_epoch = ?, last_seq = ?, live = 1",
                    (max(owner, epoch), last),
                )
        self._count("appends", len(items))
        self._count("append_batches")
        return last

    def put_snapshot(self, stream: str, seq: int, payload: bytes, *, epoch: int) -> None:
        check_name("stream", stream)
        check_count("seq", seq)
        check_count("epoch", epoch)
        entry = encode_entry(
            KIND_SNAPSHOT, name_seed(stream), seq, epoch, check_payload("payload", payload)
        )
        with self._using(f"put_snapshot {stream!r}"):
            conn = self._stream_conn(stream, create=True)
            assert conn is not None
            with self._transaction(conn):
                owner, last, _, _ = self._row(conn, stream)
                self._fence(stream, epoch, owner)
                if seq > last:
                    raise ValueError(
                        f"snapshot seq {seq} is beyond stream {stream!r}'s last seq {last}"
                    )
                conn.execute(
                    "INSERT OR REPLACE INTO snapshots (seq, entry) VALUES (?, ?)", (seq, entry)
                )
                conn.execute(
                    "DELETE FROM snapshots WHERE seq NOT IN "
                    "(SELECT seq FROM snapshots ORDER BY seq DESC LIMIT ?)",
                    (self._keep_snapshots,),
                )
                conn.execute("UPDATE stream SET owner_epoch = ?, live = 1", (max(owner, epoch),))
        self._count("snapshots_written")

    def compact(self, stream: str, upto_seq: int) -> int:
        check_name("stream", stream)
        check_count("upto_seq", upto_seq)
        with self._using(f"compact {stream!r}"):
            conn = self._stream_conn(stream, create=False)
            if conn is None:
                return 0
            with self._transaction(conn):
                compacted = self._row(conn, stream)[2]
                bound = self._compaction_bound(stream, upto_seq)
                if bound <= compacted:
                    return 0
                dropped = conn.execute("DELETE FROM records WHERE seq <= ?", (bound,)).rowcount
                conn.execute("UPDATE stream SET compacted_upto = ?", (bound,))
        self._count("compacted_records", dropped)
        return dropped

    def delete_stream(self, stream: str) -> None:
        # The file stays (emptied): unlinking it would strand other processes' open connections
        # on a deleted inode, where their writes would vanish.
        check_name("stream", stream)
        with self._using(f"delete_stream {stream!r}"):
            conn = self._stream_conn(stream, create=False)
            if conn is None:
                return
            with self._transaction(conn):
                conn.execute("DELETE FROM records")
                conn.execute("DELETE FROM snapshots")
                conn.execute("UPDATE stream SET last_seq = 0, compacted_upto = 0, live = 0")

    # ---- reads ----------------------------------------------------------------------------------
    def stream_info(self, stream: str) -> StreamInfo | None:
        check_name("stream", stream)
        with self._using(f"stream_info {stream!r}"):
            conn = self._stream_conn(stream, create=False)
            if conn is None:
                return None
            owner, last, compacted, live = self._row(conn, stream)
        return StreamInfo(stream, last, owner, compacted) if live else None

    def _read_page(self, stream: str, after_seq: int, upto_seq: int) -> list[tuple[int, bytes]]:
        with self._using(f"read {stream!r}"):
            conn = self._stream_conn(stream, create=False)
            if conn is None:
                return []
            return conn.execute(
                "SELECT seq, entry FROM records WHERE seq > ? AND seq <= ? ORDER BY seq",
                (after_seq, upto_seq),
            ).fetchall()

    def _snapshot_entries(self, stream: str) -> list[tuple[int, bytes]]:
        with self._using(f"read snapshots of {stream!r}"):
            conn = self._stream_conn(stream, create=False)
            if conn is None:
                return []
            return conn.execute("SELECT seq, entry FROM snapshots ORDER BY seq DESC").fetchall()

    def streams(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {prefix!r}")
        # A file's sanitised stem starts with the sanitised prefix if its name starts with the
        # prefix (sanitising maps char to char), so most files are skipped unopened.
        safe_prefix = _UNSAFE.sub("_", prefix)[:_MAX_SAFE_CHARS]
        found = []
        with self._using("list streams"):
            for path in (self._root / "streams").glob("*.db"):
                if not path.name.startswith(safe_prefix):
                    continue
                try:
                    conn = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
                except sqlite3.OperationalError:
                    continue  # deleted meanwhile
                try:
                    conn.execute(f"PRAGMA busy_timeout = {int(self.config.busy_timeout_s * 1000)}")
                    row = conn.execute("SELECT name, live FROM stream").fetchone()
                except sqlite3.OperationalError:
                    row = None  # not initialised yet
                finally:
                    conn.close()
                if row is not None and row[1] and row[0].startswith(prefix):
                    found.append(row[0])
        return sorted(found)

    # ---- key/value ------------------------------------------------------------------------------
    def kv_put(self, key: str, value: bytes) -> None:
        check_name("key", key)
        entry = encode_entry(KIND_VALUE, name_seed(key), 0, 0, check_payload("value", value))
        with self._using(f"kv_put {key!r}"):
            conn = self._kv(create=True)
            assert conn is not None
            conn.execute("INSERT OR REPLACE INTO kv (key, entry) VALUES (?, ?)", (key, entry))

    def _kv_entry(self, key: str) -> bytes | None:
        with self._using(f"kv_get {key!r}"):
            conn = self._kv(create=False)
            if conn is None:
                return None
            row = conn.execute("SELECT entry FROM kv WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def kv_delete(self, key: str) -> None:
        check_name("key", key)
        with self._using(f"kv_delete {key!r}"):
            conn = self._kv(create=False)
            if conn is not None:
                conn.execute("DELETE FROM kv WHERE key = ?", (key,))

    def kv_keys(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {prefix!r}")
        with self._using("kv_keys"):
            conn = self._kv(create=False)
            if conn is None:
                return []
            rows = conn.execute("SELECT key FROM kv WHERE key >= ? ORDER BY key", (prefix,))
            keys = []
            for (key,) in rows:
                if not key.startswith(prefix):
                    break
                keys.append(key)
        return keys

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = [*self._conns.values(), self._kv_conn]
            self._conns.clear()
            self._kv_conn = None
        for conn in conns:
            if conn is not None:
                conn.close()
