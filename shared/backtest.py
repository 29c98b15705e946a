"""The backtester: real history through the core, beside fixed-leverage benchmarks.

Smart long and short products share one netted venue account, as in production; every
benchmark token (1x, 2x, 3x, long and short, rebalanced daily) has its own account, so
it pays its own funding, fees and slippage as a standalone token would.
"""

from __future__ import annotations

import csv
import heapq
import itertools
import json
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from shared.codec import decimal_to_wire
from shared.core.bars import ticks_from_bars
from shared.core.config import BENCHMARK_LEVERAGES, StrategyConfig
from shared.core.engine import SignalPipeline, Strategy
from shared.core.events import (
    AccountLiquidated,
    HedgeExecuted,
    InsuranceClaimPaid,
    LeverageTargetChanged,
)
from shared.core.leverage import SmartLeverageController
from shared.core.market import NS_PER_YEAR, Bar, FundingRate, Side, Tick, order_key
from shared.core.products import SIDES, fixed_strategy, smart_strategy

NO_REGIME = ""  # the starting row's: no bar has closed yet
_ABOVE_ALL = Decimal("Infinity")


@dataclass
class ProductSeries:
    """One product's path, sampled where the capital goes in (before the first tick), at
    every bar close and at the last tick; its extremes over every tick, since within an
    hour the NAV goes lower than at either close; and its event counts."""

    product: str
    side: Side
    smart: bool
    navs: list[Decimal] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    leverages: list[float] = field(default_factory=list)
    lowest_nav: Decimal = _ABOVE_ALL
    peak_nav: Decimal = -_ABOVE_ALL
    lowest_since_peak: Decimal = _ABOVE_ALL
    max_drawdown: float = 0.0
    holds_position: bool = False  # after the last tick: what a liquidation would close
    liquidations: int = 0  # venue liquidations of its account that closed its position
    rebalances: int = 0
    emergencies: int = 0
    insurance_claims: int = 0

    def observe(self, nav: Decimal, holds_position: bool) -> None:
        """One tick's NAV into the lowest and the deepest fall from a peak (above 100%
        when the NAV went below zero). Every tick of every product comes here: the fall
        is worked out only at a new low since the peak."""
        if nav > self.peak_nav:
            self.peak_nav = self.lowest_since_peak = nav
            self.lowest_nav = min(self.lowest_nav, nav)  # (the first NAV)
        elif nav < self.lowest_since_peak:
            self.lowest_since_peak = nav
            self.lowest_nav = min(self.lowest_nav, nav)
            if self.peak_nav > 0:
                self.max_drawdown = max(self.max_drawdown, 1.0 - float(nav / self.peak_nav))
        self.holds_position = holds_position

    def account_liquidated(self) -> None:
        """Its account was liquidated: counted when that closed a position it held."""
        if self.holds_position:
            self.liquidations += 1


@dataclass
class BacktestResult:
    symbol: str
    initial_nav: Decimal
    times: list[int]
    prices: list[Decimal]
    regimes: list[str]
    series: dict[str, ProductSeries]
    strategies: list[Strategy]
    ticks: int = 0
    funding_events: int = 0
    covered_ns: int = 0  # the bars' time, first open to last close (the window measured)
    bars: int = 0


def market_events(
    ticks: Iterable[Tick], funding: Iterable[FundingRate]
) -> Iterator[Tick | FundingRate]:
    """Ticks and funding in time order; a funding at the same instant as a tick comes
    first, since it settles on the position held up to that instant."""
    events: tuple[Iterable[Tick | FundingRate], ...] = (funding, ticks)
    yield from heapq.merge(*events, key=order_key)


def build_strategies(
    symbol: str, config: StrategyConfig, benchmarks: bool
) -> tuple[list[Strategy], dict[str, ProductSeries]]:
    strategies = [smart_strategy(symbol, config)]
    if benchmarks:
        strategies += [
            fixed_strategy(symbol, side, leverage, config)
            for leverage in BENCHMARK_LEVERAGES
            for side in SIDES
        ]
    series = {
        c.product: ProductSeries(c.product, c.side, isinstance(c, SmartLeverageController))
        for strategy in strategies
        for c in strategy.controllers
    }
    return strategies, series


