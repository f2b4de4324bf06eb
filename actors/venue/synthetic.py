"""Seeded synthetic market data for long runs: regime-switching volatility with jumps.

Model, per step of ``step_s`` seconds and per currency (BTC, ETH, ...):

* a two-state Markov regime shared by all currencies, ``calm`` <-> ``stressed``, leaving calm
  with probability ``step_s / calm_mean_duration_s`` and stressed with
  ``step_s / stressed_mean_duration_s`` (so the stressed share tends to
  ``stressed_mean / (calm_mean + stressed_mean)``);
* log spot return ``-sigma**2 / 2 + sigma * z + J`` with ``sigma = vol_annual *
  sqrt(step_s / year)`` of the current regime, ``z`` standard normals correlated across
  currencies by ``correlation`` (first currency is the driver), and ``J`` the sum of
  ``N ~ Poisson(jump_intensity_per_day * step_s / 86400)`` jumps -- one arrival process for all
  currencies (systemic jumps) with independent ``Normal(jump_mean, jump_std)`` sizes;
* the perpetual trades at ``spot * (1 + basis_bps / 1e4)``; spread and depth come from
  ``DepthModel`` with an effective bar range of ``2 * sigma + |J|`` (in bps), so books widen and
  thin out in the stressed regime and on jumps.

All draws come from one ``numpy.random.Generator(seed)`` in fixed-size chunks in a fixed order,
so the same seed gives the same ticks, whatever the consumer does.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from actors.venue.instruments import SECONDS_PER_YEAR, Instrument
from actors.venue.market_data import (
    DepthModel,
    MarketDataError,
    SourceStats,
    Tick,
    TickBatch,
)

REGIMES: tuple[str, str] = ("calm", "stressed")


@dataclass(frozen=True)
class RegimeParams:
    """Volatility (annualised, decimal) and jumps (log-size mean/std, arrivals per day)."""

    vol_annual: float
    jump_intensity_per_day: float
    jump_mean: float
    jump_std: float

    def check(self, where: str) -> None:
        for name in ("vol_annual", "jump_intensity_per_day", "jump_std"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise MarketDataError(where, name, value, "must be finite and >= 0")
        if not math.isfinite(self.jump_mean):
            raise MarketDataError(where, "jump_mean", self.jump_mean, "must be finite")


@dataclass(frozen=True)
class SyntheticConfig:
    """Generator settings (model in the module doc). ``n_steps=None`` runs forever."""

    seed: int = 0
    start_s: float = 1_700_000_000.0
    step_s: float = 1.0
    n_steps: int | None = None
    initial_prices: tuple[tuple[str, float], ...] = (("BTC", 40_000.0), ("ETH", 2_500.0))
    correlation: float = 0.8
    calm: RegimeParams = RegimeParams(0.50, 1.0, 0.0, 0.005)
    stressed: RegimeParams = RegimeParams(1.50, 24.0, -0.002, 0.01)
    calm_mean_duration_s: float = 6 * 3600.0
    stressed_mean_duration_s: float = 1800.0
    basis_bps: float = 5.0
    depth: DepthModel = field(default_factory=DepthModel)
    chunk_steps: int = 2048

    def __post_init__(self) -> None:
        object.__setattr__(self, "initial_prices", tuple(
            (str(c), float(p)) for c, p in dict(self.initial_prices).items()))
        where = "SyntheticConfig"
        for name in ("step_s", "calm_mean_duration_s", "stressed_mean_duration_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise MarketDataError(where, name, value, "must be finite and > 0")
        if self.step_s > min(self.calm_mean_duration_s, self.stressed_mean_duration_s):
            raise MarketDataError(where, "step_s", self.step_s,
                                  "must not exceed the mean regime durations")
        if not self.initial_prices or any(not (p > 0 and math.isfinite(p))
                                          for _, p in self.initial_prices):
            raise MarketDataError(where, "initial_prices", self.initial_prices,
                                  "needs at least one currency, every price finite and > 0")
        if not -1.0 <= self.correlation <= 1.0:
            raise MarketDataError(where, "correlation", self.correlation, "must be in [-1, 1]")
        if self.n_steps is not None and (not isinstance(self.n_steps, int) or self.n_steps < 0):
            raise MarketDataError(where, "n_steps", self.n_steps, "must be None or an int >= 0")
        if not isinstance(self.chunk_steps, int) or self.chunk_steps < 1:
            raise MarketDataError(where, "chunk_steps", self.chunk_steps, "must be an int >= 1")
        self.calm.check(f"{where}.calm")
        self.stressed.check(f"{where}.stressed")


class SyntheticSource:
    """Ticks for ``<C>-PERPETUAL`` and ``<C>_USDC`` of each configured currency, when listed
    in ``instruments``. Each batch carries its ``regime``; ``regime_counts`` counts the steps
    generated so far per regime."""

    def __init__(self, config: SyntheticConfig, instruments: Mapping[str, Instrument]) -> None:
        self.config = config
        self.stats = SourceStats()
        self._currencies = [c for c, _ in config.initial_prices]
        self._listed = {c: [inst for name in (f"{c}-PERPETUAL", f"{c}_USDC")
                            if (inst := instruments.get(name)) is not None]
                        for c in self._currencies}
        self.regime_counts: Counter[str] = Counter()

    def _chunk(self, rng: np.random.Generator, n: int, state: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
        """Regimes, sigma per step, log returns and jump sizes (n x currencies)."""
        cfg = self.config
        p_leave = (cfg.step_s / cfg.calm_mean_duration_s, cfg.step_s / cfg.stressed_mean_duration_s)
        u = rng.random(n)
        z = rng.standard_normal((n, len(self._currencies)))
        regimes = np.empty(n, dtype=np.int8)
        for i in range(n):
            if u[i] < p_leave[state]:
                state = 1 - state
            regimes[i] = state
        params = (cfg.calm, cfg.stressed)
        vol = np.array([params[r].vol_annual for r in (0, 1)])[regimes]
        sigma = vol * math.sqrt(cfg.step_s / SECONDS_PER_YEAR)
        lam = np.array([params[r].jump_intensity_per_day for r in (0, 1)])[regimes]
        counts = rng.poisson(lam * cfg.step_s / 86_400.0)
        jm = np.array([params[r].jump_mean for r in (0, 1)])[regimes]
        js = np.array([params[r].jump_std for r in (0, 1)])[regimes]
        sizes = rng.standard_normal((n, len(self._currencies)))
        jumps = counts[:, None] * jm[:, None] + np.sqrt(counts)[:, None] * js[:, None] * sizes
        rho = cfg.correlation
        shocks = z.copy()
        if len(self._currencies) > 1:
            shocks[:, 1:] = rho * z[:, :1] + math.sqrt(1.0 - rho * rho) * z[:, 1:]
        log_ret = -0.5 * sigma[:, None] ** 2 + sigma[:, None] * shocks + jumps
        return regimes, sigma, log_ret, jumps, state

    def batches(self) -> Iterator[TickBatch]:
        cfg = self.config
        rng = np.random.default_rng(cfg.seed)
        log_price = np.log(np.array([p for _, p in cfg.initial_prices]))
        state, step = 0, 0
        while cfg.n_steps is None or step < cfg.n_steps:
            n = cfg.chunk_steps if cfg.n_steps is None else min(cfg.chunk_steps,
                                                                cfg.n_steps - step)
            regimes, sigma, log_ret, jumps, state = self._chunk(rng, n, state)
            paths = log_price + np.cumsum(log_ret, axis=0)
            log_price = paths[-1]
            prices = np.exp(paths)
            for i in range(n):
                step += 1
                t = cfg.start_s + step * cfg.step_s
                regime = REGIMES[int(regimes[i])]
                self.regime_counts[regime] += 1
                ticks = []
                for k, currency in enumerate(self._currencies):
                    spot = float(prices[i, k])
                    range_bps = (2.0 * sigma[i] + abs(jumps[i, k])) * 1e4
                    for inst in self._listed[currency]:
                        ticks.append(self._tick(inst, t, spot, range_bps))
                self.stats.batches += 1
                self.stats.ticks += len(ticks)
                yield TickBatch(t, tuple(ticks), source_ts_s=t, regime=regime)

    def _tick(self, inst: Instrument, t: float, spot: float, range_bps: float) -> Tick:
        price = spot * (1.0 + self.config.basis_bps / 1e4) if inst.kind == "future" else spot
        bids, asks = self.config.depth.levels(inst, price, range_bps)
        last = inst.ticks_to_price(max(1, round(price / inst.tick_size)))
        return Tick(t, inst.instrument_name, bids, asks, last, 0.0, spot)
