"""What the venue engine hands out: orders, trades, positions and rejections, as frozen data.

Field names are Deribit API v2's (``order_id``, ``label``, ``direction``, ``amount``,
``filled_amount``, ``average_price``, ``order_state``, ``trade_id``, ``trade_seq`` ...). Times are
float seconds (``*_s``) inside; ``to_deribit()`` makes the wire dict with millisecond stamps.

A refused request is a ``Rejection`` value with Deribit's error code and short message plus a
human ``reason`` and the offending ``param`` -- never an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from actors.venue.clock import to_ms

Direction = Literal["buy", "sell"]
OrderState = Literal["open", "filled", "rejected", "cancelled", "untriggered"]
OrderType = Literal["limit", "market", "stop_limit", "stop_market"]
TimeInForce = Literal["good_til_cancelled", "immediate_or_cancel", "fill_or_kill"]
Trigger = Literal["last_price", "mark_price", "index_price"]
Liquidity = Literal["M", "T"]

DIRECTIONS: tuple[str, ...] = ("buy", "sell")
ORDER_TYPES: tuple[str, ...] = ("limit", "market", "stop_limit", "stop_market")
TIMES_IN_FORCE: tuple[str, ...] = ("good_til_cancelled", "immediate_or_cancel", "fill_or_kill")
TRIGGERS: tuple[str, ...] = ("last_price", "mark_price", "index_price")

# Deribit error codes (API v2 "RPC Error Codes" table) used by the simulator.
ERROR_CODES: dict[str, int] = {
    "Invalid params": -32602,
    "qty_too_low": 10002,
    "order_overlap": 10003,
    "order_not_found": 10004,
    "invalid_or_unsupported_instrument": 10020,
    "invalid_amount": 10021,
    "invalid_price": 10023,
    "non_integer_contract_amount": 10027,
    "not_owner_of_order": 10029,
    "price_wrong_tick": 10043,
    "trigger_price_wrong_tick": 10044,
    "invalid_arguments": 11029,
    "other_reject": 11030,
    "not_open_order": 11044,
    "unsupported_arg_combination": 11047,
    "post_only_reject": 11054,
    "post_only_not_allowed": 11055,
    "temporarily_unavailable": 13028,
    "unavailable": 13503,
}


@dataclass(frozen=True)
class Rejection:
    """A refused request: Deribit ``code`` and ``message``, our ``reason`` and the ``param``.

    ``reason`` is a stable snake_case key (e.g. ``"price_not_finite"``, ``"reject_storm"``)
    that tests and counters use; the JSON-RPC layer sends ``to_error()``."""

    code: int
    message: str
    reason: str
    param: str | None = None

    ok = False

    def to_error(self) -> dict[str, object]:
        data: dict[str, object] = {"reason": self.reason}
        if self.param is not None:
            data["param"] = self.param
        return {"code": self.code, "message": self.message, "data": data}


def reject(message: str, reason: str, param: str | None = None) -> Rejection:
    """Build a rejection from Deribit's short ``message`` (the code is looked up)."""
    return Rejection(ERROR_CODES[message], message, reason, param)


@dataclass(frozen=True)
class Order:
    """A snapshot of one order as Deribit reports it (``price`` is ``None`` for market)."""

    order_id: str
    account: str
    instrument_name: str
    direction: Direction
    order_type: OrderType
    amount: float
    price: float | None
    time_in_force: TimeInForce
    post_only: bool
    reject_post_only: bool
    reduce_only: bool
    label: str
    filled_amount: float
    average_price: float
    order_state: OrderState
    creation_timestamp_s: float
    last_update_timestamp_s: float
    replaced: bool = False
    cancel_reason: str | None = None
    trigger_price: float | None = None
    trigger: Trigger | None = None
    triggered: bool | None = None
    contract_size: float = 1.0

    ok = True

    def to_deribit(self) -> dict[str, object]:
        out: dict[str, object] = {
            "order_id": self.order_id, "instrument_name": self.instrument_name,
            "direction": self.direction, "order_type": self.order_type,
            "amount": self.amount, "contracts": round(self.amount / self.contract_size, 8),
            "price": "market_price" if self.price is None else self.price,
            "time_in_force": self.time_in_force, "post_only": self.post_only,
            "reduce_only": self.reduce_only, "label": self.label,
            "filled_amount": self.filled_amount, "average_price": self.average_price,
            "order_state": self.order_state, "replaced": self.replaced, "api": True,
            "is_liquidation": False,
            "creation_timestamp": to_ms(self.creation_timestamp_s),
            "last_update_timestamp": to_ms(self.last_update_timestamp_s),
        }
        if self.post_only:
            out["reject_post_only"] = self.reject_post_only
        if self.order_state == "cancelled":
            out["cancel_reason"] = self.cancel_reason or "user_request"
        if self.trigger_price is not None:
            out.update(trigger_price=self.trigger_price, trigger=self.trigger,
                       triggered=bool(self.triggered))
        return out


