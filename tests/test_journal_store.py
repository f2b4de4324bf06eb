"""Contract tests of the journal store, run against every backend (real files, real redis-server).

Fault injection (flipping stored bytes, deleting records, killing writers) lives in the
``tamper`` and ``writers`` fixtures; the tests only say what they break and what they expect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from supervisors.journal import (
    CompactedError,
    CorruptRecordError,
    CorruptValueError,
    FencedError,
    JournalError,
    JournalStore,
    Record,
    SeqConflictError,
    Snapshot,
    SqliteJournalStore,
    StoreConfigError,
    StoreUnavailableError,
    open_store,
)
from tests.redis_server import redis_server, redis_server_binary_or_skip

REPO_ROOT = Path(__file__).resolve().parents[1]
WAIT_S = 20.0

# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'journal'}"
    base = request.getfixturevalue("redis_server_url")
    return f"{base}?prefix=test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(store_url: str) -> Iterator[JournalStore]:
    with open_store(store_url) as s:
        yield s


def _flip(entry: bytes) -> bytes:
    """Flip one payload byte (or a header byte when the payload is empty)."""
    out = bytearray(entry)
    out[24 if len(out) > 28 else 4] ^= 0xFF
    return bytes(out)


class _SqliteTamper:
    """Breaks stored bytes by writing to the database files directly."""

    def __init__(self, store: SqliteJournalStore) -> None:
        self.store = store

    def _db(self, path: Path) -> contextlib.closing[sqlite3.Connection]:
        return contextlib.closing(sqlite3.connect(path, isolation_level=None))

    def _flip_row(self, path: Path, table: str, column: str, key: object) -> None:
        with self._db(path) as db:
            (entry,) = db.execute(
                f"SELECT entry FROM {table} WHERE {column} = ?", (key,)
            ).fetchone()
            db.execute(f"UPDATE {table} SET entry = ? WHERE {column} = ?", (_flip(entry), key))

    def flip_record(self, stream: str, seq: int) -> None:
        self._flip_row(self.store.stream_path(stream), "records", "seq", seq)

    def flip_snapshot(self, stream: str, seq: int) -> None:
        self._flip_row(self.store.stream_path(stream), "snapshots", "seq", seq)

    def flip_value(self, key: str) -> None:
        self._flip_row(self.store.kv_path(), "kv", "key", key)

    def delete_record(self, stream: str, seq: int) -> None:
        with self._db(self.store.stream_path(stream)) as db:
            db.execute("DELETE FROM records WHERE seq = ?", (seq,))

    def add_stray_record(self, stream: str, seq: int) -> None:
        with self._db(self.store.stream_path(stream)) as db:
            db.execute("INSERT INTO records (seq, entry) VALUES (?, ?)", (seq, b"stray"))


class _RedisTamper:
    """Breaks stored bytes through a raw redis client."""

    def __init__(self, store: JournalStore, url: str) -> None:
        self.store = store
        self.raw = redis.Redis.from_url(url.split("?", 1)[0])

    def flip_record(self, stream: str, seq: int) -> None:
        key = self.store.stream_keys(stream).log  # type: ignore[attr-defined]
        entries = self.raw.xrange(key)
        self.raw.delete(key)
        for entry_id, fields in entries:
            blob = fields[b"r"]
            self.raw.xadd(key, {b"r": _flip(blob) if entry_id == f"0-{seq}".encode() else blob},
                          id=entry_id)  # fmt: skip

    def flip_snapshot(self, stream: str, seq: int) -> None:
        key = self.store.stream_keys(stream).snapshots  # type: ignore[attr-defined]
        self.raw.hset(key, str(seq), _flip(self.raw.hget(key, str(seq))))

    def flip_value(self, key: str) -> None:
        kv = self.store.kv_key  # type: ignore[attr-defined]
        self.raw.hset(kv, key, _flip(self.raw.hget(kv, key)))

    def delete_record(self, stream: str, seq: int) -> None:
        self.raw.xdel(self.store.stream_keys(stream).log, f"0-{seq}")  # type: ignore[attr-defined]

    def add_stray_record(self, stream: str, seq: int) -> None:
        key = self.store.stream_keys(stream).log  # type: ignore[attr-defined]
        self.raw.xadd(key, {b"r": b"stray"}, id=f"0-{seq}")


@pytest.fixture
def tamper(store: JournalStore, store_url: str) -> Iterator[_SqliteTamper | _RedisTamper]:
    if isinstance(store, SqliteJournalStore):
        yield _SqliteTamper(store)
        return
    t = _RedisTamper(store, store_url)
    yield t
    t.raw.close()


_WRITER = """
import itertools, sys
from supervisors.journal import open_store
url, stream, tag = sys.argv[1], sys.argv[2], sys.argv[3]
batches, size, epoch = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
store = open_store(url)
for b in (itertools.count() if batches < 0 else range(batches)):
    seq = store.append(stream, [f"{tag}:{b}:{i}".encode() for i in range(size)], epoch=epoch)
    print(seq, flush=True)
