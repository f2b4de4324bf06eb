"""Risk limits, the book's trading state and the pre-trade check. Pure: no Ray, no clock.

* :class:`Limits` — frozen, validated (``LimitsError`` names the field and the value). USD
  measures are computed by ``actors.risk``; a limit applies to a measure as written here.
* :class:`TradingStateMachine` — ``ACTIVE`` / ``REDUCING`` / ``HALTED`` as one
  ``(state, trigger) -> state`` table (:data:`TRANSITIONS`) and one ``_transition()`` that
  records ``(ts, from, to, trigger, reason)`` and publishes the change. A pair missing from the
  table means the trigger does not apply in that state (``HALTED`` ignores breaches and
  recoveries; only an operator's ``resume`` leaves it).
* :func:`evaluate` — which trigger the current measures fire, with hysteresis: a breach when a
  measure exceeds its limit, a recovery only once *every* measure is back within
  ``recover_fraction`` of its limit (between the two nothing changes).
* :func:`check` — the pre-trade check. A refused order is data, :class:`OrderDenied` with a
  stable ``reason`` key, the ``limit`` field and the offending ``value``; never an exception.
  A limit blocks an order only if the order would leave the measure above the limit *and*
  larger than before, so an order that reduces an already breached measure still passes.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

# --------------------------------------------------------------------------------------------
# Limits
# --------------------------------------------------------------------------------------------


class LimitsError(ValueError):
    """A limit is invalid; ``field`` and ``value`` name it."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"invalid limit {field_name}={value!r}: {why}")


def _positive_finite(x: object) -> bool:
    return (isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            and x > 0)


