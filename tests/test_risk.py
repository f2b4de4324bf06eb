"""Pure risk maths and limits: positions and P&L by hand, idempotent fills, funding, Greeks
against actors.options, VaR on fixed data, refused input, limits and the trading state machine.
No Ray: the event-sourced RiskBook runs here on a real SQLite journal, without an actor."""

from __future__ import annotations

import datetime as dt
import math
from types import SimpleNamespace

import numpy as np
import pytest

from actors.limits import (
    TRANSITIONS,
    InstrumentRisk,
    Limits,
    LimitsError,
    Measures,
    OrderAccepted,
    OrderDenied,
    OrderRateWindow,
    PreTradeState,
    TradingState,
    TradingStateMachine,
    Trigger,
    check,
    evaluate,
)
from actors.options import black76_greeks, black76_price, norm_pdf, norm_ppf, portfolio_greeks
from actors.risk import (
    SECONDS_PER_YEAR,
    RiskConfig,
    RiskConfigError,
    RiskState,
    parse_contract,
    var_summary,
)
from actors.risk_book import RiskBook
from supervisors.journal import open_store

T0_MS = 1_700_000_000_000
T0_S = T0_MS / 1000.0
PERP, LIN, SPOT = "BTC-PERPETUAL", "BTC_USDC-PERPETUAL", "BTC_USDC"
EXPIRY_S = dt.datetime(2026, 12, 25, 8, tzinfo=dt.UTC).timestamp()
CALL, PUT = "BTC-25DEC26-60000-C", "BTC-25DEC26-50000-P"


def fill(i: int, inst: str, direction: str, amount: float, price: float, *,
         seq: int | None = None, fee: float = 0.0, trade_id: str | None = None) -> dict:
    return {"trade_id": trade_id or f"T{i}", "trade_seq": i if seq is None else seq,
            "instrument_name": inst, "direction": direction, "amount": amount, "price": price,
            "fee": fee, "timestamp": T0_MS + i, "order_id": f"O{i}", "label": f"L{i}"}


def marks(rows: dict[str, tuple[float, float, float]]) -> dict[str, np.ndarray]:
    """{instrument: (mark, index, iv)} -> a column batch."""
    names = list(rows)
    return {"instrument": np.array(names),
            "mark_price": np.array([rows[n][0] for n in names]),
            "index_price": np.array([rows[n][1] for n in names]),
            "iv": np.array([rows[n][2] for n in names])}


def pos(state: RiskState, name: str) -> dict:
    return next(r for r in state.position_rows() if r["instrument"] == name)


# --------------------------------------------------------------------------------------------
# Contracts, positions and P&L
# --------------------------------------------------------------------------------------------


def test_parse_contract_when_deribit_names_then_units_follow_the_name() -> None:
    perp, lin, spot, opt = (parse_contract(n) for n in (PERP, LIN, SPOT, CALL))
    assert perp.inverse and perp.pnl_currency == "BTC" and perp.kind == "perpetual"
    assert not lin.inverse and lin.pnl_currency == "USDC" and lin.kind == "perpetual"
    assert spot.kind == "spot" and spot.pnl_currency == "USDC"
    assert opt.is_option and opt.strike == 60_000 and opt.is_call and opt.expiry_s == EXPIRY_S
    assert parse_contract("BTC-25DEC26").inverse  # a dated inverse future
    for bad in ("BTC", "btc-perpetual", "BTC-31FEB26-1-C", "BTC-25XXX26-1-C", 42, None):
        assert parse_contract(bad) is None


def test_linear_position_when_open_increase_reduce_flip_close_then_matches_hand() -> None:
    s = RiskState()
    steps = [  # (direction, amount, price) -> (size, avg, realised) by hand
        ("buy", 2, 100.0, 2, 100.0, 0.0),
        ("buy", 1, 130.0, 3, 110.0, 0.0),  # (2*100 + 130) / 3
        ("sell", 1, 120.0, 2, 110.0, 10.0),  # 1 * (120 - 110)
        ("sell", 3, 90.0, -1, 90.0, -30.0),  # closes 2 at -20 each; flips to -1 at 90
        ("buy", 0.5, 80.0, -0.5, 90.0, -25.0),  # short 0.5 closed 10 lower: +5
        ("buy", 0.5, 100.0, 0, 0.0, -30.0),  # the rest closed 10 higher: -5
    ]
    for i, (d, amount, price, size, avg, realised) in enumerate(steps, 1):
        s.on_fills([fill(i, LIN, d, amount, price)])
        row = pos(s, LIN)
        assert row["size"] == pytest.approx(size, abs=1e-12)
        assert row["average_price"] == pytest.approx(avg, rel=1e-12)
        assert row["realised_pnl"] == pytest.approx(realised, rel=1e-12, abs=1e-12)
    assert pos(s, LIN)["size"] == 0.0  # exactly flat, not a float residue