store.close()
"""


class _Writers:
    """Writer subprocesses that append batches and print each acknowledged last seq."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(
        self, url: str, stream: str, tag: str, *, batches: int, size: int, epoch: int = 1
    ) -> subprocess.Popen[bytes]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        argv = [
            sys.executable,
            "-c",
            _WRITER,
            url,
            stream,
            tag,
            str(batches),
            str(size),
            str(epoch),
        ]
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)  # fmt: skip
        self.procs.append(proc)
        return proc

    def read_acks(self, proc: subprocess.Popen[bytes], count: int) -> list[int]:
        """Wait for ``count`` acks (reporting the last state seen on timeout)."""
        assert proc.stdout is not None
        acks: list[int] = []
        buffer = b""
        deadline = time.monotonic() + WAIT_S
        while len(acks) < count:
            remaining_s = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(remaining_s, 0))
            chunk = os.read(proc.stdout.fileno(), 65536) if ready else b""
            if not chunk:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"writer gave {len(acks)}/{count} acks (last {acks[-1:]}), "
                            f"rc={proc.returncode}, stderr={err.decode()[-2000:]}")  # fmt: skip
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            acks.extend(int(line) for line in lines if line)
        return acks

    def finish(self, proc: subprocess.Popen[bytes]) -> list[int]:
        out, err = proc.communicate(timeout=WAIT_S)
        assert proc.returncode == 0, err.decode()[-2000:]
        return [int(line) for line in out.split()]

    def sigkill(self, proc: subprocess.Popen[bytes]) -> None:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT_S)
        assert proc.returncode == -signal.SIGKILL


@pytest.fixture
def writers() -> Iterator[_Writers]:
    w = _Writers()
    yield w
    for proc in w.procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _payloads(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


# --------------------------------------------------------------------------------------------
# Append and read
# --------------------------------------------------------------------------------------------


def test_append_when_batches_then_read_returns_them_in_order_with_contiguous_seqs(
    store: JournalStore,
) -> None:
    assert store.append("s", _payloads("a", 3), epoch=1) == 3
    assert store.append("s", [b""], epoch=1) == 4
    assert store.append("s", _payloads("b", 2), epoch=2) == 6

    records = store.read("s")

    assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r.payload for r in records] == [*_payloads("a", 3), b"", *_payloads("b", 2)]
    assert [r.epoch for r in records] == [1, 1, 1, 1, 2, 2]
    assert records[0] == Record("s", 1, 1, b"a-0")
    assert b"a-0" not in repr(records[0]).encode()
    assert store.last_seq("s") == 6
    assert store.counters["appends"] == 6
    assert store.counters["append_batches"] == 3
    assert store.counters["records_read"] == 6


def test_read_when_after_seq_and_limit_then_returns_that_window(store: JournalStore) -> None:
    store.append("s", _payloads("p", 25), epoch=1)

    assert [r.seq for r in store.read("s", after_seq=20)] == [21, 22, 23, 24, 25]
    assert [r.seq for r in store.read("s", after_seq=3, limit=4)] == [4, 5, 6, 7]
    assert store.read("s", after_seq=25) == []
    assert store.read("s", limit=0) == []
    batches = list(store.iter_read("s", after_seq=2, batch_records=10))
    assert [len(b) for b in batches] == [10, 10, 3]
    assert [r.seq for b in batches for r in b] == list(range(3, 26))


