"""What goes out to one client: a bounded queue that conflates market data for slow consumers,
and the merging of raw book changes into 100 ms book notifications.

``Outbox`` holds at most ``max_messages`` frames. When a new frame finds it full, market data is
conflated first: every queued book frame of a channel is dropped and replaced by one fresh
snapshot of that channel (``resnapshot(channel)``, which also resets the subscriber's change_id
baseline), and only the newest ticker frame per channel is kept. A book frame arriving at a full
queue is folded into that snapshot (the snapshot is taken after it was published, so it already
contains it). If the queue is still full -- it holds only replies and private notifications,
which are never dropped -- ``put`` answers False and the server disconnects the slow consumer.
When no snapshot can be taken (venue outage), the channel's book frames are dropped until one
can (``retry_snapshots``). Counts: ``conflations``, ``book_dropped``, ``ticker_dropped``,
``snapshots``, ``sent``.

``merge_book_changes`` folds consecutive ``change`` messages of one instrument into one with the
last ``change_id`` and the first ``prev_change_id``; ``BookAggregator`` collects them per
instrument between flushes and passes a message through on its own when it does not continue
the chain (a gap, a duplicate or a late message stays visible to the client).
"""

from __future__ import annotations

import asyncio
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from actors.venue.feed import BookUpdate, LevelAction

FrameKind = Literal["reply", "book", "ticker", "other", "close"]  # close: after the rest


@dataclass(frozen=True)
class Frame:
    """One outgoing text frame; ``channel`` names the subscription for market data."""

    text: str
    kind: FrameKind = "reply"
    channel: str | None = None


class Outbox:
    """Bounded outgoing queue of one connection (see the module doc)."""

    def __init__(self, max_messages: int, resnapshot: Callable[[str], str | None]) -> None:
        if not isinstance(max_messages, int) or max_messages < 2:
            raise ValueError(f"invalid max_messages={max_messages!r}: must be an int >= 2")
        self._max = max_messages
        self._resnapshot = resnapshot
        self._queue: deque[Frame] = deque()
        self._pending_snapshots: dict[str, None] = {}
        self._ready = asyncio.Event()
        self.counts: Counter[str] = Counter()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, frame: Frame) -> bool:
        """Queue a frame; False when the consumer is too slow even after conflation."""
        if frame.kind == "book" and frame.channel in self._pending_snapshots:
            self.counts["book_dropped"] += 1
            return True
        if len(self._queue) >= self._max:
            self._conflate(frame)  # folds an incoming book or ticker frame in
            if frame.kind in ("book", "ticker"):
                return len(self._queue) <= self._max
            if len(self._queue) >= self._max:
                return False
        self._queue.append(frame)
        self._ready.set()
        return True

    def _conflate(self, incoming: Frame) -> None:
        self.counts["conflations"] += 1
        book_channels: dict[str, None] = {}
        last_ticker: dict[str | None, int] = {}
        for i, frame in enumerate(self._queue):
            if frame.kind == "ticker":
                last_ticker[frame.channel] = i
        kept: deque[Frame] = deque()
        for i, frame in enumerate(self._queue):
            if frame.kind == "book":
                self.counts["book_dropped"] += 1
                book_channels[frame.channel or ""] = None
            elif frame.kind == "ticker" and last_ticker.get(frame.channel) != i:
                self.counts["ticker_dropped"] += 1
            else:
                kept.append(frame)
        if incoming.kind == "book":
            self.counts["book_dropped"] += 1
            book_channels[incoming.channel or ""] = None
        elif incoming.kind == "ticker":
            for i, frame in enumerate(kept):
                if frame.kind == "ticker" and frame.channel == incoming.channel:
                    del kept[i]
                    self.counts["ticker_dropped"] += 1
                    break
            kept.append(incoming)
        self._queue = kept
        for channel in book_channels:
            self._pending_snapshots[channel] = None
        self.retry_snapshots()

    def request_snapshot(self, channel: str) -> None:
        """Drop ``channel``'s book frames until ``retry_snapshots`` can queue a snapshot."""
        self._pending_snapshots[channel] = None

    def retry_snapshots(self) -> None:
        """Queue a fresh snapshot for every channel still waiting for one."""
        for channel in list(self._pending_snapshots):
            text = self._resnapshot(channel)
            if text is None:
                continue
            del self._pending_snapshots[channel]
            self._queue.append(Frame(text, "book", channel))
            self.counts["snapshots"] += 1
        if self._queue:
            self._ready.set()

    @property
    def pending_snapshots(self) -> list[str]:
        return list(self._pending_snapshots)

    def pop(self) -> Frame | None:
        if not self._queue:
            self._ready.clear()
            return None
        self.counts["sent"] += 1
        return self._queue.popleft()

    async def get(self) -> Frame:
        """Wait for the next frame (for the connection's writer task)."""
        while True:
            frame = self.pop()
            if frame is not None:
                return frame
            await self._ready.wait()


# --- 100 ms book aggregation -------------------------------------------------------------------
def _merge_side(first: tuple[tuple[LevelAction, float, float], ...],
                second: tuple[tuple[LevelAction, float, float], ...], descending: bool
                ) -> tuple[tuple[LevelAction, float, float], ...]:
    state: dict[float, tuple[LevelAction, float]] = {p: (a, q) for a, p, q in first}
    for action, price, amount in second:
        before = state.get(price)
        if before is None:
            state[price] = (action, amount)
        elif before[0] == "new":
            if action == "delete":
                del state[price]  # appeared and went within the window
            else:
                state[price] = ("new", amount)
        elif before[0] == "delete":
            state[price] = ("change", amount) if action == "new" else (action, amount)
        else:
            state[price] = ("delete", 0.0) if action == "delete" else ("change", amount)
    return tuple((a, p, q) for p, (a, q) in sorted(state.items(), reverse=descending))


def merge_book_changes(first: BookUpdate, second: BookUpdate) -> BookUpdate:
    """``first`` then ``second`` as one ``change`` (``second`` must continue ``first``)."""
    return BookUpdate(first.instrument_name, "change", second.change_id, first.prev_change_id,
                      second.timestamp_s, _merge_side(first.bids, second.bids, True),
                      _merge_side(first.asks, second.asks, False))


class BookAggregator:
    """Per-instrument merge of book changes between flushes (for ``book.X.100ms``)."""

    def __init__(self) -> None:
        self._pending: dict[str, BookUpdate] = {}
        self._out: list[BookUpdate] = []

    def add(self, update: BookUpdate) -> None:
        name = update.instrument_name
        pending = self._pending.get(name)
        if pending is None:
            if update.type == "change":
                self._pending[name] = update
            else:
                self._out.append(update)
            return
        if update.type == "change" and update.prev_change_id == pending.change_id:
            self._pending[name] = merge_book_changes(pending, update)
            return
        self._out.append(pending)  # the chain broke: flush, then pass this one on its own
        del self._pending[name]
        self._out.append(update)

    def flush(self, instrument_name: str | None = None) -> list[BookUpdate]:
        """Everything ready (one instrument's or all), in order."""
        if instrument_name is None:
            out = self._out + list(self._pending.values())
            self._out, self._pending = [], {}
            return out
        out = [u for u in self._out if u.instrument_name == instrument_name]
        self._out = [u for u in self._out if u.instrument_name != instrument_name]
        if instrument_name in self._pending:
            out.append(self._pending.pop(instrument_name))
        return out
