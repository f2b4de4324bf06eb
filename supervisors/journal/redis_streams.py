"""The networked journal backend: Redis Streams.

Keys, with ``P`` the configured prefix (default ``bastion``) and ``S`` the stream name::

    P:s:S:log     a Redis stream; record ``seq`` is the entry with ID ``0-<seq>``, field ``r``
    P:s:S:meta    hash: epoch (owner epoch), last (last seq), compacted, live
    P:s:S:snap    hash: <seq> -> snapshot entry
    P:streams     set of live stream names
    P:kv          hash: key -> value entry

Each record/snapshot/value is an entry of :mod:`.base` (header, payload, crc32), so tampering
with the stored bytes is detected on read. Every write that touches fencing runs as one Lua
script, so checking the owner epoch and writing cannot interleave with another writer. An append
is encoded by the client for the seq it expects (``last + 1 ...``); the script refuses if the
stream moved on meanwhile, and the client re-encodes and retries. The script checks everything
before its first write, so a batch is never half applied.

Durability: an append is acknowledged once Redis executed it. It survives a SIGKILL of the caller;
it survives a crash of ``redis-server`` only with ``appendonly yes`` and ``appendfsync always``
(Redis then fsyncs the AOF before replying). Opening a store logs a warning otherwise.
Not for Redis Cluster (the scripts touch the ``P:streams`` set together with a stream's keys).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import redis

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
    redact_url,
    require_int,
    require_positive_s,
)

__all__ = ["RedisStoreConfig", "RedisStreamKeys", "RedisStreamsStore"]

log = logging.getLogger(__name__)
_warned_urls: set[str] = set()

# Reply codes of the scripts: {code, value}.
_OK, _FENCED, _CONFLICT, _STRAY, _BEYOND_LAST = 0, 1, 2, 3, 4

# KEYS: log, meta, streams. ARGV: name, epoch, expected_last, entry...
_APPEND_LUA = """
local epoch = tonumber(ARGV[2])
local owner = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if epoch < owner then return {1, owner} end
local last = tonumber(redis.call('HGET', KEYS[2], 'last') or '0')
if last ~= tonumber(ARGV[3]) then return {2, last} end
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #top > 0 then
  local top_seq = tonumber(string.sub(top[1][1], 3)) or -1
  if top_seq ~= last then return {3, top_seq} end
end
for i = 4, #ARGV do
  last = last + 1
  redis.call('XADD', KEYS[1], string.format('0-%d', last), 'r', ARGV[i])
end
if epoch > owner then owner = epoch end
redis.call('HSET', KEYS[2], 'epoch', string.format('%d', owner),
           'last', string.format('%d', last), 'live', '1')
redis.call('SADD', KEYS[3], ARGV[1])
return {0, last}
"""

# KEYS: meta, streams. ARGV: name, epoch, mode ('claim' | 'next'). Returns {0, epoch, last}.
_CLAIM_LUA = """
local owner = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
local epoch = tonumber(ARGV[2])
if ARGV[3] == 'next' then epoch = owner + 1 end
if epoch < owner then return {1, owner} end
redis.call('HSET', KEYS[1], 'epoch', string.format('%d', epoch), 'live', '1')
redis.call('SADD', KEYS[2], ARGV[1])
return {0, epoch, tonumber(redis.call('HGET', KEYS[1], 'last') or '0')}
"""

# KEYS: meta, snap, streams. ARGV: name, epoch, seq, entry, keep.
_SNAPSHOT_LUA = """
local epoch = tonumber(ARGV[2])
local owner = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if epoch < owner then return {1, owner} end
local last = tonumber(redis.call('HGET', KEYS[1], 'last') or '0')
if tonumber(ARGV[3]) > last then return {4, last} end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
local fields = redis.call('HKEYS', KEYS[2])
local keep = tonumber(ARGV[5])
if #fields > keep then
  table.sort(fields, function(a, b) return (tonumber(a) or -1) > (tonumber(b) or -1) end)
  for i = keep + 1, #fields do redis.call('HDEL', KEYS[2], fields[i]) end