def test_read_when_stream_never_written_then_empty(store: JournalStore) -> None:
    assert store.read("nothing") == []
    assert store.last_seq("nothing") == 0
    assert store.stream_info("nothing") is None
    assert store.latest_snapshot("nothing") is None
    assert store.streams() == []


def test_append_when_a_payload_is_not_bytes_then_nothing_is_written(store: JournalStore) -> None:
    store.append("s", [b"x"], epoch=1)

    with pytest.raises(TypeError, match=r"payloads\[1\]"):
        store.append("s", [b"ok", "not bytes", b"ok"], epoch=1)  # type: ignore[list-item]

    assert [r.payload for r in store.read("s")] == [b"x"]


def test_append_when_batch_fails_midway_then_nothing_is_written(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.append("s", _payloads("a", 2), epoch=1)
    tamper.add_stray_record("s", 5)  # the 3rd record of the next batch collides with it

    with pytest.raises(CorruptRecordError) as err:
        store.append("s", _payloads("b", 4), epoch=1)

    assert err.value.seq == 5
    assert store.last_seq("s") == 2
    assert [r.payload for r in store.read("s")] == _payloads("a", 2)


def test_append_when_expected_last_seq_differs_then_conflict_and_unchanged(
    store: JournalStore,
) -> None:
    store.append("s", [b"a"], epoch=1)

    with pytest.raises(SeqConflictError) as err:
        store.append("s", [b"b"], epoch=1, expected_last_seq=0)

    assert (err.value.expected_last_seq, err.value.last_seq) == (0, 1)
    assert store.append("s", [b"c"], epoch=1, expected_last_seq=1) == 2
    assert [r.payload for r in store.read("s")] == [b"a", b"c"]


def test_append_when_threads_share_one_store_then_all_batches_land(store: JournalStore) -> None:
    def write(name: str) -> None:
        for i in range(20):
            store.append(name, _payloads(str(i), 5), epoch=1)

    threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)

    assert [store.last_seq(f"t{n}") for n in range(4)] == [100] * 4


# --------------------------------------------------------------------------------------------
# Durability and concurrency across processes
# --------------------------------------------------------------------------------------------


def test_append_when_writer_is_sigkilled_then_every_acked_record_survives(
    store_url: str, writers: _Writers
) -> None:
    proc = writers.spawn(store_url, "durable", "w", batches=-1, size=7)
    acks = writers.read_acks(proc, 40)
    writers.sigkill(proc)

    with open_store(store_url) as reopened:
        records = reopened.read("durable")

    assert reopened.counters["corrupt_records"] == 0
    assert len(records) >= max(acks)
    assert len(records) % 7 == 0  # batches land whole or not at all
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    assert [r.payload for r in records] == [
        f"w:{(s - 1) // 7}:{(s - 1) % 7}".encode() for s in range(1, len(records) + 1)
    ]


def test_append_when_two_processes_write_different_streams_then_both_complete(
    store_url: str, writers: _Writers
) -> None:
    procs = [writers.spawn(store_url, f"p{n}", f"w{n}", batches=40, size=10) for n in range(2)]
    acks = [writers.finish(p) for p in procs]

    assert acks == [list(range(10, 401, 10))] * 2
    with open_store(store_url) as reopened:
        for n in range(2):
            records = reopened.read(f"p{n}")
            assert [r.payload for r in records] == [
                f"w{n}:{b}:{i}".encode() for b in range(40) for i in range(10)
            ]
        assert reopened.streams("p") == ["p0", "p1"]


def test_append_when_two_processes_write_one_stream_then_batches_stay_whole(
    store_url: str, writers: _Writers
) -> None:
    procs = [writers.spawn(store_url, "shared", f"w{n}", batches=30, size=5) for n in range(2)]
    for p in procs:
        writers.finish(p)

    with open_store(store_url) as reopened:
        payloads = [r.payload.decode() for r in reopened.read("shared")]

    assert len(payloads) == 300
    batches = [payloads[i : i + 5] for i in range(0, 300, 5)]
    for batch in batches:  # each batch whole, from one writer, in order
        tag, b, _ = batch[0].split(":")
        assert batch == [f"{tag}:{b}:{i}" for i in range(5)]
    for tag in ("w0", "w1"):
        assert [b[0] for b in batches if b[0].startswith(tag)] == [
            f"{tag}:{b}:0" for b in range(30)
        ]