def test_inverse_perp_when_increase_reduce_flip_then_pnl_in_coin_matches_hand() -> None:
    s = RiskState()
    s.on_fills([fill(1, PERP, "buy", 1000, 40_000), fill(2, PERP, "buy", 1000, 50_000)])
    avg = 2000 / (1000 / 40_000 + 1000 / 50_000)  # harmonic: USD over coins = 44444.44
    assert pos(s, PERP)["average_price"] == pytest.approx(avg, rel=1e-13)
    s.on_fills([fill(3, PERP, "sell", 500, 60_000)])
    realised = 500 * (1 / avg - 1 / 60_000)  # 0.0029166 BTC
    assert pos(s, PERP)["realised_pnl"] == pytest.approx(realised, rel=1e-12)
    s.on_marks(marks({PERP: (55_000, 55_000, math.nan)}), T0_S)
    row = pos(s, PERP)
    assert row["unrealised_pnl"] == pytest.approx(1500 * (1 / avg - 1 / 55_000), rel=1e-12)
    assert row["pnl_currency"] == "BTC" and row["notional_usd"] == 1500
    s.on_fills([fill(4, PERP, "sell", 2500, 50_000)])  # closes 1500, opens -1000 at 50000
    realised += 1500 * (1 / avg - 1 / 50_000)
    row = pos(s, PERP)
    assert (row["size"], row["average_price"]) == (-1000, 50_000)
    assert row["realised_pnl"] == pytest.approx(realised, rel=1e-12)
    s.on_marks(marks({PERP: (40_000, 40_000, math.nan)}), T0_S + 1)
    unreal = -1000 * (1 / 50_000 - 1 / 40_000)  # a short gains 0.005 BTC as BTC falls
    assert pos(s, PERP)["unrealised_pnl"] == pytest.approx(unreal, rel=1e-12)
    assert s.pnl()["total_usd"] == pytest.approx((realised + unreal) * 40_000, rel=1e-12)


def test_option_and_fees_when_traded_then_premium_pnl_in_coin_and_fees_apart() -> None:
    s = RiskState()
    s.on_fills([fill(1, CALL, "buy", 2, 0.05, fee=0.0003),
                fill(2, CALL, "sell", 1, 0.07, fee=0.0003)])
    s.on_marks(marks({CALL: (0.06, 50_000, 0.6)}), T0_S)
    row = pos(s, CALL)
    assert row["realised_pnl"] == pytest.approx(0.02) and row["fees"] == pytest.approx(0.0006)
    assert row["unrealised_pnl"] == pytest.approx(0.01)
    btc = s.pnl()["by_currency"]["BTC"]
    assert btc["total"] == pytest.approx(0.02 + 0.01 - 0.0006)


# --------------------------------------------------------------------------------------------
# Idempotent fills
# --------------------------------------------------------------------------------------------


def test_fill_when_replayed_or_duplicated_in_batch_then_counted_once() -> None:
    s = RiskState()
    batch = [fill(1, PERP, "buy", 100, 50_000), fill(2, PERP, "buy", 100, 51_000)]
    first = s.on_fills([*batch, batch[0]])
    assert (first.applied, first.duplicates) == (2, 1)
    again = s.on_fills(batch)
    assert (again.applied, again.duplicates) == (0, 2)
    assert pos(s, PERP)["size"] == 200 and pos(s, PERP)["trades"] == 2
    assert s.counters["fills_applied"] == 2 and s.counters["fill_duplicate"] == 3
    restored = RiskState()
    restored.restore(s.snapshot())  # the ids survive a snapshot
    assert restored.on_fills(batch).duplicates == 2


