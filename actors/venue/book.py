"""One instrument's order book: external liquidity from market data plus our resting orders.

Prices are integer ticks and amounts integer lots (``Instrument`` converts). Priority is price,
then time: at one price the external (market) liquidity of the latest tick is ahead of our
orders -- we always join the back of the visible queue -- and our own orders are FIFO by
``seq``. External levels are replaced on every tick and consumed by our fills until the next.

Matching is split in a pure ``plan`` (what an aggressive order would fill, used for FOK and
self-trade checks before anything changes) and the engine applying it. ``cross_resting`` fills
our resting orders that a new external book trades through, at our price (we were the maker).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from actors.venue.instruments import Instrument
from actors.venue.records import (
    Direction,
    Order,
    OrderState,
    OrderType,
    TimeInForce,
    Trigger,
)

if TYPE_CHECKING:
    from actors.venue.market_data import Tick

OPEN_STATES: tuple[str, ...] = ("open", "untriggered")
_LEVEL_EPS = 1e-9


def _positive(x: object) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)


def fee(inst: Instrument, maker: bool, price: float, lots: int) -> float:
    """Fee in the fee currency: coin for inverse futures and options (options capped at 12.5 %
    of the premium), quote currency for spot."""
    rate = inst.maker_commission if maker else inst.taker_commission
    amount = lots * inst.min_trade_amount
    if inst.has_inverse_pnl:
        return amount / price * rate
    if inst.kind == "option":
        return min(rate * amount, 0.125 * price * amount)
    return amount * price * rate


@dataclass(slots=True)
class OrderRec:
    """The engine's mutable record of one order (integers inside, floats in ``snapshot``)."""

    order_id: str
    account: str
    instrument_name: str
    direction: Direction
    order_type: OrderType
    price_ticks: int | None
    amount_lots: int
    time_in_force: TimeInForce
    post_only: bool
    reject_post_only: bool
    reduce_only: bool
    label: str
    state: OrderState
    creation_s: float
    update_s: float
    seq: int
    filled_lots: int = 0
    filled_notional: int = 0  # sum of price_ticks * lots over fills
    replaced: bool = False
    cancel_reason: str | None = None
    trigger_price_ticks: int | None = None
    trigger: Trigger | None = None
    triggered: bool | None = None

    @property
    def remaining_lots(self) -> int:
        return self.amount_lots - self.filled_lots

    @property
    def is_buy(self) -> bool:
        return self.direction == "buy"

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def snapshot(self, inst: Instrument) -> Order:
        average = (inst.ticks_to_price(0) if self.filled_lots == 0 else
                   round(self.filled_notional / self.filled_lots * inst.tick_size,
                         inst.price_decimals + 4))
        trigger_price = (None if self.trigger_price_ticks is None
                         else inst.ticks_to_price(self.trigger_price_ticks))
        return Order(
            order_id=self.order_id, account=self.account, instrument_name=self.instrument_name,
            direction=self.direction, order_type=self.order_type,
            amount=inst.lots_to_amount(self.amount_lots),
            price=None if self.price_ticks is None else inst.ticks_to_price(self.price_ticks),
            time_in_force=self.time_in_force, post_only=self.post_only,
            reject_post_only=self.reject_post_only, reduce_only=self.reduce_only,
            label=self.label, filled_amount=inst.lots_to_amount(self.filled_lots),
            average_price=average, order_state=self.state,
            creation_timestamp_s=self.creation_s, last_update_timestamp_s=self.update_s,
            replaced=self.replaced, cancel_reason=self.cancel_reason,
            trigger_price=trigger_price, trigger=self.trigger, triggered=self.triggered,
            contract_size=inst.contract_size)