# --------------------------------------------------------------------------------------------
# Fencing
# --------------------------------------------------------------------------------------------


def test_claim_when_newer_epoch_owns_then_stale_writes_are_fenced_and_change_nothing(
    store_url: str,
) -> None:
    with open_store(store_url) as zombie, open_store(store_url) as owner:
        assert zombie.claim("s", 1) == 0
        zombie.append("s", [b"z1"], epoch=1)
        assert owner.claim("s", 2) == 1

        with pytest.raises(FencedError) as err:
            zombie.append("s", [b"z2"], epoch=1)
        with pytest.raises(FencedError):
            zombie.put_snapshot("s", 1, b"state", epoch=1)
        with pytest.raises(FencedError):
            zombie.claim("s", 1)

        assert (err.value.stream, err.value.epoch, err.value.current_epoch) == ("s", 1, 2)
        assert "'s'" in str(err.value) and "epoch 1" in str(err.value)
        assert zombie.counters["fenced_writes"] == 3
        assert [r.payload for r in owner.read("s")] == [b"z1"]
        assert owner.latest_snapshot("s") is None
        assert owner.claim("s", 2) == 1  # re-claiming the same epoch is fine
        assert owner.append("s", [b"o1"], epoch=2) == 2


def test_append_when_epoch_is_higher_than_owner_then_it_becomes_owner(store: JournalStore) -> None:
    store.claim("s", 1)
    store.append("s", [b"a"], epoch=3)

    with pytest.raises(FencedError) as err:
        store.append("s", [b"b"], epoch=2)

    assert err.value.current_epoch == 3
    info = store.stream_info("s")
    assert info is not None and (info.owner_epoch, info.last_seq) == (3, 1)


def test_next_epoch_when_called_then_increments_and_fences_older(store: JournalStore) -> None:
    first = store.next_epoch("s")
    second = store.next_epoch("s")

    assert (first, second) == (1, 2)
    with pytest.raises(FencedError):
        store.append("s", [b"x"], epoch=first)
    assert store.append("s", [b"x"], epoch=second) == 1


# --------------------------------------------------------------------------------------------
# Corruption
# --------------------------------------------------------------------------------------------