def test_fill_when_trade_seq_far_below_high_water_mark_then_refused_as_stale() -> None:
    s = RiskState(config=RiskConfig(dedup_window_seq=10))
    s.on_fills([fill(1, PERP, "buy", 10, 50_000, seq=100)])
    late = s.on_fills([fill(2, PERP, "buy", 10, 50_000, seq=95)])  # out of order, in window
    stale = s.on_fills([fill(3, PERP, "buy", 10, 50_000, seq=90)])
    assert late.applied == 1
    assert stale.applied == 0 and stale.rejected[0]["reason"] == "stale_trade_seq"
    assert pos(s, PERP)["size"] == 20 and pos(s, PERP)["last_trade_seq"] == 100


# --------------------------------------------------------------------------------------------
# Funding
# --------------------------------------------------------------------------------------------


def test_funding_when_settled_each_interval_then_accrues_by_hand_once_per_slot() -> None:
    s = RiskState(config=RiskConfig(funding_interval_s=8 * 3600.0))
    s.on_fills([fill(1, PERP, "buy", 10_000, 50_000), fill(2, LIN, "sell", 2, 50_000)])
    s.on_marks(marks({PERP: (50_000, 50_000, math.nan), LIN: (50_000, 50_000, math.nan)}), T0_S)
    t = 8 * 3600.0 * 60_000  # the start of a funding slot
    assert s.on_funding(PERP, 0.0001, t).events[0]["amount"] == pytest.approx(-2e-5)
    assert s.on_funding(PERP, 0.0001, t + 60).duplicates == 1  # same slot: not again
    s.on_funding(PERP, -0.0002, t + 8 * 3600)  # longs receive when the rate is negative
    assert pos(s, PERP)["funding"] == pytest.approx(-2e-5 + 4e-5)
    s.on_funding(LIN, 0.0001, t)  # a linear short receives size * mark * rate in USDC
    assert pos(s, LIN)["funding"] == pytest.approx(10.0)
    for bad, reason in (((SPOT, 0.0001, t), "not_a_perpetual"),
                        (("XBT-NOPE", 0.0001, t), "unknown_instrument"),
                        ((PERP, math.nan, t + 1e6), "bad_rate"),
                        ((PERP, 0.0001, -5.0), "bad_timestamp")):
        assert s.on_funding(*bad).rejected[0]["reason"] == reason
    assert s.counters["funding_applied"] == 3 and s.counters["funding_duplicate"] == 1
    assert s.counters["funding_rejected.not_a_perpetual"] == 1


# --------------------------------------------------------------------------------------------
# Greeks
# --------------------------------------------------------------------------------------------


def test_greeks_when_options_perp_and_spot_then_aggregate_like_actors_options() -> None:
    s = RiskState()
    s.on_fills([fill(1, CALL, "buy", 3, 0.05), fill(2, PUT, "sell", 2, 0.03),
                fill(3, PERP, "buy", 10_000, 50_000), fill(4, SPOT, "buy", 0.5, 50_000),
                fill(5, "ETH-PERPETUAL", "sell", 3000, 3000)])
    now = T0_S
    s.on_marks(marks({CALL: (0.05, 52_000, 0.62), PUT: (0.04, 52_000, 0.70),
                      PERP: (52_100, 52_000, math.nan), SPOT: (52_050, 52_000, math.nan),
                      "ETH-PERPETUAL": (3_000, 3_000, math.nan)}), now)
    t = (EXPIRY_S - now) / SECONDS_PER_YEAR
    g = black76_greeks(np.array([True, False]), 52_000.0, np.array([60_000.0, 50_000.0]), t,
                       np.array([0.62, 0.70]))
    want = portfolio_greeks(np.array([3.0, -2.0]), g)
    btc = s.greeks()["BTC"]
    assert btc["option_delta"] == pytest.approx(want["delta"], rel=1e-12)
    assert btc["delta"] == pytest.approx(want["delta"] + 10_000 / 52_100 + 0.5, rel=1e-12)
    assert btc["delta_usd"] == pytest.approx(btc["delta"] * 52_000, rel=1e-12)
    assert btc["gamma"] == pytest.approx(want["gamma"], rel=1e-12)
    assert btc["vega_usd"] == pytest.approx(want["vega_per_vol_point"], rel=1e-12)
    assert btc["theta_usd"] == pytest.approx(want["theta_per_day"], rel=1e-12)
    assert s.greeks()["ETH"]["delta"] == pytest.approx(-1.0)  # not netted with BTC


