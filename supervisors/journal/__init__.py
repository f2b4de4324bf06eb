"""Durable journal store for event-sourced actors and supervisors' bookkeeping.

``open_store(url)`` returns a :class:`JournalStore`: SQLite in a directory (embedded default) or
Redis Streams (networked). See :mod:`supervisors.journal.base` for the contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import (
    CompactedError,
    CorruptionError,
    CorruptRecordError,
    CorruptValueError,
    FencedError,
    JournalError,
    JournalStore,
    Record,
    SeqConflictError,
    Snapshot,
    StoreConfigError,
    StoreUnavailableError,
    StreamInfo,
    open_store,
)
from .sqlite import SqliteJournalStore, SqliteStoreConfig

if TYPE_CHECKING:
    from .redis_streams import RedisStoreConfig, RedisStreamsStore

__all__ = [
    "CompactedError",
    "CorruptRecordError",
    "CorruptValueError",
    "CorruptionError",
    "FencedError",
    "JournalError",
    "JournalStore",
    "Record",
    "RedisStoreConfig",
    "RedisStreamsStore",
    "SeqConflictError",
    "Snapshot",
    "SqliteJournalStore",
    "SqliteStoreConfig",
    "StoreConfigError",
    "StoreUnavailableError",
    "StreamInfo",
    "open_store",
]


def __getattr__(name: str) -> Any:
    # The Redis backend imports the redis client; load it only when asked for.
    if name in ("RedisStoreConfig", "RedisStreamsStore"):
        from . import redis_streams

        return getattr(redis_streams, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