@dataclass(slots=True)
class PositionRec:
    """Net position from fills: signed lots, entry price of the open part, realized P&L."""

    size_lots: int = 0
    average_price: float = 0.0
    realized: float = 0.0

    def apply_fill(self, inst: Instrument, signed_lots: int, price: float) -> None:
        """Update for a fill of ``signed_lots`` (+buy / -sell) at ``price``."""
        old = self.size_lots
        new = old + signed_lots
        step = inst.min_trade_amount
        if old == 0 or (old > 0) == (signed_lots > 0):  # open or add
            old_amt, add_amt = abs(old) * step, abs(signed_lots) * step
            if inst.has_inverse_pnl:  # harmonic mean: USD over coins
                coins = (old_amt / self.average_price if old else 0.0) + add_amt / price
                self.average_price = (old_amt + add_amt) / coins
            else:
                self.average_price = (old_amt * self.average_price + add_amt * price) / (
                    old_amt + add_amt)
        else:  # reduce, close or flip
            closed = min(abs(old), abs(signed_lots)) * step
            sign = 1.0 if old > 0 else -1.0
            if inst.has_inverse_pnl:
                self.realized += sign * closed * (1.0 / self.average_price - 1.0 / price)
            else:
                self.realized += sign * closed * (price - self.average_price)
            if new == 0:
                self.average_price = 0.0
            elif (new > 0) != (old > 0):
                self.average_price = price
        self.size_lots = new

    def floating(self, inst: Instrument, mark: float) -> float:
        if self.size_lots == 0 or mark <= 0:
            return 0.0
        amount = self.size_lots * inst.min_trade_amount
        if inst.has_inverse_pnl:
            return amount * (1.0 / self.average_price - 1.0 / mark)
        return amount * (mark - self.average_price)


@dataclass(frozen=True)
class Fill:
    """One planned execution: ``maker`` is our resting order id, or ``None`` for external."""

    maker: str | None
    price_ticks: int
    lots: int


@dataclass(frozen=True)
class Plan:
    fills: tuple[Fill, ...]
    overlap: bool = False

    @property
    def lots(self) -> int:
        return sum(f.lots for f in self.fills)