@dataclass(frozen=True)
class Limits:
    """The book's limits. Every amount is USD unless the name says otherwise.

    ``max_position_usd``: ``|size| * USD notional per unit`` per instrument (an inverse perp's
    size is already USD; a linear contract's is ``size * mark``; an option's is its underlying
    notional ``size * index``). ``max_position``: optional per-instrument caps on ``|size|`` in
    the instrument's own amount units (USD for inverse perps, coin otherwise).
    ``max_notional_usd``: the sum of every instrument's ``max_position_usd`` measure.
    ``max_abs_delta_usd``: ``|delta * index|`` per underlying (BTC and ETH are not netted).
    ``max_abs_vega_usd``: ``|vega|`` per underlying, USD per one vol point.
    ``max_loss_usd``: drawdown of total P&L (realised + unrealised + funding - fees, in USD)
    from its peak; beyond it the book halts.
    ``max_orders_per_s``: accepted orders per second over a sliding window of
    ``order_window_s`` (at most ``max_orders_per_s * order_window_s`` orders in any window).
    ``recover_fraction``: a REDUCING book returns to ACTIVE once every measure is within this
    fraction of its limit (hysteresis).
    """

    max_position_usd: float = 1_000_000.0
    max_notional_usd: float = 5_000_000.0
    max_abs_delta_usd: float = 1_000_000.0
    max_abs_vega_usd: float = 50_000.0
    max_loss_usd: float = 100_000.0
    max_orders_per_s: float = 10.0
    order_window_s: float = 1.0
    recover_fraction: float = 0.8
    max_position: Mapping[str, float] = field(default_factory=dict)

    POSITIVE_FIELDS = ("max_position_usd", "max_notional_usd", "max_abs_delta_usd",
                       "max_abs_vega_usd", "max_loss_usd", "max_orders_per_s", "order_window_s")

    def __post_init__(self) -> None:
        for name in self.POSITIVE_FIELDS:
            if not _positive_finite(getattr(self, name)):
                raise LimitsError(name, getattr(self, name), "must be a finite number > 0")
            object.__setattr__(self, name, float(getattr(self, name)))
        if not _positive_finite(self.recover_fraction) or self.recover_fraction >= 1.0:
            raise LimitsError("recover_fraction", self.recover_fraction, "must be in (0, 1)")
        if self.max_orders_per_s * self.order_window_s < 1.0:
            raise LimitsError("max_orders_per_s", self.max_orders_per_s,
                              f"allows no order in a {self.order_window_s} s window")
        if not isinstance(self.max_position, Mapping):
            raise LimitsError("max_position", self.max_position, "must map instrument -> size")
        caps = {}
        for name, cap in self.max_position.items():
            if not isinstance(name, str) or not _positive_finite(cap):
                raise LimitsError(f"max_position[{name!r}]", cap, "must be a finite number > 0")
            caps[name] = float(cap)
        object.__setattr__(self, "max_position", dict(sorted(caps.items())))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, base: Limits | None = None) -> Limits:
        """Limits from a dict; fields not given keep ``base``'s values (the defaults if None).
        An unknown key is an error naming it."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                raise LimitsError(str(key), data[key], f"unknown limit; known: {sorted(known)}")
        return dataclasses.replace(base or cls(), **data)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["max_position"] = dict(self.max_position)
        return out


# --------------------------------------------------------------------------------------------
# Trading state
# --------------------------------------------------------------------------------------------


class TradingState(StrEnum):
    ACTIVE = "ACTIVE"        # every order checked against the limits
    REDUCING = "REDUCING"    # only risk-reducing orders pass
    HALTED = "HALTED"        # nothing passes; only an operator's resume leaves it


class Trigger(StrEnum):
    SOFT_BREACH = "soft_breach"    # a position, notional, delta or vega limit exceeded
    LOSS_BREACH = "loss_breach"    # drawdown beyond max_loss_usd
    RECOVERED = "recovered"        # every measure within recover_fraction of its limit
    HALT = "halt"                  # operator kill switch
    RESUME = "resume"              # operator resumes a halted book (into REDUCING)


S, T = TradingState, Trigger
TRANSITIONS: dict[tuple[TradingState, Trigger], TradingState] = {
    (S.ACTIVE, T.SOFT_BREACH): S.REDUCING,
    (S.ACTIVE, T.LOSS_BREACH): S.HALTED,
    (S.ACTIVE, T.HALT): S.HALTED,
    (S.REDUCING, T.RECOVERED): S.ACTIVE,
    (S.REDUCING, T.LOSS_BREACH): S.HALTED,
    (S.REDUCING, T.HALT): S.HALTED,
    (S.HALTED, T.RESUME): S.REDUCING,
}
"""The whole state machine. A pair not listed does not change the state."""
del S, T


@dataclass(frozen=True)
class StateChange:
    ts: float
    from_state: TradingState
    to_state: TradingState
    trigger: Trigger
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"ts": self.ts, "from": self.from_state.value, "to": self.to_state.value,
                "trigger": self.trigger.value, "reason": self.reason}


class TradingStateMachine:
    """The book's trading state. ``on_change`` (if given) is called with each StateChange."""

    def __init__(self, state: TradingState = TradingState.ACTIVE,
                 on_change: Callable[[StateChange], None] | None = None,
                 max_history: int = 1000) -> None:
        self.state = TradingState(state)
        self.history: deque[StateChange] = deque(maxlen=max_history)
        self._on_change = on_change

    def next_state(self, trigger: Trigger) -> TradingState | None:
        """The state ``trigger`` would lead to, or None when it does not apply."""
        return TRANSITIONS.get((self.state, Trigger(trigger)))

    def fire(self, trigger: Trigger, ts: float, reason: str) -> StateChange | None:
        to = self.next_state(trigger)
        return None if to is None else self._transition(to, Trigger(trigger), ts, reason)

    def _transition(self, to: TradingState, trigger: Trigger, ts: float,
                    reason: str) -> StateChange:
        if TRANSITIONS.get((self.state, trigger)) is not to:
            raise AssertionError(f"no transition {self.state.value} --{trigger.value}--> "
                                 f"{to.value}")
        change = StateChange(float(ts), self.state, to, trigger, reason)
        self.state = to
        self.history.append(change)
        if self._on_change is not None:
            self._on_change(change)
        return change

    def to_dict(self) -> dict[str, Any]:
        return {"state": self.state.value, "history": [c.to_dict() for c in self.history]}

    def restore(self, data: Mapping[str, Any]) -> None:
        self.state = TradingState(data["state"])
        self.history.clear()
        for c in data["history"]:
            self.history.append(StateChange(c["ts"], TradingState(c["from"]),
                                            TradingState(c["to"]), Trigger(c["trigger"]),
                                            c["reason"]))


# --------------------------------------------------------------------------------------------
# Measures and their evaluation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Measures:
    """What the limits apply to, as computed by ``actors.risk.RiskState.measures``.

    ``position_usd`` and ``position_size`` per instrument (``|size| * notional per unit`` and
    the signed size in amount units); ``delta_usd`` and ``vega_usd`` per underlying."""

    position_usd: Mapping[str, float] = field(default_factory=dict)
    position_size: Mapping[str, float] = field(default_factory=dict)
    gross_notional_usd: float = 0.0
    delta_usd: Mapping[str, float] = field(default_factory=dict)
    vega_usd: Mapping[str, float] = field(default_factory=dict)
    drawdown_usd: float = 0.0


@dataclass(frozen=True)
class Breach:
    limit: str
    value: float
    threshold: float
    subject: str = ""  # the instrument or underlying

    def describe(self) -> str:
        who = f"{self.subject} " if self.subject else ""
        return f"{self.limit}: {who}{self.value:.6g} > {self.threshold:.6g}"


@dataclass(frozen=True)
class Evaluation:
    trigger: Trigger | None
    breaches: tuple[Breach, ...]
    reason: str


