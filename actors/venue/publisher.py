"""What clients see of the books: change-numbered book updates and the public view.

The engine calls ``publish`` after anything that may change an instrument's visible book. The
aggregated levels are diffed against the last published ones; a non-empty diff gets the next
``change_id`` and goes to the ``FaultyChannel`` (``md_*`` faults). While the feed is stale the
change_id still advances but nothing is sent and the public view (order book, ticker, resync
snapshot) stays frozen, so a client sees a gap when the feed resumes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from actors.venue.book import InstrumentBook, OrderRec
from actors.venue.clock import to_ms
from actors.venue.faults import Faults
from actors.venue.feed import BookUpdate, FaultyChannel, LevelAction, diff_levels
from actors.venue.instruments import Instrument


@dataclass(frozen=True)
class PublicView:
    """One instrument as clients currently see it. Levels are kept as the integer maps
    ``{price_ticks: lots}`` of the publish and converted to ``(price, amount)`` on read."""

    timestamp_s: float
    change_id: int
    bid_lots: Mapping[int, int]
    ask_lots: Mapping[int, int]
    last_price: float
    mark_price: float
    index_price: float
    mark_iv: float | None

    def levels(self, inst: Instrument, bid_side: bool, depth: int | None = None
               ) -> list[tuple[float, float]]:
        lots = self.bid_lots if bid_side else self.ask_lots
        prices = sorted(lots, reverse=bid_side)[:depth]
        return [(inst.ticks_to_price(p), inst.lots_to_amount(lots[p])) for p in prices]


_EMPTY = PublicView(0.0, 0, {}, {}, 0.0, 0.0, 0.0, None)


class BookPublisher:
    """Numbers, sends and remembers book changes for every instrument."""

    def __init__(self, seed: int) -> None:
        self._channel = FaultyChannel(f"md-faults:{seed}")
        self._views: dict[str, PublicView] = {}

    @property
    def counts(self) -> Counter[str]:
        """``published`` / ``suppressed`` (stale feed) and the channel's ``delivered`` /
        ``dropped`` / ``duplicated`` / ``reordered``."""
        return self._channel.counts

    def publish(self, book: InstrumentBook, orders: Mapping[str, OrderRec], now_s: float,
                faults: Faults) -> None:
        if not book.has_data and book.published is None and not (book.own_bids or
                                                                 book.own_asks):
            return
        inst = book.inst
        bids, asks = book.aggregated(orders)
        first = book.published is None
        if first:
            bid_levels: list[tuple[LevelAction, int, int]] = [
                ("new", p, a) for p, a in sorted(bids.items(), reverse=True)]
            ask_levels: list[tuple[LevelAction, int, int]] = [
                ("new", p, a) for p, a in sorted(asks.items())]
        else:
            assert book.published is not None
            bid_levels = diff_levels(book.published[0], bids, descending=True)
            ask_levels = diff_levels(book.published[1], asks, descending=False)
        if first or bid_levels or ask_levels:
            book.change_id += 1
            book.published = (bids, asks)
            update = BookUpdate(
                inst.instrument_name, "snapshot" if first else "change", book.change_id,
                None if first else book.change_id - 1, now_s,
                tuple((a, inst.ticks_to_price(p), inst.lots_to_amount(q))
                      for a, p, q in bid_levels),
                tuple((a, inst.ticks_to_price(p), inst.lots_to_amount(q))
                      for a, p, q in ask_levels))
            if faults.stale_feed:
                self._channel.counts["suppressed"] += 1
            else:
                self._channel.push(update, faults)
                self._channel.counts["published"] += 1
        if not faults.stale_feed:
            self._views[inst.instrument_name] = PublicView(
                now_s, book.change_id, bids, asks, book.last_price, book.mark_price(),
                book.index_price, book.mark_iv)

    def drain(self) -> list[BookUpdate]:
        return self._channel.drain()

    def view(self, name: str) -> PublicView:
        return self._views.get(name, _EMPTY)

    def snapshot(self, inst: Instrument) -> BookUpdate:
        """A ``snapshot`` message of the public view, to resync after a detected gap."""
        view = self.view(inst.instrument_name)
        return BookUpdate(inst.instrument_name, "snapshot", view.change_id, None,
                          view.timestamp_s,
                          tuple(("new", p, a) for p, a in view.levels(inst, True)),
                          tuple(("new", p, a) for p, a in view.levels(inst, False)))

    def book_dict(self, book: InstrumentBook, depth: int) -> dict[str, object]:
        """``public/get_order_book`` fields (with funding for perps, IV for options)."""
        inst = book.inst
        view = self.view(inst.instrument_name)
        bids, asks = view.levels(inst, True, depth), view.levels(inst, False, depth)
        out: dict[str, object] = {
            "instrument_name": inst.instrument_name, "timestamp": to_ms(view.timestamp_s),
            "change_id": view.change_id, "state": "open",
            "bids": [list(level) for level in bids],
            "asks": [list(level) for level in asks],
            "best_bid_price": bids[0][0] if bids else None,
            "best_bid_amount": bids[0][1] if bids else 0.0,
            "best_ask_price": asks[0][0] if asks else None,
            "best_ask_amount": asks[0][1] if asks else 0.0,
            "last_price": view.last_price, "mark_price": view.mark_price,
            "index_price": view.index_price,
        }
        if inst.kind == "future":
            per_8h = inst.funding_rate_per_interval * (8 * 3600.0 / inst.funding_interval_s)
            out.update(current_funding=inst.funding_rate_per_interval, funding_8h=per_8h)
        if inst.kind == "option":
            out.update(mark_iv=None if view.mark_iv is None else round(view.mark_iv * 100, 4),
                       underlying_price=view.index_price)
        return out