end
if epoch > owner then owner = epoch end
redis.call('HSET', KEYS[1], 'epoch', string.format('%d', owner), 'live', '1')
redis.call('SADD', KEYS[3], ARGV[1])
return {0, 0}
"""

# KEYS: log, meta. ARGV: bound. Returns the number of entries dropped.
_COMPACT_LUA = """
local compacted = tonumber(redis.call('HGET', KEYS[2], 'compacted') or '0')
local bound = tonumber(ARGV[1])
if bound <= compacted then return 0 end
local before = redis.call('XLEN', KEYS[1])
redis.call('XTRIM', KEYS[1], 'MINID', string.format('0-%d', bound + 1))
redis.call('HSET', KEYS[2], 'compacted', string.format('%d', bound))
return before - redis.call('XLEN', KEYS[1])
"""

# KEYS: log, meta, snap, streams. ARGV: name.
_DELETE_LUA = """
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('HDEL', KEYS[2], 'last', 'compacted', 'live')
redis.call('SREM', KEYS[4], ARGV[1])
return 0
"""


@dataclass(frozen=True, slots=True)
class RedisStoreConfig:
    """Options of the Redis backend (keywords of ``open_store`` or URL query parameters)."""

    #: Namespace of every key this store touches.
    prefix: str = "bastion"
    #: Snapshots kept per stream (the newest ones).
    keep_snapshots: int = 2
    #: Entries fetched per XRANGE (and per ``iter_read`` batch by default).
    read_page_records: int = 5_000
    #: Timeout of one Redis command.
    socket_timeout_s: float = 10.0
    #: Timeout of opening a connection.
    connect_timeout_s: float = 5.0
    #: Tries of an append racing other writers of the same stream before SeqConflictError.
    max_append_attempts: int = 100

    def __post_init__(self) -> None:
        owner = type(self).__name__
        if not isinstance(self.prefix, str) or not self.prefix:
            raise StoreConfigError(f"{owner}.prefix must be a non-empty str, got {self.prefix!r}")
        require_int(owner, "keep_snapshots", self.keep_snapshots, 1)
        require_int(owner, "read_page_records", self.read_page_records, 1)
        require_int(owner, "max_append_attempts", self.max_append_attempts, 1)
        require_positive_s(owner, "socket_timeout_s", self.socket_timeout_s)
        require_positive_s(owner, "connect_timeout_s", self.connect_timeout_s)


@dataclass(frozen=True, slots=True)
class RedisStreamKeys:
    """The Redis keys of one stream."""

    log: str
    meta: str
    snapshots: str


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _seq_of_id(entry_id: bytes) -> int:
    head, _, tail = entry_id.partition(b"-")
    return int(tail) if head == b"0" and tail.isdigit() else -1


class RedisStreamsStore(JournalStore):
    """Journal store in Redis. Use :func:`open_store` to create one."""

    def __init__(self, url: str, config: RedisStoreConfig | None = None) -> None:
        self.config = config or RedisStoreConfig()
        super().__init__(
            url,
            keep_snapshots=self.config.keep_snapshots,
            read_page_records=self.config.read_page_records,
        )
        parts = urlsplit(url)
        self._server_url = urlunsplit(parts._replace(query="", fragment=""))
        try:
            self._client = redis.Redis.from_url(
                self._server_url,
                socket_timeout=self.config.socket_timeout_s,
                socket_connect_timeout=self.config.connect_timeout_s,
                decode_responses=False,
            )
        except ValueError as exc:
            raise StoreConfigError(f"bad redis URL {redact_url(url)!r}: {exc}") from exc
        prefix = self.config.prefix
        self._k_streams = f"{prefix}:streams"
        self._k_kv = f"{prefix}:kv"
        self._append_script = self._client.register_script(_APPEND_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._snapshot_script = self._client.register_script(_SNAPSHOT_LUA)
        self._compact_script = self._client.register_script(_COMPACT_LUA)
        self._delete_script = self._client.register_script(_DELETE_LUA)
        with self._using("connect"):
            self._client.ping()
            self._warn_if_not_fsynced()

    @classmethod
    def from_url(cls, url: str, **options: object) -> RedisStreamsStore:
        """``redis://[user:password@]host:port/db?prefix=...&keep_snapshots=...``."""
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise StoreConfigError(f"bad redis URL {redact_url(url)!r}: {exc}") from exc
        if not parts.hostname:
            raise StoreConfigError(f"redis URL {redact_url(url)!r} names no host")
        db = parts.path.lstrip("/")
        if db and not db.isdigit():
            raise StoreConfigError(
                f"redis URL {redact_url(url)!r}: database {db!r} is not a number"
            )
        if port is not None and not 0 < port < 65536:
            raise StoreConfigError(f"redis URL {redact_url(url)!r}: port {port} is out of range")
        try:
            query = dict(
                parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
            )
        except ValueError as exc:
            raise StoreConfigError(f"bad query string in {redact_url(url)!r}: {exc}") from exc
        config = config_from_options(RedisStoreConfig, {**query, **options}, url=url)
        return cls(url, config)

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.url, self.config))

    def stream_keys(self, stream: str) -> RedisStreamKeys:
        """The keys of ``stream`` (for tooling and fault-injection tests)."""
        base = f"{self.config.prefix}:s:{check_name('stream', stream)}"
        return RedisStreamKeys(log=f"{base}:log", meta=f"{base}:meta", snapshots=f"{base}:snap")

    @property
    def kv_key(self) -> str:
        """The hash holding the key/value area."""
        return self._k_kv

    @contextlib.contextmanager
    def _using(self, what: str) -> Iterator[None]:
        """Hold the lock, check the store is usable and translate redis errors."""
        with self._lock:
            self._check_usable()
            try:
                yield
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                raise StoreUnavailableError(
                    f"redis store {redact_url(self.url)} ({what}): {exc}"
                ) from exc
            except redis.RedisError as exc:
                raise JournalError(f"redis store {redact_url(self.url)} ({what}): {exc}") from exc

    def _warn_if_not_fsynced(self) -> None:
        if self._server_url in _warned_urls:
            return
        _warned_urls.add(self._server_url)
        try:
            config: dict[Any, Any] = self._client.config_get("append*")
        except redis.ResponseError:  # CONFIG disabled (managed Redis): cannot tell
            return
        got = {_text(k): _text(v) for k, v in config.items()}
        mode = (got.get("appendonly", "?"), got.get("appendfsync", "?"))
        if mode != ("yes", "always"):
            log.warning(
                "redis at %s runs with appendonly=%s appendfsync=%s: acknowledged appends "
                "survive a client crash but may be lost if redis-server crashes "
                "(set appendonly yes, appendfsync always)",
                redact_url(self._server_url),
                *mode,
            )

    def _fenced(self, stream: str, epoch: int, owner: int) -> FencedError:
        self._count("fenced_writes")
        return FencedError(stream, epoch, owner)

    # ---- writes -------------------------------------------------------------------------------
    def _claim(self, stream: str, epoch: int, mode: str) -> tuple[int, int]:
        keys = self.stream_keys(stream)
        with self._using(f"{mode} {stream!r}"):
            reply = self._claim_script(
                keys=[keys.meta, self._k_streams], args=[stream, epoch, mode]
            )
        if reply[0] == _FENCED:
            raise self._fenced(stream, epoch, reply[1])
        return reply[1], reply[2]

    def claim(self, stream: str, epoch: int) -> int:
        check_name("stream", stream)
        check_count("epoch", epoch)
        return self._claim(stream, epoch, "claim")[1]

    def next_epoch(self, stream: str) -> int:
        check_name("stream", stream)
        return self._claim(stream, 0, "next")[0]

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
        keys = self.stream_keys(stream)
        script_keys = [keys.log, keys.meta, self._k_streams]
        with self._using(f"append to {stream!r}"):
            if expected_last_seq is None:
                expected = int(self._client.hget(keys.meta, "last") or 0)
            else:
                expected = expected_last_seq
            for _ in range(self.config.max_append_attempts):
                entries = [
                    encode_entry(KIND_RECORD, seed, seq, epoch, p)
                    for seq, p in enumerate(items, expected + 1)
                ]
                code, value = self._append_script(
                    keys=script_keys, args=[stream, epoch, expected, *entries]
                )
                if code == _OK:
                    break
                if code == _FENCED:
                    raise self._fenced(stream, epoch, value)
                if code == _STRAY:
                    self._count("corrupt_records")
                    if value > expected:
                        raise CorruptRecordError(
                            stream,
                            value,
                            f"a record is stored beyond the stream's last seq {expected}",
                        )
                    raise CorruptRecordError(
                        stream, value + 1, f"record is missing (the log ends at seq {value})"
                    )
                self._count("seq_conflicts")
                if expected_last_seq is not None:
                    raise SeqConflictError(stream, expected_last_seq, value)
                expected = value
            else:
                raise SeqConflictError(stream, expected, value)
        self._count("appends", len(items))
        self._count("append_batches")
        return value

    def put_snapshot(self, stream: str, seq: int, payload: bytes, *, epoch: int) -> None:
        check_name("stream", stream)
        check_count("seq", seq)
        check_count("epoch", epoch)
        entry = encode_entry(
            KIND_SNAPSHOT, name_seed(stream), seq, epoch, check_payload("payload", payload)
        )
        keys = self.stream_keys(stream)
        with self._using(f"put_snapshot {stream!r}"):
            code, value = self._snapshot_script(
                keys=[keys.meta, keys.snapshots, self._k_streams],
                args=[stream, epoch, seq, entry, self._keep_snapshots],
            )
        if code == _FENCED:
            raise self._fenced(stream, epoch, value)
        if code == _BEYOND_LAST:
            raise ValueError(f"snapshot seq {seq} is beyond stream {stream!r}'s last seq {value}")
        self._count("snapshots_written")

    def compact(self, stream: str, upto_seq: int) -> int:
        check_name("stream", stream)
        check_count("upto_seq", upto_seq)
        keys = self.stream_keys(stream)
        with self._using(f"compact {stream!r}"):
            # Snapshots only ever get newer, so a bound computed before the script stays safe.
            bound = self._compaction_bound(stream, upto_seq)
            if bound == 0:
                return 0
            dropped = int(self._compact_script(keys=[keys.log, keys.meta], args=[bound]))
        self._count("compacted_records", dropped)
        return dropped

    def delete_stream(self, stream: str) -> None:
        check_name("stream", stream)
        keys = self.stream_keys(stream)
        with self._using(f"delete_stream {stream!r}"):
            self._delete_script(
                keys=[keys.log, keys.meta, keys.snapshots, self._k_streams], args=[stream]
            )

    # ---- reads ----------------------------------------------------------------------------------
    def stream_info(self, stream: str) -> StreamInfo | None:
        check_name("stream", stream)
        meta = self.stream_keys(stream).meta
        with self._using(f"stream_info {stream!r}"):
            last, compacted, epoch, live = self._client.hmget(
                meta, "last", "compacted", "epoch", "live"
            )
        if live != b"1":
            return None
        return StreamInfo(stream, int(last or 0), int(epoch or 0), int(compacted or 0))

    def _read_page(self, stream: str, after_seq: int, upto_seq: int) -> list[tuple[int, bytes]]:
        log_key = self.stream_keys(stream).log
        with self._using(f"read {stream!r}"):
            rows = self._client.xrange(log_key, f"0-{after_seq + 1}", f"0-{upto_seq}")
        return [(_seq_of_id(entry_id), fields.get(b"r", b"")) for entry_id, fields in rows]

    def _snapshot_entries(self, stream: str) -> list[tuple[int, bytes]]:
        snap_key = self.stream_keys(stream).snapshots
        with self._using(f"read snapshots of {stream!r}"):
            raw = self._client.hgetall(snap_key)
        entries = [(int(f) if f.isdigit() else -1, v) for f, v in raw.items()]
        return sorted(entries, key=lambda e: e[0], reverse=True)

    def streams(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {prefix!r}")
        with self._using("list streams"):
            names = self._client.smembers(self._k_streams)
        return sorted(n for n in (m.decode("utf-8") for m in names) if n.startswith(prefix))

    # ---- key/value ------------------------------------------------------------------------------
    def kv_put(self, key: str, value: bytes) -> None:
        check_name("key", key)
        entry = encode_entry(KIND_VALUE, name_seed(key), 0, 0, check_payload("value", value))
        with self._using(f"kv_put {key!r}"):
            self._client.hset(self._k_kv, key, entry)

    def _kv_entry(self, key: str) -> bytes | None:
        with self._using(f"kv_get {key!r}"):
            return self._client.hget(self._k_kv, key)

    def kv_delete(self, key: str) -> None:
        check_name("key", key)
        with self._using(f"kv_delete {key!r}"):
            self._client.hdel(self._k_kv, key)

    def kv_keys(self, prefix: str = "") -> list[str]:
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a str, got {prefix!r}")
        with self._using("kv_keys"):
            keys = self._client.hkeys(self._k_kv)
        return sorted(k for k in (b.decode("utf-8") for b in keys) if k.startswith(prefix))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
