"""Trading state as Ray metrics (``ray.util.metrics``; Prometheus names get a ``ray_`` prefix).

Each actor calls its exporter from a loop it already runs (the connector's publisher, the risk
book's fill and mark handlers); :class:`Throttle` makes that at most once per ``every_s``, so a
metric update never costs more than a few gauge sets per second, whatever the tick rate.

* connector: ``bastion_connector_state{venue, connector}`` (0 STARTING, 1 RECONCILING,
  2 RUNNING, 3 DEGRADED, 4 STOPPED), ``bastion_connector_fills``, ``bastion_connector_open_orders``,
  ``bastion_position{source="connector", owner, instrument}``, and when role-gated
  ``bastion_lease_epoch{venue, connector}`` and ``bastion_role_active{venue, connector}``;
* risk book: ``bastion_position{source="risk_book", owner=book, instrument}``,
  ``bastion_trading_state{book}`` (0 ACTIVE, 1 REDUCING, 2 HALTED), ``bastion_pnl_usd{book}``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from supervisors.metrics import Gauges

__all__ = ["CONNECTOR_STATES", "ConnectorMetrics", "RiskBookMetrics", "Throttle",
           "TRADING_STATES"]

CONNECTOR_STATES = ("STARTING", "RECONCILING", "RUNNING", "DEGRADED", "STOPPED")
TRADING_STATES = ("ACTIVE", "REDUCING", "HALTED")

_GAUGES = {
    "bastion_connector_state": ("connector state: 0 STARTING 1 RECONCILING 2 RUNNING "
                                "3 DEGRADED 4 STOPPED", ("venue", "connector")),
    "bastion_connector_fills": ("fills in the connector's ledger", ("venue", "connector")),
    "bastion_connector_open_orders": ("orders in flight or resting", ("venue", "connector")),
    "bastion_lease_epoch": ("lease epoch the connector's site holds for its venue",
                            ("venue", "connector")),
    "bastion_role_active": ("1 while the connector may order for its site",
                            ("venue", "connector")),
    "bastion_position": ("signed position", ("source", "owner", "instrument")),
    "bastion_trading_state": ("trading state: 0 ACTIVE 1 REDUCING 2 HALTED", ("book",)),
    "bastion_pnl_usd": ("total P&L in USD", ("book",)),
}


class Throttle:
    """``due()`` is true at most once per ``every_s`` (the first call is due)."""

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self._next = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        return True


class _Exporter:
    def __init__(self, every_s: float) -> None:
        self.gauges = Gauges(_GAUGES)
        self.throttle = Throttle(every_s)
        self._instruments: set[str] = set()

    def _positions(self, owner: str, source: str, positions: Mapping[str, float]) -> None:
        # an instrument flat now is exported as 0, not left at its last value
        self._instruments |= set(positions)
        for name in sorted(self._instruments):
            self.gauges.set("bastion_position", float(positions.get(name, 0.0)),
                            {"source": source, "owner": owner, "instrument": name})


class ConnectorMetrics(_Exporter):
    def __init__(self, venue: str, connector: str, every_s: float = 1.0) -> None:
        super().__init__(every_s)
        self.tags = {"venue": venue, "connector": connector}

    def export(self, state: str, fills: int, open_orders: int, positions: Mapping[str, float],
               role: Mapping[str, Any] | None, *, force: bool = False) -> bool:
        if not (force or self.throttle.due()):
            return False
        g = self.gauges
        g.set("bastion_connector_state", float(CONNECTOR_STATES.index(state))
              if state in CONNECTOR_STATES else -1.0, self.tags)
        g.set("bastion_connector_fills", float(fills), self.tags)
        g.set("bastion_connector_open_orders", float(open_orders), self.tags)
        if role and role.get("enabled"):
            g.set("bastion_lease_epoch", float(role.get("epoch") or 0), self.tags)
            g.set("bastion_role_active", 1.0 if role.get("state") == "ACTIVE" else 0.0,
                  self.tags)
        self._positions(self.tags["connector"], "connector", positions)
        return True


class RiskBookMetrics(_Exporter):
    def __init__(self, book: str, every_s: float = 1.0) -> None:
        super().__init__(every_s)
        self.book = book

    def export(self, trading_state: str, positions: Mapping[str, float], pnl_usd: float,
               *, force: bool = False) -> bool:
        if not (force or self.throttle.due()):
            return False
        g = self.gauges
        g.set("bastion_trading_state", float(TRADING_STATES.index(trading_state))
              if trading_state in TRADING_STATES else -1.0, {"book": self.book})
        if math.isfinite(pnl_usd):
            g.set("bastion_pnl_usd", pnl_usd, {"book": self.book})
        self._positions(self.book, "risk_book", positions)
        return True
