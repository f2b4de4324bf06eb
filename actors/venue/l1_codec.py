"""The binary top-of-book (L1) feed: wire format, sequence checks and conflation.

The JSON-RPC ``book.*`` channels cost one JSON parse per update, which caps a Python connector
at a few thousand updates a second. Venues offer a binary feed for the high-rate path (Deribit's
multicast SBE feed, Binance's SBE streams); this is the simulator's, in the same spirit: fixed
little-endian records, many per frame, decoded with one ``np.frombuffer``.

Frame = 16-byte header + body::

    magic  b"BL"   2 bytes
    version u8     (VERSION)
    kind    u8     DIRECTORY | L1 | HEARTBEAT
    count   u32    records in the body (L1), 0 otherwise
    sent_us i64    venue wall clock at send, microseconds

* ``DIRECTORY``: body is JSON ``{"instruments": [name, ...]}``; a record's ``instrument`` field
  is an index into it. Sent first on every connection and whenever the list changes.
* ``L1``: ``count`` records of :data:`RECORD` (50 bytes each): instrument, ``change_id``
  (per instrument, +1 per change), event time, best bid/ask price and amount.
* ``HEARTBEAT``: empty, sent when nothing changed for a while.

Every L1 record carries the whole top of book, so a gap in ``change_id`` loses intermediate
states, never the current one: the receiver counts it and goes on (no snapshot is needed, as
for the L2 channels). Older or repeated ``change_id`` are dropped (duplicates, reordering).
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"BL"
VERSION = 1
DIRECTORY, L1, HEARTBEAT = 1, 2, 3
KINDS = (DIRECTORY, L1, HEARTBEAT)
HEADER = struct.Struct("<2sBBIq")
RECORD = np.dtype([("instrument", "<u2"), ("change_id", "<u8"), ("ts_us", "<i8"),
                   ("bid", "<f8"), ("bid_amount", "<f8"), ("ask", "<f8"),
                   ("ask_amount", "<f8")])
MAX_RECORDS_PER_FRAME = 65_536
MAX_DIRECTORY_BYTES = 1 << 20
_CHANGE_ID_BITS = 44  # change ids above 2**44 (17 trillion) are refused as corrupt


class FeedFrameError(ValueError):
    """A frame of the binary feed is malformed; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"binary feed frame refused ({reason}): {detail}")


@dataclass(frozen=True)
class Frame:
    kind: int
    sent_s: float
    records: np.ndarray | None = None      # L1
    instruments: tuple[str, ...] = ()      # DIRECTORY


def encode_l1(records: np.ndarray, sent_s: float) -> bytes:
    if records.dtype != RECORD:
        raise TypeError(f"records must have dtype RECORD, not {records.dtype}")
    if len(records) > MAX_RECORDS_PER_FRAME:
        raise ValueError(f"{len(records)} records > {MAX_RECORDS_PER_FRAME} per frame")
    return HEADER.pack(MAGIC, VERSION, L1, len(records), int(sent_s * 1e6)) + records.tobytes()


def encode_directory(instruments: list[str] | tuple[str, ...], sent_s: float) -> bytes:
    body = json.dumps({"instruments": list(instruments)}).encode()
    return HEADER.pack(MAGIC, VERSION, DIRECTORY, 0, int(sent_s * 1e6)) + body


def encode_heartbeat(sent_s: float) -> bytes:
    return HEADER.pack(MAGIC, VERSION, HEARTBEAT, 0, int(sent_s * 1e6))