def test_greeks_when_iv_missing_then_implied_from_the_coin_mark() -> None:
    s = RiskState()
    s.on_fills([fill(1, CALL, "buy", 1, 0.05)])
    t = (EXPIRY_S - T0_S) / SECONDS_PER_YEAR
    coin = float(black76_price(True, 50_000.0, 60_000.0, t, 0.55)) / 50_000.0
    s.on_marks(marks({CALL: (coin, 50_000, math.nan)}), T0_S)
    want = black76_greeks(True, 50_000.0, 60_000.0, t, 0.55)
    assert s.greeks()["BTC"]["delta"] == pytest.approx(float(want.delta), rel=1e-9)
    assert s.mark_counters["iv_solved"] == 1


# --------------------------------------------------------------------------------------------
# VaR / ES
# --------------------------------------------------------------------------------------------


def test_var_summary_when_fixed_pnl_changes_then_matches_hand() -> None:
    changes = np.arange(-10.0, 10.0)  # 20 changes; losses 10, 9, 8, ...
    out = var_summary(changes, 0.9)
    assert out["historical"] == {"var": 8.0, "es": 9.5}  # 3rd worst; mean of the 2 worst
    sigma = float(np.std(changes, ddof=1))
    z = float(norm_ppf(0.9))
    assert out["parametric"]["var"] == pytest.approx(0.5 + sigma * z, rel=1e-12)
    assert out["parametric"]["es"] == pytest.approx(
        0.5 + sigma * float(norm_pdf(z)) / 0.1, rel=1e-12)
    assert var_summary([], 0.9)["historical"] is None


def test_var_when_marks_move_then_sampled_pnl_changes_feed_it() -> None:
    s = RiskState(config=RiskConfig(var_sample_s=60.0, var_window=5, var_confidence=0.9))
    s.on_fills([fill(1, SPOT, "buy", 2, 100.0)])
    prices = [100.0, 103.0, 99.0, 101.0, 96.0, 97.0, 104.0]
    for k, p in enumerate(prices):
        s.on_marks(marks({SPOT: (p, p, math.nan)}), T0_S + 60 * k)
        s.on_marks(marks({SPOT: (p + 50, p, math.nan)}), T0_S + 60 * k + 30)  # not sampled
    want = 2 * np.diff(prices)[-5:]  # a 5-change window of 2 BTC's P&L
    np.testing.assert_allclose(s.pnl_changes(), want, rtol=1e-12)
    assert s.var()["historical"] == var_summary(want, 0.9)["historical"]


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

GOOD = fill(1, PERP, "buy", 100, 50_000)


@pytest.mark.parametrize(("change", "reason", "field"), [
    ({"price": math.nan}, "not_finite", "price"),
    ({"price": math.inf}, "not_finite", "price"),
    ({"price": -1.0}, "not_positive", "price"),
    ({"price": 0.0}, "not_positive", "price"),
    ({"amount": math.inf}, "not_finite", "amount"),
    ({"amount": 0}, "not_positive", "amount"),
    ({"amount": -5}, "not_positive", "amount"),
    ({"amount": True}, "bad_type", "amount"),
    ({"price": "50000"}, "bad_type", "price"),
    ({"fee": math.nan}, "not_finite", "fee"),
    ({"timestamp": -1}, "negative", "timestamp"),
    ({"trade_seq": -1}, "bad_type", "trade_seq"),
    ({"trade_seq": 1.5}, "bad_type", "trade_seq"),
    ({"trade_id": ""}, "bad_type", "trade_id"),
    ({"direction": "long"}, "bad_direction", "direction"),
    ({"instrument_name": "BTC-NOPE"}, "unknown_instrument", "instrument_name"),
    ({"instrument_name": "ETH-PERPETUAL"}, "unknown_instrument", "instrument_name"),
    ({"price": None}, "missing_field", "price"),
])
def test_fill_when_bad_then_rejected_with_reason_counted_and_not_applied(
        change: dict, reason: str, field: str) -> None:
    s = RiskState(instruments=[PERP, SPOT])
    result = s.on_fills([{**GOOD, **change}])
    assert result.applied == 0 and result.rejected[0]["reason"] == reason
    assert result.rejected[0]["field"] == field
    assert s.counters[f"fill_rejected.{reason}"] == 1 and s.positions == {}