def _over(limit: str, values: Mapping[str, float], threshold: float) -> list[Breach]:
    return [Breach(limit, abs(v), threshold, k) for k, v in sorted(values.items())
            if abs(v) > threshold]


def measure_breaches(m: Measures, limits: Limits, scale: float = 1.0) -> list[Breach]:
    """Every measure above ``scale`` times its limit (``scale < 1``: the recovery band)."""
    out = _over("max_position_usd", m.position_usd, limits.max_position_usd * scale)
    for name, cap in limits.max_position.items():
        size = abs(m.position_size.get(name, 0.0))
        if size > cap * scale:
            out.append(Breach("max_position", size, cap * scale, name))
    if m.gross_notional_usd > limits.max_notional_usd * scale:
        out.append(Breach("max_notional_usd", m.gross_notional_usd,
                          limits.max_notional_usd * scale))
    out += _over("max_abs_delta_usd", m.delta_usd, limits.max_abs_delta_usd * scale)
    out += _over("max_abs_vega_usd", m.vega_usd, limits.max_abs_vega_usd * scale)
    if m.drawdown_usd > limits.max_loss_usd * scale:
        out.append(Breach("max_loss_usd", m.drawdown_usd, limits.max_loss_usd * scale))
    return out


def evaluate(m: Measures, limits: Limits) -> Evaluation:
    """The trigger the measures fire: LOSS_BREACH beats SOFT_BREACH; RECOVERED only when
    every measure is within ``recover_fraction`` of its limit; None in the band between."""
    breaches = measure_breaches(m, limits)
    if any(b.limit == "max_loss_usd" for b in breaches):
        loss = [b for b in breaches if b.limit == "max_loss_usd"]
        return Evaluation(Trigger.LOSS_BREACH, tuple(breaches), loss[0].describe())
    if breaches:
        return Evaluation(Trigger.SOFT_BREACH, tuple(breaches),
                          "; ".join(b.describe() for b in breaches))
    near = measure_breaches(m, limits, limits.recover_fraction)
    if not near:
        return Evaluation(Trigger.RECOVERED, (), f"all measures within "
                          f"{limits.recover_fraction:g} of their limits")
    return Evaluation(None, (), "; ".join(b.describe() for b in near))


# --------------------------------------------------------------------------------------------
# Order rate
# --------------------------------------------------------------------------------------------


class OrderRateWindow:
    """Times of accepted orders, pruned to a sliding window. Times are passed in."""

    def __init__(self, max_kept: int = 100_000) -> None:
        self._times: deque[float] = deque(maxlen=max_kept)

    def recent(self, now_s: float, window_s: float) -> tuple[float, ...]:
        """The order times in ``(now_s - window_s, now_s]`` (older ones are forgotten)."""
        cutoff = now_s - window_s
        while self._times and self._times[0] <= cutoff:
            self._times.popleft()
        return tuple(t for t in self._times if t <= now_s)

    def record(self, now_s: float) -> None:
        self._times.append(float(now_s))


# --------------------------------------------------------------------------------------------
# Pre-trade check
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstrumentRisk:
    """How one unit of an instrument's amount moves the book's measures (from RiskState).

    NaN where no price is known yet (the order is then denied with ``no_price``)."""

    instrument: str
    underlying: str
    size: float
    notional_usd_per_amount: float
    delta_usd_per_amount: float
    vega_usd_per_amount: float = 0.0


@dataclass(frozen=True)
class PreTradeState:
    """Everything :func:`check` looks at, captured at one instant."""

    trading_state: TradingState
    measures: Measures
    instrument: InstrumentRisk | None  # None: not an instrument of this book
    order_times_s: tuple[float, ...] = ()  # accepted orders, at least the last window's