@dataclass(frozen=True)
class Trade:
    """One of our executions (one side of a venue trade). Two of our accounts trading with
    each other produce two records with the same ``trade_id`` and ``trade_seq``.

    ``trade_seq`` increases by one per venue trade on the instrument; ``liquidity`` is ``"M"``
    for the resting side and ``"T"`` for the aggressor."""

    trade_id: str
    trade_seq: int
    instrument_name: str
    account: str
    order_id: str
    label: str
    direction: Direction
    price: float
    amount: float
    timestamp_s: float
    liquidity: Liquidity
    order_type: OrderType
    state: OrderState
    fee: float
    fee_currency: str
    index_price: float
    mark_price: float

    def to_deribit(self) -> dict[str, object]:
        return {
            "trade_id": self.trade_id, "trade_seq": self.trade_seq,
            "instrument_name": self.instrument_name, "order_id": self.order_id,
            "label": self.label, "direction": self.direction, "price": self.price,
            "amount": self.amount, "timestamp": to_ms(self.timestamp_s),
            "liquidity": self.liquidity, "order_type": self.order_type, "state": self.state,
            "fee": self.fee, "fee_currency": self.fee_currency,
            "index_price": self.index_price, "mark_price": self.mark_price,
        }


@dataclass(frozen=True)
class Position:
    """An account's net position on one instrument, derived from its fills only.

    ``size`` is signed, in amount units (USD for inverse perpetuals). ``average_price`` is the
    entry price of the open part (harmonic mean for inverse instruments). Profit and loss are
    in the settlement currency (coin for inverse, quote for linear)."""

    instrument_name: str
    kind: str
    size: float
    direction: Literal["buy", "sell", "zero"]
    average_price: float
    realized_profit_loss: float
    floating_profit_loss: float
    mark_price: float
    size_currency: float

    def to_deribit(self) -> dict[str, object]:
        return {
            "instrument_name": self.instrument_name, "kind": self.kind, "size": self.size,
            "direction": self.direction, "average_price": self.average_price,
            "realized_profit_loss": self.realized_profit_loss,
            "floating_profit_loss": self.floating_profit_loss,
            "total_profit_loss": self.realized_profit_loss + self.floating_profit_loss,
            "mark_price": self.mark_price, "size_currency": self.size_currency,
        }


@dataclass(frozen=True)
class OrderResult:
    """The answer to buy/sell/edit: the order after the call and the trades it made.

    ``duplicate`` is true when the call was a resend of an existing ``label``: ``order`` is the
    original order in its current state and ``trades`` is empty (nothing new happened)."""

    order: Order
    trades: tuple[Trade, ...] = ()
    duplicate: bool = False

    ok = True

    def to_deribit(self) -> dict[str, object]:
        return {"order": self.order.to_deribit(),
                "trades": [t.to_deribit() for t in self.trades]}


OrderOutcome = Literal["created", "duplicate", "rejected"]


@dataclass(frozen=True, slots=True)
class OrderLogEntry:
    """One buy/sell request the venue received and what became of it: ``created`` (a new
    order), ``duplicate`` (a resend of a known label: the original order answered) or
    ``rejected`` (``reason`` says why; e.g. ``fenced_epoch``). ``seq`` counts per account."""

    seq: int
    ts_s: float
    account: str
    label: str
    direction: str
    instrument_name: str
    amount: float | None
    price: float | None
    order_type: str
    outcome: OrderOutcome
    reason: str | None = None
    order_id: str | None = None

    def to_deribit(self) -> dict[str, object]:
        return {"seq": self.seq, "timestamp": to_ms(self.ts_s), "label": self.label,
                "direction": self.direction, "instrument_name": self.instrument_name,
                "amount": self.amount, "price": self.price, "type": self.order_type,
                "outcome": self.outcome, "reason": self.reason, "order_id": self.order_id}
