"""The venue's Deribit API v2 methods over ``VenueEngine``, independent of any transport.

``VenueApi.call(method, account, params)`` answers the result (wire-ready dicts/lists), or a
``Rejection``/``RpcError`` to send as the JSON-RPC error. Params are checked against each
method's declared ``Param`` list first (see ``jsonrpc``); the engine then checks values.

Beyond Deribit's documented parameters, what clients such as ccxt need:

* ``public/get_instruments`` without ``currency`` lists every currency (ccxt sends none);
* ``private/get_account_summaries`` (ccxt's ``fetchBalance`` without a code);
* ``private/get_positions`` without ``currency`` lists every currency.

Beyond Deribit: a dead-man's switch as BitMEX/OKX/Binance have one,
``private/cancel_all_after`` (``timeout`` ms, ``label_prefix``) and
``private/get_cancel_all_after`` (see ``deadman``; the server fires it from its own loop).

Balances are a simulator model: each account starts with ``initial_balances``; the balance of a
currency moves with realized P&L of positions settled in it, fees charged in it and spot
transfers; equity adds floating P&L; initial/maintenance margin are ``initial_margin_rate`` /
``maintenance_margin_rate`` of the absolute coin value of futures positions (open orders are
not margined).

``EventTracker`` turns engine changes into ``user.orders``/``user.trades`` events: orders a
call returned, plus every open order whose state moved since the last look (fills by market
data, reduce-only shrinking, cancel-all), plus executions the engine recorded since.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from actors.venue.clock import Clock, WallClock
from actors.venue.deadman import PARAMS as DEADMAN_PARAMS
from actors.venue.deadman import DeadmanSwitches
from actors.venue.engine import VenueEngine
from actors.venue.instruments import Instrument
from actors.venue.jsonrpc import Param, RpcError, check_params, invalid_params
from actors.venue.records import Order, OrderResult, Rejection, Trade, reject

ALL_TRADES = 10**9
MAX_COUNT = 1000
KINDS = ("future", "option", "spot")
SORTING = ("asc", "desc", "default")
CURRENCY_NAMES = {"BTC": "Bitcoin", "ETH": "Ethereum", "USDC": "USD Coin"}

Result = object


@dataclass(frozen=True)
class MethodSpec:
    name: str
    params: tuple[Param, ...]
    private: bool
    handler: Callable[[str | None, dict[str, object]], Result]


def _num(name: str, required: bool = False) -> Param:
    return Param(name, "number", required)


def _text(name: str, required: bool = False, default: object = None,
          choices: tuple[str, ...] | None = None) -> Param:
    return Param(name, "str", required, default, choices)


def _flag(name: str, default: object = None) -> Param:
    return Param(name, "bool", False, default)


ORDER_PARAMS = (
    _text("instrument_name", True), _num("amount"), _num("contracts"),
    _text("type", default="limit"), _text("label", default=""), _num("price"),
    _text("time_in_force", default="good_til_cancelled"), _flag("post_only", False),
    _flag("reject_post_only", False), _flag("reduce_only", False), _num("trigger_price"),
    _text("trigger"))
KIND = _text("kind", choices=KINDS + ("any",))
COUNT = Param("count", "int", False, 10)


def _fingerprint(o: Order) -> tuple[object, ...]:
    return (o.order_state, o.filled_amount, o.amount, o.price, o.last_update_timestamp_s,
            o.reduce_only, o.post_only)


@dataclass
class UserEvents:
    orders: list[Order] = field(default_factory=list)
    trades: list[Trade] = field(default_factory=list)


class EventTracker:
    """Which orders and executions clients have not been told about yet (module doc)."""

    def __init__(self, engine: VenueEngine) -> None:
        self._engine = engine
        self._open: dict[str, dict[str, tuple[object, ...]]] = {}
        self._trade_index: dict[str, int] = {}
        self._engine_trades = engine.stats.trades
        self._touched: list[Order] = []

    def touched(self, order: Order) -> None:
        self._touched.append(order)

    def collect(self, accounts: Iterable[str]) -> UserEvents:
        engine, events = self._engine, UserEvents()
        candidates = dict.fromkeys(accounts)
        candidates.update(dict.fromkeys(a for a, seen in self._open.items() if seen))
        emitted: set[str] = set()
        for order in self._touched:
            events.orders.append(order)
            emitted.add(order.order_id)
            candidates[order.account] = None
        self._touched = []
        for account in candidates:
            current = engine.get_open_orders(account)
            if isinstance(current, Rejection):
                continue
            seen = self._open.get(account, {})
            now = {o.order_id: _fingerprint(o) for o in current}
            events.orders.extend(o for o in current if o.order_id not in emitted
                                 and seen.get(o.order_id) != now[o.order_id])
            for oid in seen.keys() - now.keys() - emitted:
                state = engine.get_order_state(account, oid)
                if not isinstance(state, Rejection):
                    events.orders.append(state)
            self._open[account] = now
        if engine.stats.trades != self._engine_trades:
            self._engine_trades = engine.stats.trades
            for account in candidates:
                trades = engine.get_user_trades(account, count=ALL_TRADES)
                if isinstance(trades, Rejection):
                    continue
                events.trades.extend(trades[self._trade_index.get(account, 0):])
                self._trade_index[account] = len(trades)
        return events


class VenueApi:
    """Deribit venue methods (market data, trading, account) for any number of accounts."""

    def __init__(self, engine: VenueEngine, instruments: Sequence[Instrument],
                 initial_balances: Mapping[str, float], *, initial_margin_rate: float = 0.02,
                 maintenance_margin_rate: float = 0.01, clock: Clock | None = None) -> None:
        self.engine = engine
        self.deadman = DeadmanSwitches(engine, clock or WallClock())
        self.instruments = {i.instrument_name: i for i in instruments}
        self.events = EventTracker(engine)
        self._balances = dict(initial_balances)
        self._im_rate = initial_margin_rate
        self._mm_rate = maintenance_margin_rate
        currencies: dict[str, None] = {}
        for inst in instruments:
            for cur in (inst.base_currency, inst.settlement_currency, inst.quote_currency):
                if cur != "USD":
                    currencies[cur] = None
        self.currencies = sorted(currencies)
        self._methods: dict[str, MethodSpec] = {}
        self._declare()

    # --- method table -----------------------------------------------------------------------
    def _add(self, name: str, private: bool, params: tuple[Param, ...],
             handler: Callable[[str | None, dict[str, object]], Result]) -> None:
        self._methods[name] = MethodSpec(name, params, private, handler)

    def _declare(self) -> None:
        inst, cur = _text("instrument_name", True), _text("currency", True)
        opt_cur = _text("currency", default="any")
        self._add("public/get_instruments", False,
                  (opt_cur, KIND, _flag("expired", False)), self._get_instruments)
        self._add("public/get_currencies", False, (), self._get_currencies)
        self._add("public/ticker", False, (inst,), self._ticker)
        self._add("public/get_order_book", False, (inst, Param("depth", "int", False, 10)),
                  self._get_order_book)
        self._add("public/get_index_price", False, (_text("index_name", True),),
                  self._get_index_price)
        self._add("private/buy", True, ORDER_PARAMS, lambda a, p: self._place(a, "buy", p))
        self._add("private/sell", True, ORDER_PARAMS, lambda a, p: self._place(a, "sell", p))
        self._add("private/edit", True, (
            _text("order_id", True), _num("amount"), _num("contracts"), _num("price"),
            _flag("post_only"), _flag("reject_post_only"), _flag("reduce_only")), self._edit)
        self._add("private/cancel", True, (_text("order_id", True),), self._cancel)
        self._add("private/cancel_all", True, (), self._cancel_all)
        self._add("private/cancel_all_by_instrument", True, (inst,), self._cancel_all)
        self._add("private/cancel_all_by_currency", True, (cur, KIND), self._cancel_all)
        self._add("private/cancel_all_after", True, DEADMAN_PARAMS,
                  lambda a, p: self.deadman.arm(str(a), p))
        self._add("private/get_cancel_all_after", True, (),
                  lambda a, p: self.deadman.armed(str(a)))
        self._add("private/cancel_by_label", True, (_text("label", True), opt_cur),
                  lambda a, p: self.engine.cancel_by_label(a, p["label"]))  # type: ignore[arg-type]
        self._add("private/get_open_orders_by_currency", True, (cur, KIND, _text("type")),
                  self._open_orders)
        self._add("private/get_open_orders_by_instrument", True, (inst, _text("type")),
                  self._open_orders)
        self._add("private/get_order_state", True, (_text("order_id", True),),
                  self._order_state)
        self._add("private/get_order_state_by_label", True, (_text("label", True), opt_cur),
                  self._order_state_by_label)
        sorting = _text("sorting", default="default", choices=SORTING)
        self._add("private/get_user_trades_by_currency", True, (cur, KIND, COUNT, sorting),
                  self._user_trades)
        self._add("private/get_user_trades_by_instrument", True, (
            inst, Param("start_seq", "int"), Param("end_seq", "int"), COUNT, sorting),
            self._user_trades)
        self._add("private/get_positions", True, (opt_cur, KIND), self._positions)
        self._add("private/get_position", True, (inst,), self._position)
        self._add("private/get_account_summary", True, (cur, _flag("extended", False)),
                  self._account_summary)
        self._add("private/get_account_summaries", True, (_flag("extended", False),),
                  self._account_summaries)

    def spec(self, method: str) -> MethodSpec | None:
        return self._methods.get(method)

    @property
    def methods(self) -> list[str]:
        return sorted(self._methods)

    def call(self, method: str, account: str | None, params: Mapping[str, object]
             ) -> Result | Rejection | RpcError:
        """Run a declared method; ``account`` is required for private ones (the server
        checks authentication before calling)."""
        spec = self._methods[method]
        checked = check_params(spec.params, params)
        if isinstance(checked, RpcError):
            return checked
        return spec.handler(account, checked)

    # --- helpers -------------------------------------------------------------------------
    @staticmethod
    def _any(value: object) -> str | None:
        return None if value in (None, "any") else str(value)

    def _amount(self, p: dict[str, object]) -> object | RpcError:
        """``amount``, or ``contracts * contract_size`` (Deribit accepts either)."""
        if p.get("amount") is not None:
            return p["amount"]
        contracts = p.get("contracts")
        if contracts is None:
            return invalid_params("amount_missing", "amount")
        inst = self.instruments.get(str(p.get("instrument_name", "")))
        return contracts if inst is None else contracts * inst.contract_size  # type: ignore

    def _result(self, out: OrderResult | Rejection) -> Result | Rejection:
        if isinstance(out, Rejection):
            return out
        if not out.duplicate:
            self.events.touched(out.order)
        return out.to_deribit()

    # --- public ------------------------------------------------------------------------------
    def _get_instruments(self, _: str | None, p: dict[str, object]) -> Result | Rejection:
        if p["expired"]:
            return []
        out = self.engine.get_instruments(currency=self._any(p["currency"]),
                                          kind=self._any(p["kind"]))
        return out if isinstance(out, Rejection) else [i.to_deribit() for i in out]

    def _get_currencies(self, _: str | None, p: dict[str, object]) -> Result:
        return [{"currency": c, "currency_long": CURRENCY_NAMES.get(c, c),
                 "coin_type": {"BTC": "BITCOIN", "ETH": "ETHER"}.get(c, "ERC20"),
                 "min_confirmations": 1, "min_withdrawal_fee": 0.0001,
                 "withdrawal_fee": 0.0001, "withdrawal_priorities": [], "decimals": 8}
                for c in self.currencies]

    def _ticker(self, _: str | None, p: dict[str, object]) -> Result | Rejection:
        out = self.engine.ticker(str(p["instrument_name"]))
        if isinstance(out, dict):
            out.setdefault("estimated_delivery_price", out.get("index_price"))
            out.setdefault("open_interest", 0.0)
        return out

    def _get_order_book(self, _: str | None, p: dict[str, object]) -> Result | Rejection:
        return self.engine.get_order_book(str(p["instrument_name"]), p["depth"])  # type: ignore

    def _get_index_price(self, _: str | None, p: dict[str, object]) -> Result | Rejection:
        coin = str(p["index_name"]).split("_")[0].upper()
        if f"{coin}-PERPETUAL" not in self.instruments:
            return invalid_params("index_name_invalid", "index_name")
        ticker = self.engine.ticker(f"{coin}-PERPETUAL")
        if isinstance(ticker, Rejection):
            return ticker
        return {"index_price": ticker["index_price"],
                "estimated_delivery_price": ticker["index_price"]}

    # --- trading -----------------------------------------------------------------------------
    def _place(self, account: str | None, direction: str, p: dict[str, object]
               ) -> Result | Rejection | RpcError:
        amount = self._amount(p)
        if isinstance(amount, RpcError):
            return amount
        out = self.engine.place(
            str(account), direction, str(p["instrument_name"]), amount,  # type: ignore[arg-type]
            type=p["type"], price=p["price"], label=p["label"],  # type: ignore[arg-type]
            time_in_force=p["time_in_force"], post_only=p["post_only"],  # type: ignore[arg-type]
            reject_post_only=p["reject_post_only"],  # type: ignore[arg-type]
            reduce_only=p["reduce_only"], trigger_price=p["trigger_price"],  # type: ignore
            trigger=p["trigger"])  # type: ignore[arg-type]
        return self._result(out)

    def _edit(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        amount = p["amount"]
        if amount is None and p["contracts"] is not None:
            state = self.engine.get_order_state(str(account), str(p["order_id"]))
            if isinstance(state, Rejection):
                return state
            amount = p["contracts"] * state.contract_size  # type: ignore[operator]
        out = self.engine.edit(str(account), str(p["order_id"]), amount,  # type: ignore[arg-type]
                               p["price"], post_only=p["post_only"],  # type: ignore[arg-type]
                               reject_post_only=p["reject_post_only"],  # type: ignore[arg-type]
                               reduce_only=p["reduce_only"])  # type: ignore[arg-type]
        return self._result(out)

    def _cancel(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        out = self.engine.cancel(str(account), str(p["order_id"]))
        if isinstance(out, Rejection):
            return out
        self.events.touched(out)
        return out.to_deribit()

    def _cancel_all(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        return self.engine.cancel_all(
            str(account), instrument_name=p.get("instrument_name"),  # type: ignore[arg-type]
            currency=self._any(p.get("currency")), kind=self._any(p.get("kind")))

    def _open_orders(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        name = p.get("instrument_name")
        if name is not None and name not in self.instruments:
            return reject("invalid_or_unsupported_instrument", "instrument_unknown",
                          "instrument_name")
        out = self.engine.get_open_orders(
            str(account), instrument_name=name,  # type: ignore[arg-type]
            currency=self._any(p.get("currency")), kind=self._any(p.get("kind")))
        if isinstance(out, Rejection):
            return out
        wanted = p.get("type")
        return [o.to_deribit() for o in out
                if wanted in (None, "all") or o.order_type == wanted
                or (wanted == "stop_all" and o.trigger_price is not None)]

    def _order_state(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        out = self.engine.get_order_state(str(account), str(p["order_id"]))
        return out if isinstance(out, Rejection) else out.to_deribit()

    def _order_state_by_label(self, account: str | None, p: dict[str, object]
                              ) -> Result | Rejection:
        out = self.engine.get_order_state_by_label(str(account), str(p["label"]))
        if isinstance(out, Rejection):
            return [] if out.reason == "label_unknown" else out
        return [out.to_deribit()]

    def _user_trades(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        count = p["count"]
        if not isinstance(count, int) or not 1 <= count <= MAX_COUNT:
            return invalid_params("count_invalid", "count")
        name = p.get("instrument_name")
        out = self.engine.get_user_trades(
            str(account), instrument_name=name,  # type: ignore[arg-type]
            currency=self._any(p.get("currency")), start_seq=p.get("start_seq"),  # type: ignore
            end_seq=p.get("end_seq"), count=ALL_TRADES)  # type: ignore[arg-type]
        if isinstance(out, Rejection):
            return out
        kind = self._any(p.get("kind"))
        trades = [t for t in out if kind is None or self.instruments[t.instrument_name].kind == kind]
        by_seq = p.get("start_seq") is not None or p.get("end_seq") is not None
        if p["sorting"] == "desc" or (p["sorting"] == "default" and not by_seq):
            trades.reverse()
        return {"trades": [t.to_deribit() for t in trades[:count]],
                "has_more": len(trades) > count}

    # --- account -----------------------------------------------------------------------------
    def _positions(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        out = self.engine.get_positions(str(account), currency=self._any(p["currency"]),
                                        kind=self._any(p["kind"]))
        return out if isinstance(out, Rejection) else [x.to_deribit() for x in out]

    def _position(self, account: str | None, p: dict[str, object]) -> Result | Rejection:
        out = self.engine.get_position(str(account), str(p["instrument_name"]))
        return out if isinstance(out, Rejection) else out.to_deribit()

    def summary(self, account: str, currency: str) -> dict[str, object] | Rejection:
        """Balances of one currency (model in the module doc)."""
        trades = self.engine.get_user_trades(account, count=ALL_TRADES)
        positions = self.engine.get_positions(account)
        if isinstance(trades, Rejection):
            return trades
        if isinstance(positions, Rejection):
            return positions
        balance, fees = float(self._balances.get(currency, 0.0)), 0.0
        for t in trades:
            inst = self.instruments[t.instrument_name]
            sign = 1.0 if t.direction == "buy" else -1.0
            if t.fee_currency == currency:
                fees += t.fee
            if inst.kind == "spot" and inst.base_currency == currency:
                balance += sign * t.amount
            if inst.kind == "spot" and inst.quote_currency == currency:
                balance -= sign * t.amount * t.price
        rpl = upl = im = mm = delta = 0.0
        for pos in positions:
            inst = self.instruments[pos.instrument_name]
            if inst.kind == "spot" or inst.settlement_currency != currency:
                continue
            rpl += pos.realized_profit_loss
            upl += pos.floating_profit_loss
            if inst.kind == "future":
                value = abs(pos.size_currency)
                im, mm, delta = im + self._im_rate * value, mm + self._mm_rate * value, \
                    delta + pos.size_currency
        balance += rpl - fees
        equity = balance + upl
        available = equity - im
        return {"currency": currency, "balance": balance, "equity": equity,
                "margin_balance": equity, "available_funds": available,
                "available_withdrawal_funds": max(0.0, min(balance, available)),
                "initial_margin": im, "maintenance_margin": mm, "session_upl": upl,
                "session_rpl": rpl, "total_pl": rpl + upl, "futures_pl": rpl + upl,
                "options_pl": 0.0, "delta_total": delta, "fee_balance": 0.0,
                "portfolio_margining_enabled": False}

    def _account_summary(self, account: str | None, p: dict[str, object]
                         ) -> Result | Rejection | RpcError:
        if p["currency"] not in self.currencies:
            return invalid_params("currency_invalid", "currency")
        out = self.summary(str(account), str(p["currency"]))
        if isinstance(out, dict) and p["extended"]:
            out.update(username=account, system_name=account, type="main")
        return out

    def _account_summaries(self, account: str | None, p: dict[str, object]
                           ) -> Result | Rejection:
        summaries = []
        for currency in self.currencies:
            out = self.summary(str(account), currency)
            if isinstance(out, Rejection):
                return out
            summaries.append(out)
        return {"username": account, "system_name": account, "type": "main",
                "summaries": summaries}
