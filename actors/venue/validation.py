"""Input checks for order entry: every bad value becomes a ``Rejection`` with a stable reason.

Reasons (``Rejection.reason``) by parameter, with the Deribit message they map to:

* ``direction_invalid``, ``type_invalid``, ``time_in_force_invalid``, ``trigger_invalid``,
  ``label_invalid``, ``<flag>_not_bool`` -> ``Invalid params`` (-32602)
* ``instrument_unknown`` -> ``invalid_or_unsupported_instrument`` (10020)
* ``amount_not_a_number`` / ``amount_not_finite`` (NaN, inf) -> ``Invalid params``;
  ``amount_not_positive`` -> ``invalid_amount`` (10021); ``amount_off_step`` (not a multiple of
  ``min_trade_amount``) -> ``non_integer_contract_amount`` (10027) for futures, else 10021
* ``price_missing`` / ``price_not_a_number`` / ``price_not_finite`` -> ``Invalid params``;
  ``price_not_positive`` -> ``invalid_price`` (10023); ``price_off_tick`` ->
  ``price_wrong_tick`` (10043); the same for ``trigger_price_*`` (off tick: 10044)
* ``post_only_market`` -> ``post_only_not_allowed`` (11055); ``post_only_with_ioc_fok`` ->
  ``unsupported_arg_combination`` (11047)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from actors.venue.instruments import Instrument
from actors.venue.records import (
    DIRECTIONS,
    ORDER_TYPES,
    TIMES_IN_FORCE,
    TRIGGERS,
    Direction,
    OrderType,
    Rejection,
    TimeInForce,
    Trigger,
    reject,
)

MAX_LABEL_LENGTH = 64


@dataclass(frozen=True)
class OrderRequest:
    """A buy/sell request that passed every static check (integers in ticks and lots)."""

    inst: Instrument
    direction: Direction
    order_type: OrderType
    lots: int
    price_ticks: int | None
    time_in_force: TimeInForce
    post_only: bool
    reject_post_only: bool
    reduce_only: bool
    label: str
    trigger_price_ticks: int | None
    trigger: Trigger | None

    @property
    def is_stop(self) -> bool:
        return self.order_type in ("stop_limit", "stop_market")

    @property
    def is_buy(self) -> bool:
        return self.direction == "buy"


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _positive_finite(value: object, param: str, not_positive: str) -> Rejection | None:
    """The refusal of a value that is not a finite number > 0, else None."""
    if not _is_number(value):
        return reject("Invalid params", f"{param}_not_a_number", param)
    assert isinstance(value, int | float)
    if not math.isfinite(value):
        return reject("Invalid params", f"{param}_not_finite", param)
    if value <= 0:
        return reject(not_positive, f"{param}_not_positive", param)
    return None


def check_amount(inst: Instrument, amount: object, param: str = "amount") -> int | Rejection:
    """Lots for ``amount`` or the reason it is refused."""
    refused = _positive_finite(amount, param, "invalid_amount")
    if refused is not None:
        return refused
    assert isinstance(amount, int | float)
    lots = inst.amount_to_lots(float(amount))
    if lots is None or lots < 1:
        message = "non_integer_contract_amount" if inst.kind == "future" else "invalid_amount"
        return reject(message, f"{param}_off_step", param)
    return lots


def check_price(inst: Instrument, price: object, param: str = "price") -> int | Rejection:
    """Ticks for ``price`` or the reason it is refused."""
    if price is None:
        return reject("Invalid params", f"{param}_missing", param)
    refused = _positive_finite(price, param, "invalid_price")
    if refused is not None:
        return refused
    assert isinstance(price, int | float)
    ticks = inst.price_to_ticks(float(price))
    if ticks is None or ticks < 1:
        message = "trigger_price_wrong_tick" if param == "trigger_price" else "price_wrong_tick"
        return reject(message, f"{param}_off_tick", param)
    return ticks


def check_label(label: object) -> Rejection | None:
    if not isinstance(label, str) or len(label) > MAX_LABEL_LENGTH:
        return reject("Invalid params", "label_invalid", "label")
    return None


def check_flags(**flags: object) -> Rejection | None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            return reject("Invalid params", f"{name}_not_bool", name)
    return None


def validate_order(instruments: Mapping[str, Instrument], direction: object,
                   instrument_name: object, amount: object, order_type: object, price: object,
                   time_in_force: object, post_only: object, reject_post_only: object,
                   reduce_only: object, label: object, trigger_price: object,
                   trigger: object) -> OrderRequest | Rejection:
    """All static checks of a buy/sell, in a fixed order; the first failure is returned."""
    if direction not in DIRECTIONS:
        return reject("Invalid params", "direction_invalid", "direction")
    if not isinstance(instrument_name, str) or instrument_name not in instruments:
        return reject("invalid_or_unsupported_instrument", "instrument_unknown",
                      "instrument_name")
    inst = instruments[instrument_name]
    if order_type not in ORDER_TYPES:
        return reject("Invalid params", "type_invalid", "type")
    if time_in_force not in TIMES_IN_FORCE:
        return reject("Invalid params", "time_in_force_invalid", "time_in_force")
    if (bad := check_label(label)) is not None:
        return bad
    bad = check_flags(post_only=post_only, reject_post_only=reject_post_only,
                      reduce_only=reduce_only)
    if bad is not None:
        return bad
    lots = check_amount(inst, amount)
    if isinstance(lots, Rejection):
        return lots
    price_ticks: int | None = None
    if order_type in ("limit", "stop_limit"):
        checked = check_price(inst, price)
        if isinstance(checked, Rejection):
            return checked
        price_ticks = checked
    trigger_ticks: int | None = None
    trigger_kind: Trigger | None = None
    if order_type in ("stop_limit", "stop_market"):
        checked = check_price(inst, trigger_price, "trigger_price")
        if isinstance(checked, Rejection):
            return checked
        trigger_ticks = checked
        trigger = "last_price" if trigger is None else trigger
        if trigger not in TRIGGERS:
            return reject("Invalid params", "trigger_invalid", "trigger")
        trigger_kind = trigger  # type: ignore[assignment]
    if post_only and order_type in ("market", "stop_market"):
        return reject("post_only_not_allowed", "post_only_market", "post_only")
    if post_only and time_in_force != "good_til_cancelled":
        return reject("unsupported_arg_combination", "post_only_with_ioc_fok", "time_in_force")
    return OrderRequest(
        inst=inst, direction=direction, order_type=order_type,  # type: ignore[arg-type]
        lots=lots, price_ticks=price_ticks, time_in_force=time_in_force,  # type: ignore[arg-type]
        post_only=bool(post_only), reject_post_only=bool(reject_post_only),
        reduce_only=bool(reduce_only), label=str(label), trigger_price_ticks=trigger_ticks,
        trigger=trigger_kind)