def test_fill_batch_when_malformed_then_rejected_and_good_rows_still_applied() -> None:
    s = RiskState()
    missing = {k: v for k, v in GOOD.items() if k != "trade_seq"}
    result = s.on_fills([GOOD, "not a dict", missing])
    assert result.applied == 1
    assert [r["reason"] for r in result.rejected] == ["not_a_dict", "missing_field"]
    assert s.on_fills("nope").rejected[0]["reason"] == "not_a_list"
    assert s.counters["fill_rejected.not_a_list"] == 1 and pos(s, PERP)["size"] == 100


def test_marks_when_bad_rows_or_batch_then_rejected_counted_and_ignored() -> None:
    s = RiskState(instruments=[PERP, SPOT])
    result = s.on_marks({"instrument": np.array([PERP, SPOT, "ETH-PERPETUAL", PERP]),
                         "mark_price": np.array([np.nan, -1.0, 3000.0, 50_000.0]),
                         "index_price": np.array([50_000.0, 50_000.0, 3000.0, 0.0]),
                         "iv": np.full(4, np.nan)}, T0_S)
    assert result.applied == 0 and result.ignored == 1
    assert result.rejected == {"mark_price_invalid": 2, "index_price_invalid": 1}
    for batch, reason in (("x", "batch_not_a_dict"),
                          ({"instrument": [PERP], "mark_price": [1.0]},
                           "batch_missing_index_price"),
                          ({"instrument": [PERP], "mark_price": [1.0, 2.0],
                            "index_price": [1.0]}, "batch_bad_shape"),
                          ({"instrument": [PERP], "mark_price": ["x"], "index_price": [1.0]},
                           "batch_bad_type")):
        assert s.on_marks(batch, T0_S).rejected == {reason: 1}
    assert s.marks == {} and s.mark_counters["rejected.mark_price_invalid"] == 2


def test_config_when_bad_then_error_names_field_and_value() -> None:
    with pytest.raises(RiskConfigError, match="var_window=1"):
        RiskConfig(var_window=1)
    with pytest.raises(RiskConfigError, match="var_confidence"):
        RiskConfig(var_confidence=1.5)
    with pytest.raises(RiskConfigError, match="instruments='BTC-NOPE'"):
        RiskState(instruments=["BTC-NOPE"])
    with pytest.raises(RiskConfigError, match="bogus"):
        RiskConfig.from_dict({"bogus": 1})


# --------------------------------------------------------------------------------------------
# Limits and the pre-trade check
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("max_position_usd", 0), ("max_notional_usd", -1.0), ("max_abs_delta_usd", math.nan),
    ("max_abs_vega_usd", math.inf), ("max_loss_usd", "10"), ("max_orders_per_s", True),
    ("order_window_s", 0.0), ("recover_fraction", 1.0), ("max_orders_per_s", 0.5),
])
def test_limits_when_invalid_then_error_names_field_and_value(field: str, value: object) -> None:
    with pytest.raises(LimitsError) as info:
        Limits(**{field: value})
    assert info.value.field == field and f"{field}={value!r}" in str(info.value)


def test_limits_from_dict_when_partial_then_keeps_base_and_refuses_unknown() -> None:
    base = Limits(max_loss_usd=5_000.0)
    new = Limits.from_dict({"max_abs_delta_usd": 1e5, "max_position": {PERP: 1000}}, base)
    assert new.max_loss_usd == 5_000.0 and new.max_abs_delta_usd == 1e5
    assert Limits.from_dict(new.to_dict()) == new
    with pytest.raises(LimitsError, match="max_delta"):
        Limits.from_dict({"max_delta": 1.0})
    with pytest.raises(LimitsError, match=r"max_position\['X'\]"):
        Limits(max_position={"X": -1.0})


LIM = Limits(max_position_usd=10_000, max_notional_usd=15_000, max_abs_delta_usd=12_000,
             max_abs_vega_usd=500, max_loss_usd=1_000, max_orders_per_s=2, order_window_s=1.0,
             max_position={PERP: 8_000})


