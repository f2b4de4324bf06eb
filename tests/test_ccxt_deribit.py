"""ccxt's own Deribit client (synchronous ``ccxt.deribit``) against the venue simulator process:
markets, ticker, book, limit orders, open orders, cancel, positions, trades, balance, and
AuthenticationError for wrong keys. Skipped when ccxt is not installed, unless
``BASTION_REQUIRE_CCXT=1`` (then it fails)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from typing import Any

import pytest

from actors.venue.process import VenueProcess
from tests.conftest import wait_until

try:
    import ccxt
except ImportError:
    if os.environ.get("BASTION_REQUIRE_CCXT") == "1":
        raise
    pytest.skip("ccxt is not installed (pip install ccxt); set BASTION_REQUIRE_CCXT=1 to fail "
                "instead of skipping", allow_module_level=True)

KEYS = {"ccxt-acct": "ccxt-secret-0001"}
SYMBOL = "BTC/USD:BTC"  # BTC-PERPETUAL as ccxt names it


def deribit(venue: VenueProcess, api_key: str, secret: str) -> Any:
    """ccxt's Deribit client with its REST base URL pointed at the simulator."""
    exchange = ccxt.deribit({"apiKey": api_key, "secret": secret, "timeout": 10_000,
                             "enableRateLimit": False})
    exchange.urls["api"] = {"rest": venue.http_url}
    return exchange


@pytest.fixture(scope="module")
def venue() -> Iterator[VenueProcess]:
    proc = VenueProcess.start("ccxt-venue", keys=KEYS, speedup=120.0)
    try:
        wait_until(lambda: deribit(proc, "", "").fetch_ticker(SYMBOL)["bid"], 20.0,
                   "BTC market data")
        yield proc
    finally:
        proc.stop()
        assert not proc.alive()


@pytest.fixture(scope="module")
def exchange(venue: VenueProcess) -> Any:
    ex = deribit(venue, "ccxt-acct", KEYS["ccxt-acct"])
    ex.load_markets()
    return ex


def test_ccxt_when_loading_markets_then_simulator_listing_and_market_data(exchange: Any
                                                                          ) -> None:
    assert {SYMBOL, "ETH/USD:ETH", "BTC/USDC", "ETH/USDC"} <= set(exchange.markets)
    market = exchange.market(SYMBOL)
    assert (market["id"], market["swap"], market["inverse"]) == ("BTC-PERPETUAL", True, True)
    assert market["precision"]["price"] == 0.5 and market["contractSize"] == 10
    ticker = exchange.fetch_ticker(SYMBOL)
    assert 0 < ticker["bid"] < ticker["ask"] and ticker["markPrice"] > 0
    book = exchange.fetch_order_book(SYMBOL, 5)
    assert len(book["bids"]) == 5 and book["bids"][0][0] < book["asks"][0][0]
    assert book["nonce"] > 0


def test_ccxt_when_trading_then_orders_positions_trades_and_balance(exchange: Any) -> None:
    ticker = exchange.fetch_ticker(SYMBOL)
    buy = exchange.create_order(SYMBOL, "limit", "buy", 20, math.floor(ticker["bid"] * 0.8))
    sell = exchange.create_order(SYMBOL, "limit", "sell", 10, math.ceil(ticker["ask"] * 1.2))
    assert buy["status"] == "open" and sell["status"] == "open"
    assert (buy["side"], buy["amount"], buy["type"]) == ("buy", 20, "limit")
    open_ids = {o["id"] for o in exchange.fetch_open_orders(SYMBOL)}
    assert {buy["id"], sell["id"]} <= open_ids
    assert {buy["id"], sell["id"]} <= {o["id"] for o in exchange.fetch_open_orders()}
    for order in (buy, sell):
        assert exchange.cancel_order(order["id"], SYMBOL)["status"] == "canceled"
    assert not {buy["id"], sell["id"]} & {o["id"] for o in exchange.fetch_open_orders(SYMBOL)}

    taker = exchange.create_order(SYMBOL, "limit", "buy", 30,
                                  math.ceil(exchange.fetch_ticker(SYMBOL)["ask"] * 1.02))
    assert taker["status"] == "closed" and taker["filled"] == 30
    trades = exchange.fetch_my_trades(SYMBOL)
    mine = [t for t in trades if t["order"] == taker["id"]]
    assert mine and sum(t["amount"] for t in mine) == 30
    assert mine[0]["side"] == "buy" and mine[0]["takerOrMaker"] == "taker"
    positions = {p["symbol"]: p for p in exchange.fetch_positions()}
    assert positions[SYMBOL]["contracts"] >= 30 and positions[SYMBOL]["side"] == "long"
    balance = exchange.fetch_balance()
    assert balance["BTC"]["total"] > 0 and balance["USDC"]["free"] > 0
    btc = exchange.fetch_balance({"code": "BTC"})
    assert btc["BTC"]["used"] >= 0 and btc["BTC"]["free"] <= btc["BTC"]["total"]


def test_ccxt_when_keys_wrong_then_authentication_error(venue: VenueProcess,
                                                        exchange: Any) -> None:
    for api_key, secret in (("ccxt-acct", "not-the-secret"), ("nobody", "whatever-secret")):
        wrong = deribit(venue, api_key, secret)
        with pytest.raises(ccxt.AuthenticationError):
            wrong.fetch_balance()
        with pytest.raises(ccxt.AuthenticationError):
            wrong.create_order(SYMBOL, "limit", "buy", 10, 1000)


def test_ccxt_when_done_then_it_called_no_method_the_simulator_lacks(venue: VenueProcess,
                                                                     exchange: Any) -> None:
    import json
    import urllib.request
    with urllib.request.urlopen(f"{venue.http_url}/api/v2/public/simulator/status",
                                timeout=10) as resp:
        state = json.loads(resp.read())["result"]
    assert "-32601" not in state["errors"], state["requests"]
    assert state["requests"]["public/get_instruments"] >= 1