@dataclass(frozen=True)
class OrderAccepted:
    instrument: str
    direction: str
    amount: float
    label: str = ""
    reducing: bool = False
    post_position: float = 0.0
    ok = True

    def to_dict(self) -> dict[str, Any]:
        return {"ok": True, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class OrderDenied:
    """A refused order. ``reason`` is a stable key: ``trading_halted``, ``reducing_only``,
    ``invalid_order``, ``unknown_instrument``, ``no_price``, ``max_order_rate``,
    ``max_position``, ``max_position_usd``, ``max_notional_usd``, ``max_abs_delta_usd``,
    ``max_abs_vega_usd``, ``max_loss_usd``. ``limit`` is the Limits field (or
    ``trading_state`` / the order field), ``value`` what it would have been."""

    reason: str
    limit: str | None = None
    value: float | None = None
    threshold: float | None = None
    detail: str = ""
    instrument: str = ""
    label: str = ""
    ok = False

    def to_dict(self) -> dict[str, Any]:
        return {"ok": False, **dataclasses.asdict(self)}


def _order_fields(order: object) -> tuple[str, str, float, str] | OrderDenied:
    if not isinstance(order, Mapping):
        return OrderDenied("invalid_order", "order", None, detail="order must be a dict")
    name, direction = order.get("instrument_name"), order.get("direction")
    amount, label = order.get("amount"), order.get("label", "") or ""
    if not isinstance(name, str) or not name:
        return OrderDenied("invalid_order", "instrument_name", None, detail=repr(name)[:80])
    if direction not in ("buy", "sell"):
        return OrderDenied("invalid_order", "direction", None, detail=repr(direction)[:80],
                           instrument=name)
    if not _positive_finite(amount):
        return OrderDenied("invalid_order", "amount", None, detail=repr(amount)[:80],
                           instrument=name)
    return name, direction, float(amount), str(label)


def _deny_if_grows(limit: str, before: float, after: float, threshold: float,
                   inst: str, label: str, subject: str = "") -> OrderDenied | None:
    if abs(after) > threshold and abs(after) > abs(before):
        who = f"{subject} " if subject else ""
        return OrderDenied(limit, limit, abs(after), threshold,
                           f"{who}{abs(after):.6g} > {threshold:.6g}", inst, label)
    return None


def check(order: Mapping[str, Any], state: PreTradeState, limits: Limits,
          now_s: float) -> OrderAccepted | OrderDenied:
    """Pre-trade check of ``order`` (``instrument_name``, ``direction``, ``amount``,
    optional ``label``) at ``now_s``. The order rate counts ``state.order_times_s`` in
    ``(now_s - order_window_s, now_s]``; the caller records an accepted order's time.

    An order is *risk-reducing* if it shrinks the instrument's position without flipping it,
    or shrinks the underlying's ``|delta|`` without growing its ``|vega|``."""
    fields = _order_fields(order)
    if isinstance(fields, OrderDenied):
        return fields
    name, direction, amount, label = fields
    if state.trading_state is TradingState.HALTED:
        return OrderDenied("trading_halted", "trading_state", None, None,
                           "the book is HALTED", name, label)
    inst = state.instrument
    if inst is None:
        return OrderDenied("unknown_instrument", "instrument_name", None, None,
                           f"{name} is not traded by this book", name, label)
    window_s = limits.order_window_s
    in_window = sum(1 for t in state.order_times_s if now_s - window_s < t <= now_s)
    if in_window + 1 > limits.max_orders_per_s * window_s:
        return OrderDenied("max_order_rate", "max_orders_per_s", (in_window + 1) / window_s,
                           limits.max_orders_per_s,
                           f"{in_window} orders in the last {window_s:g} s", name, label)
    per_unit = (inst.notional_usd_per_amount, inst.delta_usd_per_amount,
                inst.vega_usd_per_amount)
    if not all(math.isfinite(x) for x in per_unit):
        return OrderDenied("no_price", "instrument_name", None, None,
                           f"no mark or fill price for {name} yet", name, label)
    m = state.measures
    signed = amount if direction == "buy" else -amount
    size0, size1 = inst.size, inst.size + signed
    pos0, pos1 = abs(size0) * per_unit[0], abs(size1) * per_unit[0]
    delta0 = m.delta_usd.get(inst.underlying, 0.0)
    vega0 = m.vega_usd.get(inst.underlying, 0.0)
    delta1, vega1 = delta0 + signed * per_unit[1], vega0 + signed * per_unit[2]
    gross1 = m.gross_notional_usd - pos0 + pos1
    reduces_position = abs(size1) < abs(size0) and size0 * size1 >= 0
    reducing = reduces_position or (abs(delta1) < abs(delta0) and abs(vega1) <= abs(vega0))
    if state.trading_state is TradingState.REDUCING and not reducing:
        return OrderDenied("reducing_only", "trading_state", None, None,
                           "the book is REDUCING: only risk-reducing orders pass", name, label)
    cap = limits.max_position.get(name)
    denials = [
        _deny_if_grows("max_position", size0, size1, cap, name, label, name) if cap else None,
        _deny_if_grows("max_position_usd", pos0, pos1, limits.max_position_usd, name, label,
                       name),
        _deny_if_grows("max_notional_usd", m.gross_notional_usd, gross1,
                       limits.max_notional_usd, name, label),
        _deny_if_grows("max_abs_delta_usd", delta0, delta1, limits.max_abs_delta_usd, name,
                       label, inst.underlying),
        _deny_if_grows("max_abs_vega_usd", vega0, vega1, limits.max_abs_vega_usd, name, label,
                       inst.underlying),
    ]
    for denied in denials:
        if denied is not None:
            return denied
    if m.drawdown_usd > limits.max_loss_usd and not reducing:
        return OrderDenied("max_loss_usd", "max_loss_usd", m.drawdown_usd, limits.max_loss_usd,
                           "drawdown beyond the loss limit", name, label)
    return OrderAccepted(name, direction, amount, label, reducing, size1)