def pre(size: float = 0.0, *, state: TradingState = TradingState.ACTIVE, gross: float = 0.0,
        delta: float = 0.0, vega: float = 0.0, drawdown: float = 0.0, vega_per: float = 0.0,
        delta_per: float = 1.0, notional_per: float = 1.0,
        orders: tuple[float, ...] = ()) -> PreTradeState:
    inst = InstrumentRisk(PERP, "BTC", size, notional_per, delta_per, vega_per)
    usd = abs(size) * notional_per
    m = Measures({PERP: usd}, {PERP: size}, gross or usd, {"BTC": delta or size},
                 {"BTC": vega}, drawdown)
    return PreTradeState(state, m, inst, orders)


def order(direction: str = "buy", amount: float = 1_000.0, name: str = PERP) -> dict:
    return {"instrument_name": name, "direction": direction, "amount": amount, "label": "x"}


@pytest.mark.parametrize(("state", "order_", "reason", "limit", "value"), [
    (pre(7_000), order(amount=2_000), "max_position", "max_position", 9_000),
    (pre(0, delta_per=0.1, notional_per=2.0), order(amount=6_000), "max_position_usd",
     "max_position_usd", 12_000),
    (pre(5_000, gross=14_000, delta_per=0.1), order(amount=2_000), "max_notional_usd",
     "max_notional_usd", 16_000),
    (pre(1_000, delta=11_500), order(amount=1_000), "max_abs_delta_usd", "max_abs_delta_usd",
     12_500),
    (pre(0, vega=450, vega_per=0.1), order(amount=1_000), "max_abs_vega_usd",
     "max_abs_vega_usd", 550),
    (pre(0, drawdown=1_500), order(amount=10), "max_loss_usd", "max_loss_usd", 1_500),
    (pre(0, orders=(-0.5, 0.0)), order(), "max_order_rate", "max_orders_per_s", 3.0),
    (pre(0, state=TradingState.HALTED), order(), "trading_halted", "trading_state", None),
    (pre(1_000, state=TradingState.REDUCING), order(), "reducing_only", "trading_state", None),
    (pre(0), order(amount=math.nan), "invalid_order", "amount", None),
    (pre(0), {"instrument_name": PERP, "direction": "up", "amount": 1}, "invalid_order",
     "direction", None),
    (pre(0), "buy it all", "invalid_order", "order", None),
    (PreTradeState(TradingState.ACTIVE, Measures(), None), order(name="ETH-PERPETUAL"),
     "unknown_instrument", "instrument_name", None),
    (PreTradeState(TradingState.ACTIVE, Measures(), InstrumentRisk(PERP, "BTC", 0, math.nan,
                                                                     math.nan)),
     order(), "no_price", "instrument_name", None),
])
def test_check_when_limit_breached_then_denied_as_data_with_reason(
        state: PreTradeState, order_: object, reason: str, limit: str, value: object) -> None:
    result = check(order_, state, LIM, 0.0)
    assert isinstance(result, OrderDenied) and not result.ok
    assert (result.reason, result.limit) == (reason, limit)
    assert result.value == (pytest.approx(value) if value is not None else None)


def test_check_when_within_limits_then_accepted_with_post_trade_position() -> None:
    result = check(order(amount=2_000), pre(1_000), LIM, 0.0)
    assert isinstance(result, OrderAccepted) and result.ok and result.post_position == 3_000
    assert result.to_dict()["ok"] is True


def test_check_when_reducing_state_then_only_risk_reducing_orders_pass() -> None:
    reducing = pre(9_500, state=TradingState.REDUCING, delta=13_000)  # over several limits
    assert check(order("sell", 4_000), reducing, LIM, 0.0).reducing
    assert check(order("buy", 100), reducing, LIM, 0.0).reason == "reducing_only"
    flip = check(order("sell", 20_000), pre(9_500, state=TradingState.REDUCING), LIM, 0.0)
    assert flip.reason == "reducing_only"  # -10 500 is a bigger position and delta
    # a hedge in another instrument that lowers the underlying's |delta| is risk-reducing
    hedge = PreTradeState(TradingState.REDUCING,
                          Measures({CALL: 50_000}, {CALL: 1.0}, 50_000, {"BTC": 13_000}, {}),
                          InstrumentRisk(PERP, "BTC", 0.0, 1.0, 1.0))
    accepted = check(order("sell", 5_000), hedge, Limits(max_notional_usd=1e6), 0.0)
    stale = pre(0, orders=(-1.0, -2.0, 5.0))  # outside (now - 1 s, now]: not counted
    assert check(order(), stale, LIM, 0.0).ok
    assert isinstance(accepted, OrderAccepted) and accepted.reducing