@dataclass(slots=True)
class InstrumentBook:
    """Book state of one instrument (see module docstring for the priority rules)."""

    inst: Instrument
    ext_bids: dict[int, int] = field(default_factory=dict)
    ext_asks: dict[int, int] = field(default_factory=dict)
    own_bids: dict[int, deque[str]] = field(default_factory=dict)
    own_asks: dict[int, deque[str]] = field(default_factory=dict)
    last_price: float = 0.0
    index_price: float = 0.0
    mark_iv: float | None = None
    quote_ts_s: float = 0.0
    has_data: bool = False
    trade_seq: int = 0
    change_id: int = 0
    published: tuple[dict[int, int], dict[int, int]] | None = None

    # --- market data -----------------------------------------------------------------------
    def load_tick(self, tick: Tick, factor: float = 1.0) -> str | None:
        """Replace the external levels with ``tick`` (prices times ``factor``, bids rounded
        down and asks up to the tick, amounts down to whole lots). Returns why the tick was
        refused (``bad_tick``: NaN/inf/non-positive value; ``crossed_tick``) or ``None``."""
        inst = self.inst
        sides: list[dict[int, int]] = [{}, {}]
        for i, levels in enumerate((tick.bids, tick.asks)):
            for price, amount in levels:
                if not (_positive(price) and _positive(amount)):
                    return "bad_tick"
                p = price * factor
                ticks = inst.floor_ticks(p) if i == 0 else inst.ceil_ticks(p)
                lots = int(math.floor(amount / inst.min_trade_amount + _LEVEL_EPS))
                if ticks >= 1 and lots >= 1:
                    sides[i][ticks] = sides[i].get(ticks, 0) + lots
        bids, asks = sides
        if bids and asks and max(bids) >= min(asks):
            return "crossed_tick"
        last, index = tick.last_price, tick.index_price
        if (last is not None and not _positive(last)) or (index is not None
                                                          and not _positive(index)):
            return "bad_tick"
        self.ext_bids, self.ext_asks = bids, asks
        if last is not None:
            self.last_price = inst.ticks_to_price(max(1, round(last * factor / inst.tick_size)))
        self.index_price = index * factor if index is not None else self.mark_price()
        self.mark_iv = tick.mark_iv
        self.quote_ts_s = tick.ts_s
        self.has_data = True
        return None

    # --- our resting orders -------------------------------------------------------------
    def add_resting(self, rec: OrderRec) -> None:
        side = self.own_bids if rec.is_buy else self.own_asks
        assert rec.price_ticks is not None
        side.setdefault(rec.price_ticks, deque()).append(rec.order_id)

    def remove_resting(self, rec: OrderRec) -> None:
        side = self.own_bids if rec.is_buy else self.own_asks
        if rec.price_ticks is None or rec.price_ticks not in side:
            return
        queue = side[rec.price_ticks]
        if rec.order_id in queue:
            queue.remove(rec.order_id)
        if not queue:
            del side[rec.price_ticks]

    # --- views ---------------------------------------------------------------------------
    def aggregated(self, orders: Mapping[str, OrderRec]) -> tuple[dict[int, int], dict[int, int]]:
        """Visible levels (external + ours) as ``{price_ticks: lots}`` for bids and asks."""
        bids, asks = dict(self.ext_bids), dict(self.ext_asks)
        for own, agg in ((self.own_bids, bids), (self.own_asks, asks)):
            for price, queue in own.items():
                lots = sum(orders[oid].remaining_lots for oid in queue)
                if lots:
                    agg[price] = agg.get(price, 0) + lots
        return bids, asks

    def best(self, bid_side: bool) -> int | None:
        ext, own = (self.ext_bids, self.own_bids) if bid_side else (self.ext_asks, self.own_asks)
        prices = list(ext) + list(own)
        if not prices:
            return None
        return max(prices) if bid_side else min(prices)

    def mark_price(self) -> float:
        """Mid of the external book (the venue's fair price), else the last price."""
        if self.ext_bids and self.ext_asks:
            mid = (max(self.ext_bids) + min(self.ext_asks)) / 2.0
            return round(mid * self.inst.tick_size, self.inst.price_decimals + 1)
        return self.last_price

    # --- matching ------------------------------------------------------------------------
    def plan(self, taker_is_buy: bool, limit_ticks: int | None, lots: int, taker_account: str,
             orders: Mapping[str, OrderRec], reducible: Callable[[OrderRec], int]) -> Plan:
        """What an aggressive order would fill, best price first, without changing anything.

        ``overlap`` is set (and planning stops) when the order would reach a resting order of
        the same account (Deribit's self-trade refusal). Resting reduce-only orders fill at
        most what still reduces their account's position (``reducible``)."""
        ext, own = (self.ext_asks, self.own_asks) if taker_is_buy else (self.ext_bids,
                                                                         self.own_bids)
        left, fills = lots, []
        reduce_left: dict[str, int] = {}
        for price in sorted(set(ext) | set(own), reverse=not taker_is_buy):
            if limit_ticks is not None and (price > limit_ticks if taker_is_buy
                                            else price < limit_ticks):
                break
            take = min(ext.get(price, 0), left)
            if take:
                fills.append(Fill(None, price, take))
                left -= take
            for oid in own.get(price, ()):
                if not left:
                    break
                rec = orders[oid]
                if rec.account == taker_account:
                    return Plan(tuple(fills), overlap=True)
                cap = rec.remaining_lots
                if rec.reduce_only:
                    cap = min(cap, reduce_left.setdefault(rec.account, reducible(rec)))
                take = min(cap, left)
                if take <= 0:
                    continue
                if rec.reduce_only:
                    reduce_left[rec.account] -= take
                fills.append(Fill(oid, price, take))
                left -= take
            if not left:
                break
        return Plan(tuple(fills))

    def consume_external(self, taker_is_buy: bool, price_ticks: int, lots: int) -> None:
        ext = self.ext_asks if taker_is_buy else self.ext_bids
        left = ext.get(price_ticks, 0) - lots
        if left > 0:
            ext[price_ticks] = left
        else:
            ext.pop(price_ticks, None)

    def cross_resting(self, orders: Mapping[str, OrderRec],
                      reducible: Callable[[OrderRec], int]) -> list[tuple[str, int]]:
        """Fill our resting orders that the external book now trades through.

        A resting bid at or above the best external ask (or ask at or below the best external
        bid) is filled at its own price against external levels it crosses, best first, in
        price-time order of our orders. External levels are consumed. Returns
        ``(order_id, lots)`` per fill; the fill price is the order's price."""
        out: list[tuple[str, int]] = []
        reduce_left: dict[str, int] = {}
        for bid_side in (True, False):
            own = self.own_bids if bid_side else self.own_asks
            ext = self.ext_asks if bid_side else self.ext_bids
            for price in sorted(own, reverse=bid_side):
                for oid in own[price]:
                    rec = orders[oid]
                    want = rec.remaining_lots
                    if rec.reduce_only:
                        want = min(want, reduce_left.setdefault(rec.account, reducible(rec)))
                    got = 0
                    while want > got and ext:
                        level = min(ext) if bid_side else max(ext)
                        if (level > price) if bid_side else (level < price):
                            break
                        take = min(ext[level], want - got)
                        self.consume_external(bid_side, level, take)
                        got += take
                    if got:
                        out.append((oid, got))
                        if rec.reduce_only:
                            reduce_left[rec.account] -= got
        return out
