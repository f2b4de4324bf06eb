"""The venue's pure core: order entry, matching, positions and book updates for every instrument.

``VenueEngine`` is plain Python driven by calls and market-data batches; it never sleeps, opens
sockets or reads the wall clock (time comes from the injected ``Clock``). The JSON-RPC server
wraps it later and adds latency. Each call answers data: an ``OrderResult``/``Order``/list on
success, or a ``Rejection`` (Deribit code, message, ``reason``, ``param``) that is also counted in
``stats.rejections`` by reason.

Rules, in one place:

* Price-time priority per instrument (``book.InstrumentBook``); market orders sweep levels and
  cancel the rest; IOC cancels the rest; FOK fills completely or is cancelled unfilled;
  ``post_only`` is repriced one tick inside the spread, or refused (``post_only_reject``,
  11054) with ``reject_post_only``; an order that would trade with a resting order of its own
  account is refused (``order_overlap``, 10003); ``reduce_only`` larger than what reduces the
  position is refused, and resting reduce-only orders are shrunk or cancelled when the position
  shrinks.
* ``edit`` keeps time priority only when the price is unchanged and the amount does not grow.
* ``label`` is the idempotency key per account: a buy/sell with a label already used by that
  account returns the original order (``duplicate=True``) in its current state and never
  creates a second one -- open, filled or cancelled alike. A refused request creates no order,
  so its label stays free for a retry.
* Positions come only from fills; ``trade_seq`` counts venue trades per instrument.
* Stop orders (``stop_limit``/``stop_market``) wait in ``untriggered`` state and fire when the
  trigger price (last, mark = external mid, or index) reaches ``trigger_price``.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from itertools import islice

from actors.venue.book import InstrumentBook as _Book
from actors.venue.book import OrderRec, Plan, PositionRec, fee
from actors.venue.clock import Clock, to_ms
from actors.venue.faults import Faults
from actors.venue.feed import BookUpdate
from actors.venue.instruments import Instrument
from actors.venue.market_data import TickBatch
from actors.venue.publisher import BookPublisher
from actors.venue.records import (
    Order,
    OrderLogEntry,
    OrderResult,
    OrderState,
    Position,
    Rejection,
    Trade,
    reject,
)
from actors.venue.validation import (
    OrderRequest,
    check_amount,
    check_flags,
    check_label,
    check_price,
    validate_order,
)


class VenueConfigError(ValueError):
    """A venue configuration is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"VenueConfig: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class VenueConfig:
    """Listed instruments and the seed of every random fault draw (reject storm, md faults)."""

    instruments: tuple[Instrument, ...]
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "instruments", tuple(self.instruments))
        if not self.instruments:
            raise VenueConfigError("instruments", self.instruments, "must list at least one")
        names = [i.instrument_name for i in self.instruments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise VenueConfigError("instruments", dupes, "instrument names must be unique")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise VenueConfigError("seed", self.seed, "must be an int")


#: A label stamped with a fencing epoch (see ``VenueEngine._fence``).
EPOCH_LABEL = re.compile(r"^e(\d{1,18})\.")
#: Order-log entries kept per account (oldest dropped first; ``seq`` keeps counting).
ORDER_LOG_MAX = 1_000_000


@dataclass
class VenueStats:
    """Counters for tests and the operator (nothing here drives behaviour)."""

    rejections: Counter[str] = field(default_factory=Counter)  # by Rejection.reason
    rejection_messages: Counter[str] = field(default_factory=Counter)  # by Deribit message
    duplicate_labels: int = 0
    orders_created: int = 0
    trades: int = 0
    ticks_applied: int = 0
    ticks_skipped: Counter[str] = field(default_factory=Counter)  # by reason
    price_spikes_applied: int = 0
    fenced_orders: int = 0  # refused: stamped with an epoch older than one already seen


def _finite(x: object) -> float | None:
    ok = isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
    return float(x) if ok else None  # type: ignore[arg-type]


class VenueEngine:
    """A Deribit-like venue for any number of accounts over the configured instruments."""

    def __init__(self, config: VenueConfig, clock: Clock, faults: Faults | None = None, *,
                 order_log_max: int = ORDER_LOG_MAX) -> None:
        self._config = config
        self._clock = clock
        self._instruments = {i.instrument_name: i for i in config.instruments}
        self._books = {name: _Book(inst) for name, inst in self._instruments.items()}
        self._orders: dict[str, OrderRec] = {}
        self._open_by_account: dict[str, dict[str, None]] = {}
        self._labels: dict[tuple[str, str], str] = {}
        self._untriggered: dict[str, dict[str, None]] = {n: {} for n in self._instruments}
        self._positions: dict[tuple[str, str], PositionRec] = {}
        self._changed_positions: dict[tuple[str, str], None] = {}
        self._trades: dict[str, list[Trade]] = {}
        self._seq = 0
        self._order_counter = 0
        self._trade_counter = 0
        self._withdrawal_counter = 0
        self._storm_rng = random.Random(f"reject-storm:{config.seed}")
        self._publisher = BookPublisher(config.seed)
        self._faults = Faults()
        self._spike_left = 0
        self._fence_epochs: dict[str, int] = {}
        self._order_log: dict[str, deque[OrderLogEntry]] = {}
        self._order_log_seq: dict[str, int] = {}
        self._order_log_max = order_log_max
        self.stats = VenueStats()
        if faults is not None:
            self.set_faults(faults)

    # --- faults -----------------------------------------------------------------------------
    @property
    def faults(self) -> Faults:
        return self._faults

    def set_faults(self, faults: Faults) -> None:
        """Replace the fault switches; a non-zero ``price_spike_pct`` arms a one-off spike."""
        if not isinstance(faults, Faults):
            raise TypeError(f"faults must be a Faults, got {type(faults).__name__}")
        self._spike_left = faults.price_spike_ticks if faults.price_spike_pct != 0.0 else 0
        self._faults = faults

    @property
    def md_fault_counts(self) -> Counter[str]:
        """Book updates ``published`` / ``suppressed`` (stale feed) and, of the published,
        ``delivered`` / ``dropped`` / ``duplicated`` / ``reordered``."""
        return self._publisher.counts

    # --- helpers ----------------------------------------------------------------------------
    def _reject(self, rejection: Rejection) -> Rejection:
        self.stats.rejections[rejection.reason] += 1
        self.stats.rejection_messages[rejection.message] += 1
        return rejection

    def _gate(self) -> Rejection | None:
        if self._faults.outage:
            return self._reject(reject("temporarily_unavailable", "outage"))
        return None

    def _fence(self, account: str, label: str) -> Rejection | None:
        """Fencing tokens. A label ``e<epoch>.<rest>`` carries the epoch of the lease its
        sender held when it sent the order. The highest epoch seen per account is kept; an
        order stamped with a lower one comes from a site that has lost its lease, and is
        refused (``other_reject``, reason ``fenced_epoch``) — the second line of defence behind
        the lease itself. Unstamped labels are not fenced."""
        match = EPOCH_LABEL.match(label)
        if match is None:
            return None
        epoch = int(match.group(1))
        highest = self._fence_epochs.get(account, 0)
        if epoch < highest:
            self.stats.fenced_orders += 1
            return reject("other_reject", "fenced_epoch", "label")
        self._fence_epochs[account] = epoch
        return None

    def _storm(self) -> Rejection | None:
        p = self._faults.reject_storm_probability
        if p > 0.0 and self._storm_rng.random() < p:
            return self._reject(reject("other_reject", "reject_storm"))
        return None

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _owned(self, account: object, order_id: object) -> OrderRec | Rejection:
        rec = self._orders.get(order_id) if isinstance(order_id, str) else None
        if rec is None:
            return self._reject(reject("order_not_found", "order_unknown", "order_id"))
        if rec.account != account:
            return self._reject(reject("not_owner_of_order", "not_owner", "order_id"))
        return rec

    def _set_state(self, rec: OrderRec, state: OrderState, cancel_reason: str | None = None
                   ) -> None:
        rec.state = state
        rec.update_s = self._clock.now_s()
        if cancel_reason is not None:
            rec.cancel_reason = cancel_reason
        index = self._open_by_account.setdefault(rec.account, {})
        if rec.is_open:
            index[rec.order_id] = None
        else:
            index.pop(rec.order_id, None)

    def _snap(self, rec: OrderRec) -> Order:
        return rec.snapshot(self._instruments[rec.instrument_name])

    def _position(self, account: str, name: str) -> PositionRec:
        return self._positions.setdefault((account, name), PositionRec())

    def _reducible_lots(self, account: str, name: str, is_buy: bool) -> int:
        pos = self._positions.get((account, name))
        size = pos.size_lots if pos is not None else 0
        return max(0, -size) if is_buy else max(0, size)

    def _reducible(self, rec: OrderRec) -> int:
        return self._reducible_lots(rec.account, rec.instrument_name, rec.is_buy)

    # --- order entry --------------------------------------------------------------------------
    def buy(self, account: str, instrument_name: str, amount: float, **kwargs: object
            ) -> OrderResult | Rejection:
        """Deribit ``private/buy``; keyword arguments as in ``place``."""
        return self.place(account, "buy", instrument_name, amount,
                          **kwargs)  # type: ignore[arg-type]

    def sell(self, account: str, instrument_name: str, amount: float, **kwargs: object
             ) -> OrderResult | Rejection:
        """Deribit ``private/sell``; keyword arguments as in ``place``."""
        return self.place(account, "sell", instrument_name, amount,
                          **kwargs)  # type: ignore[arg-type]

    def place(self, account: str, direction: str, instrument_name: str, amount: float, *,
              type: str = "limit", price: float | None = None, label: str = "",  # noqa: A002
              time_in_force: str = "good_til_cancelled", post_only: bool = False,
              reject_post_only: bool = False, reduce_only: bool = False,
              trigger_price: float | None = None, trigger: str | None = None
              ) -> OrderResult | Rejection:
        """Place an order. Checks run in this order: outage, account, label (a known label
        returns the original order), reject storm, static input checks, reduce-only,
        post-only, self-trade; only then is an order created. Every request, whatever its
        outcome, goes into the account's order log (``order_log``)."""
        out = self._place(account, direction, instrument_name, amount, type=type, price=price,
                          label=label, time_in_force=time_in_force, post_only=post_only,
                          reject_post_only=reject_post_only, reduce_only=reduce_only,
                          trigger_price=trigger_price, trigger=trigger)
        if isinstance(account, str) and account:
            self._log_order(account, direction, instrument_name, amount, price, type, label, out)
        return out

    def _log_order(self, account: str, direction: str, instrument_name: str, amount: object,
                   price: object, order_type: str, label: object,
                   out: OrderResult | Rejection) -> None:
        seq = self._order_log_seq.get(account, 0) + 1
        self._order_log_seq[account] = seq
        log = self._order_log.get(account)
        if log is None:
            log = self._order_log[account] = deque(maxlen=self._order_log_max)
        if isinstance(out, Rejection):
            outcome, reason, order_id = "rejected", out.reason, None
        else:
            outcome = "duplicate" if out.duplicate else "created"
            reason, order_id = None, out.order.order_id
        log.append(OrderLogEntry(
            seq, self._clock.now_s(), account, label if isinstance(label, str) else "",
            str(direction), str(instrument_name), _finite(amount), _finite(price),
            str(order_type), outcome, reason, order_id))  # type: ignore[arg-type]

    def order_log(self, account: str, after_seq: int = 0, count: int = 1000
                  ) -> tuple[list[OrderLogEntry], int]:
        """Up to ``count`` of the account's order-log entries with ``seq > after_seq``,
        oldest first, and the last seq logged. Entries older than the newest
        ``order_log_max`` are gone: the first one returned then has a larger seq."""
        log = self._order_log.get(account)
        last = self._order_log_seq.get(account, 0)
        if log is None or count < 1:
            return [], last
        first = last - len(log) + 1
        start = max(0, after_seq - first + 1)
        return list(islice(log, start, start + count)), last

    def _place(self, account: str, direction: str, instrument_name: str, amount: float, *,
               type: str, price: float | None, label: str,  # noqa: A002
               time_in_force: str, post_only: bool, reject_post_only: bool,
               reduce_only: bool, trigger_price: float | None, trigger: str | None
               ) -> OrderResult | Rejection:
        if (gate := self._gate()) is not None:
            return gate
        if not isinstance(account, str) or not account:
            return self._reject(reject("Invalid params", "account_invalid", "account"))
        if (bad := check_label(label)) is not None:
            return self._reject(bad)
        if label and (account, label) in self._labels:
            self.stats.duplicate_labels += 1
            original = self._orders[self._labels[(account, label)]]
            return OrderResult(self._snap(original), (), duplicate=True)
        if (fenced := self._fence(account, label)) is not None:
            return self._reject(fenced)
        if (storm := self._storm()) is not None:
            return storm
        req = validate_order(self._instruments, direction, instrument_name, amount, type, price,
                             time_in_force, post_only, reject_post_only, reduce_only, label,
                             trigger_price, trigger)
        if isinstance(req, Rejection):
            return self._reject(req)
        name = req.inst.instrument_name
        if req.reduce_only and req.lots > self._reducible_lots(account, name, req.is_buy):
            return self._reject(reject("other_reject", "reduce_only_would_increase",
                                       "reduce_only"))
        if req.is_stop:
            rec = self._new_order(account, req, req.price_ticks, "untriggered")
            self._untriggered[name][rec.order_id] = None
            return OrderResult(self._snap(rec))
        book = self._books[name]
        price_ticks = req.price_ticks
        plan = Plan(())
        if req.post_only:
            assert price_ticks is not None
            repriced = self._post_only_price(book, req.is_buy, price_ticks, req.reject_post_only)
            if isinstance(repriced, Rejection):
                return repriced
            price_ticks = repriced
        else:
            limit = None if req.order_type == "market" else price_ticks
            plan = book.plan(req.is_buy, limit, req.lots, account, self._orders, self._reducible)
            if plan.overlap:
                return self._reject(reject("order_overlap", "self_trade", "instrument_name"))
        rec = self._new_order(account, req, price_ticks, "open")
        fok_unfillable = req.time_in_force == "fill_or_kill" and plan.lots < req.lots
        trades = [] if fok_unfillable else self._execute(rec, plan)
        self._finish_taker(rec, book)
        self._after_fills()
        self._publish(name)
        return OrderResult(self._snap(rec), tuple(trades))

    def _post_only_price(self, book: _Book, is_buy: bool, price_ticks: int,
                         reject_post_only: bool) -> int | Rejection:
        opposite = book.best(bid_side=not is_buy)
        if opposite is None or (price_ticks < opposite if is_buy else price_ticks > opposite):
            return price_ticks
        repriced = opposite - 1 if is_buy else opposite + 1
        if reject_post_only or repriced < 1:
            return self._reject(reject("post_only_reject", "post_only_would_cross", "price"))
        return repriced

    def _new_order(self, account: str, req: OrderRequest, price_ticks: int | None,
                   state: OrderState) -> OrderRec:
        self._order_counter += 1
        now = self._clock.now_s()
        rec = OrderRec(
            order_id=f"{req.inst.base_currency}-{self._order_counter}", account=account,
            instrument_name=req.inst.instrument_name, direction=req.direction,
            order_type=req.order_type, price_ticks=price_ticks, amount_lots=req.lots,
            time_in_force=req.time_in_force, post_only=req.post_only,
            reject_post_only=req.reject_post_only, reduce_only=req.reduce_only,
            label=req.label, state=state, creation_s=now, update_s=now, seq=self._next_seq(),
            trigger_price_ticks=req.trigger_price_ticks, trigger=req.trigger,
            triggered=False if req.is_stop else None)
        self._orders[rec.order_id] = rec
        self._set_state(rec, state)
        if req.label:
            self._labels[(account, req.label)] = rec.order_id
        self.stats.orders_created += 1
        return rec

    def _finish_taker(self, rec: OrderRec, book: _Book) -> None:
        """After the aggressive part: rest a GTC limit remainder, cancel any other."""
        if rec.remaining_lots == 0:
            return
        if rec.order_type in ("market", "stop_market"):
            self._set_state(rec, "cancelled", "market_remainder")
        elif rec.time_in_force != "good_til_cancelled":
            self._set_state(rec, "cancelled", rec.time_in_force)
        else:
            book.add_resting(rec)

    # --- fills -----------------------------------------------------------------------------
    def _execute(self, taker: OrderRec, plan: Plan) -> list[Trade]:
        book = self._books[taker.instrument_name]
        trades: list[Trade] = []
        for fill in plan.fills:
            maker = None if fill.maker is None else self._orders[fill.maker]
            if maker is None:
                book.consume_external(taker.is_buy, fill.price_ticks, fill.lots)
            trades.extend(self._trade(book, taker, maker, fill.price_ticks, fill.lots))
        return [t for t in trades if t.order_id == taker.order_id]

    def _trade(self, book: _Book, taker: OrderRec | None, maker: OrderRec | None,
               price_ticks: int, lots: int) -> list[Trade]:
        """One venue trade between ``taker`` and ``maker`` (``None``: external liquidity)."""
        inst = book.inst
        book.trade_seq += 1
        self._trade_counter += 1
        self.stats.trades += 1
        now = self._clock.now_s()
        price = inst.ticks_to_price(price_ticks)
        book.last_price = price
        out: list[Trade] = []
        for rec, liquidity in ((taker, "T"), (maker, "M")):
            if rec is None:
                continue
            rec.filled_lots += lots
            rec.filled_notional += price_ticks * lots
            rec.update_s = now
            if rec.remaining_lots == 0:
                if liquidity == "M":
                    book.remove_resting(rec)
                self._set_state(rec, "filled")
            signed = lots if rec.is_buy else -lots
            self._position(rec.account, inst.instrument_name).apply_fill(inst, signed, price)
            self._changed_positions[(rec.account, inst.instrument_name)] = None
            trade = Trade(
                trade_id=f"{inst.base_currency}-{self._trade_counter}", trade_seq=book.trade_seq,
                instrument_name=inst.instrument_name, account=rec.account,
                order_id=rec.order_id, label=rec.label, direction=rec.direction, price=price,
                amount=inst.lots_to_amount(lots), timestamp_s=now,
                liquidity=liquidity,  # type: ignore[arg-type]
                order_type=rec.order_type, state=rec.state,
                fee=fee(inst, liquidity == "M", price, lots),
                fee_currency=(inst.quote_currency if inst.kind == "spot"
                              else inst.settlement_currency),
                index_price=book.index_price, mark_price=book.mark_price())
            self._trades.setdefault(rec.account, []).append(trade)
            out.append(trade)
        return out

    def _after_fills(self) -> None:
        """Shrink or cancel resting reduce-only orders that would now grow a position."""
        changed, self._changed_positions = self._changed_positions, {}
        touched: set[str] = set()
        for account, name in changed:
            used = {True: 0, False: 0}
            for oid in list(self._open_by_account.get(account, {})):
                rec = self._orders[oid]
                if rec.instrument_name != name or not rec.reduce_only or rec.state != "open":
                    continue
                avail = self._reducible(rec) - used[rec.is_buy]
                if avail <= 0:
                    self._books[name].remove_resting(rec)
                    self._set_state(rec, "cancelled", "reduce_only_position_closed")
                    touched.add(name)
                elif rec.remaining_lots > avail:
                    rec.amount_lots = rec.filled_lots + avail
                    rec.update_s = self._clock.now_s()
                    touched.add(name)
                used[rec.is_buy] += max(0, min(rec.remaining_lots, avail))
        for name in touched:
            self._publish(name)

    # --- edit / cancel --------------------------------------------------------------------------
    def edit(self, account: str, order_id: str, amount: float | None = None,
             price: float | None = None, *, post_only: bool | None = None,
             reject_post_only: bool | None = None, reduce_only: bool | None = None
             ) -> OrderResult | Rejection:
        """Deribit ``private/edit``: new total ``amount`` and/or ``price`` of an open order.

        Priority is kept only if the price is unchanged and the amount does not grow. A new
        price that crosses trades at once (or is repriced/refused if post-only). A refused edit
        leaves the order as it was."""
        if (gate := self._gate()) is not None:
            return gate
        rec = self._owned(account, order_id)
        if isinstance(rec, Rejection):
            return rec
        if (storm := self._storm()) is not None:
            return storm
        if not rec.is_open:
            return self._reject(reject("not_open_order", "order_not_open", "order_id"))
        if amount is None and price is None:
            return self._reject(reject("Invalid params", "nothing_to_edit", "amount"))
        inst = self._instruments[rec.instrument_name]
        new_lots = rec.amount_lots
        if amount is not None:
            checked = check_amount(inst, amount)
            if isinstance(checked, Rejection):
                return self._reject(checked)
            new_lots = checked
        if new_lots <= rec.filled_lots:
            return self._reject(reject("invalid_amount", "amount_not_above_filled", "amount"))
        new_price = rec.price_ticks
        if price is not None and rec.order_type in ("limit", "stop_limit"):
            checked = check_price(inst, price)
            if isinstance(checked, Rejection):
                return self._reject(checked)
            new_price = checked
        flags = {k: v for k, v in (("post_only", post_only), ("reduce_only", reduce_only),
                                   ("reject_post_only", reject_post_only)) if v is not None}
        if (bad := check_flags(**flags)) is not None:
            return self._reject(bad)
        new_post_only = rec.post_only if post_only is None else post_only
        new_reject = rec.reject_post_only if reject_post_only is None else reject_post_only
        new_reduce = rec.reduce_only if reduce_only is None else reduce_only
        if new_reduce and new_lots - rec.filled_lots > self._reducible(rec):
            return self._reject(reject("other_reject", "reduce_only_would_increase",
                                       "reduce_only"))
        if rec.state == "untriggered":
            rec.amount_lots, rec.price_ticks, rec.reduce_only = new_lots, new_price, new_reduce
            rec.replaced, rec.update_s = True, self._clock.now_s()
            return OrderResult(self._snap(rec))
        book = self._books[rec.instrument_name]
        assert new_price is not None
        plan = Plan(())
        if new_post_only:
            repriced = self._post_only_price(book, rec.is_buy, new_price, new_reject)
            if isinstance(repriced, Rejection):
                return repriced
            new_price = repriced
        elif new_price != rec.price_ticks:
            plan = book.plan(rec.is_buy, new_price, new_lots - rec.filled_lots, account,
                             self._orders, self._reducible)
            if plan.overlap:
                return self._reject(reject("order_overlap", "self_trade", "price"))
        loses_priority = new_price != rec.price_ticks or new_lots > rec.amount_lots
        if loses_priority:
            book.remove_resting(rec)
            rec.seq = self._next_seq()
        rec.amount_lots, rec.price_ticks = new_lots, new_price
        rec.post_only, rec.reject_post_only, rec.reduce_only = new_post_only, new_reject, new_reduce
        rec.replaced, rec.update_s = True, self._clock.now_s()
        trades = self._execute(rec, plan) if plan.fills else []
        if loses_priority and rec.remaining_lots > 0:
            book.add_resting(rec)
        self._after_fills()
        self._publish(rec.instrument_name)
        return OrderResult(self._snap(rec), tuple(trades))

    def _cancel_rec(self, rec: OrderRec, reason: str) -> None:
        if rec.state == "open":
            self._books[rec.instrument_name].remove_resting(rec)
        else:
            self._untriggered[rec.instrument_name].pop(rec.order_id, None)
        self._set_state(rec, "cancelled", reason)

    def cancel(self, account: str, order_id: str) -> Order | Rejection:
        """Deribit ``private/cancel``: the cancelled order, or why not."""
        if (gate := self._gate()) is not None:
            return gate
        rec = self._owned(account, order_id)
        if isinstance(rec, Rejection):
            return rec
        if not rec.is_open:
            return self._reject(reject("not_open_order", "order_not_open", "order_id"))
        self._cancel_rec(rec, "user_request")
        self._publish(rec.instrument_name)
        return self._snap(rec)

    def cancel_all(self, account: str, *, instrument_name: str | None = None,
                   currency: str | None = None, kind: str | None = None,
                   label_prefix: str = "", reason: str = "user_request") -> int | Rejection:
        """``private/cancel_all[_by_instrument|_by_currency]``: how many orders were cancelled
        (only those whose label starts with ``label_prefix``; the dead-man's switch, see
        ``deadman``, cancels with ``reason="deadman"``)."""
        if (gate := self._gate()) is not None:
            return gate
        if instrument_name is not None and instrument_name not in self._instruments:
            return self._reject(reject("invalid_or_unsupported_instrument", "instrument_unknown",
                                       "instrument_name"))
        touched: dict[str, None] = {}
        cancelled = 0
        for rec in self._open_orders(account, instrument_name, currency, kind):
            if not rec.label.startswith(label_prefix):
                continue
            self._cancel_rec(rec, reason)
            touched[rec.instrument_name] = None
            cancelled += 1
        for name in touched:
            self._publish(name)
        return cancelled

    def cancel_by_label(self, account: str, label: str) -> int | Rejection:
        """``private/cancel_by_label``: cancels the open order carrying ``label`` (0 or 1)."""
        if (gate := self._gate()) is not None:
            return gate
        oid = self._labels.get((account, label)) if isinstance(label, str) else None
        rec = self._orders.get(oid) if oid is not None else None
        if rec is None or not rec.is_open:
            return 0
        self._cancel_rec(rec, "user_request")
        self._publish(rec.instrument_name)
        return 1

    # --- queries ---------------------------------------------------------------------------------
    def _open_orders(self, account: str, instrument_name: str | None, currency: str | None,
                     kind: str | None) -> list[OrderRec]:
        out = []
        for oid in self._open_by_account.get(account, {}):
            rec = self._orders[oid]
            inst = self._instruments[rec.instrument_name]
            if instrument_name is not None and rec.instrument_name != instrument_name:
                continue
            if currency is not None and inst.base_currency != currency:
                continue
            if kind is not None and inst.kind != kind:
                continue
            out.append(rec)
        return out

    def get_open_orders(self, account: str, *, instrument_name: str | None = None,
                        currency: str | None = None, kind: str | None = None
                        ) -> list[Order] | Rejection:
        """Open and untriggered orders, oldest first."""
        if (gate := self._gate()) is not None:
            return gate
        return [self._snap(r) for r in self._open_orders(account, instrument_name, currency,
                                                         kind)]

    def get_order_state(self, account: str, order_id: str) -> Order | Rejection:
        if (gate := self._gate()) is not None:
            return gate
        rec = self._owned(account, order_id)
        return rec if isinstance(rec, Rejection) else self._snap(rec)

    def get_order_state_by_label(self, account: str, label: str) -> Order | Rejection:
        if (gate := self._gate()) is not None:
            return gate
        oid = self._labels.get((account, label)) if isinstance(label, str) else None
        if oid is None:
            return self._reject(reject("order_not_found", "label_unknown", "label"))
        return self._snap(self._orders[oid])

    def get_user_trades(self, account: str, *, instrument_name: str | None = None,
                        currency: str | None = None, start_seq: int | None = None,
                        end_seq: int | None = None, count: int = 100
                        ) -> list[Trade] | Rejection:
        """The account's executions in time order; ``start_seq``/``end_seq`` (inclusive,
        ``trade_seq`` is per instrument) need ``instrument_name``. At most ``count``."""
        if (gate := self._gate()) is not None:
            return gate
        if instrument_name is not None and instrument_name not in self._instruments:
            return self._reject(reject("invalid_or_unsupported_instrument", "instrument_unknown",
                                       "instrument_name"))
        if (start_seq is not None or end_seq is not None) and instrument_name is None:
            return self._reject(reject("Invalid params", "seq_needs_instrument",
                                       "instrument_name"))
        if not isinstance(count, int) or count < 1:
            return self._reject(reject("Invalid params", "count_invalid", "count"))
        out = []
        for t in self._trades.get(account, []):
            if instrument_name is not None and t.instrument_name != instrument_name:
                continue
            if currency is not None and not t.instrument_name.startswith(currency):
                continue
            if start_seq is not None and t.trade_seq < start_seq:
                continue
            if end_seq is not None and t.trade_seq > end_seq:
                continue
            out.append(t)
            if len(out) == count:
                break
        return out

    def _position_view(self, account: str, name: str) -> Position:
        inst, book = self._instruments[name], self._books[name]
        pos = self._positions.get((account, name), PositionRec())
        mark = book.mark_price()
        size = inst.lots_to_amount(pos.size_lots)
        return Position(
            instrument_name=name, kind=inst.kind, size=size,
            direction="buy" if size > 0 else "sell" if size < 0 else "zero",
            average_price=round(pos.average_price, 8), realized_profit_loss=pos.realized,
            floating_profit_loss=pos.floating(inst, mark), mark_price=mark,
            size_currency=(size / mark if inst.has_inverse_pnl and mark > 0 else size))

    def get_position(self, account: str, instrument_name: str) -> Position | Rejection:
        if (gate := self._gate()) is not None:
            return gate
        if instrument_name not in self._instruments:
            return self._reject(reject("invalid_or_unsupported_instrument", "instrument_unknown",
                                       "instrument_name"))
        return self._position_view(account, instrument_name)

    def get_positions(self, account: str, *, currency: str | None = None,
                      kind: str | None = None) -> list[Position] | Rejection:
        """Every instrument the account has traded (zero-size ones included)."""
        if (gate := self._gate()) is not None:
            return gate
        out = []
        for acc, name in self._positions:
            inst = self._instruments[name]
            if acc != account or (currency is not None and inst.base_currency != currency):
                continue
            if kind is None or inst.kind == kind:
                out.append(self._position_view(account, name))
        return out

    def get_instruments(self, *, currency: str | None = None, kind: str | None = None
                        ) -> list[Instrument] | Rejection:
        if (gate := self._gate()) is not None:
            return gate
        return [i for i in self._instruments.values()
                if (currency is None or i.base_currency == currency)
                and (kind is None or i.kind == kind)]

    def get_order_book(self, instrument_name: str, depth: int = 10
                       ) -> dict[str, object] | Rejection:
        """``public/get_order_book`` from what clients currently see (stale while the feed is);
        ``ticker`` is the same without levels."""
        if (gate := self._gate()) is not None:
            return gate
        if instrument_name not in self._instruments:
            return self._reject(reject("invalid_or_unsupported_instrument", "instrument_unknown",
                                       "instrument_name"))
        if not isinstance(depth, int) or depth < 1:
            return self._reject(reject("Invalid params", "depth_invalid", "depth"))
        return self._publisher.book_dict(self._books[instrument_name], depth)

    def touch(self, instrument_name: str) -> tuple[float | None, float, float | None, float]:
        """Best ``(bid, bid_amount, ask, ask_amount)`` as clients currently see them (None: an
        empty side); no gate and no counters: the binary feed reads it every few ms."""
        inst = self._instruments[instrument_name]
        view = self._publisher.view(instrument_name)
        bids, asks = view.levels(inst, True, 1), view.levels(inst, False, 1)
        bid, bid_amount = bids[0] if bids else (None, 0.0)
        ask, ask_amount = asks[0] if asks else (None, 0.0)
        return bid, bid_amount, ask, ask_amount

    def ticker(self, instrument_name: str) -> dict[str, object] | Rejection:
        result = self.get_order_book(instrument_name, 1)
        if isinstance(result, dict):
            result.pop("bids")
            result.pop("asks")
        return result

    def get_book_snapshot(self, instrument_name: str) -> BookUpdate | Rejection:
        """A ``snapshot`` message of what clients see, to resync after a detected gap."""
        if (gate := self._gate()) is not None:
            return gate
        if instrument_name not in self._instruments:
            return self._reject(reject("invalid_or_unsupported_instrument", "instrument_unknown",
                                       "instrument_name"))
        return self._publisher.snapshot(self._instruments[instrument_name])

    def withdraw(self, account: str, currency: str, amount: float, address: str
                 ) -> dict[str, object] | Rejection:
        """``private/withdraw`` (no balances are modelled: only the fault and input checks)."""
        if (gate := self._gate()) is not None:
            return gate
        if self._faults.withdrawals_suspended:
            return self._reject(reject("unavailable", "withdrawals_suspended", "currency"))
        currencies = {i.base_currency for i in self._instruments.values()} | {
            i.quote_currency for i in self._instruments.values()}
        if currency not in currencies:
            return self._reject(reject("Invalid params", "currency_unknown", "currency"))
        if (isinstance(amount, bool) or not isinstance(amount, int | float)
                or not math.isfinite(amount) or amount <= 0):
            return self._reject(reject("invalid_amount", "amount_not_positive", "amount"))
        if not isinstance(address, str) or not address:
            return self._reject(reject("Invalid params", "address_invalid", "address"))
        self._withdrawal_counter += 1
        return {"id": self._withdrawal_counter, "currency": currency, "amount": float(amount),
                "address": address, "state": "unconfirmed",
                "created_timestamp": to_ms(self._clock.now_s())}

    # --- market data ------------------------------------------------------------------------------
    def on_market_data(self, batch: TickBatch) -> None:
        """Refresh external liquidity from a batch, then fire stops, fill resting orders the
        new book trades through, and publish book updates. Bad ticks are skipped and counted in
        ``stats.ticks_skipped`` (``unknown_instrument``, ``bad_tick``, ``crossed_tick``)."""
        if self._faults.outage:
            self.stats.ticks_skipped["outage"] += len(batch.ticks)
            return
        factor, spike_for = 1.0, None
        target = self._faults.price_spike_instrument
        if self._spike_left > 0 and (target is None or any(
                t.instrument_name == target for t in batch.ticks)):
            factor = 1.0 + self._faults.price_spike_pct / 100.0
            spike_for = self._faults.price_spike_instrument
            self._spike_left -= 1
            self.stats.price_spikes_applied += 1
            if self._spike_left == 0:
                self._faults = replace(self._faults, price_spike_pct=0.0)
        touched: dict[str, None] = {}
        for tick in batch.ticks:
            f = factor if spike_for is None or tick.instrument_name == spike_for else 1.0
            book = self._books.get(tick.instrument_name)
            skipped = "unknown_instrument" if book is None else book.load_tick(tick, f)
            if skipped is None:
                self.stats.ticks_applied += 1
                touched[tick.instrument_name] = None
            else:
                self.stats.ticks_skipped[skipped] += 1
        for name in touched:
            self._trigger_stops(name)
            book = self._books[name]
            for oid, lots in book.cross_resting(self._orders, self._reducible):
                rec = self._orders[oid]
                assert rec.price_ticks is not None
                self._trade(book, None, rec, rec.price_ticks, lots)
        self._after_fills()
        for name in touched:
            self._publish(name)

    def _trigger_stops(self, name: str) -> None:
        waiting = self._untriggered[name]
        if not waiting:
            return
        book = self._books[name]
        refs = {"last_price": book.last_price, "mark_price": book.mark_price(),
                "index_price": book.index_price}
        for oid in list(waiting):
            rec = self._orders[oid]
            assert rec.trigger_price_ticks is not None and rec.trigger is not None
            ref, trig = refs[rec.trigger], book.inst.ticks_to_price(rec.trigger_price_ticks)
            if ref <= 0 or (ref < trig if rec.is_buy else ref > trig):
                continue
            del waiting[oid]
            rec.triggered = True
            self._set_state(rec, "open")
            if rec.reduce_only:
                avail = self._reducible(rec)
                if avail == 0:
                    self._set_state(rec, "cancelled", "reduce_only_position_closed")
                    continue
                rec.amount_lots = min(rec.amount_lots, rec.filled_lots + avail)
            limit = rec.price_ticks if rec.order_type == "stop_limit" else None
            plan = book.plan(rec.is_buy, limit, rec.remaining_lots, rec.account, self._orders,
                             self._reducible)
            if plan.overlap:
                self._set_state(rec, "cancelled", "order_overlap")
                continue
            self._execute(rec, plan)
            self._finish_taker(rec, book)

    # --- book updates -----------------------------------------------------------------------------
    def _publish(self, name: str) -> None:
        self._publisher.publish(self._books[name], self._orders, self._clock.now_s(),
                                self._faults)

    def drain_book_updates(self) -> list[BookUpdate]:
        """Book updates for clients since the last drain, after the ``md_*`` faults."""
        return self._publisher.drain()

