"""Fault switches of the venue simulator, as one frozen, validated value.

The server flips them at run time with ``engine.set_faults(replace(engine.faults, ...))``;
nothing here keeps state. Random faults draw from the engine's seeded generators, so a run with
the same seed, inputs and fault settings is reproducible. Latency is not here: the network layer
adds it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class FaultsError(ValueError):
    """A fault setting is invalid; names the field and the value."""

    def __init__(self, field_name: str, value: object, why: str) -> None:
        self.field = field_name
        self.value = value
        super().__init__(f"Faults: invalid {field_name}={value!r}: {why}")


@dataclass(frozen=True)
class Faults:
    """What is currently broken at the venue.

    ``outage``: every call answers ``temporarily_unavailable`` (13028) and market data is not
    applied. ``reject_storm_probability``: each buy/sell/edit is refused with ``other_reject``
    (11030, reason ``reject_storm``) with this probability. ``stale_feed``: published market
    data freezes (no book updates, ticker and book requests answer the last published view)
    while matching goes on against the live market, so resuming shows a ``change_id`` gap.
    ``price_spike_pct``: the next ``price_spike_ticks`` market-data batches are multiplied by
    ``1 + pct/100`` (for ``price_spike_instrument`` or every instrument); the engine clears it
    when consumed. ``withdrawals_suspended``: ``withdraw`` is refused. ``md_*_probability``:
    each published book update is dropped, duplicated or delivered after the next one.
    """

    outage: bool = False
    reject_storm_probability: float = 0.0
    stale_feed: bool = False
    price_spike_pct: float = 0.0
    price_spike_ticks: int = 1
    price_spike_instrument: str | None = None
    withdrawals_suspended: bool = False
    md_drop_probability: float = 0.0
    md_duplicate_probability: float = 0.0
    md_reorder_probability: float = 0.0

    def __post_init__(self) -> None:
        for name in ("reject_storm_probability", "md_drop_probability",
                     "md_duplicate_probability", "md_reorder_probability"):
            p = getattr(self, name)
            if not isinstance(p, int | float) or not math.isfinite(p) or not 0.0 <= p <= 1.0:
                raise FaultsError(name, p, "must be a probability in [0, 1]")
        md_total = self.md_drop_probability + self.md_duplicate_probability
        if md_total > 1.0:
            raise FaultsError("md_duplicate_probability", self.md_duplicate_probability,
                              "md_drop_probability + md_duplicate_probability must be <= 1")
        spike = self.price_spike_pct
        if not isinstance(spike, int | float) or not math.isfinite(spike) or spike <= -100.0:
            raise FaultsError("price_spike_pct", spike, "must be finite and > -100")
        if not isinstance(self.price_spike_ticks, int) or self.price_spike_ticks < 1:
            raise FaultsError("price_spike_ticks", self.price_spike_ticks, "must be an int >= 1")
        for name in ("outage", "stale_feed", "withdrawals_suspended"):
            if not isinstance(getattr(self, name), bool):
                raise FaultsError(name, getattr(self, name), "must be a bool")
