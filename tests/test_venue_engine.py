"""Venue simulator core: matching rules, order lifecycle, idempotent labels, positions, book
sequence numbers, input rejections and fault hooks. Pure Python, fake clock, no Ray."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from actors.venue import (
    BookUpdate,
    ChangeIdTracker,
    Faults,
    FaultsError,
    Instrument,
    InstrumentError,
    ManualClock,
    Rejection,
    Tick,
    TickBatch,
    VenueConfig,
    VenueConfigError,
    VenueEngine,
    VolSurface,
    build_option_chain,
    check_sequence,
    default_instruments,
    option_expiries,
    perpetual,
    quote_option,
)
from actors.venue.instruments import black76_usd

T0 = 1_700_000_000.0  # 2023-11-14 22:13:20 UTC
BTC = "BTC-PERPETUAL"
ETH = "ETH-PERPETUAL"
BIDS = ((40000.0, 100.0), (39999.5, 200.0))
ASKS = ((40001.0, 100.0), (40002.0, 200.0))


# --- fixtures and helpers -------------------------------------------------------------------
@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(T0)


def make_engine(clock: ManualClock, seed: int = 0, faults: Faults | None = None) -> VenueEngine:
    return VenueEngine(VenueConfig(default_instruments(T0, 40_000.0), seed=seed), clock, faults)


@pytest.fixture
def engine(clock: ManualClock) -> VenueEngine:
    eng = make_engine(clock)
    feed(eng, book_tick())
    return eng


def book_tick(name: str = BTC, bids: tuple = BIDS, asks: tuple = ASKS,
              last: float | None = 40000.5, ts: float = T0) -> Tick:
    return Tick(ts, name, bids, asks, last, 0.0, None)


def eth_tick() -> Tick:
    return book_tick(ETH, ((2000.0, 50.0),), ((2000.1, 50.0),), 2000.05)


def feed(engine: VenueEngine, *ticks: Tick) -> None:
    engine.on_market_data(TickBatch(ticks[0].ts_s, tuple(ticks)))


def ok(result):
    assert not isinstance(result, Rejection), f"unexpected rejection {result!r}"
    return result


def refused(result, reason: str) -> Rejection:
    assert isinstance(result, Rejection), f"expected rejection {reason!r}, got {result!r}"
    assert result.reason == reason, result
    return result


# --- price-time priority and partial fills ------------------------------------------------------
def test_resting_orders_when_same_price_then_filled_in_time_order(engine: VenueEngine) -> None:
    a = ok(engine.sell("A", BTC, 50, price=40000.5)).order
    b = ok(engine.sell("B", BTC, 50, price=40000.5)).order
    taker = ok(engine.buy("C", BTC, 70, price=40000.5))
    assert [(t.price, t.amount) for t in taker.trades] == [(40000.5, 50.0), (40000.5, 20.0)]
    assert ok(engine.get_order_state("A", a.order_id)).order_state == "filled"
    b_now = ok(engine.get_order_state("B", b.order_id))
    assert (b_now.order_state, b_now.filled_amount) == ("open", 20.0)


def test_price_priority_when_better_price_arrives_later_then_it_trades_first(
        engine: VenueEngine) -> None:
    ok(engine.sell("A", BTC, 50, price=40001.0))  # behind the external 100 at 40001
    ok(engine.sell("B", BTC, 50, price=40000.5))  # better price, later
    taker = ok(engine.buy("C", BTC, 60, price=40001.0))
    assert [(t.price, t.amount) for t in taker.trades] == [(40000.5, 50.0), (40001.0, 10.0)]
    assert ok(engine.get_user_trades("A")) == []  # external liquidity at 40001 was ahead of A


def test_own_order_when_at_external_price_then_queued_behind_external(
        engine: VenueEngine) -> None:
    a = ok(engine.sell("A", BTC, 50, price=40001.0)).order
    taker = ok(engine.buy("C", BTC, 120, price=40001.0))
    assert [t.amount for t in taker.trades] == [100.0, 20.0]
    assert ok(engine.get_order_state("A", a.order_id)).filled_amount == 20.0


def test_limit_buy_when_larger_than_liquidity_at_limit_then_partial_fill_rests(
        engine: VenueEngine) -> None:
    result = ok(engine.buy("A", BTC, 150, price=40001.0))
    assert (result.order.order_state, result.order.filled_amount) == ("open", 100.0)
    assert result.order.average_price == 40001.0
    book = ok(engine.get_order_book(BTC))
    assert book["best_bid_price"] == 40001.0 and book["best_bid_amount"] == 50.0
    assert book["best_ask_price"] == 40002.0  # the 40001 level was consumed


def test_market_order_when_larger_than_top_level_then_sweeps_levels(engine: VenueEngine) -> None:
    result = ok(engine.buy("A", BTC, 250, type="market"))
    assert [(t.price, t.amount) for t in result.trades] == [(40001.0, 100.0), (40002.0, 150.0)]
    assert result.order.order_state == "filled"
    assert result.order.average_price == pytest.approx((40001 * 100 + 40002 * 150) / 250)
    assert all(t.liquidity == "T" for t in result.trades)


def test_market_order_when_book_too_thin_then_remainder_cancelled(engine: VenueEngine) -> None:
    result = ok(engine.sell("A", BTC, 1000, type="market"))
    assert result.order.filled_amount == 300.0
    assert result.order.order_state == "cancelled"
    assert ok(engine.get_open_orders("A")) == []


# --- post_only / reduce_only / IOC / FOK ----------------------------------------------------------
def test_post_only_when_crossing_with_reject_flag_then_rejected(engine: VenueEngine) -> None:
    r = refused(engine.buy("A", BTC, 10, price=40001.0, post_only=True, reject_post_only=True,
                           label="p1"), "post_only_would_cross")
    assert (r.code, r.message) == (11054, "post_only_reject")
    assert engine.stats.orders_created == 0


def test_post_only_when_crossing_then_repriced_one_tick_inside(engine: VenueEngine) -> None:
    result = ok(engine.buy("A", BTC, 10, price=40005.0, post_only=True))
    assert result.trades == () and result.order.price == 40000.5
    assert result.order.order_state == "open"


def test_post_only_when_market_or_ioc_then_rejected(engine: VenueEngine) -> None:
    assert refused(engine.buy("A", BTC, 10, type="market", post_only=True),
                   "post_only_market").code == 11055
    assert refused(engine.buy("A", BTC, 10, price=39000.0, post_only=True,
                              time_in_force="immediate_or_cancel"),
                   "post_only_with_ioc_fok").code == 11047


def test_reduce_only_when_no_position_then_rejected(engine: VenueEngine) -> None:
    refused(engine.sell("A", BTC, 10, type="market", reduce_only=True),
            "reduce_only_would_increase")


def test_reduce_only_when_larger_than_position_then_rejected_else_filled(
        engine: VenueEngine) -> None:
    ok(engine.buy("A", BTC, 50, type="market"))
    refused(engine.sell("A", BTC, 60, type="market", reduce_only=True),
            "reduce_only_would_increase")
    refused(engine.buy("A", BTC, 10, type="market", reduce_only=True),
            "reduce_only_would_increase")
    ok(engine.sell("A", BTC, 50, type="market", reduce_only=True))
    assert ok(engine.get_position("A", BTC)).size == 0.0


def test_resting_reduce_only_when_position_closed_then_cancelled(engine: VenueEngine) -> None:
    ok(engine.buy("A", BTC, 100, type="market"))
    tp = ok(engine.sell("A", BTC, 100, price=40100.0, reduce_only=True)).order
    ok(engine.sell("A", BTC, 60, type="market"))
    assert ok(engine.get_order_state("A", tp.order_id)).amount == 40.0  # shrunk to position
    ok(engine.sell("A", BTC, 40, type="market"))
    closed = ok(engine.get_order_state("A", tp.order_id))
    assert closed.order_state == "cancelled"
    assert closed.cancel_reason == "reduce_only_position_closed"


def test_ioc_when_partially_fillable_then_fills_and_cancels_rest(engine: VenueEngine) -> None:
    result = ok(engine.buy("A", BTC, 150, price=40001.0, time_in_force="immediate_or_cancel"))
    assert (result.order.filled_amount, result.order.order_state) == (100.0, "cancelled")
    assert ok(engine.get_open_orders("A")) == []


def test_fok_when_not_fully_fillable_then_nothing_trades(engine: VenueEngine) -> None:
    result = ok(engine.buy("A", BTC, 150, price=40001.0, time_in_force="fill_or_kill"))
    assert result.trades == () and result.order.filled_amount == 0.0
    assert result.order.order_state == "cancelled"
    assert ok(engine.get_order_book(BTC))["best_ask_amount"] == 100.0  # untouched
    full = ok(engine.buy("A", BTC, 300, price=40002.0, time_in_force="fill_or_kill"))
    assert full.order.order_state == "filled" and full.order.filled_amount == 300.0


def test_order_when_it_would_trade_with_own_resting_order_then_rejected(
        engine: VenueEngine) -> None:
    ok(engine.sell("A", BTC, 50, price=40000.5))
    r = refused(engine.buy("A", BTC, 50, price=40000.5), "self_trade")
    assert r.code == 10003


# --- edit -----------------------------------------------------------------------------------------
def _two_asks(engine: VenueEngine) -> tuple[str, str]:
    a = ok(engine.sell("A", BTC, 50, price=40000.5)).order.order_id
    b = ok(engine.sell("B", BTC, 50, price=40000.5)).order.order_id
    return a, b


def test_edit_when_amount_decreased_then_keeps_priority(engine: VenueEngine) -> None:
    a, _ = _two_asks(engine)
    edited = ok(engine.edit("A", a, amount=40))
    assert edited.order.replaced and edited.order.amount == 40.0
    ok(engine.buy("C", BTC, 40, price=40000.5))
    assert ok(engine.get_order_state("A", a)).order_state == "filled"


def test_edit_when_amount_increased_then_loses_priority(engine: VenueEngine) -> None:
    a, b = _two_asks(engine)
    ok(engine.edit("A", a, amount=60))
    ok(engine.buy("C", BTC, 50, price=40000.5))
    assert ok(engine.get_order_state("B", b)).order_state == "filled"
    assert ok(engine.get_order_state("A", a)).filled_amount == 0.0


def test_edit_when_price_changed_then_loses_priority(engine: VenueEngine) -> None:
    a, b = _two_asks(engine)
    ok(engine.edit("A", a, price=40001.0))
    ok(engine.edit("A", a, price=40000.5))
    ok(engine.buy("C", BTC, 50, price=40000.5))
    assert ok(engine.get_order_state("B", b)).order_state == "filled"
    assert ok(engine.get_order_state("A", a)).order_state == "open"


def test_edit_when_new_price_crosses_then_trades_immediately(engine: VenueEngine) -> None:
    bid = ok(engine.buy("A", BTC, 150, price=39000.0)).order.order_id
    result = ok(engine.edit("A", bid, price=40001.0))
    assert [(t.price, t.amount) for t in result.trades] == [(40001.0, 100.0)]
    assert (result.order.order_state, result.order.filled_amount) == ("open", 100.0)


def test_edit_when_invalid_then_rejected_and_order_unchanged(engine: VenueEngine) -> None:
    a = ok(engine.sell("A", BTC, 50, price=40000.5)).order.order_id
    assert refused(engine.edit("A", "BTC-999", amount=10), "order_unknown").code == 10004
    assert refused(engine.edit("B", a, amount=10), "not_owner").code == 10029
    refused(engine.edit("A", a, price=40000.3), "price_off_tick")
    refused(engine.edit("A", a, price=39000.0, post_only=True, reject_post_only=True),
            "post_only_would_cross")
    refused(engine.edit("A", a), "nothing_to_edit")
    ok(engine.buy("C", BTC, 20, price=40000.5))
    refused(engine.edit("A", a, amount=20), "amount_not_above_filled")
    still = ok(engine.get_order_state("A", a))
    assert (still.amount, still.price, still.filled_amount) == (50.0, 40000.5, 20.0)
    ok(engine.buy("C", BTC, 30, price=40000.5))
    refused(engine.edit("A", a, amount=100), "order_not_open")


# --- cancel / cancel_all / open orders ------------------------------------------------------------
def test_cancel_when_open_then_cancelled_and_removed_from_book(engine: VenueEngine) -> None:
    engine.drain_book_updates()
    oid = ok(engine.buy("A", BTC, 30, price=40000.5)).order.order_id
    cancelled = ok(engine.cancel("A", oid))
    assert (cancelled.order_state, cancelled.cancel_reason) == ("cancelled", "user_request")
    updates = engine.drain_book_updates()
    assert updates[-1].bids == (("delete", 40000.5, 0.0),)
    assert refused(engine.cancel("A", oid), "order_not_open").code == 11044
    assert ok(engine.get_order_book(BTC))["best_bid_price"] == 40000.0


def test_cancel_all_when_filtered_by_currency_or_instrument_then_only_those(
        engine: VenueEngine) -> None:
    feed(engine, eth_tick())
    ok(engine.buy("A", BTC, 10, price=39000.0))
    ok(engine.buy("A", "BTC_USDC", 0.01, price=39000.0))
    ok(engine.buy("A", ETH, 10, price=1900.0))
    ok(engine.buy("B", BTC, 10, price=39000.0))
    assert engine.cancel_all("A", currency="BTC") == 2
    assert [o.instrument_name for o in ok(engine.get_open_orders("A"))] == [ETH]
    assert engine.cancel_all("A", instrument_name=ETH) == 1
    assert ok(engine.get_open_orders("A")) == []
    assert len(ok(engine.get_open_orders("B"))) == 1
    refused(engine.cancel_all("A", instrument_name="XRP-PERPETUAL"), "instrument_unknown")
    assert engine.cancel_all("B") == 1


# --- idempotent labels ----------------------------------------------------------------------------
def test_place_when_label_resent_while_open_then_original_returned_once(
        engine: VenueEngine) -> None:
    first = ok(engine.buy("A", BTC, 10, price=39000.0, label="c-1"))
    again = ok(engine.buy("A", BTC, 10, price=39000.0, label="c-1"))
    assert again.duplicate and again.order.order_id == first.order.order_id
    assert len(ok(engine.get_open_orders("A"))) == 1
    assert engine.stats.orders_created == 1 and engine.stats.duplicate_labels == 1
    assert ok(engine.get_order_state_by_label("A", "c-1")).order_id == first.order.order_id


def test_place_when_label_resent_after_fill_then_no_second_trade(engine: VenueEngine) -> None:
    first = ok(engine.buy("A", BTC, 50, type="market", label="m-1"))
    assert first.order.order_state == "filled"
    again = ok(engine.buy("A", BTC, 50, type="market", label="m-1"))
    assert again.duplicate and again.trades == ()
    assert again.order.order_state == "filled" and again.order.order_id == first.order.order_id
    assert ok(engine.get_position("A", BTC)).size == 50.0
    assert len(ok(engine.get_user_trades("A"))) == 1


def test_place_when_label_resent_after_cancel_then_cancelled_original(
        engine: VenueEngine) -> None:
    oid = ok(engine.buy("A", BTC, 10, price=39000.0, label="k")).order.order_id
    ok(engine.cancel("A", oid))
    again = ok(engine.buy("A", BTC, 10, price=39000.0, label="k"))
    assert again.duplicate and again.order.order_state == "cancelled"
    assert ok(engine.get_open_orders("A")) == []


def test_place_when_same_label_other_account_then_separate_orders(engine: VenueEngine) -> None:
    a = ok(engine.buy("A", BTC, 10, price=39000.0, label="same")).order.order_id
    b = ok(engine.buy("B", BTC, 10, price=39000.0, label="same")).order.order_id
    assert a != b


def test_place_when_first_attempt_refused_then_label_free_for_retry(engine: VenueEngine) -> None:
    refused(engine.buy("A", BTC, 10, price=40001.0, post_only=True, reject_post_only=True,
                       label="r"), "post_only_would_cross")
    retry = ok(engine.buy("A", BTC, 10, price=39000.0, label="r"))
    assert not retry.duplicate and retry.order.order_state == "open"


def test_place_when_resent_during_reject_storm_then_original_not_refused(
        clock: ManualClock) -> None:
    eng = make_engine(clock)
    feed(eng, book_tick())
    first = ok(eng.buy("A", BTC, 10, price=39000.0, label="s"))
    eng.set_faults(Faults(reject_storm_probability=1.0))
    again = ok(eng.buy("A", BTC, 10, price=39000.0, label="s"))
    assert again.duplicate and again.order.order_id == first.order.order_id
    refused(eng.buy("A", BTC, 10, price=39000.0, label="t"), "reject_storm")


# --- positions and user trades --------------------------------------------------------------------
def test_positions_when_many_fills_then_size_equals_signed_sum_of_trades(
        engine: VenueEngine) -> None:
    rng = random.Random(7)
    for i in range(60):
        feed(engine, book_tick(ts=T0 + i))
        amount = 10 * rng.randint(1, 20)
        side = engine.buy if rng.random() < 0.55 else engine.sell
        ok(side("A", BTC, amount, type="market"))
        if i % 7 == 0:
            ok(engine.sell("B", BTC, 30, price=40000.5))
            ok(engine.buy("A", BTC, 30, price=40000.5))
    trades = ok(engine.get_user_trades("A", instrument_name=BTC, count=10_000))
    signed = sum(t.amount if t.direction == "buy" else -t.amount for t in trades)
    assert ok(engine.get_position("A", BTC)).size == pytest.approx(signed)
    b_trades = ok(engine.get_user_trades("B", count=10_000))
    assert ok(engine.get_position("B", BTC)).size == pytest.approx(
        -sum(t.amount for t in b_trades))


def test_positions_when_inverse_round_trip_then_harmonic_entry_and_coin_pnl(
        engine: VenueEngine) -> None:
    ok(engine.buy("A", BTC, 100, type="market"))  # 100 @ 40001
    ok(engine.buy("A", BTC, 200, type="market"))  # 200 @ 40002
    pos = ok(engine.get_position("A", BTC))
    assert pos.average_price == pytest.approx(300 / (100 / 40001 + 200 / 40002), rel=1e-9)
    assert pos.direction == "buy"
    ok(engine.sell("A", BTC, 300, type="market"))  # 100 @ 40000, 200 @ 39999.5
    closed = ok(engine.get_position("A", BTC))
    expected = 300 / pos.average_price - (100 / 40000 + 200 / 39999.5)
    assert closed.size == 0.0 and closed.direction == "zero"
    assert closed.realized_profit_loss == pytest.approx(expected, rel=1e-6)
    assert closed.realized_profit_loss < 0


def test_user_trades_when_queried_since_seq_then_only_newer_in_order(
        engine: VenueEngine) -> None:
    feed(engine, eth_tick())
    for i in range(5):
        ok(engine.buy("A", BTC, 10, type="market"))
        ok(engine.buy("A", ETH, 1, type="market"))
        feed(engine, book_tick(ts=T0 + i), eth_tick())
    seqs = [t.trade_seq for t in ok(engine.get_user_trades("A", instrument_name=BTC))]
    assert seqs == [1, 2, 3, 4, 5]  # per-instrument sequence
    since = ok(engine.get_user_trades("A", instrument_name=BTC, start_seq=4))
    assert [t.trade_seq for t in since] == [4, 5]
    assert [t.trade_seq for t in ok(engine.get_user_trades("A", instrument_name=ETH,
                                                           start_seq=2, end_seq=3))] == [2, 3]
    refused(engine.get_user_trades("A", start_seq=2), "seq_needs_instrument")
    assert len(ok(engine.get_user_trades("A", currency="ETH"))) == 5


def test_trade_between_two_accounts_when_matched_then_both_sides_share_trade_id(
        engine: VenueEngine) -> None:
    ok(engine.sell("A", BTC, 50, price=40000.5))
    taker = ok(engine.buy("B", BTC, 50, price=40000.5))
    (maker_trade,) = ok(engine.get_user_trades("A"))
    (taker_trade,) = taker.trades
    assert maker_trade.trade_id == taker_trade.trade_id
    assert maker_trade.trade_seq == taker_trade.trade_seq
    assert (maker_trade.liquidity, taker_trade.liquidity) == ("M", "T")
    assert ok(engine.get_position("A", BTC)).size == -50.0


# --- book updates and change_id -------------------------------------------------------------------
def test_book_updates_when_book_changes_then_change_ids_link_without_gaps(
        clock: ManualClock) -> None:
    eng = make_engine(clock)
    for i in range(20):
        clock.advance(1.0)
        price = 40000.0 + 0.5 * (i % 5)
        feed(eng, book_tick(bids=((price, 100.0),), asks=((price + 1.0, 100.0),), ts=clock.now_s()))
        if i % 3 == 0:
            ok(eng.buy("A", BTC, 10, price=39000.0 + i))
    updates = eng.drain_book_updates()
    assert updates[0].type == "snapshot" and updates[0].prev_change_id is None
    assert all(u.prev_change_id == p.change_id for p, u in zip(updates, updates[1:], strict=False))
    assert check_sequence(updates) == {"snapshot": 1, "ok": len(updates) - 1}
    wire = updates[1].to_deribit()
    assert {"type", "change_id", "prev_change_id", "bids", "asks", "timestamp"} <= set(wire)
    assert ok(eng.get_order_book(BTC))["change_id"] == updates[-1].change_id


def _update(change_id: int, prev: int | None, kind: str = "change") -> BookUpdate:
    return BookUpdate(BTC, kind, change_id, prev, T0, (), ())  # type: ignore[arg-type]


def test_change_id_tracker_when_gap_duplicate_or_late_then_each_flagged() -> None:
    tracker = ChangeIdTracker()
    verdicts = [tracker.accept(u) for u in (
        _update(10, None, "snapshot"), _update(11, 10), _update(11, 10),  # duplicate
        _update(13, 12),  # gap: 12 missing
        _update(12, 11),  # the missing one, late
        _update(14, 13), _update(20, 19, "snapshot"), _update(21, 20))]
    assert verdicts == ["snapshot", "ok", "duplicate", "gap", "out_of_order", "ok", "snapshot",
                        "ok"]
    assert tracker.last_change_id(BTC) == 21
    assert ChangeIdTracker().accept(_update(5, 4)) == "gap"  # no snapshot seen yet


# --- bad input ------------------------------------------------------------------------------------
BAD_ORDERS = [
    ("amount_nan", dict(amount=math.nan), "amount_not_finite", -32602),
    ("amount_inf", dict(amount=math.inf), "amount_not_finite", -32602),
    ("amount_negative", dict(amount=-10.0), "amount_not_positive", 10021),
    ("amount_zero", dict(amount=0.0), "amount_not_positive", 10021),
    ("amount_off_step", dict(amount=15.0), "amount_off_step", 10027),
    ("amount_text", dict(amount="10"), "amount_not_a_number", -32602),
    ("amount_bool", dict(amount=True), "amount_not_a_number", -32602),
    ("spot_amount_off_step", dict(instrument_name="BTC_USDC", amount=0.00015),
     "amount_off_step", 10021),
    ("price_nan", dict(price=math.nan), "price_not_finite", -32602),
    ("price_negative", dict(price=-40000.0), "price_not_positive", 10023),
    ("price_zero", dict(price=0.0), "price_not_positive", 10023),
    ("price_off_tick", dict(price=40000.3), "price_off_tick", 10043),
    ("price_missing", dict(price=None), "price_missing", -32602),
    ("instrument_unknown", dict(instrument_name="DOGE-PERPETUAL"), "instrument_unknown", 10020),
    ("direction", dict(direction="hold"), "direction_invalid", -32602),
    ("type", dict(type="iceberg"), "type_invalid", -32602),
    ("time_in_force", dict(time_in_force="good_til_day"), "time_in_force_invalid", -32602),
    ("label_too_long", dict(label="x" * 65), "label_invalid", -32602),
    ("trigger_off_tick", dict(type="stop_market", trigger_price=39000.2),
     "trigger_price_off_tick", 10044),
]


@pytest.mark.parametrize(("case", "override", "reason", "code"), BAD_ORDERS,
                         ids=[c[0] for c in BAD_ORDERS])
def test_place_when_input_bad_then_rejected_with_reason_and_counted(
        engine: VenueEngine, case: str, override: dict, reason: str, code: int) -> None:
    args = dict(account="A", direction="buy", instrument_name=BTC, amount=10.0, price=39000.0)
    args.update(override)
    r = refused(engine.place(**args), reason)
    assert r.code == code and r.to_error()["data"]["reason"] == reason  # type: ignore[index]
    assert engine.stats.rejections == {reason: 1}
    assert engine.stats.orders_created == 0 and ok(engine.get_open_orders("A")) == []


def test_tick_when_bad_values_then_skipped_and_counted(engine: VenueEngine) -> None:
    before = ok(engine.get_order_book(BTC))
    feed(engine, book_tick(bids=((math.nan, 100.0),)), book_tick(asks=((-1.0, 10.0),)),
         book_tick(bids=((40010.0, 10.0),)), book_tick(name="NOPE-PERPETUAL"),
         book_tick(last=0.0))
    assert engine.stats.ticks_skipped == {"bad_tick": 3, "crossed_tick": 1,
                                          "unknown_instrument": 1}
    assert ok(engine.get_order_book(BTC))["bids"] == before["bids"]


# --- faults ---------------------------------------------------------------------------------------
def _storm_pattern(clock: ManualClock, seed: int) -> list[bool]:
    eng = make_engine(clock, seed=seed, faults=Faults(reject_storm_probability=0.5))
    feed(eng, book_tick())
    return [isinstance(eng.buy("A", BTC, 10, price=39000.0), Rejection) for _ in range(200)]


def test_reject_storm_when_seeded_then_reproducible_and_near_probability(
        clock: ManualClock) -> None:
    a, b, c = _storm_pattern(clock, 1), _storm_pattern(clock, 1), _storm_pattern(clock, 2)
    assert a == b and a != c
    assert 70 <= sum(a) <= 130


def test_reject_storm_when_active_then_code_and_reason_and_counted(clock: ManualClock) -> None:
    eng = make_engine(clock, faults=Faults(reject_storm_probability=1.0))
    feed(eng, book_tick())
    r = refused(eng.buy("A", BTC, 10, price=39000.0), "reject_storm")
    assert (r.code, r.message) == (11030, "other_reject")
    assert eng.stats.rejections["reject_storm"] == 1


def test_outage_when_on_then_every_call_fails_and_ticks_ignored(engine: VenueEngine) -> None:
    oid = ok(engine.buy("A", BTC, 10, price=39000.0)).order.order_id
    engine.set_faults(Faults(outage=True))
    calls = [engine.buy("A", BTC, 10, price=39000.0), engine.cancel("A", oid),
             engine.edit("A", oid, amount=20), engine.cancel_all("A"),
             engine.get_open_orders("A"), engine.get_order_state("A", oid),
             engine.get_positions("A"), engine.get_user_trades("A"), engine.ticker(BTC),
             engine.get_order_book(BTC), engine.get_instruments(),
             engine.withdraw("A", "BTC", 1.0, "addr")]
    assert all(isinstance(c, Rejection) and c.reason == "outage" and c.code == 13028
               for c in calls)
    feed(engine, book_tick())
    assert engine.stats.ticks_skipped["outage"] == 1
    engine.set_faults(Faults())
    assert ok(engine.get_order_state("A", oid)).order_state == "open"


def test_price_spike_when_armed_then_next_tick_jumps_once_and_fills_resting(
        engine: VenueEngine) -> None:
    ask = ok(engine.sell("A", BTC, 100, price=40800.0)).order.order_id
    engine.set_faults(Faults(price_spike_pct=3.0))
    feed(engine, book_tick())
    assert ok(engine.get_order_state("A", ask)).order_state == "filled"
    (fill,) = ok(engine.get_user_trades("A"))
    assert (fill.price, fill.liquidity) == (40800.0, "M")  # filled at our price, as maker
    assert ok(engine.ticker(BTC))["best_ask_price"] == 41201.5  # 40001 * 1.03 rounded up
    assert engine.faults.price_spike_pct == 0.0 and engine.stats.price_spikes_applied == 1
    feed(engine, book_tick())
    assert ok(engine.ticker(BTC))["best_ask_price"] == 40001.0  # one-off: back to the source


def test_price_spike_when_targeted_then_waits_for_that_instrument(engine: VenueEngine) -> None:
    engine.set_faults(Faults(price_spike_pct=-10.0, price_spike_instrument=ETH))
    feed(engine, book_tick())
    assert engine.stats.price_spikes_applied == 0 and engine.faults.price_spike_pct == -10.0
    feed(engine, book_tick(), eth_tick())
    assert ok(engine.ticker(ETH))["best_bid_price"] == 1800.0
    assert ok(engine.ticker(BTC))["best_bid_price"] == 40000.0  # untouched
    assert engine.faults.price_spike_pct == 0.0


def test_stale_feed_when_on_then_clients_see_frozen_book_and_a_gap_on_resume(
        engine: VenueEngine) -> None:
    tracker = ChangeIdTracker()
    assert [tracker.accept(u) for u in engine.drain_book_updates()] == ["snapshot"]
    engine.set_faults(Faults(stale_feed=True))
    moved = book_tick(bids=((40100.0, 100.0),), asks=((40101.0, 100.0),))
    feed(engine, moved)
    assert engine.drain_book_updates() == []
    assert ok(engine.ticker(BTC))["best_ask_price"] == 40001.0  # frozen
    fill = ok(engine.buy("A", BTC, 10, type="market"))
    assert fill.trades[0].price == 40101.0  # matching runs on the live market
    engine.set_faults(Faults())
    feed(engine, book_tick())
    assert [tracker.accept(u) for u in engine.drain_book_updates()] == ["gap"]
    assert tracker.accept(ok(engine.get_book_snapshot(BTC))) == "snapshot"
    ok(engine.buy("A", BTC, 10, price=39000.0))
    assert [tracker.accept(u) for u in engine.drain_book_updates()] == ["ok"]
    assert engine.md_fault_counts["suppressed"] >= 1


def _md_stream(clock: ManualClock, faults: Faults, seed: int = 3) -> list[BookUpdate]:
    eng = make_engine(clock, seed=seed, faults=faults)
    for i in range(200):
        p = 40000.0 + 0.5 * (i % 7)
        feed(eng, book_tick(bids=((p, 100.0),), asks=((p + 1.0, 100.0),), ts=T0 + i))
    return eng.drain_book_updates()


def test_md_faults_when_duplicates_and_reorders_then_tracker_flags_them(
        clock: ManualClock) -> None:
    stream = _md_stream(clock, Faults(md_duplicate_probability=0.1,
                                      md_reorder_probability=0.1))
    again = _md_stream(clock, Faults(md_duplicate_probability=0.1,
                                     md_reorder_probability=0.1))
    assert stream == again  # seeded
    counts = check_sequence(stream)
    assert counts["duplicate"] > 0 and counts["out_of_order"] > 0
    assert counts["gap"] == counts["out_of_order"]  # each swap: a gap, then the late one
    assert len(stream) > 200


def test_md_faults_when_dropping_then_gaps_match_drops(clock: ManualClock) -> None:
    eng = make_engine(clock, seed=5, faults=Faults(md_drop_probability=0.2))
    for i in range(200):
        p = 40000.0 + 0.5 * (i % 7)
        feed(eng, book_tick(bids=((p, 100.0),), asks=((p + 1.0, 100.0),), ts=T0 + i))
    stream = eng.drain_book_updates()
    counts = check_sequence([_update(0, None, "snapshot")] + stream)
    dropped = eng.md_fault_counts["dropped"]
    assert 20 <= dropped <= 60
    assert counts["duplicate"] == 0 and counts["out_of_order"] == 0
    assert 0 < counts["gap"] <= dropped  # consecutive drops make one gap


def test_withdraw_when_suspended_then_rejected_else_accepted(engine: VenueEngine) -> None:
    assert ok(engine.withdraw("A", "BTC", 0.5, "bc1q"))["state"] == "unconfirmed"
    engine.set_faults(Faults(withdrawals_suspended=True))
    assert refused(engine.withdraw("A", "BTC", 0.5, "bc1q"), "withdrawals_suspended").code == 13503
    engine.set_faults(Faults())
    refused(engine.withdraw("A", "BTC", math.nan, "bc1q"), "amount_not_positive")
    refused(engine.withdraw("A", "DOGE", 1.0, "x"), "currency_unknown")


def test_faults_when_invalid_then_error_names_field_and_value() -> None:
    with pytest.raises(FaultsError, match=r"reject_storm_probability=1\.5"):
        Faults(reject_storm_probability=1.5)
    with pytest.raises(FaultsError, match="price_spike_pct=-100"):
        Faults(price_spike_pct=-100)
    with pytest.raises(FaultsError, match="md_drop_probability=nan"):
        Faults(md_drop_probability=math.nan)


# --- stop orders ----------------------------------------------------------------------------------
def test_stop_market_when_last_price_reaches_trigger_then_fires_and_fills(
        engine: VenueEngine) -> None:
    stop = ok(engine.sell("A", BTC, 100, type="stop_market", trigger_price=39900.0)).order
    assert stop.order_state == "untriggered" and stop.to_deribit()["trigger"] == "last_price"
    assert [o.order_id for o in ok(engine.get_open_orders("A"))] == [stop.order_id]
    feed(engine, book_tick(bids=((39950.0, 500.0),), asks=((39951.0, 500.0),), last=39950.0))
    assert ok(engine.get_order_state("A", stop.order_id)).order_state == "untriggered"
    feed(engine, book_tick(bids=((39799.5, 500.0),), asks=((39800.5, 500.0),), last=39800.0))
    fired = ok(engine.get_order_state("A", stop.order_id))
    assert fired.order_state == "filled" and fired.triggered is True
    assert fired.average_price == 39799.5


# --- wire format, config and instruments ----------------------------------------------------------
def test_order_result_when_serialised_then_uses_deribit_field_names(engine: VenueEngine) -> None:
    wire = ok(engine.buy("A", BTC, 150, price=40001.0, label="w")).to_deribit()
    order, trade = wire["order"], wire["trades"][0]  # type: ignore[index]
    for key in ("order_id", "label", "direction", "amount", "price", "filled_amount",
                "average_price", "order_state", "instrument_name", "creation_timestamp"):
        assert key in order
    assert (order["order_state"], order["filled_amount"]) == ("open", 100.0)
    assert order["creation_timestamp"] == int(T0 * 1000)
    for key in ("trade_id", "trade_seq", "price", "amount", "direction", "liquidity"):
        assert key in trade
    assert refused(engine.buy("A", BTC, math.nan, price=1.0), "amount_not_finite").to_error() == {
        "code": -32602, "message": "Invalid params",
        "data": {"reason": "amount_not_finite", "param": "amount"}}


def test_venue_config_when_duplicate_instruments_then_error_names_them(
        clock: ManualClock) -> None:
    btc = perpetual("BTC", tick_size=0.5, contract_size=10.0)
    with pytest.raises(VenueConfigError, match="BTC-PERPETUAL"):
        VenueConfig((btc, btc))
    with pytest.raises(VenueConfigError, match="instruments"):
        VenueConfig(())


def test_instrument_when_field_invalid_then_error_names_field_and_value() -> None:
    with pytest.raises(InstrumentError, match=r"tick_size=0\.0"):
        perpetual("BTC", tick_size=0.0, contract_size=10.0)
    with pytest.raises(InstrumentError, match="funding_interval_s=0"):
        perpetual("BTC", tick_size=0.5, contract_size=10.0, funding_interval_s=0)
    with pytest.raises(InstrumentError, match="funding_rate_per_interval=0.5"):
        perpetual("BTC", tick_size=0.5, contract_size=10.0, funding_rate_per_interval=0.5)
    good = build_option_chain("BTC", 40_000.0, T0)[0]
    with pytest.raises(InstrumentError, match="instrument_name="):
        replace(good, strike=good.strike + 1)  # type: ignore[operator]
    with pytest.raises(InstrumentError, match="instrument_name='BTC PERP'"):
        Instrument("BTC PERP", "future", "BTC", "USD", "BTC", 0.5, 10.0, 10.0,
                   funding_interval_s=28800.0)


def test_default_instruments_when_built_then_deribit_specs_and_option_chain() -> None:
    insts = {i.instrument_name: i for i in default_instruments(T0, 40_000.0)}
    btc, eth = insts[BTC], insts[ETH]
    assert (btc.tick_size, btc.contract_size, btc.instrument_type) == (0.5, 10.0, "reversed")
    assert (eth.tick_size, eth.contract_size) == (0.05, 1.0)
    assert btc.funding_interval_s == 8 * 3600 and btc.funding_rate_per_interval == 0.0001
    assert {"BTC_USDC", "ETH_USDC"} <= set(insts)
    options = [i for i in insts.values() if i.kind == "option"]
    expiries = {i.expiration_timestamp_s for i in options}
    assert len(expiries) >= 4 and all(e > T0 for e in expiries)
    assert all(i.instrument_name.startswith("BTC-") and i.instrument_name[-1] in "CP"
               for i in options)
    assert {round(e) % 86400 for e in expiries} == {8 * 3600}  # 08:00 UTC
    assert option_expiries(T0)[0][1] == "week"
    wire = options[0].to_deribit()
    assert {"option_type", "strike", "expiration_timestamp", "tick_size",
            "min_trade_amount", "contract_size"} <= set(wire)


def test_vol_surface_when_evaluated_then_smile_skew_and_term_structure() -> None:
    s = VolSurface()
    f, t = 40_000.0, 30 / 365
    iv = s.implied_vol(np.array([24_000.0, 32_000.0, 40_000.0, 48_000.0, 64_000.0]), f, t)
    assert iv[0] > iv[2] and iv[4] > iv[2]  # smile
    assert iv[1] > iv[3]  # negative skew: puts richer
    assert s.atm_vol(1 / 365) > s.atm_vol(1.0)  # short end higher (default term structure)
    with pytest.raises(InstrumentError, match="curvature=-1"):
        VolSurface(curvature=-1)


def test_option_quotes_when_priced_then_ordered_and_put_call_parity() -> None:
    chain = build_option_chain("BTC", 40_000.0, T0)
    s, f = VolSurface(), 40_000.0
    by_key = {(i.expiration_timestamp_s, i.strike, i.option_type): i for i in chain}
    checked = 0
    for (exp, strike, kind), call in by_key.items():
        if kind != "call":
            continue
        put = by_key[(exp, strike, "put")]
        qc, qp = quote_option(call, f, T0, s), quote_option(put, f, T0, s)
        assert qc is not None and qp is not None
        assert qc.bid_price < qc.mark_price < qc.ask_price
        assert qc.mark_price - qp.mark_price == pytest.approx((f - strike) / f, abs=1e-6)
        checked += 1
    assert checked >= 20
    assert black76_usd(f, 30_000.0, 0.0, 0.5, "call") == 10_000.0
    expired = quote_option(chain[0], f, chain[0].expiration_timestamp_s + 1, s)
    assert expired is None


def test_place_when_label_carries_an_older_epoch_then_fenced_and_counted() -> None:
    from actors.venue.clock import ManualClock
    from actors.venue.engine import VenueConfig, VenueEngine
    from actors.venue.instruments import default_instruments

    clock = ManualClock(1_700_000_000.0)
    engine = VenueEngine(VenueConfig(default_instruments(clock.now_s()), seed=1), clock)
    order = {"amount": 10, "type": "limit", "price": 1000.0}
    assert not isinstance(engine.buy("a", "BTC-PERPETUAL", label="e3.tokyo.1", **order),
                          Rejection)
    assert not isinstance(engine.buy("a", "BTC-PERPETUAL", label="e4.london.1", **order),
                          Rejection)
    late = engine.buy("a", "BTC-PERPETUAL", label="e3.tokyo.2", **order)
    assert isinstance(late, Rejection) and late.reason == "fenced_epoch"
    assert engine.stats.fenced_orders == 1
    # a resend of a label the venue already has is still idempotent, fenced or not
    again = engine.buy("a", "BTC-PERPETUAL", label="e3.tokyo.1", **order)
    assert not isinstance(again, Rejection) and again.duplicate
    # fencing is per account, and unstamped labels are never fenced
    assert not isinstance(engine.buy("b", "BTC-PERPETUAL", label="e1.x.1", **order), Rejection)
    assert not isinstance(engine.buy("a", "BTC-PERPETUAL", label="plain.9", **order), Rejection)