def decode(data: bytes | bytearray | memoryview) -> Frame:
    """One frame; raises :class:`FeedFrameError` naming what is wrong, never anything else."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FeedFrameError("not_binary", f"got {type(data).__name__}")
    if len(data) < HEADER.size:
        raise FeedFrameError("short", f"{len(data)} bytes < {HEADER.size}-byte header")
    magic, version, kind, count, sent_us = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FeedFrameError("bad_magic", f"{bytes(magic)!r}")
    if version != VERSION:
        raise FeedFrameError("bad_version", f"version {version}, expected {VERSION}")
    if kind not in KINDS:
        raise FeedFrameError("bad_kind", f"kind {kind}")
    body = memoryview(data)[HEADER.size:]
    sent_s = sent_us / 1e6
    if kind == L1:
        if count > MAX_RECORDS_PER_FRAME:
            raise FeedFrameError("oversize", f"{count} records > {MAX_RECORDS_PER_FRAME}")
        if len(body) != count * RECORD.itemsize:
            raise FeedFrameError("bad_length", f"{len(body)} body bytes for {count} records")
        return Frame(L1, sent_s, np.frombuffer(body, dtype=RECORD))
    if kind == HEARTBEAT:
        if len(body):
            raise FeedFrameError("bad_length", f"heartbeat with {len(body)} body bytes")
        return Frame(HEARTBEAT, sent_s)
    if len(body) > MAX_DIRECTORY_BYTES:
        raise FeedFrameError("oversize", f"directory of {len(body)} bytes")
    try:
        names = json.loads(bytes(body))["instruments"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FeedFrameError("bad_directory", repr(exc)) from None
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names) or \
            len(names) > 65_535 or len(set(names)) != len(names):
        raise FeedFrameError("bad_directory", "instruments must be distinct non-empty names")
    return Frame(DIRECTORY, sent_s, instruments=tuple(names))


class L1Sequencer:
    """Receiver-side checks, vectorized over a frame: values (finite, positive, not crossed,
    known instrument) and per-instrument ``change_id`` order. ``counts`` says what was dropped
    and why (``bad_<field>``, ``duplicate``) and how many gaps were seen (``gap``, ``gap_missed``
    = change ids never seen)."""

    def __init__(self, instruments: tuple[str, ...] = ()) -> None:
        self.counts: Counter[str] = Counter()
        self.instruments: tuple[str, ...] = ()
        self._last = np.zeros(0, dtype=np.int64)
        self.set_directory(instruments)

    def set_directory(self, instruments: tuple[str, ...]) -> None:
        """A new directory; the sequence of an instrument that keeps its name is kept."""
        old = {name: int(self._last[i]) for i, name in enumerate(self.instruments)}
        self.instruments = tuple(instruments)
        self._last = np.array([old.get(n, 0) for n in self.instruments], dtype=np.int64)

    def last_change_id(self, name: str) -> int:
        return int(self._last[self.instruments.index(name)])

    def accept(self, records: np.ndarray) -> np.ndarray:
        """The records to act on, in arrival order."""
        if not len(records):
            return records
        ok = self._valid(records)
        rec = records[ok] if not ok.all() else records
        inst = rec["instrument"].astype(np.int64)
        cid = rec["change_id"].astype(np.int64)
        order = np.argsort(inst, kind="stable")
        keys = (inst[order] << _CHANGE_ID_BITS) | cid[order]
        seed = (inst[order] << _CHANGE_ID_BITS) | self._last[inst[order]]
        prev = np.concatenate(([0], keys[:-1]))
        prior = np.maximum.accumulate(np.maximum(seed, prev))
        fresh_sorted = keys > prior
        missed = (keys - prior - 1)[fresh_sorted]
        gaps = missed > 0
        self.counts["gap"] += int(gaps.sum())
        self.counts["gap_missed"] += int(missed[gaps].sum())
        fresh = np.empty_like(fresh_sorted)
        fresh[order] = fresh_sorted
        self.counts["duplicate"] += int((~fresh).sum())
        out = rec[fresh]
        np.maximum.at(self._last, out["instrument"].astype(np.int64),
                      out["change_id"].astype(np.int64))
        self.counts["accepted"] += len(out)
        return out

    def _valid(self, records: np.ndarray) -> np.ndarray:
        ok = np.ones(len(records), dtype=bool)
        checks = (
            ("bad_instrument", records["instrument"] < len(self.instruments)),
            ("bad_change_id", (records["change_id"] >= 1) &
             (records["change_id"] < (1 << _CHANGE_ID_BITS))),
            ("bad_bid", np.isfinite(records["bid"]) & (records["bid"] > 0)),
            ("bad_ask", np.isfinite(records["ask"]) & (records["ask"] > 0)),
            ("bad_amount", np.isfinite(records["bid_amount"]) & (records["bid_amount"] >= 0) &
             np.isfinite(records["ask_amount"]) & (records["ask_amount"] >= 0)),
            ("crossed", records["bid"] < records["ask"]),
        )
        for reason, good in checks:
            bad = ok & ~good
            if bad.any():
                self.counts[reason] += int(bad.sum())
                ok &= good
        return ok


class L1Conflator:
    """The latest record per instrument since the last :meth:`take`, plus what conflation would
    otherwise hide: how many events were merged, the lowest and highest mid, and the oldest
    event's time (so the consumer can measure the worst latency, not only the freshest)."""

    def __init__(self) -> None:
        self._n = 0
        self._reset(0)

    def _reset(self, n: int) -> None:
        self._n = n
        self._latest = np.zeros(n, dtype=RECORD)
        self._count = np.zeros(n, dtype=np.int64)
        self._lo = np.full(n, np.inf)
        self._hi = np.full(n, -np.inf)
        self._first_us = np.full(n, np.iinfo(np.int64).max)

    def add(self, records: np.ndarray, n_instruments: int) -> None:
        if n_instruments != self._n:
            self._reset(n_instruments)
        if not len(records):
            return
        inst = records["instrument"].astype(np.int64)
        mid = (records["bid"] + records["ask"]) * 0.5
        # last occurrence of each instrument in this frame
        rev_inst = inst[::-1]
        uniq, first_in_rev = np.unique(rev_inst, return_index=True)
        last_idx = len(inst) - 1 - first_in_rev
        self._latest[uniq] = records[last_idx]
        self._count += np.bincount(inst, minlength=self._n)
        np.minimum.at(self._lo, inst, mid)
        np.maximum.at(self._hi, inst, mid)
        np.minimum.at(self._first_us, inst, records["ts_us"])

    @property
    def pending(self) -> int:
        return int(self._count.sum())

    def take(self, names: tuple[str, ...]) -> dict[str, Any] | None:
        """Numpy columns for the instruments that changed, or None; resets the window."""
        idx = np.flatnonzero(self._count)
        if not idx.size:
            return None
        rec = self._latest[idx]
        out = {"instrument": np.array([names[i] for i in idx.tolist()]),
               "bid": rec["bid"].copy(), "ask": rec["ask"].copy(),
               "bid_amount": rec["bid_amount"].copy(), "ask_amount": rec["ask_amount"].copy(),
               "mark_price": (rec["bid"] + rec["ask"]) * 0.5,
               "index_price": (rec["bid"] + rec["ask"]) * 0.5,
               "change_id": rec["change_id"].astype(np.int64),
               "timestamp": rec["ts_us"] / 1000.0,          # ms, as Deribit's
               "events": self._count[idx].copy(), "mid_low": self._lo[idx].copy(),
               "mid_high": self._hi[idx].copy(),
               "first_event_ts": self._first_us[idx] / 1e6,
               "last_event_ts": rec["ts_us"] / 1e6}
        self._count[idx] = 0
        self._lo[idx] = np.inf
        self._hi[idx] = -np.inf
        self._first_us[idx] = np.iinfo(np.int64).max
        return out
