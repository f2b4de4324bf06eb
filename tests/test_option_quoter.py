"""The option quoter: which options it picks, its prices and spreads against Black-76, its state
triggers (spot vol, implied-vol jumps, the risk book), its delta hedge, fill attribution when
another strategy trades the same account; the connector's option selector; and the whole thing
on Ray — quoter, router, risk book and a connector to a venue simulator listing an option chain,
with a second account on the venue hitting our quotes: fills reach the risk book with Greeks,
the delta is hedged with the perpetual, HALTED pauses and resume brings the quotes back, and
SIGKILLs of the quoter mid-stream never make the venue see a client order id twice."""

from __future__ import annotations

import datetime as dt
import math
import os
import random
import signal
import time
from typing import Any

import numpy as np
import pytest
import ray

from actors.connector import OptionSelector, OptionSelectorError
from actors.option_quoter import (
    OptionQuoter,
    QuoterConfig,
    QuoterConfigError,
    classify_options,
    decide_option_quotes,
    half_spread_frac,
    hedge_order,
    option_arrays,
    pick_options,
    quote_prices,
    venue_implied_vols,
)
from actors.options import black76_greeks, black76_price
from actors.risk import parse_contract
from actors.risk_book import with_option_underlyings
from actors.strategy import MakerBook, MMState, MMTrigger
from actors.venue.process import VenueProcess
from cluster.demo import venue_rpc
from supervisors import ChildSpec, SupervisorSpec, start_tree
from supervisors.spec import Backoff
from tests.conftest import wait_until

Q, W, P, R = MMState.QUOTING, MMState.WIDENED, MMState.PAUSED, MMState.REDUCING
CFG = QuoterConfig()
NOW = dt.datetime(2026, 12, 1, 12, tzinfo=dt.UTC).timestamp()
F = 50_000.0
CHAIN = [f"BTC-{d}-{k}-{cp}" for d in ("4DEC26", "11DEC26", "25DEC26")
         for k in (45000, 50000, 55000) for cp in "CP"]


# --- picking and pricing ----------------------------------------------------------------------
def test_pick_when_chain_given_then_nearest_expiry_then_nearest_strike_and_none_expiring() -> None:
    picked = pick_options(CHAIN + ["BTC-PERPETUAL", "ETH-4DEC26-3000-C"], F, NOW, CFG)
    assert picked == ["BTC-4DEC26-50000-C", "BTC-4DEC26-50000-P", "BTC-4DEC26-55000-C",
                      "BTC-4DEC26-55000-P"]  # |ln(55/50)| < |ln(45/50)|
    late = NOW + 3 * 86_400 + 20 * 3600 - 60  # a minute before 4 Dec 08:00: too close
    assert all("4DEC26" not in n for n in pick_options(CHAIN, F, late, CFG))
    assert pick_options(CHAIN, math.nan, NOW, CFG) == []