def test_read_when_record_bytes_are_flipped_then_raises_naming_stream_and_seq(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.append("s", _payloads("p", 30), epoch=1)
    tamper.flip_record("s", 17)

    with pytest.raises(CorruptRecordError) as err:
        store.read("s")

    assert (err.value.stream, err.value.seq) == ("s", 17)
    assert "checksum" in err.value.reason
    message = str(err.value)
    assert "'s'" in message and "seq 17" in message and err.value.reason in message
    assert store.counters["corrupt_records"] == 1
    yielded: list[int] = []
    with pytest.raises(CorruptRecordError):
        for batch in store.iter_read("s", batch_records=5):
            yielded.extend(r.seq for r in batch)
    assert yielded == list(range(1, 16))  # batches before the bad one; never the bad record
    assert [r.seq for r in store.read("s", after_seq=17)] == list(range(18, 31))


def test_read_when_a_record_is_missing_then_raises_naming_the_gap(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.append("s", _payloads("p", 10), epoch=1)
    tamper.delete_record("s", 4)
    tamper.delete_record("s", 10)

    with pytest.raises(CorruptRecordError) as err:
        store.read("s")
    with pytest.raises(CorruptRecordError) as tail_err:
        store.read("s", after_seq=5)

    assert (err.value.seq, tail_err.value.seq) == (4, 10)
    assert "missing" in err.value.reason


def test_latest_snapshot_when_newest_is_corrupt_then_falls_back_and_counts(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper, caplog: pytest.LogCaptureFixture
) -> None:
    store.append("s", _payloads("p", 20), epoch=1)
    store.put_snapshot("s", 10, b"state@10", epoch=1)
    store.put_snapshot("s", 20, b"state@20", epoch=1)
    assert store.latest_snapshot("s") == Snapshot("s", 20, 1, b"state@20")
    tamper.flip_snapshot("s", 20)

    with caplog.at_level(logging.WARNING):
        fallback = store.latest_snapshot("s")

    assert fallback == Snapshot("s", 10, 1, b"state@10")
    assert store.counters["corrupt_snapshots"] == 1
    assert any("seq 20" in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
    tamper.flip_snapshot("s", 10)
    assert store.latest_snapshot("s") is None
    assert store.counters["corrupt_snapshots"] == 3


def test_put_snapshot_when_more_than_keep_then_only_the_newest_two_remain(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.append("s", _payloads("p", 30), epoch=1)
    for seq in (10, 20, 30):
        store.put_snapshot("s", seq, f"state@{seq}".encode(), epoch=1)

    tamper.flip_snapshot("s", 30)
    tamper.flip_snapshot("s", 20)

    assert store.latest_snapshot("s") is None  # the one at 10 was dropped
    assert store.counters["snapshots_written"] == 3


def test_put_snapshot_when_seq_is_beyond_last_then_value_error(store: JournalStore) -> None:
    store.append("s", [b"a"], epoch=1)

    with pytest.raises(ValueError, match="seq 2 is beyond"):
        store.put_snapshot("s", 2, b"state", epoch=1)

    assert store.latest_snapshot("s") is None


def test_kv_get_when_value_bytes_are_flipped_then_corrupt_value_error(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.kv_put("sup/children", b"[1,2,3]")
    tamper.flip_value("sup/children")

    with pytest.raises(CorruptValueError) as err:
        store.kv_get("sup/children")

    assert err.value.key == "sup/children" and "sup/children" in str(err.value)
    assert store.counters["corrupt_values"] == 1


# --------------------------------------------------------------------------------------------
# Compaction, deletion, key/value, names
# --------------------------------------------------------------------------------------------


def test_compact_when_snapshots_exist_then_keeps_what_the_oldest_snapshot_needs(
    store: JournalStore, tamper: _SqliteTamper | _RedisTamper
) -> None:
    store.append("s", _payloads("p", 30), epoch=1)
    assert store.compact("s", 30) == 0  # no snapshot covers anything yet
    store.put_snapshot("s", 10, b"state@10", epoch=1)
    store.put_snapshot("s", 20, b"state@20", epoch=1)

    assert store.compact("s", 25) == 10
    assert store.compact("s", 25) == 0

    assert [r.seq for r in store.read("s", after_seq=10)] == list(range(11, 31))
    with pytest.raises(CompactedError) as err:
        store.read("s")
    assert (err.value.after_seq, err.value.compacted_upto) == (0, 10)
    info = store.stream_info("s")
    assert info is not None and (info.compacted_upto, info.last_seq) == (10, 30)
    tamper.flip_snapshot("s", 20)  # recovery still works from the older snapshot
    snapshot = store.latest_snapshot("s")
    assert snapshot is not None and snapshot.seq == 10
    assert len(store.read("s", after_seq=snapshot.seq)) == 20
    assert store.counters["compacted_records"] == 10


def test_delete_stream_when_deleted_then_gone_but_its_epoch_still_fences(
    store: JournalStore,
) -> None:
    store.append("keep", [b"k"], epoch=1)
    store.append("gone", _payloads("p", 5), epoch=4)
    store.put_snapshot("gone", 5, b"state", epoch=4)

    store.delete_stream("gone")
    store.delete_stream("never-existed")

    assert store.streams() == ["keep"]
    assert (store.read("gone"), store.last_seq("gone"), store.latest_snapshot("gone")) == (
        [],
        0,
        None,
    )
    with pytest.raises(FencedError):
        store.append("gone", [b"zombie"], epoch=3)
    assert store.append("gone", [b"new"], epoch=4) == 1
    assert store.streams() == ["gone", "keep"]


def test_kv_when_put_get_delete_then_round_trip(store: JournalStore) -> None:
    assert store.kv_get("missing") is None
    assert store.kv_keys() == []
    store.kv_put("sup/a", b"1")
    store.kv_put("sup/b", b"")
    store.kv_put("other", b"3")
    store.kv_put("sup/a", b"11")

    assert store.kv_get("sup/a") == b"11"
    assert store.kv_get("sup/b") == b""
    assert store.kv_keys("sup/") == ["sup/a", "sup/b"]
    store.kv_delete("sup/a")
    store.kv_delete("sup/a")
    assert store.kv_get("sup/a") is None
    assert store.kv_keys() == ["other", "sup/b"]


def test_streams_when_names_differ_only_in_unsafe_chars_then_they_stay_distinct(
    store: JournalStore,
) -> None:
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    names = ["a/b", "a_b", "A_b", "a b", "ü/ß", long_a, long_b]
    for i, name in enumerate(names, 1):
        store.append(name, [str(i).encode()] * i, epoch=1)

    assert [store.last_seq(n) for n in names] == list(range(1, len(names) + 1))
    assert store.streams() == sorted(names)
    assert store.streams("a") == ["a b", "a/b", "a_b"]
    assert store.streams("x" * 70) == [long_a, long_b]
    assert store.streams(long_b) == [long_b]


def test_store_when_pickled_then_reopens_on_the_same_data(store: JournalStore) -> None:
    store.append("s", [b"a"], epoch=1)

    with pickle.loads(pickle.dumps(store)) as copy:
        assert copy.url == store.url
        assert [r.payload for r in copy.read("s")] == [b"a"]


def test_errors_when_pickled_then_keep_their_fields() -> None:
    errors = [
        FencedError("s", 1, 2),
        CorruptRecordError("s", 7, "checksum mismatch"),
        CorruptValueError("k", "truncated"),
        SeqConflictError("s", 1, 3),
        CompactedError("s", 0, 10),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error)
        assert vars(copy) == vars(error)


def test_store_when_closed_then_calls_raise_journal_error(store_url: str) -> None:
    store = open_store(store_url)
    store.close()
    store.close()

    with pytest.raises(JournalError, match="closed"):
        store.append("s", [b"a"], epoch=1)


# --------------------------------------------------------------------------------------------
# open_store
# --------------------------------------------------------------------------------------------


def test_open_store_when_sqlite_url_forms_then_all_name_the_same_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///" + str(tmp_path / "j").lstrip("/") + "?keep_snapshots=3") as a:
        a.append("s", [b"a"], epoch=1)
        assert a.config.keep_snapshots == 3  # type: ignore[attr-defined]
    for url in ("sqlite://j", str(tmp_path / "j"), "j"):
        with open_store(url) as store:
            assert store.url == f"sqlite://{tmp_path / 'j'}"
            assert store.last_seq("s") == 1


@pytest.mark.parametrize(
    ("url", "options", "named"),
    [
        ("ftp://host/dir", {}, "ftp://host/dir"),
        ("sqlite://", {}, "sqlite://"),
        ("", {}, "''"),
        ("redis://localhost:99999/0", {}, "redis://localhost:99999/0"),
        ("redis://localhost:6379/zero", {}, "'zero'"),
        ("redis:///0", {}, "redis:///0"),
        ("redis://localhost:6379/0?keep_snapshots=two", {}, "keep_snapshots='two'"),
        ("sqlite:///tmp/bastion-x?bogus=1", {}, "'bogus'"),
        (
            "sqlite:///tmp/bastion-x",
            {"keep_snapshots": 0},
            "keep_snapshots must be an int >= 1, got 0",
        ),
        ("sqlite:///tmp/bastion-x", {"synchronous": "OFF"}, "synchronous must be"),
        ("redis://user:s3cret@localhost:6379/0", {"busy_timeout_s": 1.0}, "user:***@"),
    ],
)
def test_open_store_when_url_or_option_is_bad_then_config_error_names_it(
    url: str, options: dict[str, object], named: str
) -> None:
    with pytest.raises(StoreConfigError) as err:
        open_store(url, **options)

    assert named in str(err.value)
    assert "s3cret" not in str(err.value)


def test_open_store_when_path_is_a_file_then_config_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")

    with pytest.raises(StoreConfigError, match="file"):
        open_store(str(tmp_path / "file"))


def test_open_store_when_redis_is_unreachable_then_store_unavailable() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

        with pytest.raises(StoreUnavailableError, match=str(port)):
            open_store(f"redis://127.0.0.1:{port}/0", connect_timeout_s=2.0)


@pytest.mark.redis
def test_redis_server_when_block_exits_then_process_is_gone(tmp_path: Path) -> None:
    redis_server_binary_or_skip()
    with redis_server(tmp_path / "r") as server:
        with open_store(server.url) as store:
            store.append("s", [b"a"], epoch=1)
        pid = server.pid

    assert not server.is_running()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "r").is_dir()  # a given data dir is kept (for restarts)