def test_check_when_measure_already_breached_then_an_order_reducing_it_passes() -> None:
    over = pre(12_000)  # above max_position_usd and max_position while still ACTIVE
    assert check(order("sell", 1_000), over, LIM, 0.0).ok
    assert check(order("buy", 1), over, LIM, 0.0).reason == "max_position"


def test_order_rate_when_window_slides_then_old_orders_stop_counting() -> None:
    window, accepted = OrderRateWindow(), []
    for now in (0.0, 0.1, 0.2, 0.9, 1.05, 1.2, 1.3):
        result = check(order(amount=1), pre(0, orders=window.recent(now, LIM.order_window_s)),
                       LIM, now)
        if result.ok:
            window.record(now)
        accepted.append(result.ok)
    # 2 per 1 s window: 0.2 and 0.9 refused; at 1.05 the order at 0.0 has left the window,
    # at 1.2 the one at 0.1 too; at 1.3 both of (0.3, 1.3] are taken
    assert accepted == [True, True, False, False, True, True, False]


# --------------------------------------------------------------------------------------------
# Trading state machine
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state", list(TradingState))
@pytest.mark.parametrize("trigger", list(Trigger))
def test_state_machine_when_triggered_then_follows_the_table_and_records(
        state: TradingState, trigger: Trigger) -> None:
    published = []
    machine = TradingStateMachine(state, on_change=published.append)
    change = machine.fire(trigger, 12.5, "why")
    expected = TRANSITIONS.get((state, trigger))
    if expected is None:
        assert change is None and machine.state is state and not machine.history
    else:
        assert machine.state is expected and published == [change]
        assert (change.ts, change.from_state, change.to_state, change.reason) == (
            12.5, state, expected, "why")


def test_table_when_read_then_halted_leaves_only_by_resume_into_reducing() -> None:
    assert [k for k in TRANSITIONS if k[0] is TradingState.HALTED] == [
        (TradingState.HALTED, Trigger.RESUME)]
    assert TRANSITIONS[(TradingState.HALTED, Trigger.RESUME)] is TradingState.REDUCING


def test_evaluate_when_delta_moves_then_hysteresis_between_80_and_100_percent() -> None:
    lim = Limits(max_abs_delta_usd=10_000, recover_fraction=0.8)
    machine = TradingStateMachine()
    path = [(5_000, TradingState.ACTIVE), (11_000, TradingState.REDUCING),
            (9_000, TradingState.REDUCING), (8_500, TradingState.REDUCING),
            (7_900, TradingState.ACTIVE), (9_500, TradingState.ACTIVE),
            (-10_001, TradingState.REDUCING)]
    for i, (delta, want) in enumerate(path):
        ev = evaluate(Measures(delta_usd={"BTC": delta}), lim)
        if ev.trigger is not None:
            machine.fire(ev.trigger, float(i), ev.reason)
        assert machine.state is want, (delta, ev)
    assert [(c.from_state, c.to_state) for c in machine.history] == [
        (TradingState.ACTIVE, TradingState.REDUCING), (TradingState.REDUCING,
                                                        TradingState.ACTIVE),
        (TradingState.ACTIVE, TradingState.REDUCING)]
    assert "max_abs_delta_usd: BTC 11000" in machine.history[0].reason


def test_evaluate_when_loss_beyond_limit_then_loss_breach_wins_and_halts() -> None:
    lim = Limits(max_loss_usd=1_000, max_abs_delta_usd=10_000)
    ev = evaluate(Measures(delta_usd={"BTC": 20_000}, drawdown_usd=1_001), lim)
    assert ev.trigger is Trigger.LOSS_BREACH and len(ev.breaches) == 2
    machine = TradingStateMachine(TradingState.REDUCING)
    machine.fire(ev.trigger, 0.0, ev.reason)
    assert machine.state is TradingState.HALTED
    assert machine.fire(Trigger.RECOVERED, 1.0, "") is None  # sticky


# --------------------------------------------------------------------------------------------
# The event-sourced book without Ray (a real SQLite journal)
# --------------------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, t: float = T0_S) -> None:
        self.t = t

    def now_s(self) -> float:
        return self.t


def pos_row(book: RiskBook, name: str) -> dict:
    return next(r for r in book.positions() if r["instrument"] == name)