def contracts(names: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return option_arrays([parse_contract(n) for n in names], NOW)


def test_prices_when_quoted_then_black76_at_vol_and_spread_widens_with_vol_and_state() -> None:
    names = ["BTC-11DEC26-50000-C", "BTC-11DEC26-45000-P"]
    is_call, strike, t = contracts(names)
    vol = np.array([0.6, 0.7])
    fair, bid, ask = quote_prices(is_call, F, strike, t, vol, 0.05)
    assert fair == pytest.approx(black76_price(is_call, F, strike, t, vol) / F)
    assert (bid < fair).all() and (fair < ask).all()
    # the venue's implied vol from a mid is the vol that prices it (round trip)
    assert venue_implied_vols(is_call, F, strike, t, fair) == pytest.approx(vol, rel=1e-9)
    assert half_spread_frac(Q, 0.0, CFG) == CFG.base_half_spread_frac
    assert half_spread_frac(Q, CFG.widen_vol_bps, CFG) == 2 * CFG.base_half_spread_frac
    assert half_spread_frac(W, 0.0, CFG) == CFG.widened_mult * CFG.base_half_spread_frac


def decide(state: MMState, positions: dict[str, float] | None = None,
           venue: tuple[float, float] = (math.nan, math.nan)) -> dict[tuple[str, str], Any]:
    names = ["BTC-11DEC26-50000-C"]
    is_call, strike, t = contracts(names)
    fair, bid, ask = quote_prices(is_call, F, strike, t, np.array([0.6]), 0.05)
    d = decide_option_quotes(state, names, fair, bid, ask, np.array([venue[0]]),
                             np.array([venue[1]]), positions or {}, CFG)
    return {(o.instrument, o.direction): o for o in d.orders}


def test_quotes_when_quoting_then_both_sides_on_ticks_post_only_inside_the_venue_touch() -> None:
    q = decide(Q)
    buy, sell = q[("BTC-11DEC26-50000-C", "buy")], q[("BTC-11DEC26-50000-C", "sell")]
    for o in (buy, sell):
        assert round(o.price / CFG.tick_size, 6) == int(round(o.price / CFG.tick_size))
        assert o.amount == CFG.quote_size and o.to_router()["post_only"]
        assert o.to_router()["instrument"] == "BTC-11DEC26-50000-C"
    assert buy.price < sell.price
    tight = decide(Q, venue=(buy.price + 0.0050, buy.price + 0.0052))  # venue ask near our bid
    assert tight[("BTC-11DEC26-50000-C", "buy")].price <= buy.price + 0.0051
    assert tight[("BTC-11DEC26-50000-C", "sell")].price >= buy.price + 0.0051


def test_quotes_when_reducing_or_at_max_position_or_paused_then_only_the_allowed_side() -> None:
    name = "BTC-11DEC26-50000-C"
    assert set(decide(R, {name: 0.3})) == {(name, "sell")}
    assert decide(R, {name: -0.2})[(name, "buy")].amount == pytest.approx(0.1)
    assert decide(R, {}) == {}
    assert set(decide(Q, {name: CFG.max_position})) == {(name, "sell")}
    assert decide(P, {name: 0.3}) == {}


def test_classify_when_vol_jumps_or_risk_halts_then_widen_pause_and_resume_via_widened(
        ) -> None:
    def trig(state: MMState, spot: float = 1.0, jump: float = 0.0, risk: str = "ACTIVE",
             samples: int = 10, priced: int = 2) -> MMTrigger:
        return classify_options(state, spot, jump, samples, 0.1, priced, risk, CFG)[0]

    assert trig(Q) is MMTrigger.CALM
    assert trig(Q, jump=0.06) is MMTrigger.VOLATILE and trig(Q, jump=0.3) is MMTrigger.EXTREME
    assert trig(Q, spot=70.0) is MMTrigger.EXTREME and trig(Q, spot=20.0) is MMTrigger.VOLATILE
    assert trig(P, jump=0.17) is MMTrigger.EXTREME  # >= 0.8 * 0.2: still paused
    assert trig(Q, jump=0.3, risk="HALTED") is MMTrigger.RISK_HALTED
    assert trig(Q, risk="REDUCING") is MMTrigger.RISK_REDUCING
    assert trig(Q, risk="unreachable: timeout") is MMTrigger.RISK_HALTED
    assert trig(Q, samples=1) is MMTrigger.NO_DATA and trig(Q, priced=0) is MMTrigger.NO_DATA


def test_hedge_when_delta_beyond_threshold_then_ioc_perp_to_flat_in_contracts() -> None:
    sell = hedge_order(0.1, F, 49_999.0, 50_001.0, CFG)  # long 0.1 BTC = 5000 USD
    assert (sell.direction, sell.amount, sell.instrument) == ("sell", 5000.0, "BTC-PERPETUAL")
    assert sell.price < 49_999.0 and sell.to_router()["time_in_force"] == "immediate_or_cancel"
    buy = hedge_order(-0.01234, F, 49_999.0, 50_001.0, CFG)
    assert (buy.direction, buy.amount) == ("buy", 610.0) and buy.price > 50_001.0
    assert hedge_order(0.001, F, 49_999.0, 50_001.0, CFG) is None  # 50 USD < threshold
    assert hedge_order(0.1, F, math.nan, 50_001.0, CFG) is None


def test_config_when_bad_value_then_error_names_field() -> None:
    for kwargs, name in [({"quote_size": 0.15}, "quote_size"), ({"underlying": "BTC_USDC"},
                         "underlying"), ({"widen_iv_jump": 0.5}, "widen_iv_jump"),
                         ({"vol_edge_frac": -0.9}, "vol_edge_frac"),
                         ({"max_options": 2.5}, "max_options")]:
        with pytest.raises(QuoterConfigError, match=name):
            QuoterConfig(**kwargs)
    with pytest.raises(QuoterConfigError, match="colour"):
        OptionQuoter(router="r", risk_book="b", config={"colour": 1})


# --- fill attribution (the book both strategies journal) -------------------------------------
def test_book_when_fill_overtakes_its_outcome_or_is_another_strategys_then_attributed_right(
        ) -> None:
    book = MakerBook("BTC-PERPETUAL")
    hedge = {"instrument": "BTC-PERPETUAL", "direction": "sell", "amount": 50.0,
             "type": "limit", "price": 1.0, "time_in_force": "immediate_or_cancel"}
    book.apply({"t": "intent", "coid": "oq.1", "kind": "hedge", "order": hedge})
    book.apply({"t": "fills", "fills": [  # ours, before the route call's reply; and another's
        {"trade_id": "T1", "instrument": "BTC-PERPETUAL", "signed": -30.0, "label": "L1"},
        {"trade_id": "T2", "instrument": "BTC-PERPETUAL", "signed": 10.0, "label": "MM7"}]})
    assert book.positions == {} and set(book.unattributed) == {"L1", "MM7"}
    book.apply({"t": "outcome", "coid": "oq.1", "outcome": {
        "status": "accepted", "label": "L1", "state": "filled", "filled": 50.0}})
    assert book.inventory == -30.0 and "MM7" in book.unattributed
    assert book.expected_position("BTC-PERPETUAL") == -50.0  # 20 more reported filled
    book.apply({"t": "fills", "fills": [
        {"trade_id": "T3", "instrument": "BTC-PERPETUAL", "signed": -20.0, "label": "L1"}]})
    assert book.inventory == book.expected_position("BTC-PERPETUAL") == -50.0
    assert not book.pending_hedges
    again = MakerBook("BTC-PERPETUAL")
    again.restore(book.snapshot())
    assert again.snapshot() == book.snapshot()


# --- the connector's option selector and the risk book's option underlyings -------------------
def listing(names: list[str]) -> list[dict[str, Any]]:
    out = []
    for n in names:
        c = parse_contract(n)
        out.append({"instrument_name": n, "kind": "option", "base_currency": c.base,
                    "strike": c.strike, "expiration_timestamp": int(c.expiry_s * 1000)})
    return out


def test_selector_when_resolving_then_nearest_expiries_and_strikes_and_bad_fields_named(
        ) -> None:
    chosen = OptionSelector(expiries=2, strikes=1).select(
        listing(CHAIN) + [{"instrument_name": "junk"}], 54_000.0, NOW)
    assert chosen == ["BTC-4DEC26-55000-C", "BTC-4DEC26-55000-P", "BTC-11DEC26-55000-C",
                      "BTC-11DEC26-55000-P"]
    for raw, name in [({"expiries": 0}, "expiries"), ({"currency": "btc"}, "currency"),
                      ({"strikes": True}, "strikes"), ({"min_expiry_s": -1}, "min_expiry_s"),
                      ({"colour": 1}, "colour"), ([1], "options")]:
        with pytest.raises(OptionSelectorError, match=name):
            OptionSelector.from_config(raw)


def test_risk_book_marks_when_option_rows_carry_their_own_mid_as_index_then_valued_on_perp(
        ) -> None:
    batch = {"instrument": np.array(["BTC-11DEC26-50000-C", "BTC-PERPETUAL", "ETH-4DEC26-3000-P"]),
             "mark_price": np.array([0.05, 50_000.0, 0.01]),
             "index_price": np.array([0.05, 50_000.0, 0.01])}
    fixed = with_option_underlyings(batch, {"ETH": 3_000.0})
    assert list(fixed["index_price"]) == list(fixed["underlying_price"]) == [
        50_000.0, 50_000.0, 3_000.0]
    assert list(batch["index_price"]) == [0.05, 50_000.0, 0.01]  # the input is not changed
    assert math.isnan(with_option_underlyings(batch, {})["index_price"][2])  # no ETH: refused
    perps_only = {k: v[1:2] for k, v in batch.items()}
    assert with_option_underlyings(perps_only, {}) is perps_only
    with_under = {**batch, "underlying_price": np.ones(3)}
    assert with_option_underlyings(with_under, {}) is with_under


# --- on Ray, against a venue simulator with an option chain -----------------------------------
KEYS = {"bastion-test": "s3cret-not-for-production", "taker": "taker-s3cret-only-tests"}


def rpc(venue: VenueProcess, method: str, params: dict | None = None,
        client: str = "bastion-test") -> Any:
    return venue_rpc(venue.http_url, client, KEYS[client], method, params)


class Waiting:
    """A falsy answer for ``wait_until`` that says what was seen."""

    def __init__(self, seen: object) -> None:
        self.seen = seen

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return repr(self.seen)


def hit(venue: VenueProcess, quote: dict[str, Any]) -> float:
    """A customer (the ``taker`` account) takes one of our resting quotes with an IOC at its
    price; returns the amount traded at that price (0 when the quote had just moved; a better
    price on the venue's own book would trade first and is not counted)."""
    side = "sell" if quote["direction"] == "buy" else "buy"
    out = rpc(venue, f"private/{side}", {"instrument_name": quote["instrument"],
                                         "amount": quote["amount"], "type": "limit",
                                         "price": quote["price"],
                                         "time_in_force": "immediate_or_cancel"}, "taker")
    return sum(t["amount"] for t in out["trades"] if t["price"] == quote["price"])


def quoter_tree(venue: VenueProcess, config: dict[str, Any] | None = None) -> SupervisorSpec:
    fast = Backoff(initial_s=0.0)
    return SupervisorSpec(id="root", intensity=20, period_s=60, children=[
        ChildSpec(id="book", cls="actors.risk_book:RiskBook", backoff=fast,
                  kwargs={"book_id": "oq", "instruments": None,
                          "limits": {"max_orders_per_s": 200.0}}),
        ChildSpec(id="deribit", cls="actors.connector:VenueConnector", backoff=fast,
                  kwargs={"venue": "deribit", "ws_url": venue.ws_url, "client_id":
                          "bastion-test", "client_secret": KEYS["bastion-test"],
                          "instruments": ["BTC-PERPETUAL"],
                          "options": {"currency": "BTC", "expiries": 1, "strikes": 2},
                          "subscribers": ["root/book", "root/router", "root/oq"]}),
        ChildSpec(id="router", cls="actors.router:OrderRouter", backoff=fast,
                  kwargs={"venues": {"deribit": "root/deribit"}, "risk_book": "root/book"}),
        ChildSpec(id="oq", cls="actors.option_quoter:OptionQuoter", backoff=fast,
                  kwargs={"router": "root/router", "risk_book": "root/book",
                          "max_options": 4, "quote_size": 0.1, "interval_s": 0.3,
                          "config": {"base_half_spread_frac": 0.003,  # well inside the venue's
                                     "pause_vol_bps": 500.0, "widen_vol_bps": 200.0,
                                     "pause_iv_jump": 0.5, "widen_iv_jump": 0.3,
                                     "hedge_threshold_usd": 200.0, **(config or {})}}),
    ])


def caller(tree: Any) -> Any:
    def call(path: str, method: str, *args: Any) -> Any:
        return ray.get(getattr(tree.actor(path, 10), method).remote(*args), timeout=30)
    return call


def live_quotes(call: Any) -> list[dict[str, Any]]:
    return list(call("root/oq", "status")["live"].values())


def hit_until_filled(venue: VenueProcess, call: Any, direction: str, want: float,
                     timeout_s: float = 30.0) -> float:
    """Hit our ``direction`` quotes until ``want`` coins traded (quotes move: retry)."""
    done = [0.0]

    def filled() -> bool:
        for q in live_quotes(call):
            if q["direction"] == direction and done[0] < want - 1e-9:
                done[0] += hit(venue, q)
        return done[0] >= want - 1e-9
    wait_until(filled, timeout_s, f"{want} of our {direction} quotes taken")
    return done[0]


def btc_greeks(call: Any) -> dict[str, float]:
    return call("root/book", "summary")["greeks"].get("BTC", {})


def test_quoter_when_customers_hit_quotes_then_risk_book_has_greeks_delta_hedged_halt_pauses(
        namespace, store_url, trees) -> None:
    with VenueProcess.start("oq-venue", seed=5, keys=KEYS, speedup=60.0, options=True) as venue:
        tree = start_tree(quoter_tree(venue), namespace=namespace, store_url=store_url)
        trees.append(tree)
        call = caller(tree)
        traded = wait_until(lambda: (t := call("root/deribit", "traded_instruments")) and
                            len(t) > 1 and t, 30, "the connector's options resolved")
        assert traded[0] == "BTC-PERPETUAL" and len(traded) == 1 + 2 * 2
        status = wait_until(lambda: (st := call("root/oq", "status")) and len(
            {q["instrument"] for q in st["live"].values()}) >= 2 and st, 45, "quotes on options")
        quotes = list(status["live"].values())
        assert {q["instrument"] for q in quotes} <= set(traded[1:])
        for q in quotes:  # around fair value: bid below, ask above
            fair = status["fair"][q["instrument"]]
            assert (q["price"] < fair) if q["direction"] == "buy" else (q["price"] > fair)
        hit_until_filled(venue, call, "buy", 0.3)  # customers sell us options ...
        hit_until_filled(venue, call, "sell", 0.1)  # ... and buy one from us

        def hedged() -> dict[str, Any] | None:
            st = call("root/oq", "status")
            opts = {k: v for k, v in st["positions"].items() if k != "BTC-PERPETUAL"}
            ok = opts and "BTC-PERPETUAL" in st["positions"] and not st["pending_intents"] \
                and abs(st["delta_usd"]) <= 200.0 + 10.0
            return st if ok else Waiting({k: st.get(k) for k in ("positions", "delta_usd",
                                                                 "hedge", "outcomes")})
        st = wait_until(hedged, 30, "option positions and a perpetual hedge")
        options = {k: v for k, v in st["positions"].items() if k != "BTC-PERPETUAL"}
        assert sum(options.values()) == pytest.approx(0.3 - 0.1)

        def book_has_them() -> dict[str, float] | None:
            rows = {r["instrument"]: r["size"] for r in call("root/book", "positions")}
            g = btc_greeks(call)
            ok = all(rows.get(k) == pytest.approx(v) for k, v in st["positions"].items()) \
                and g.get("options_unpriced") == 0.0 and g.get("option_delta")
            return g if ok else Waiting((rows, g))
        g = wait_until(book_has_them, 30, "the risk book's positions and Greeks")
        # the book's own Greeks: the options carry delta, and the hedge offsets it
        option_delta_usd = g["option_delta"] * st["forward"]
        assert abs(option_delta_usd) > 1_000.0
        assert abs(g["delta_usd"]) < 0.15 * abs(option_delta_usd) + 200.0
        assert g["vega_usd"] != 0.0 and math.isfinite(g["gamma"])
        # the quoter's Black-76 delta matches a hand computation at its own vols
        fwd, views = st["forward"], st["views"]
        hand = 0.0
        for name, size in options.items():
            c = parse_contract(name)
            t_years = (c.expiry_s - time.time()) / (365 * 86_400)
            hand += size * float(black76_greeks(c.is_call, fwd, c.strike, t_years,
                                                views[name]).delta)
        assert (st["delta_coin"] - st["positions"]["BTC-PERPETUAL"] / fwd) == pytest.approx(
            hand, rel=0.05)

        call("root/book", "halt", "test", "pause the quoter")
        wait_until(lambda: call("root/oq", "state") == "PAUSED" and not live_quotes(call),
                   20, "the quoter PAUSED with no live quote")
        last = call("root/oq", "transitions")[-1]
        assert (last["to"], last["trigger"]) == ("PAUSED", "risk_halted")
        call("root/book", "resume", "test", "let it quote again")
        wait_until(lambda: call("root/oq", "state") in ("WIDENED", "QUOTING", "REDUCING")
                   and live_quotes(call), 30, "the quoter quoting again")


def test_quoter_when_sigkilled_mid_stream_then_no_client_order_id_reused_and_positions_match(
        namespace, store_url, trees) -> None:
    """Three SIGKILLs, each as soon as the quoter has begun the orders a customer's hit calls
    for (replace the quote, hedge). Another client trades the perpetual on the same account
    after each restart (as in the demo): the quoter must not count those fills; and the
    connector hands a restarted subscriber marks again only after a call to its old handle
    failed, which a fill's publication does."""
    rng = random.Random(11)
    with VenueProcess.start("oq-kill", seed=6, keys=KEYS, speedup=60.0, options=True) as venue:
        tree = start_tree(quoter_tree(venue), namespace=namespace, store_url=store_url)
        trees.append(tree)
        call = caller(tree)
        client_usd = 0.0
        wait_until(lambda: live_quotes(call), 45, "the first quotes")
        for i in range(3):
            base = call("root/router", "status")["routes"]
            hit_until_filled(venue, call, rng.choice(["buy", "sell"]), 0.1)
            wait_until(lambda b=base: call("root/router", "status")["routes"] > b, 30,
                       "the quoter routing orders")
            info = tree.child("root/oq")
            os.kill(info.pid, signal.SIGKILL)
            wait_until(lambda p=info.pid: (c := tree.child("root/oq")).status == "running"
                       and c.pid != p, 30, "the quoter restarted")
            restarted = call("root/router", "status")["routes"]
            side = "buy" if i % 2 == 0 else "sell"
            client = call("root/deribit", "submit", {"instrument": "BTC-PERPETUAL",
                                                     "direction": side, "amount": 10.0,
                                                     "type": "market"}, 5.0)
            assert client["status"] == "accepted"
            client_usd += client["filled"] * (1.0 if side == "buy" else -1.0)
            # warmed up again, it cancels the old quotes and quotes under new ids
            wait_until(lambda r=restarted: call("root/router", "status")["routes"] >= r + 4, 45,
                       "the restarted quoter routing new orders")
        call("root/book", "halt", "test", "compare")
        wait_until(lambda: not live_quotes(call) and not call("root/oq", "status")[
            "pending_intents"], 30, "no live quote, nothing pending")

        engine = rpc(venue, "public/simulator/status")["engine"]
        assert engine["duplicate_labels"] == 0
        router = call("root/router", "status")
        assert router["counters"].get("client_order_id_conflicts", 0) == 0
        # the quoter's ids are "<path>.<journal seq of the intent>": each seq one order
        seq = call("root/oq", "status")["journal_seq"]
        routed = {n: o for n in range(1, seq + 1)
                  if (o := call("root/router", "outcome", f"root-oq.{n}")) is not None}
        assert len(routed) >= 8 + 3 * 4
        assert not [o for o in routed.values() if o.get("reason") == "invalid_order"]

        def match() -> tuple[dict, dict, dict] | Waiting:
            venue_pos = {p["instrument_name"]: p["size"] for p in rpc(
                venue, "private/get_positions", {"currency": "BTC"}) if p["size"]}
            ours, quoter = call("root/deribit", "positions"), call("root/oq", "positions")
            perp = "BTC-PERPETUAL"
            theirs = {**venue_pos, perp: venue_pos.get(perp, 0.0) - client_usd}
            ok = ours == pytest.approx(venue_pos) and \
                {k: v for k, v in quoter.items() if v} == pytest.approx(
                    {k: v for k, v in theirs.items() if v})
            return (ours, quoter, venue_pos) if ok else Waiting((ours, quoter, venue_pos))
        ours, quoter, _ = wait_until(match, 30, "connector == venue; quoter == venue but the "
                                                "other client's perpetual")
        assert any(k != "BTC-PERPETUAL" for k in quoter)  # it did hold options
