"""Book-update messages (Deribit ``book.{instrument}.raw``) and how they reach clients.

Every change of an instrument's aggregated book gets the next ``change_id``; a ``change``
message carries ``prev_change_id`` so a client can tell a gap (a message it never saw) from a
duplicate or a late one. ``ChangeIdTracker`` is that client-side check. ``FaultyChannel`` is the
outbound queue: with the ``md_*`` fault probabilities it drops, duplicates or swaps messages,
drawing from its own seeded generator so runs are reproducible.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from actors.venue.clock import to_ms
from actors.venue.faults import Faults

LevelAction = Literal["new", "change", "delete"]
Verdict = Literal["ok", "snapshot", "gap", "duplicate", "out_of_order"]


@dataclass(frozen=True)
class BookUpdate:
    """One book notification. Levels are ``(action, price, amount)``; bids best (highest)
    first, asks best (lowest) first; a ``delete`` carries amount 0."""

    instrument_name: str
    type: Literal["snapshot", "change"]
    change_id: int
    prev_change_id: int | None
    timestamp_s: float
    bids: tuple[tuple[LevelAction, float, float], ...]
    asks: tuple[tuple[LevelAction, float, float], ...]

    def to_deribit(self) -> dict[str, object]:
        out: dict[str, object] = {
            "type": self.type, "instrument_name": self.instrument_name,
            "change_id": self.change_id, "timestamp": to_ms(self.timestamp_s),
            "bids": [list(level) for level in self.bids],
            "asks": [list(level) for level in self.asks],
        }
        if self.prev_change_id is not None:
            out["prev_change_id"] = self.prev_change_id
        return out


def diff_levels(old: Mapping[int, int], new: Mapping[int, int],
                descending: bool) -> list[tuple[LevelAction, int, int]]:
    """Level changes turning ``old`` into ``new`` (price key -> amount), best price first."""
    out: list[tuple[LevelAction, int, int]] = []
    for key in sorted(set(old) | set(new), reverse=descending):
        before, after = old.get(key, 0), new.get(key, 0)
        if before == after:
            continue
        if after == 0:
            out.append(("delete", key, 0))
        elif before == 0:
            out.append(("new", key, after))
        else:
            out.append(("change", key, after))
    return out


class ChangeIdTracker:
    """Client-side sequence check over book updates of any number of instruments.

    ``accept`` answers ``snapshot`` (baseline reset), ``ok`` (``prev_change_id`` is the last
    id seen), ``gap`` (a message is missing: resync from a snapshot; tracking continues from
    this message), ``duplicate`` (this ``change_id`` was already seen) or ``out_of_order``
    (an older id never seen before: it arrived late). The last ``memory`` ids are kept per
    instrument to tell duplicates from late messages."""

    def __init__(self, memory: int = 4096) -> None:
        self._memory = memory
        self._last: dict[str, int] = {}
        self._seen: dict[str, deque[int]] = {}
        self._seen_set: dict[str, set[int]] = {}
        self.counts: Counter[str] = Counter()

    def last_change_id(self, instrument_name: str) -> int | None:
        return self._last.get(instrument_name)

    def _remember(self, name: str, change_id: int) -> None:
        seen = self._seen.setdefault(name, deque())
        seen_set = self._seen_set.setdefault(name, set())
        seen.append(change_id)
        seen_set.add(change_id)
        if len(seen) > self._memory:
            seen_set.discard(seen.popleft())

    def accept(self, update: BookUpdate) -> Verdict:
        verdict = self._judge(update)
        self.counts[verdict] += 1
        return verdict

    def _judge(self, update: BookUpdate) -> Verdict:
        name = update.instrument_name
        if update.type == "snapshot":
            self._seen.pop(name, None)
            self._seen_set.pop(name, None)
            self._last[name] = update.change_id
            self._remember(name, update.change_id)
            return "snapshot"
        last = self._last.get(name)
        if update.change_id in self._seen_set.get(name, ()):
            return "duplicate"
        if last is not None and update.change_id <= last:
            self._remember(name, update.change_id)
            return "out_of_order"
        self._last[name] = update.change_id
        self._remember(name, update.change_id)
        if last is None or update.prev_change_id != last:
            return "gap"
        return "ok"


def check_sequence(updates: Iterable[BookUpdate]) -> Counter[str]:
    """Verdict counts for a recorded stream (a convenience over ``ChangeIdTracker``)."""
    tracker = ChangeIdTracker()
    for update in updates:
        tracker.accept(update)
    return tracker.counts


class FaultyChannel:
    """Outbound book-update queue that applies the ``md_*`` faults with its own generator.

    Per message, one draw decides drop / duplicate and a second decides whether to hold it
    back and deliver it right after the next message (a swap of neighbours)."""

    def __init__(self, seed: int | str) -> None:
        self._rng = random.Random(seed)
        self._out: list[BookUpdate] = []
        self._held: BookUpdate | None = None
        self.counts: Counter[str] = Counter()

    def push(self, update: BookUpdate, faults: Faults) -> None:
        u_loss, u_order = self._rng.random(), self._rng.random()
        if u_loss < faults.md_drop_probability:
            self.counts["dropped"] += 1
            return
        copies = 1
        if u_loss < faults.md_drop_probability + faults.md_duplicate_probability:
            self.counts["duplicated"] += 1
            copies = 2
        if copies == 1 and self._held is None and u_order < faults.md_reorder_probability:
            self.counts["reordered"] += 1
            self._held = update
            return
        self._out.extend([update] * copies)
        if self._held is not None:
            self._out.append(self._held)
            self._held = None
        self.counts["delivered"] += 1

    def drain(self) -> list[BookUpdate]:
        """Messages ready for clients, in delivery order (a held message stays held)."""
        out, self._out = self._out, []
        return out