def run_backtest(
    symbol: str,
    bars: Sequence[Bar],
    funding: Sequence[FundingRate],
    config: StrategyConfig,
    *,
    capital: Decimal = Decimal(1_000_000),
    marks: dict[int, Decimal] | None = None,
    tick_mode: str = "ohlc",
    benchmarks: bool = True,
    progress: Callable[[int], None] | None = None,
    on_tick: Callable[[Tick, str | None, Sequence[Strategy]], None] | None = None,
) -> BacktestResult:
    """`on_tick(tick, regime or None, strategies)` runs after every tick is applied: a
    per-tick record (the pipeline parity test compares every tick's NAV, not only bar
    closes). The report has a row where the capital goes in (at the first tick's time
    and price, before it is applied), one per bar close and one for the last tick, where
    the replay ends (a bar closes only on the next bar's first tick, which never comes).
    Every tick also feeds each product's lowest NAV and deepest drawdown."""
    if not bars:
        raise ValueError("no bars to backtest")
    interval = config.features.bar_seconds * 1_000_000_000
    ticks = ticks_from_bars(bars, interval, marks, mode="close" if tick_mode == "close" else "ohlc")
    signals = SignalPipeline(symbol, config.features, config.regime)
    strategies, series = build_strategies(symbol, config, benchmarks)
    covered = bars[-1].open_ts_ns + interval - bars[0].open_ts_ns
    result = BacktestResult(
        symbol, config.accounting.initial_nav, [], [], [], series, strategies,
        covered_ns=covered, bars=len(bars),
    )  # fmt: skip
    for strategy in strategies:  # seed capital; the first tick builds the positions
        for controller in strategy.controllers:
            seed = strategy.engine.deposit(controller.product, capital, bars[0].open_ts_ns)
            _count(series, strategy, seed)
    first = next(ticks)
    _record(result, first, NO_REGIME)
    _observe(result, first)
    last_tick = first
    last_regime = NO_REGIME  # the regime as of the last bar close
    recorded_last = False  # the last tick has its row (after it was applied)
    for event in market_events(itertools.chain([first], ticks), funding):
        if isinstance(event, FundingRate):
            result.funding_events += 1
            for strategy in strategies:
                _count(series, strategy, strategy.on_funding(event))
            continue
        result.ticks += 1
        regime = signals.on_tick(event.ts_ns, event.price)
        for strategy in strategies:
            _count(series, strategy, strategy.on_tick(event, regime))
        _observe(result, event)
        last_tick, recorded_last = event, regime is not None
        if regime is not None:
            last_regime = regime.regime.value
            _record(result, event, last_regime)
        if on_tick is not None:
            on_tick(event, None if regime is None else regime.regime.value, strategies)
        if progress is not None and result.ticks % 4096 == 0:
            progress(result.ticks)
    if not recorded_last:
        _record(result, last_tick, last_regime)
    if progress is not None:
        progress(result.ticks)
    return result


def _count(series: dict[str, ProductSeries], strategy: Strategy, events: Iterable[object]) -> None:
    for event in events:
        if isinstance(event, LeverageTargetChanged):
            if event.emergency:
                series[event.product].emergencies += 1
        elif isinstance(event, HedgeExecuted):
            for allocation in event.allocations:
                series[allocation.product].rebalances += 1
        elif isinstance(event, InsuranceClaimPaid):
            series[event.product].insurance_claims += 1
        elif isinstance(event, AccountLiquidated):
            for controller in strategy.controllers:
                series[controller.product].account_liquidated()


def _observe(result: BacktestResult, tick: Tick) -> None:
    for strategy in result.strategies:
        for product, book in strategy.engine.books.products.items():
            result.series[product].observe(book.nav(tick.price), bool(book.qty))


def _record(result: BacktestResult, tick: Tick, regime: str) -> None:
    result.times.append(tick.ts_ns)
    result.prices.append(tick.price)
    result.regimes.append(regime)
    for strategy in result.strategies:
        for controller in strategy.controllers:
            book = strategy.engine.books.products[controller.product]
            item = result.series[controller.product]
            item.navs.append(book.nav(tick.price))
            item.targets.append(float(controller.target))
            item.leverages.append(float(book.leverage(tick.price)))


