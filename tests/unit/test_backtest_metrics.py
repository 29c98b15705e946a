"""The backtest's figures on made-up bars small enough to work out by hand: where the
report starts, the lowest NAV and drawdown over every tick, liquidations, the Sharpe
ratio and the summary table's cost columns."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from rich.console import Console

from shared.backtest import (
    NO_REGIME,
    BacktestResult,
    ProductSeries,
    _count,
    metrics,
    run_backtest,
    sharpe_ratio,
    write_metrics,
    write_nav_csv,
)
from shared.cli import summary_table
from shared.core.config import LeverageConfig, StrategyConfig
from shared.core.engine import Strategy
from shared.core.events import (
    HedgeAllocation,
    HedgeExecuted,
    InsuranceAdvanced,
    InsuranceClaimPaid,
    LeverageTargetChanged,
)
from shared.core.market import NS_PER_HOUR, Bar, FundingRate, Side, Tick
from shared.core.products import smart_strategy
from shared.core.regime import Regime
from shared.core.venue import PerpVenue
from tests.unit.core_stubs import regime_state

SYMBOL = "BTC-USDT"
T0 = 1_600_000_000 // 3600 * NS_PER_HOUR  # on the hour
LONG_3X = f"{SYMBOL}:LONG:3X-FIXED"


def bar(hour: int, o: int, h: int, low: int, c: int) -> Bar:
    one = Decimal(1)
    return Bar(
        SYMBOL, T0 + hour * NS_PER_HOUR, Decimal(o), Decimal(h), Decimal(low), Decimal(c), one
    )


def flat(hour: int, price: int) -> Bar:
    return bar(hour, price, price, price, price)


# the first bar falls 40%: the fixed 3x long, built at its open, is liquidated in it
CRASH_IN_THE_FIRST_BAR = [bar(0, 100, 100, 60, 60), flat(1, 60), flat(2, 60)]


def test_the_report_starts_where_the_capital_goes_in() -> None:
    """Capital went in at the first bar's open and the return counted from there, but
    the first row was the first close: a product wiped out in its first bar showed a
    max drawdown of 0.0% (its path began at 0)."""
    result = run_backtest(SYMBOL, CRASH_IN_THE_FIRST_BAR, [], StrategyConfig())
    assert result.times[0] == T0  # the first tick's time (the first bar's open) ...
    assert result.prices[0] == Decimal(100)  # ... and price
    assert result.regimes[0] == NO_REGIME  # no bar has closed yet
    assert result.times[1] == T0 + NS_PER_HOUR  # then the first close
    for item in result.series.values():
        assert item.navs[0] == result.initial_nav
        assert item.leverages[0] == 0.0  # nothing bought before the first tick
    assert result.series[f"{SYMBOL}:LONG:2X-FIXED"].targets[0] == 2.0
    figures = metrics(result)
    assert result.series[LONG_3X].navs[1] == 0  # the case this test is for
    assert figures[LONG_3X]["max_drawdown"] == 1.0
    assert figures[LONG_3X]["total_return"] == -1.0
    # the 1x long fell with the price, 40% and its costs, from the starting NAV
    assert figures[f"{SYMBOL}:LONG:1X-FIXED"]["max_drawdown"] == pytest.approx(0.40, abs=0.005)


def test_the_starting_row_is_in_nav_csv_and_metrics(tmp_path: Path) -> None:
    result = run_backtest(SYMBOL, CRASH_IN_THE_FIRST_BAR, [], StrategyConfig())
    write_nav_csv(result, tmp_path / "nav.csv")
    first = (tmp_path / "nav.csv").read_text().splitlines()[1].split(",")
    assert first[:3] == ["2020-09-13T12:00:00Z", "100", ""]
    assert first[5] == "100.00000000"  # the first product's NAV
    write_metrics(result, tmp_path / "metrics.json")
    document = json.loads((tmp_path / "metrics.json").read_text())
    assert document["start"] == "2020-09-13T12:00:00Z"
    assert document["bars"] == len(CRASH_IN_THE_FIRST_BAR) == len(result.times) - 1


def test_with_one_tick_a_bar_the_report_starts_at_the_first_close_tick() -> None:
    result = run_backtest(SYMBOL, CRASH_IN_THE_FIRST_BAR, [], StrategyConfig(), tick_mode="close")
    assert result.times[0] == T0 + NS_PER_HOUR - 1  # the first tick: the first bar's close
    assert result.prices[0] == Decimal(60)
    assert all(item.navs[0] == result.initial_nav for item in result.series.values())


def test_lowest_nav_and_drawdown_are_over_every_tick_even_below_zero() -> None:
    """The second bar trades down to 60 and back: its closes never show it. With the
    mark held at 100 the fixed 3x long is not liquidated: its NAV goes below zero at
    that tick, and the figures must say so."""
    bars = [flat(0, 100), bar(1, 100, 100, 60, 100), flat(2, 100), flat(3, 100)]
    marks = {b.open_ts_ns: Decimal(100) for b in bars}
    lowest: dict[str, Decimal] = {}
    peaks: dict[str, Decimal] = {}
    deepest: dict[str, Decimal] = {}

    def every_tick(tick: Tick, regime: str | None, strategies: Sequence[Strategy]) -> None:
        for strategy in strategies:
            for product, book in strategy.engine.books.products.items():
                nav = book.nav(tick.price)
                lowest[product] = min(nav, lowest.get(product, nav))
                peaks[product] = max(nav, peaks.get(product, Decimal(100)))
                deepest[product] = max(1 - nav / peaks[product], deepest.get(product, Decimal(0)))

    result = run_backtest(SYMBOL, bars, [], StrategyConfig(), marks=marks, on_tick=every_tick)
    figures = metrics(result)
    for product, row in figures.items():
        assert Decimal(str(row["min_nav"])) == lowest[product], product
        assert row["max_drawdown"] == pytest.approx(float(deepest[product])), product
        if row["side"] == "LONG":  # the dip: every long's NAV was lower than at any close
            assert min(result.series[product].navs) > lowest[product], product
    assert lowest[LONG_3X] < 0  # the case this test is for
    assert Decimal(str(figures[LONG_3X]["min_nav"])) < 0
    deepest_fall = figures[LONG_3X]["max_drawdown"]
    assert isinstance(deepest_fall, float) and deepest_fall > 1
    assert figures[LONG_3X]["venue_liquidations"] == 0


@pytest.mark.parametrize(
    ("navs", "lowest", "deepest"),
    [
        ([100, 50, 200, 60, 210], 50, 0.7),  # the deepest fall is from a later, higher peak
        ([100, 80, 150, 90, 120, 70], 70, 1 - 70 / 150),
        ([100, -20, 0], -20, 1.2),  # below zero: more than all of it lost
        ([100, 100, 101], 100, 0.0),
    ],
)
def test_a_series_keeps_its_lowest_nav_and_deepest_fall_from_a_peak(
    navs: list[int], lowest: int, deepest: float
) -> None:
    item = ProductSeries("P", Side.LONG, False)
    for nav in navs:
        item.observe(Decimal(nav), holds_position=True)
    assert item.lowest_nav == lowest
    assert item.max_drawdown == pytest.approx(deepest)


def test_venue_liquidations_are_counted_for_the_products_they_closed() -> None:
    result = run_backtest(SYMBOL, CRASH_IN_THE_FIRST_BAR, [], StrategyConfig())
    figures = metrics(result)
    assert figures[LONG_3X]["venue_liquidations"] == 1
    for strategy in result.strategies:
        venue = strategy.engine.venue
        assert isinstance(venue, PerpVenue)
        for controller in strategy.controllers:
            counted = figures[controller.product]["venue_liquidations"]
            assert counted == venue.liquidations, controller.product


def test_an_account_liquidation_counts_only_for_a_product_holding_a_position() -> None:
    """The smart long and short share one account: a liquidation closes the positions
    it holds, not a product holding none."""
    holding, idle = ProductSeries("L", Side.LONG, True), ProductSeries("S", Side.SHORT, True)
    holding.observe(Decimal(100), holds_position=True)
    idle.observe(Decimal(100), holds_position=False)
    for item in (holding, idle):
        item.account_liquidated()
    assert (holding.liquidations, idle.liquidations) == (1, 0)


HOURS_A_YEAR = 24 * 365


def test_sharpe_is_on_simple_returns_and_ends_at_a_wipe_out() -> None:
    """Returns +10%, -10%, then -100% to zero: nothing after it (the product is gone)."""
    returns = [0.1, -0.1, -1.0]
    mean = sum(returns) / 3
    std = math.sqrt(sum((r - mean) ** 2 for r in returns) / 2)
    expected = mean / std * math.sqrt(HOURS_A_YEAR)
    assert sharpe_ratio([100, 110, 99, 0, 0, 5], HOURS_A_YEAR) == pytest.approx(expected)
    # below zero at a close is a wipe-out too, counted as -100%
    assert sharpe_ratio([100, 110, 99, -7, 3], HOURS_A_YEAR) == pytest.approx(expected)
    up_down = [0.1, -0.1]
    mean = sum(up_down) / 2
    std = math.sqrt(sum((r - mean) ** 2 for r in up_down))
    assert sharpe_ratio([100, 110, 99], 1) == pytest.approx(mean / std)  # log returns: 0.0


def test_sharpe_is_zero_without_volatility_or_with_one_return() -> None:
    assert sharpe_ratio([100, 100, 100, 100], HOURS_A_YEAR) == 0.0
    assert sharpe_ratio([100, 0], HOURS_A_YEAR) == 0.0
    assert sharpe_ratio([100], HOURS_A_YEAR) == 0.0


def test_summary_table_shows_trading_costs_and_the_management_fee_apart() -> None:
    """The "fees" column was trading fees and slippage only: the 1x long showed 1,340
    while paying 141,473 of management fee."""
    row: dict[str, object] = {
        "smart": False,
        "final_nav": "201.06",
        "total_return": 1.011,
        "cagr": 0.176,
        "max_drawdown": 1.067,
        "sharpe": 0.58,
        "min_nav": "-6.91758075",
        "avg_leverage": 1.0,
        "rebalances": 1560,
        "emergency_deleverages": 0,
        "venue_liquidations": 3,
        "trading_fees_paid": "1000.40",
        "slippage_paid": "340.30",
        "management_fees_paid": "141473.20",
        "funding_paid": "1402484",
    }
    console = Console(width=200, record=True)
    console.print(summary_table({"X:LONG:1X-FIXED": row}))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    values = next(line for line in lines if "X:LONG:1X-FIXED" in line)
    cells = dict(
        zip(
            [c.strip() for c in header.split("┃")[1:-1]],
            [c.strip() for c in values.split("│")[1:-1]],
            strict=True,
        )
    )
    assert cells["trade costs"] == "1,341"
    assert cells["mgmt fees"] == "141,473"
    assert cells["liquidations"] == "3"
    assert cells["min NAV"] == "-6.9176"
    assert cells["max DD"] == "106.7%"


def test_insurance_paid_counts_an_advance_the_product_rebalanced_on() -> None:
    """At a print the mark ignores, the fund advances the product's floor; a rebalance
    on the print makes the advance paid for good, as a claim is. The report counted the
    claims' events only: 555.09 of the 5,876,941.51 the fund paid out (a 3x short at a
    print 3.3x the mark, then a RANGE bar there)."""
    config = StrategyConfig(leverage=LeverageConfig(warmup_leverage=3.0))
    strategy = smart_strategy(SYMBOL, config)
    engine = strategy.engine
    short = f"{SYMBOL}:SHORT"
    engine.deposit(short, Decimal(1_000_000), T0)
    fund = engine.books.insurance_fund
    ticks = [(100, None), (330, None), (330, regime_state(Regime.RANGE))]
    advanced = []
    for hour, (price, regime) in enumerate(ticks, start=1):
        tick = Tick(SYMBOL, T0 + hour, Decimal(price), Decimal(100))
        events = strategy.on_tick(tick, regime)
        advanced += [e for e in events if isinstance(e, InsuranceAdvanced)]
    paid_out = fund - engine.books.insurance_fund
    assert advanced and paid_out > advanced[0].amount > 5_000_000
    series = {
        c.product: ProductSeries(
            c.product, c.side, True, [Decimal(100)], leverages=[3.0], lowest_nav=Decimal(100)
        )
        for c in strategy.controllers
    }
    result = BacktestResult(
        SYMBOL, Decimal(100), [T0, T0 + 3], [], [], series, [strategy], covered_ns=3
    )
    figures = metrics(result)[short]
    assert Decimal(str(figures["insurance_paid"])) == paid_out
    assert figures["insurance_advanced"] == "0"
    # an advance still outstanding is not paid for good: it may yet be repaid
    engine.books.products[short].insurance_owed += Decimal(7)
    figures = metrics(result)[short]
    assert Decimal(str(figures["insurance_paid"])) == paid_out - 7
    assert figures["insurance_advanced"] == "7"


def test_each_count_is_of_its_own_events() -> None:
    """Emergencies, rebalances and claims per product, as the demo's table shows them:
    a rebalance counted as an emergency, a hedge of both products counted for its first
    only, or claims never counted, passed every test before."""
    long, short = f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"
    series = {p: ProductSeries(p, s, True) for p, s in ((long, Side.LONG), (short, Side.SHORT))}
    one, zero = Decimal(1), Decimal(0)

    def decided(product: str, *, emergency: bool) -> LeverageTargetChanged:
        side = Side.LONG if product == long else Side.SHORT
        return LeverageTargetChanged(
            product, side, T0, one, one, one, rebalance=True, emergency=emergency,
            reasons=(), regime="RANGE",
        )  # fmt: skip

    both = HedgeExecuted(
        SYMBOL, T0, one, zero, (), tuple(HedgeAllocation(p, one, one, zero, zero) for p in series)
    )
    events = [
        decided(long, emergency=False),
        decided(short, emergency=True),
        both,
        HedgeExecuted(SYMBOL, T0, one, one, (), (HedgeAllocation(short, one, one, zero, zero),)),
        InsuranceClaimPaid(short, T0, one, zero),
    ]
    _count(series, smart_strategy(SYMBOL, StrategyConfig()), events)
    counted = {p: (s.emergencies, s.rebalances, s.insurance_claims) for p, s in series.items()}
    assert counted == {long: (0, 1, 0), short: (1, 2, 1)}


def test_funding_paid_is_what_a_product_paid_and_negative_what_it_received() -> None:
    """A long pays a positive rate, the short receives it: the report's sign."""
    bars = [flat(hour, 100) for hour in range(12)]
    rates = [FundingRate(SYMBOL, T0 + 8 * NS_PER_HOUR, Decimal("0.001"))]
    figures = metrics(run_backtest(SYMBOL, bars, rates, StrategyConfig(), benchmarks=False))
    assert Decimal(str(figures[f"{SYMBOL}:LONG"]["funding_paid"])) > 0
    assert Decimal(str(figures[f"{SYMBOL}:SHORT"]["funding_paid"])) < 0


def test_average_leverage_leaves_out_the_instant_before_the_capital_is_invested() -> None:
    """The first row, where the capital goes in, is at 0x (the first tick builds the
    position at that same instant): a one-bar 3x token showed 1.50x."""
    result = run_backtest(SYMBOL, [flat(0, 100)], [], StrategyConfig())
    item = result.series[LONG_3X]
    assert item.leverages[0] == 0.0 and len(item.leverages) == 2
    assert metrics(result)[LONG_3X]["avg_leverage"] == item.leverages[1] > 2.9