def open_book(tmp_path, **kw) -> RiskBook:
    book = RiskBook(**{"book_id": "b1", "snapshot_every": 4, "clock": FakeClock(), **kw})
    ctx = SimpleNamespace(stream="t/root/b1", store_url=f"sqlite://{tmp_path}")
    book._bastion_recover(ctx, open_store(f"sqlite://{tmp_path}"))
    return book


def test_book_when_rebuilt_from_journal_then_positions_limits_and_state_are_the_same(
        tmp_path) -> None:
    book = open_book(tmp_path, limits={"max_abs_delta_usd": 1e6})
    fills = [fill(i, PERP if i % 2 else LIN, "buy" if i % 3 else "sell", 10 + i,
                  50_000 + 10 * i, fee=1e-6) for i in range(1, 12)]
    book.on_fills(fills[:6])
    book.on_fills(fills[3:])  # overlaps: 3 duplicates
    slot_s = 8 * 3600.0 * 60_000
    assert book.on_funding(PERP, 0.0001, slot_s)["applied"] == 1
    assert book.on_funding(PERP, 0.0001, slot_s + 1)["duplicates"] == 1
    book.set_limits({"max_abs_delta_usd": 100.0}, who="alice", why="test")
    assert book.trading_state() == "REDUCING"  # the lower limit bites at once
    again = open_book(tmp_path, limits={"max_abs_delta_usd": 1e6})
    assert again.positions() == book.positions()
    assert again.limits()["max_abs_delta_usd"] == 100.0
    assert again.trading_state() == "REDUCING"
    assert [(h["who"], h["why"], h["old"]["max_abs_delta_usd"], h["new"]["max_abs_delta_usd"])
            for h in again.limit_history()] == [("alice", "test", 1e6, 100.0)]
    assert again.summary()["counters"]["book"]["fill_duplicate"] == 3
    assert pos_row(again, PERP)["funding"] == pos_row(book, PERP)["funding"] != 0.0
    assert again.on_funding(PERP, 0.0001, slot_s + 2)["duplicates"] == 1
    assert again.recovery()["snapshot_seq"] > 0


def test_book_when_limits_changed_then_each_change_is_an_event_with_who_and_why(
        tmp_path) -> None:
    book = open_book(tmp_path)
    seq0 = book.journal_seq
    book.set_limits({"max_loss_usd": 5_000.0}, "alice", "smaller book")
    book.set_limits({"max_loss_usd": 5_000.0}, "bob", "no-op")  # unchanged: not recorded
    book.set_limits({"max_orders_per_s": 50.0}, "bob", "market maker")
    assert book.journal_seq == seq0 + 2
    assert [h["who"] for h in book.limit_history()] == ["alice", "bob"]
    with pytest.raises(LimitsError, match="max_loss_usd=-1"):
        book.set_limits({"max_loss_usd": -1}, "eve", "oops")
    with pytest.raises(LimitsError, match="who"):
        book.set_limits({"max_loss_usd": 1.0}, "", "anonymous")
    assert book.limits()["max_loss_usd"] == 5_000.0


def test_book_when_loss_beyond_limit_then_halts_and_resume_needs_an_operator(tmp_path) -> None:
    book = open_book(tmp_path, limits={"max_loss_usd": 100.0})
    book.on_fills([fill(1, SPOT, "buy", 1, 50_000)])
    book.on_marks(marks({SPOT: (50_200, 50_200, math.nan)}), T0_S)  # peak +200
    book.on_marks(marks({SPOT: (50_050, 50_050, math.nan)}), T0_S + 1)  # drawdown 150
    assert book.trading_state() == "HALTED"
    denied = book.check_order(order("sell", 0.5, SPOT))
    assert isinstance(denied, OrderDenied) and denied.reason == "trading_halted"
    book.on_marks(marks({SPOT: (50_300, 50_300, math.nan)}), T0_S + 2)
    assert book.trading_state() == "HALTED"  # no automatic way out
    book.resume("alice", "reviewed")
    assert book.trading_state() == "ACTIVE"  # REDUCING, then within 80 % of every limit
    assert [h["to"] for h in book.state_history()] == ["HALTED", "REDUCING", "ACTIVE"]
    assert book.summary()["pnl"]["peak_usd"] == pytest.approx(300.0)