def metrics(result: BacktestResult) -> dict[str, dict[str, object]]:
    """Per product: the figures a user compares products by. The return and Sharpe run
    over the rows (the starting one included); the lowest NAV and the drawdown over every
    tick."""
    years = (result.times[-1] - result.times[0]) / NS_PER_YEAR
    bars_per_year = (len(result.times) - 1) / years if years > 0 else 0.0
    out: dict[str, dict[str, object]] = {}
    for strategy in result.strategies:
        for controller in strategy.controllers:
            item = result.series[controller.product]
            book = strategy.engine.books.products[controller.product]
            start = float(result.initial_nav)
            final = float(item.navs[-1])
            out[item.product] = {
                "smart": item.smart,
                "side": item.side.name,
                "final_nav": decimal_to_wire(item.navs[-1]),
                "total_return": final / start - 1,
                "cagr": _cagr(final / start, result.covered_ns / NS_PER_YEAR),
                "max_drawdown": item.max_drawdown,
                "sharpe": sharpe_ratio([float(n) for n in item.navs], bars_per_year),
                "min_nav": decimal_to_wire(item.lowest_nav),
                # over the rows after the capital went in: that row's 0x is the instant
                # before the first tick builds the position (a one-bar 3x showed 1.50x)
                "avg_leverage": _mean(item.leverages[1:] or item.leverages),
                "rebalances": item.rebalances,
                "emergency_deleverages": item.emergencies,
                "venue_liquidations": item.liquidations,
                "trading_fees_paid": decimal_to_wire(book.trading_fees),
                "slippage_paid": decimal_to_wire(book.slippage),
                "management_fees_paid": decimal_to_wire(book.management_fees),
                "funding_paid": decimal_to_wire(book.funding),
                "insurance_claims": item.insurance_claims,
                # What the fund put in for good: its claims, and what it advanced at a
                # print the mark ignores that the product rebalanced on (the claims'
                # events alone left those out: 555 shown of 5,876,942 paid); net of
                # what it took back. What is still advanced may yet be repaid.
                "insurance_paid": decimal_to_wire(book.insurance_received - book.insurance_owed),
                "insurance_advanced": decimal_to_wire(book.insurance_owed),
            }
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _cagr(growth: float, years: float) -> float | None:
    """The yearly rate of `growth` over the `years` the bars cover (first open to last
    close, where the NAVs run from and to); None under a year (two days up 11%
    annualised to 41,020,095,670%: the figure says nothing then, the total return does)."""
    if years < 1:
        return None
    return growth ** (1 / years) - 1 if growth > 0 else -1.0


def sharpe_ratio(navs: Sequence[float], bars_per_year: float) -> float:
    """Annualised mean over standard deviation of the simple per-row returns. A step to
    zero or below is a wipe-out: -100%, and the last return (the product is gone)."""
    returns: list[float] = []
    for before, after in itertools.pairwise(navs):
        returns.append(max(after / before - 1, -1.0))
        if after <= 0:
            break
    if len(returns) < 2:
        return 0.0
    mean = sum(returns) / len(returns)
    variance = sum((r - mean) ** 2 for r in returns) / (len(returns) - 1)
    return mean / math.sqrt(variance) * math.sqrt(bars_per_year) if variance > 0 else 0.0


def write_nav_csv(result: BacktestResult, path: Path) -> None:
    """Prices and NAVs exact, in plain notation like the wire's ("0.00000000", not the
    "0E-8" of a product wiped out)."""
    products = list(result.series)
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["timestamp", "price", "regime"]
            + [f"{p}:{column}" for p in products for column in ("target", "leverage", "nav")]
        )
        for i, ts in enumerate(result.times):
            row: list[object] = [_iso(ts), decimal_to_wire(result.prices[i]), result.regimes[i]]
            for p in products:
                item = result.series[p]
                nav = decimal_to_wire(item.navs[i])
                row += [f"{item.targets[i]:.2f}", f"{item.leverages[i]:.4f}", nav]
            writer.writerow(row)


def write_metrics(result: BacktestResult, path: Path) -> dict[str, dict[str, object]]:
    figures = metrics(result)
    document = {
        "symbol": result.symbol,
        "start": _iso(result.times[0]),
        "end": _iso(result.times[-1]),
        "bars": result.bars,
        "ticks": result.ticks,
        "funding_settlements": result.funding_events,
        "initial_nav": decimal_to_wire(result.initial_nav),
        "products": figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return figures


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
