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
from shared.core.config import StrategyConfig
from shared.core.engine import SignalPipeline, Strategy
from shared.core.events import HedgeExecuted, InsuranceClaimPaid, LeverageTargetChanged
from shared.core.leverage import SmartLeverageController
from shared.core.market import NS_PER_YEAR, Bar, FundingRate, Side, Tick
from shared.core.money import ZERO
from shared.core.products import SIDES, fixed_strategy, smart_strategy

BENCHMARK_LEVERAGES = (Decimal(1), Decimal(2), Decimal(3))


@dataclass
class ProductSeries:
    """One product's path, sampled at every bar close, and its event counts."""

    product: str
    side: Side
    smart: bool
    navs: list[Decimal] = field(default_factory=list)
    targets: list[float] = field(default_factory=list)
    leverages: list[float] = field(default_factory=list)
    rebalances: int = 0
    emergencies: int = 0
    insurance_claims: int = 0
    insurance_paid: Decimal = ZERO


@dataclass
class BacktestResult:
    symbol: str
    initial_nav: Decimal
    times: list[int]
    prices: list[Decimal]
    regimes: list[str]
    series: dict[str, ProductSeries]
    strategies: list[Strategy]
    ticks: int
    funding_events: int
    covered_ns: int = 0  # the bars' time, first open to last close (the window measured)


def market_events(
    ticks: Iterable[Tick], funding: Iterable[FundingRate]
) -> Iterator[Tick | FundingRate]:
    """Ticks and funding in time order; a funding at the same instant as a tick comes
    first, since it settles on the position held up to that instant."""
    keyed_funding: Iterator[tuple[int, int, Tick | FundingRate]] = (
        (f.ts_ns, 0, f) for f in funding
    )
    keyed_ticks: Iterator[tuple[int, int, Tick | FundingRate]] = ((t.ts_ns, 1, t) for t in ticks)
    for _, _, event in heapq.merge(keyed_funding, keyed_ticks, key=lambda e: (e[0], e[1])):
        yield event


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
    closes). The report has a row per bar close and one for the last tick, where the
    replay ends (a bar closes only on the next bar's first tick, which never comes)."""
    if not bars:
        raise ValueError("no bars to backtest")
    interval = config.features.bar_seconds * 1_000_000_000
    ticks = ticks_from_bars(bars, interval, marks, mode="close" if tick_mode == "close" else "ohlc")
    signals = SignalPipeline(symbol, config.features, config.regime)
    strategies, series = build_strategies(symbol, config, benchmarks)
    covered = bars[-1].open_ts_ns + interval - bars[0].open_ts_ns
    result = BacktestResult(
        symbol, config.accounting.initial_nav, [], [], [], series, strategies, 0, 0, covered
    )
    for strategy in strategies:  # seed capital; the first tick builds the positions
        for controller in strategy.controllers:
            seed = strategy.engine.deposit(controller.product, capital, bars[0].open_ts_ns)
            _count(series, seed)
    last_tick: Tick | None = None
    last_regime: str | None = None  # the regime as of the last bar close
    recorded_last = False  # the last tick has its row
    for event in market_events(ticks, funding):
        if isinstance(event, FundingRate):
            result.funding_events += 1
            for strategy in strategies:
                _count(series, strategy.engine.on_funding(event))
            continue
        result.ticks += 1
        regime = signals.on_tick(event.ts_ns, event.price)
        for strategy in strategies:
            _count(series, strategy.on_tick(event, regime))
        last_tick, recorded_last = event, regime is not None
        if regime is not None:
            last_regime = regime.regime.value
            _record(result, event, last_regime)
        if on_tick is not None:
            on_tick(event, None if regime is None else regime.regime.value, strategies)
        if progress is not None and result.ticks % 4096 == 0:
            progress(result.ticks)
    if last_tick is not None and last_regime is not None and not recorded_last:
        _record(result, last_tick, last_regime)
    if progress is not None:
        progress(result.ticks)
    return result


def _count(series: dict[str, ProductSeries], events: Iterable[object]) -> None:
    for event in events:
        if isinstance(event, LeverageTargetChanged):
            if event.emergency:
                series[event.product].emergencies += 1
        elif isinstance(event, HedgeExecuted):
            for allocation in event.allocations:
                series[allocation.product].rebalances += 1
        elif isinstance(event, InsuranceClaimPaid):
            item = series[event.product]
            item.insurance_claims += 1
            item.insurance_paid += event.amount


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
    """Per product: the figures a user compares products by."""
    years = (result.times[-1] - result.times[0]) / NS_PER_YEAR if len(result.times) > 1 else 0.0
    bars_per_year = (len(result.times) - 1) / years if years > 0 else 0.0
    out: dict[str, dict[str, object]] = {}
    for strategy in result.strategies:
        for controller in strategy.controllers:
            item = result.series[controller.product]
            book = strategy.engine.books.products[controller.product]
            navs = [float(n) for n in item.navs]
            start = float(result.initial_nav)
            final = navs[-1] if navs else start
            out[item.product] = {
                "smart": item.smart,
                "side": item.side.name,
                "final_nav": decimal_to_wire(item.navs[-1] if item.navs else result.initial_nav),
                "total_return": final / start - 1,
                "cagr": _cagr(final / start, result.covered_ns / NS_PER_YEAR),
                "max_drawdown": _max_drawdown(navs),
                "sharpe": _sharpe(navs, bars_per_year),
                "min_nav": decimal_to_wire(min(item.navs) if item.navs else result.initial_nav),
                "avg_leverage": sum(item.leverages) / len(item.leverages)
                if item.leverages
                else 0.0,
                "rebalances": item.rebalances,
                "emergency_deleverages": item.emergencies,
                "trading_fees_paid": decimal_to_wire(book.trading_fees),
                "slippage_paid": decimal_to_wire(book.slippage),
                "management_fees_paid": decimal_to_wire(book.management_fees),
                "funding_paid": decimal_to_wire(book.funding),
                "insurance_claims": item.insurance_claims,
                "insurance_paid": decimal_to_wire(item.insurance_paid),
            }
    return out


def _cagr(growth: float, years: float) -> float | None:
    """The yearly rate of `growth` over the `years` the bars cover (first open to last
    close, where the NAVs run from and to); None under a year (two days up 11%
    annualised to 41,020,095,670%: the figure says nothing then, the total return does)."""
    if years < 1:
        return None
    return growth ** (1 / years) - 1 if growth > 0 else -1.0


def _max_drawdown(navs: Sequence[float]) -> float:
    peak, worst = -math.inf, 0.0
    for nav in navs:
        peak = max(peak, nav)
        if peak > 0:
            worst = max(worst, 1.0 - nav / peak)
    return worst


def _sharpe(navs: Sequence[float], bars_per_year: float) -> float:
    returns = [math.log(b / a) for a, b in itertools.pairwise(navs) if a > 0 and b > 0]
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
        "start": _iso(result.times[0]) if result.times else None,
        "end": _iso(result.times[-1]) if result.times else None,
        "bars": len(result.times),
        "ticks": result.ticks,
        "funding_settlements": result.funding_events,
        "initial_nav": decimal_to_wire(result.initial_nav),
        "products": figures,
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
    return figures


def _iso(ts_ns: int) -> str:
    return datetime.fromtimestamp(ts_ns / 1e9, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
