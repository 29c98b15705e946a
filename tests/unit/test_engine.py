"""The core end to end: golden leveraged-token cases and the DESIGN section 5 invariants."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from shared.core.accounting import BooksOutOfBalance, ProductBook, QuoteOutOfBand, redeem_terms
from shared.core.config import StrategyConfig
from shared.core.engine import Engine, SignalPipeline, Strategy
from shared.core.events import (
    HedgeExecuted,
    InsuranceAdvanced,
    InsuranceClaimPaid,
    InsuranceRepaid,
    LeverageTargetChanged,
    ManagementFeeAccrued,
    ProductUnitsIssued,
    UnheldEquityTaken,
)
from shared.core.features import SnapshotIncompatible
from shared.core.hedging import plan_slices
from shared.core.leverage import (
    Controller,
    LeverageConfig,
    SmartLeverageController,
    model_leverage,
)
from shared.core.market import MAX_FUNDING_RATE, NS_PER_DAY, NS_PER_HOUR, FundingRate, Side, Tick
from shared.core.money import ZERO, nav_of, to_step, usdt_down
from shared.core.products import fixed_strategy, smart_controllers, smart_engine, smart_strategy
from shared.core.venue import PerpVenue
from tests.unit.core_stubs import (
    LONG,
    SHORT,
    SYMBOL,
    T0,
    fast_config,
    frictionless_strategy,
    levered_config,
    regime_state,
    smart_run,
    tick,
)

CAPITAL = Decimal(1_000_000)


def built_at(leverage: float) -> StrategyConfig:
    """The default strategy, its products built at `leverage`."""
    return StrategyConfig(leverage=LeverageConfig(warmup_leverage=leverage))


TICK_NS = NS_PER_HOUR // 4


def daily_3x(prices: list[int], side: Side = Side.LONG) -> Decimal:
    """Return of a 3x token rebalanced daily, no fees, over one price per day."""
    strategy = frictionless_strategy(side, Decimal(3))
    product = strategy.controllers[0].product
    signals = SignalPipeline(SYMBOL, StrategyConfig().features, StrategyConfig().regime)
    for day, price in enumerate(prices):
        market = tick(T0 + day * NS_PER_DAY, price)
        strategy.on_tick(market, signals.on_tick(market.ts_ns, market.price))
        if day == 0:
            strategy.engine.deposit(product, CAPITAL, market.ts_ns)
    start = strategy.engine.books.config.initial_nav
    return strategy.engine.nav(product) / start - 1


@pytest.mark.parametrize(
    ("prices", "expected"),
    [
        ([10_000, 11_000, 10_000], Decimal("-0.0545")),
        ([10_000, 11_000, 12_100], Decimal("0.69")),
        ([10_000, 9_500, 9_000], Decimal("-0.284")),
    ],
)
def test_ftx_faq_golden_cases(prices: list[int], expected: Decimal) -> None:
    # FTX leveraged-token FAQ: BULL 3x, rebalanced daily.
    result = daily_3x(prices)
    assert result.quantize(expected) == expected


def test_golden_case_is_path_dependent_not_3x_the_move() -> None:
    # 10k -> 11k -> 10k: the underlying is flat, a static 3x position would be flat too.
    assert daily_3x([10_000, 11_000, 10_000]) < 0
    assert daily_3x([10_000, 10_000, 10_000]) == 0


# --- paths ---------------------------------------------------------------------------

bounded_moves = st.floats(-0.17, 0.17, allow_nan=False)
"""Single-step moves below 1/leverage_ceiling, with maintenance-margin headroom."""


def _segment() -> st.SearchStrategy[list[float]]:
    calm = st.lists(st.floats(-0.02, 0.02), min_size=1, max_size=40)
    crash = st.lists(st.floats(-0.9, -0.3), min_size=1, max_size=2)
    spike = st.lists(st.floats(0.3, 3.0), min_size=1, max_size=2)
    chop = st.builds(lambda a, n: [a, -a] * n, st.floats(0.01, 0.08), st.integers(2, 20))
    run = st.builds(lambda a, n: [a] * n, st.floats(-0.05, 0.05), st.integers(2, 30))
    return st.one_of(calm, crash, spike, chop, run)


adversarial_paths = st.lists(_segment(), min_size=1, max_size=12).map(
    lambda parts: [m for part in parts for m in part]
)


def prices_from(moves: list[float], start: float = 10_000.0) -> list[Decimal]:
    """Prices on the BTC tick grid, kept inside [10, 1e7] so lots and ticks stay meaningful."""
    prices, price = [Decimal(int(start))], start
    for move in moves:
        price = min(max(price * (1 + move), 10.0), 1e7)
        prices.append(Decimal(round(price * 10)) / 10)
    return prices


def drive(
    config: StrategyConfig,
    prices: list[Decimal],
    snapshot_at: int | None = None,
    products: tuple[str, ...] = (LONG, SHORT),
) -> tuple[list[tuple[Decimal, Decimal]], Engine, list[object]]:
    """Run the smart products over `prices` with capital in `products`; optionally
    snapshot and restore mid-way."""
    signals, strategy = smart_run(config)
    navs, events = [], []
    for i, price in enumerate(prices):
        if i == snapshot_at:
            state = json.loads(json.dumps(snapshot(signals, strategy)))
            signals, strategy = restore(config, state)
        if i == 0:  # seed capital; the first tick builds the positions
            for product in products:
                events.extend(strategy.engine.deposit(product, CAPITAL, T0))
        market = tick(T0 + i * TICK_NS, price)
        events.extend(strategy.on_tick(market, signals.on_tick(market.ts_ns, market.price)))
        navs.append((strategy.engine.nav(LONG), strategy.engine.nav(SHORT)))
    return navs, strategy.engine, events


def snapshot(signals: SignalPipeline, strategy: Strategy) -> dict[str, object]:
    """Everything a restart needs: signals, controllers, books and the venue account."""
    venue = strategy.engine.venue
    assert isinstance(venue, PerpVenue)
    return {
        "signals": signals.snapshot(),
        "controllers": [c.snapshot() for c in strategy.controllers],
        "engine": strategy.engine.snapshot(),
        "venue": venue.snapshot(),
    }


def restore(config: StrategyConfig, state: dict[str, Any]) -> tuple[SignalPipeline, Strategy]:
    signals = SignalPipeline.restore(SYMBOL, config.features, config.regime, state["signals"])
    controllers: list[Controller] = [
        SmartLeverageController.restore(c.product, c.side, config.leverage, snap)
        for c, snap in zip(smart_controllers(SYMBOL, config), state["controllers"], strict=True)
    ]
    venue = PerpVenue.restore(config.instrument(SYMBOL), config.venue, state["venue"])
    engine = smart_engine(SYMBOL, config, venue)
    engine.restore_state(state["engine"])
    return signals, Strategy(controllers, engine)


def venue_state(engine: Engine) -> dict[str, object]:
    assert isinstance(engine.venue, PerpVenue)
    return engine.venue.snapshot()


PROPERTY = settings(
    max_examples=int(os.environ.get("SMARTLEV_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@PROPERTY
@given(adversarial_paths)
def test_nav_stays_positive_and_targets_in_bounds_on_adversarial_paths(moves: list[float]) -> None:
    config = levered_config()
    navs, engine, events = drive(config, prices_from(moves))
    for long_nav, short_nav in navs:
        assert long_nav > 0 and short_nav > 0
    lev = config.leverage
    for event in events:
        if isinstance(event, LeverageTargetChanged):
            assert Decimal(str(lev.l_min)) <= event.target <= Decimal(str(lev.l_max))
    # Books balance: Engine checks after every event and raises; check the end state too.
    engine.books.check_balanced(engine.venue, engine.price)


# Trends lift the target to its cap, then bounded shocks hit it: the dangerous case.
trend_then_shocks = st.lists(
    st.one_of(
        st.builds(lambda a, n: [a] * n, st.floats(-0.03, 0.03), st.integers(10, 60)),
        st.lists(bounded_moves, min_size=1, max_size=6),
    ),
    min_size=1,
    max_size=10,
).map(lambda parts: [m for part in parts for m in part])


@PROPERTY
@given(trend_then_shocks, st.sampled_from([(LONG,), (SHORT,), (LONG, SHORT)]))
def test_venue_account_never_liquidated_when_steps_stay_below_the_bound(
    moves: list[float], products: tuple[str, ...]
) -> None:
    _, engine, _ = drive(levered_config(), prices_from(moves), products=products)
    assert engine.venue.liquidations == 0


@PROPERTY
@given(adversarial_paths)
def test_same_input_same_output_bit_for_bit(moves: list[float]) -> None:
    prices = prices_from(moves)
    first = drive(levered_config(), prices)
    second = drive(levered_config(), prices)
    assert first[0] == second[0]
    assert first[2] == second[2]
    assert first[1].snapshot() == second[1].snapshot()
    assert venue_state(first[1]) == venue_state(second[1])


@PROPERTY
@given(adversarial_paths, st.floats(0, 1))
def test_snapshot_and_restore_mid_run_gives_the_identical_result(
    moves: list[float], where: float
) -> None:
    prices = prices_from(moves)
    cut = 1 + int(where * (len(prices) - 1))
    uninterrupted = drive(levered_config(), prices)
    resumed = drive(levered_config(), prices, snapshot_at=cut)
    assert resumed[0] == uninterrupted[0]
    assert resumed[1].snapshot() == uninterrupted[1].snapshot()
    assert venue_state(resumed[1]) == venue_state(uninterrupted[1])


def test_long_and_short_requests_are_netted_into_one_venue_order() -> None:
    config = fast_config()
    signals, strategy = smart_run(config)
    engine = strategy.engine
    first = tick(T0, 10_000)
    strategy.on_tick(first, signals.on_tick(first.ts_ns, first.price))
    engine.deposit(LONG, CAPITAL, T0)
    engine.deposit(SHORT, CAPITAL, T0)
    # Both products at 1x: +100 BTC long, -100 BTC short (less fees), the venue nets them.
    assert engine.books.products[LONG].qty > 0 > engine.books.products[SHORT].qty
    assert engine.venue.position == (
        engine.books.products[LONG].qty + engine.books.products[SHORT].qty
    )
    assert abs(engine.venue.position) < engine.books.products[LONG].qty / 10


def test_emergency_deleverage_fires_on_the_tick_that_crosses_the_trigger() -> None:
    # built at 3x: at 1x the cut to the floor of the range trades nothing
    config = fast_config().model_copy(update={"leverage": LeverageConfig(warmup_leverage=3.0)})
    signals, strategy = smart_run(config)
    engine = strategy.engine
    start = tick(T0, 10_000)
    strategy.on_tick(start, signals.on_tick(start.ts_ns, start.price))
    engine.deposit(LONG, CAPITAL, T0)
    ref = engine.books.products[LONG].qty
    # A move of exactly emergency_move (10%) down, inside one bar: no bar closes here.
    crash = tick(T0 + 1, 9_000)
    events = strategy.on_tick(crash, signals.on_tick(crash.ts_ns, crash.price))
    decisions = [e for e in events if isinstance(e, LeverageTargetChanged)]
    assert [d.reasons for d in decisions] == [("EMERGENCY_ADVERSE_MOVE",)]
    assert any(isinstance(e, HedgeExecuted) for e in events)
    assert engine.books.products[LONG].qty < ref


def test_tampered_books_are_caught() -> None:
    _, engine, _ = drive(fast_config(), prices_from([0.01, -0.02, 0.03]))
    engine.books.products[LONG].cash += Decimal("0.00000001")
    with pytest.raises(BooksOutOfBalance):
        engine.books.check_balanced(engine.venue, engine.price)


def test_deposit_and_redeem_settle_at_nav_and_keep_the_books() -> None:
    config = fast_config()
    _, engine, _ = drive(config, prices_from([0.01] * 30))
    book = engine.books.products[LONG]
    nav = engine.nav(LONG)
    events = engine.redeem(LONG, book.units / 2, T0 + 40 * TICK_NS)
    redeemed = events[0]
    gross = (book.units * nav).quantize(Decimal("0.00000001"))  # units already halved
    assert redeemed.nav == nav
    assert redeemed.gross == gross
    assert redeemed.payout == redeemed.gross - redeemed.fee
    engine.books.check_balanced(engine.venue, engine.price)


def test_the_last_holder_leaving_never_leaves_a_deficit_for_the_next_depositor() -> None:
    config = fast_config()
    _, engine, _ = drive(config, prices_from([0.01] * 30), products=(LONG,))
    book = engine.books.products[LONG]
    fund_before = engine.books.insurance_fund
    events = engine.redeem(LONG, book.units, T0 + 40 * TICK_NS)
    # Paid at NAV, then the hedge unwound at a cost: the empty product is back at zero.
    assert book.units == 0 and book.qty == 0
    assert book.equity(engine.price) == 0
    claims = [e for e in events if isinstance(e, InsuranceClaimPaid)]
    assert len(claims) == 1 and claims[0].amount > 0
    redeemed = events[0]
    share = (redeemed.fee * config.accounting.insurance_share).quantize(
        Decimal("1e-8"), "ROUND_DOWN"
    )
    assert engine.books.insurance_fund == fund_before + share - claims[0].amount
    engine.books.check_balanced(engine.venue, engine.price)


@pytest.mark.parametrize("order", ["deposit", "redeem"])
def test_an_order_keeps_the_products_leverage_so_the_emergency_rule_still_holds(
    order: str,
) -> None:
    """A 5x long after a rally is at ~2.8x; an order must not re-lever it to target
    behind its controller's back: the controller measures leverage from its last
    rebalance, and its emergency trigger with it. Re-levered, the way back down took the
    product past 60x and its NAV below zero before any emergency fired."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    for product in (f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"):
        engine.deposit(product, Decimal(1_000_000), 0)
    ts = 0

    def tick(price: str) -> None:
        nonlocal ts
        ts += 1
        strategy.on_tick(Tick(SYMBOL, ts, Decimal(price)), None)

    for price in ("30000", "31500", "33000", "34500", "36000", "37500"):
        tick(price)
    long = engine.books.products[f"{SYMBOL}:LONG"]
    before = long.leverage(Decimal(37500))
    if order == "deposit":
        engine.deposit(long.product, Decimal(250_000), ts)
    else:
        engine.redeem(long.product, long.units / 3, ts)
    assert abs(long.leverage(Decimal(37500)) - before) < Decimal("0.01")
    for price in ("36000", "34500", "33000", "31500", "30500", "30000", "29500", "29000"):
        tick(price)
        assert engine.nav(long.product) > 0
        assert long.leverage(Decimal(price)) <= Decimal(config.leverage.l_max) * 2


@pytest.mark.parametrize(
    ("side", "away", "back"),
    [
        (Side.LONG, (30000, 33000, 36000, 37500), (36000, 33000, 31500, 30500, 30000, 29000)),
        (Side.SHORT, (30000, 27000, 25000, 24000), (25000, 27000, 28500, 29500, 30000, 31000)),
    ],
)
def test_a_deposit_into_an_empty_product_stands_where_its_controller_models_it(
    side: Side, away: tuple[int, ...], back: tuple[int, ...]
) -> None:
    """A 5x product's controller anchored at its first mark (nothing held) models 2.78x
    (long) or 2x (short) once the market moved 25% or 20% its way. The first deposit is
    built there, not at 5x: its emergency rules, anchored at the first mark, then watch
    the position it holds. Built at 5x, the way back took it past 60x before the rules,
    reading 5.5x, fired. The mark sits 2% off the trade price, which the model reads."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    product = f"{SYMBOL}:{side.name}"
    ts = 0

    def tick(price: int) -> None:
        nonlocal ts
        ts += 1
        mark = Decimal(price) * Decimal("1.02")
        strategy.on_tick(Tick(SYMBOL, ts, Decimal(price), mark), None)

    for price in away:
        tick(price)
    first_mark, last_mark = away[0] * 1.02, away[-1] * 1.02
    assert strategy.engine.anchors[product] == (5.0, first_mark, 0.0)
    # what hedging restores after a restart carries the anchors: deposit through it
    restored = smart_engine("BTC-USDT", config)
    restored.restore_state(json.loads(json.dumps(strategy.engine.snapshot())))
    strategy.engine = restored
    book = restored.books.products[product]
    assert book.qty == 0
    restored.deposit(product, Decimal(1_000_000), ts)
    modelled = model_leverage(side, 5.0, first_mark, last_mark)
    # at the last trade, or at the mark where that is the worse (a short's mark above
    # it), never above (the hedge's own fee and slippage come out of what it sized on)
    at = [float(book.leverage(Decimal(p))) / modelled for p in (away[-1], last_mark)]
    assert max(at) < 1.001 and min(abs(a - 1) for a in at) < 0.01, at
    for price in back:
        tick(price)
        assert restored.nav(product) > 0
        assert book.leverage(Decimal(price)) <= Decimal(config.leverage.l_max) * 2


def test_a_rebalance_without_an_anchor_voids_the_last_one() -> None:
    """A decision from a leverage service without anchors (an older one in a rolling
    deploy) leaves no stale anchor behind: the product is built at its target."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    product = f"{SYMBOL}:LONG"
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    assert product in engine.anchors
    [decision] = [d for d in strategy.on_tick(Tick(SYMBOL, 2, Decimal(15000)), None)
                  if isinstance(d, LeverageTargetChanged) and d.product == product]  # fmt: skip
    assert decision.rebalance and decision.anchor == 15000.0  # an emergency re-anchors
    engine.on_tick(Tick(SYMBOL, 3, Decimal(15000)), [replace(decision, anchor=None)], False)
    assert product not in engine.anchors
    assert engine.modelled(product) == engine.targets[product]


def quoted_5x_long(
    capital: Decimal, moved_to: Decimal
) -> tuple[StrategyConfig, Engine, ProductBook, Decimal]:
    """A 5x long built at 30,000, its NAV quoted there, then the price moved: what a
    gateway's quote may be settled against."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, capital, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    quoted = engine.nav(long.product)
    strategy.on_tick(Tick(SYMBOL, 2, moved_to), None)
    return config, engine, long, quoted


@pytest.mark.parametrize("quoted", ["1000000000000000000000000000000", "0.00000001", "1050"])
def test_an_order_at_a_quote_far_from_the_books_is_refused_and_moves_nothing(
    quoted: str,
) -> None:
    """A NAV no honest quote could be (1e30: it paid the holders' money and the fund's to
    one close; or a NAV of 1e-8: a deposit bought the product for nothing), and one just
    over ten times the books' (~104.9 after a 1% rise; 100 last settled), moves neither
    the books nor the venue; a quote that old and honest (the NAV at 30,000) settles."""
    _, engine, long, fair = quoted_5x_long(Decimal(100_000), Decimal(30300))
    before = (engine.snapshot(), engine.venue.snapshot())
    for order in (
        lambda: engine.deposit(long.product, Decimal(1000), 3, Decimal(quoted)),
        lambda: engine.redeem(long.product, long.units / 2, 3, Decimal(quoted)),
    ):
        with pytest.raises(QuoteOutOfBand, match="within a factor of 10"):
            order()
        assert (engine.snapshot(), engine.venue.snapshot()) == before
    units = long.units
    engine.deposit(long.product, Decimal(1000), 3, fair)
    assert long.units > units


@pytest.mark.parametrize("moved_to", [30060, 29940, 27000])
def test_orders_in_flight_at_one_quote_all_settle_after_a_large_close_at_it(
    moved_to: int,
) -> None:
    """The gateway quotes one published NAV until the NAV service marks again: a whale
    closing all its units at it, a little stale, moved the NAV of the units left to
    ~718 or ~1 (a 0.2% move), and the band refused the small holder's close at the same
    quote, which its user had been paid already. So did a 10% fall of a 5x product
    before a close quoted at 30,000. The NAV the last order settled at counts too."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    whale = engine.deposit(long.product, Decimal(1_000_000), 0)[0]
    small = engine.deposit(long.product, Decimal(1_000), 0)[0]
    assert isinstance(whale, ProductUnitsIssued) and isinstance(small, ProductUnitsIssued)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    quoted = engine.nav(long.product)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(moved_to)), None)
    engine.redeem(long.product, whale.units, 3, quoted)
    assert not Decimal("0.5") < engine.nav(long.product) / quoted < 2  # moved far
    engine.redeem(long.product, small.units, 4, quoted)
    assert long.units == 0


def test_a_close_at_a_quote_the_market_left_behind_never_takes_nav_below_zero() -> None:
    """The gateway settles at the NAV it quoted, which may be older than the last move: a
    5x long quoted at ~99.68 before a 2% drop, 99% of its units closed at the quote, pays
    out more than the product holds. The insurance fund restores the remaining holders'
    floor (as after a gap); the books still balance to the last unit."""
    config, engine, long, quoted = quoted_5x_long(Decimal(1_000_000), Decimal(29400))
    units = long.units * Decimal("0.99")
    gross, fee = redeem_terms(units, quoted, config.accounting.close_fee)
    events = engine.redeem(long.product, units, 3, quoted, quoted_payout=gross - fee)
    assert any(isinstance(e, InsuranceClaimPaid) for e in events)
    assert engine.nav(long.product) > 0
    engine.books.check_balanced(engine.venue, engine.price)


@pytest.mark.parametrize("leverage", [1.0, 5.0])
def test_a_large_holder_leaving_keeps_the_leverage_of_the_holders_who_stay(
    leverage: float,
) -> None:
    """The unwind's fees and slippage are the product's, and large against what stays:
    sized before them, 99% of a 5x product's units closed left it at 7.3x (above the
    ceiling; the rules, modelling leverage from the price, saw nothing) and a 1x at
    1.06x. One trade, sized on the equity net of its own cost."""
    config = built_at(leverage)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    engine.deposit(long.product, Decimal(10_000), 2)
    before = long.leverage(engine.price)
    equity = long.equity(engine.price)
    events = engine.redeem(long.product, long.units * Decimal("0.99"), 3)
    [hedge] = [e for e in events if isinstance(e, HedgeExecuted)]
    paid = sum(a.fee + a.slippage for a in hedge.allocations)
    assert paid > equity / 100 * Decimal("0.05")  # over 5% of the equity that stays
    lot_leverage = engine.spec.lot_step * engine.price / long.equity(engine.price)
    assert abs(long.leverage(engine.price) - before) <= lot_leverage


@pytest.mark.parametrize("leverage", [1.0, 3.0, 5.0])
@pytest.mark.parametrize("closed", ["0.998", "0.999", "0.9995"])
def test_a_near_total_exit_leaves_those_who_stay_at_most_at_their_target(
    leverage: float, closed: str
) -> None:
    """When unwinding costs more than the equity left, the fund restores the floor of
    those who stay; their new position was sized on the equity before the trade, and
    stood at 100-500x their target (a 1% move then liquidated the account). It is sized
    on what the trade leaves, the floor at least."""
    config = built_at(leverage)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    for side in ("LONG", "SHORT"):
        book = engine.books.products[f"{SYMBOL}:{side}"]
        engine.deposit(book.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    for side in ("LONG", "SHORT"):
        book = engine.books.products[f"{SYMBOL}:{side}"]
        before = max(book.leverage(engine.price), Decimal(str(leverage)))
        engine.redeem(book.product, book.units * Decimal(closed), 2)
        assert book.units and engine.nav(book.product) > 0
        # (within the cost of the second sizing's own difference: a few parts in 1,000)
        assert book.leverage(engine.price) <= before * Decimal("1.005"), (side, book.qty)
    for n, price in enumerate((29700, 30300, 29400), start=3):
        strategy.on_tick(Tick(SYMBOL, n, Decimal(price)), None)
        assert engine.venue.liquidations == 0


def test_a_deposit_at_a_quote_below_the_floor_per_unit_costs_the_fund_nothing() -> None:
    """The floor grew with the units: a deposit bought at a quote below the floor per
    unit was insured at more than it paid, and the fund paid the depositor 36,069 USDT.
    New money is insured at the share a rebalance gives it. (The quote is 1/600 of the
    books' NAV after the whale's exit at it, which `quote_band` refuses by default: the
    insurance rule must hold whatever band is configured.)"""
    config = built_at(5.0)
    config = config.model_copy(
        update={"accounting": config.accounting.model_copy(update={"quote_band": Decimal(1000)})}
    )
    strategy = smart_strategy("BTC-USDT", config)
    engine, sec = strategy.engine, 1_000_000_000
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    big = engine.deposit(short.product, Decimal(500_000), 0)[0]
    assert isinstance(big, ProductUnitsIssued)
    strategy.on_tick(Tick(SYMBOL, 1 * sec, Decimal(30000)), None)
    engine.deposit(short.product, Decimal(20), 2 * sec)
    strategy.on_tick(Tick(SYMBOL, 3 * sec, Decimal(28500)), None)
    quoted = engine.nav(short.product)
    strategy.on_tick(Tick(SYMBOL, 60 * sec, Decimal(28300)), None)
    engine.redeem(short.product, big.units, 61 * sec, quoted)  # at the older quote
    strategy.on_tick(Tick(SYMBOL, 62 * sec, Decimal(28300)), regime_state(warm=False))
    assert short.equity_floor / short.units > quoted  # the floor per unit, above the quote
    fund = engine.books.insurance_fund
    events = engine.deposit(short.product, Decimal(10_000), 63 * sec, quoted)
    assert not [e for e in events if isinstance(e, InsuranceClaimPaid)]
    assert engine.books.insurance_fund >= fund  # (its share of the open fee, if any)


def test_funding_paid_while_an_advance_holds_a_product_up_keeps_its_nav_above_zero() -> None:
    """At a print the mark ignores an advance holds the product on its floor; funding
    settled then took it below (NAV -0.50 until the next tick). The fund advances it."""
    strategy = smart_strategy("BTC-USDT", built_at(5.0))
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, Decimal(10_000), 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(20000), Decimal(30000)), None)
    assert long.insurance_owed > 0
    events = engine.on_funding(FundingRate(SYMBOL, 3, Decimal("0.003")))
    assert any(isinstance(e, InsuranceAdvanced) for e in events)
    assert engine.nav(long.product) > 0 and long.equity(engine.price) >= long.equity_floor


@pytest.mark.parametrize(("side", "print_at"), [(Side.SHORT, 24000), (Side.LONG, 36000)])
def test_a_position_built_at_a_print_the_mark_ignores_is_solvent_at_the_mark(
    side: Side, print_at: int
) -> None:
    """Sized and filled at the print alone, a 5x short built at a print 20% under the
    mark had negative equity at it, and the next tick liquidated the account."""
    strategy = smart_strategy("BTC-USDT", built_at(5.0))
    engine = strategy.engine
    book = engine.books.products[f"{SYMBOL}:{side.name}"]
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(print_at), Decimal(30000)), None)
    engine.deposit(book.product, Decimal(10_000), 3)
    assert book.qty and book.leverage(Decimal(30000)) <= Decimal("5.001")  # at the mark
    assert book.leverage(Decimal(print_at)) <= Decimal("5.001")
    strategy.on_tick(Tick(SYMBOL, 4, Decimal(30000)), None)
    assert engine.venue.liquidations == 0 and engine.nav(book.product) > 0


def test_small_orders_leave_the_position_alone_when_the_mark_lags_the_last_trade() -> None:
    """A live tick carries the last mark, seconds old: capped at the last trade's
    leverage at the mark, every 10 USDT deposit into a 5x long marked 0.1% under its last
    trade sold part of the position (50 deposits: 5.02x -> 4.19x, 384.50 USDT of hedging
    cost to the holders, against 0.68 with no gap)."""
    strategy = smart_strategy("BTC-USDT", built_at(5.0))
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(30000), Decimal(29970)), None)
    before = long.leverage(Decimal(29970))
    for n in range(50):
        events = engine.deposit(long.product, Decimal(10), 3 + n)
        assert all(h.net_qty >= 0 for h in events if isinstance(h, HedgeExecuted))  # buys
    assert abs(long.leverage(Decimal(29970)) / before - 1) < Decimal("0.001")


def test_a_trade_that_costs_more_as_it_grows_is_sized_to_what_it_leaves() -> None:
    """An exit unwinds more as less is kept, and costs more: sized on the equity the
    first size's trade left, a stale close of all of a large holder's units left the
    product at 716x (a coin at 10 USDT, its tick 0.1, 1% of slippage a trade)."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    whale = engine.deposit(long.product, CAPITAL, 0)[0]
    assert isinstance(whale, ProductUnitsIssued)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(10)), None)
    engine.deposit(long.product, Decimal(1665), 2)
    before = long.leverage(engine.price)
    quoted = engine.nav(long.product)
    strategy.on_tick(Tick(SYMBOL, 3, Decimal("10.1")), None)
    engine.redeem(long.product, whale.units, 4, quoted)
    assert long.qty and long.leverage(engine.price) <= before * Decimal("1.01")


def test_a_floor_set_at_its_least_above_the_equity_is_covered_at_once() -> None:
    """An empty product whose last NAV was one quantum takes a deposit at it: the floor,
    at its least (one NAV quantum per unit), stood above the equity the hedge left, and
    the NAV read 0 until the next tick."""
    strategy = smart_strategy("BTC-USDT", built_at(3.0))
    engine = strategy.engine
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    short.last_nav = Decimal("1E-8")
    engine.deposit(short.product, Decimal(10_000), 2, engine.nav(short.product))
    assert short.equity(engine.price) >= short.equity_floor > 0
    assert engine.nav(short.product) > 0


def test_a_rebalance_that_sets_a_floor_above_the_equity_covers_it() -> None:
    """The tick path's rebalance set the floor at its least (one NAV quantum per unit,
    units bought at a NAV of one quantum) above the equity its own trade left: NAV 0 on
    that tick. A benchmark, insured by nobody, gets no floor from a deposit."""
    strategy = smart_strategy("BTC-USDT", built_at(5.0))
    engine = strategy.engine
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    engine.deposit(short.product, Decimal(10_000), 0, Decimal("1e-8"))
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    assert short.qty and short.equity(engine.price) >= short.equity_floor > 0
    assert engine.nav(short.product) > 0
    fixed = fixed_strategy("BTC-USDT", Side.LONG, Decimal(3), StrategyConfig())
    [benchmark] = fixed.engine.books.products.values()
    fixed.engine.deposit(benchmark.product, Decimal(1000), 0)
    fixed.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    fixed.engine.deposit(benchmark.product, Decimal(1000), 2)
    assert benchmark.equity_floor == 0


def test_the_last_dust_of_a_position_keeps_a_nav_to_close_it_at() -> None:
    """All but 1e-8 units closed: the floor scaled to them rounded to 0 USDT, the fund
    restored nothing, and the product stood at NAV 0 for good: its dust could not be
    closed, nor anyone open a position in it again. An insured floor is now at least a
    NAV of one quantum for the units left."""
    strategy = smart_strategy("BTC-USDT", StrategyConfig())
    engine = strategy.engine
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    engine.deposit(short.product, Decimal(100), 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    engine.redeem(short.product, short.units - Decimal("1e-8"), 2)
    assert short.units == Decimal("1e-8") and engine.nav(short.product) > 0
    engine.deposit(short.product, Decimal(1000), 3)  # the product takes deposits again
    engine.redeem(short.product, Decimal("1e-8"), 4)  # and the dust closes
    engine.books.check_balanced(engine.venue, engine.price)


@pytest.mark.parametrize("share", [Decimal(1), Decimal("0.999999")])
def test_a_large_close_at_a_print_the_mark_ignores_is_not_refused_for_margin(
    share: Decimal,
) -> None:
    """A close of (nearly) all of a large short held up by the fund at a print 3.3x its
    mark buys the position back there. That turned the account long (the long product
    holds one), and the venue judged the turning slice on an account whose equity at
    the mark was below zero until the fund's claim after the trade: InsufficientMargin,
    and hedging halted the symbol (real ETH data, 2020-03-13, at the default config).
    The turning part now goes once the fund has made the product whole."""
    strategy = smart_strategy("ETH-USDT", StrategyConfig())
    engine = strategy.engine
    short, long = (engine.books.products[f"ETH-USDT:{side}"] for side in ("SHORT", "LONG"))
    engine.deposit(short.product, Decimal(300_000_000), 1)
    engine.deposit(long.product, Decimal(1_000), 1)
    strategy.on_tick(Tick("ETH-USDT", T0, Decimal(100), Decimal(100)), None)
    strategy.on_tick(Tick("ETH-USDT", T0 + 1, Decimal(330), Decimal(100)), None)
    assert short.insurance_owed > 0 and engine.venue.position < 0  # held up at the print
    fund, before = engine.books.insurance_fund, engine.venue.position
    units = (short.units * share).quantize(Decimal("1e-8"))
    events = engine.redeem(short.product, units, T0 + 2)
    assert engine.venue.position == long.qty + short.qty > 0  # turned, as the books say
    assert engine.books.insurance_fund < fund  # the fund paid the buy-back's loss
    # two orders (to zero, then the rest), one hedge: an event's update carries one
    [hedge] = [e for e in events if isinstance(e, HedgeExecuted)]
    assert hedge.net_qty == engine.venue.position - before == sum(f.qty for f in hedge.fills)
    assert [a.product for a in hedge.allocations] == [short.product]
    # the slices one order plans, the one reaching zero cut in two: an event a build
    # before the split began (and halted on) finds its recorded venue calls unchanged
    planned = plan_slices(
        hedge.net_qty, engine.price, engine.spec.lot_step, engine.hedging.max_slice_notional
    )
    got = [f.qty for f in hedge.fills]
    cut = next(i for i, (qty, plan) in enumerate(zip(got, planned, strict=False)) if qty != plan)
    assert got[cut] + got[cut + 1] == planned[cut] and got[cut + 2 :] == planned[cut + 1 :]
    engine.books.check_balanced(engine.venue, engine.price)


def test_a_large_close_that_costs_more_than_the_product_holds_is_not_refused() -> None:
    """Not held up by the fund (a print above the mark, within the floor): 99.9999% of a
    3e7 short at 5x unwound at a print 19.75% above the mark costs more than the
    product's whole equity, and the turning slice was refused at the mark as well."""
    strategy = smart_strategy("ETH-USDT", built_at(5.0))
    engine = strategy.engine
    short, long = (engine.books.products[f"ETH-USDT:{side}"] for side in ("SHORT", "LONG"))
    engine.deposit(short.product, Decimal(30_000_000), 1)
    engine.deposit(long.product, Decimal(1_000), 1)
    strategy.on_tick(Tick("ETH-USDT", T0, Decimal(100), Decimal(100)), None)
    strategy.on_tick(Tick("ETH-USDT", T0 + 1, Decimal("119.75"), Decimal(100)), None)
    assert short.insurance_owed == 0
    engine.redeem(
        short.product, (short.units * Decimal("0.999999")).quantize(Decimal("1e-8")), T0 + 2
    )
    assert engine.venue.position == long.qty + short.qty > 0
    assert short.equity(engine.price) >= short.equity_floor > 0  # those who stay: floored
    engine.books.check_balanced(engine.venue, engine.price)


def test_a_stale_close_while_an_advance_holds_the_product_up_leaves_a_floor_above_zero() -> None:
    """At a last-trade wick the product is held up by an advance; a close quoted before
    the wick paid out more than the product held, and the product was built anew on
    that negative equity: its floor set below zero, so the fund never restored it and
    the NAV stayed at -97.9 for good. The remaining holders' floor (moved with their
    units) is restored first."""
    strategy = smart_strategy("BTC-USDT", StrategyConfig())
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000), Decimal(30000)), None)
    quoted, floor = engine.nav(long.product), long.equity_floor
    events = strategy.on_tick(Tick(SYMBOL, 2, Decimal(100), Decimal(30000)), None)
    assert any(isinstance(e, InsuranceAdvanced) for e in events)
    engine.redeem(long.product, long.units * Decimal("0.99"), 3, quoted)
    assert long.equity_floor > 0 and engine.nav(long.product) > 0
    assert long.equity(engine.price) >= usdt_down(floor / 100)  # the 1% who stay were owed
    for n in range(1, 4):
        strategy.on_tick(Tick(SYMBOL, 3 + n * NS_PER_HOUR, Decimal(30000)), None)
        assert engine.nav(long.product) > 0


def test_a_close_that_took_all_its_equity_leaves_the_holders_who_stay_hedged() -> None:
    """A close quoted before a 2% drop took all the product's equity: its position was
    sold and the fund restored the floor, but no trade rebuilt it, so the units left had
    no exposure for good (a 1x long stayed at NAV 0.9994 through a 70% rally)."""
    strategy = smart_strategy("BTC-USDT", StrategyConfig())
    engine = strategy.engine
    long = engine.books.products[f"{SYMBOL}:LONG"]
    engine.deposit(long.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    quoted = engine.nav(long.product)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(29400)), None)
    events = engine.redeem(long.product, long.units * Decimal("0.99"), 3, quoted)
    assert sum(isinstance(e, HedgeExecuted) for e in events) == 1  # one trade per order
    assert long.qty > 0 and long.units > 0
    assert abs(long.leverage(engine.price) - engine.modelled(long.product)) < Decimal("0.5")
    nav = engine.nav(long.product)
    strategy.on_tick(Tick(SYMBOL, 4, Decimal(35000)), None)
    assert engine.nav(long.product) > nav * Decimal("1.1")


order_steps = st.lists(
    st.one_of(
        st.tuples(st.just("tick"), st.floats(-0.06, 0.06)),
        st.tuples(st.just("wick"), st.floats(0.5, 0.99)),  # a last trade the mark ignores
        st.tuples(st.just("deposit"), st.integers(10, 2_000_000), st.booleans()),
        st.tuples(st.just("redeem"), st.integers(1, 1000), st.booleans()),  # per mille
    ),
    min_size=1,
    max_size=25,
)


@PROPERTY
@given(order_steps, st.sampled_from([1.0, 3.0, 5.0]))
# found by a review: the venue judged its initial margin at a print the mark ignores
# (21.7x there, ~3x at the mark) and refused the short's close
@example(
    [("tick", 0.0)] * 14
    + [("wick", 0.5), ("tick", 0.0), ("deposit", 10, False), ("redeem", 390, True)]
    + [("wick", 0.5), ("redeem", 1, False)],
    3.0,
)
def test_orders_at_fresh_or_stale_quotes_keep_every_nav_above_zero(
    steps: list[tuple[Any, ...]], leverage: float
) -> None:
    """Opens and closes of any size, at the NAV now or at the one quoted a tick before
    (a gateway's quote may be that old), between moves of up to 6%: every product with
    units keeps a NAV above zero and a position (unless too small for a lot), each order
    is hedged in one trade, and the books balance (the engine checks after every call).
    Also across last-trade wicks the mark ignores (the product then held up by an
    insurance advance). A stale quote the books have since moved more than `quote_band`
    away from is refused, and moves nothing."""
    config = built_at(leverage)
    strategy = smart_strategy("BTC-USDT", config)
    ceiling = Decimal(str(config.leverage.leverage_ceiling))
    engine = strategy.engine
    books = [engine.books.products[p] for p in (f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT")]
    for book in books:
        engine.deposit(book.product, CAPITAL, 0)
    price, ts = Decimal(30000), 1
    strategy.on_tick(Tick(SYMBOL, ts, price), None)
    quoted = {b.product: engine.nav(b.product) for b in books}
    for n, (kind, size, *stale) in enumerate(steps):
        ts += NS_PER_HOUR
        book = books[n % 2]
        if kind in ("tick", "wick"):
            quoted = {b.product: engine.nav(b.product) for b in books}
            if kind == "tick":
                price = (price * Decimal(1 + size)).quantize(Decimal("0.1"))
                strategy.on_tick(Tick(SYMBOL, ts, price), None)
            else:
                wick = (price * Decimal(1 - size)).quantize(Decimal("0.1"))
                strategy.on_tick(Tick(SYMBOL, ts, wick, price), None)
            continue
        nav = quoted[book.product] if stale[0] else None
        if nav is not None and nav <= 0:
            continue  # a gateway refuses to quote at such a NAV
        units = (book.units * size / 1000).quantize(Decimal("1e-8"), "ROUND_DOWN")
        if kind == "redeem" and not units:
            continue
        before = (engine.snapshot(), engine.venue.snapshot())
        try:
            if kind == "deposit":
                events = engine.deposit(book.product, Decimal(size), ts, nav)
            else:
                events = engine.redeem(book.product, units, ts, nav)
        except QuoteOutOfBand:  # a stale quote the books moved 2x away from: nothing moves
            assert nav is not None and (engine.snapshot(), engine.venue.snapshot()) == before
            continue
        assert sum(isinstance(e, HedgeExecuted) for e in events) <= 1
        for b in books:
            assert b.units == 0 or engine.nav(b.product) > 0, (b.product, engine.nav(b.product))
            assert b.qty * b.side >= 0, (b.product, b.qty)  # never the other side's position
        if engine.price != engine.mark:  # at a print: sized within the mark's leverage too
            continue
        if book.units and not book.qty:  # too small for a lot, or left unhedged
            exposure = engine.modelled(book.product) * book.equity(engine.price) / engine.price
            assert abs(exposure) < engine.spec.lot_step, (book.product, exposure)
        if book.qty:  # sized net of the order's own costs
            assert book.leverage(engine.price) <= ceiling, (book.product, engine.price)


def test_the_last_holder_leaving_at_a_stale_quote_leaves_no_position_and_no_equity() -> None:
    """All units closed at a NAV quoted before a 2% rise: the product keeps equity that no
    unit holds. It held ~9% of its position, unowned, and the next depositor took its
    gains, or (after a gap past the floor the fund no longer covered, with no units) its
    losses down to a NAV below zero. Now a product without units holds no position and
    no equity: what is left goes to the insurance fund (which pays when it is short)."""
    config, engine, long, quoted = quoted_5x_long(Decimal(100_000), Decimal(30600))
    units = long.units
    assert engine.nav(long.product) > quoted  # the market left the quote behind
    fund = engine.books.insurance_fund
    gross, fee = redeem_terms(units, quoted, config.accounting.close_fee)
    events = engine.redeem(long.product, units, 3, quoted, quoted_payout=gross - fee)
    assert (long.units, long.qty, long.equity(engine.price)) == (0, 0, 0)
    [taken] = [e for e in events if isinstance(e, UnheldEquityTaken)]
    assert taken.amount > 0 and engine.books.insurance_fund >= fund + taken.amount  # + fee share
    engine.books.check_balanced(engine.venue, engine.price)
    engine.deposit(long.product, Decimal(1_000), 4)  # worth what it paid, less the hedge
    net = Decimal(1_000) - usdt_down(Decimal(1_000) * config.accounting.open_fee)
    assert net * Decimal("0.99") < long.equity(engine.price) <= net
    engine.books.check_balanced(engine.venue, engine.price)


@pytest.mark.parametrize("mark_after", [Decimal(101), Decimal(120)])
def test_a_wick_the_mark_ignores_is_floored_by_an_advance_the_recovery_repays(
    mark_after: Decimal,
) -> None:
    """A 3x short, rebalanced at 100; a print at 330 while the mark stays at 100 (the rules
    watch the mark: no emergency, no sale at the wick). At 330 its equity would be far
    below zero; the fund advances it up to its floor, so the NAV shown at that tick is
    the floor's, above zero. The price comes back: the advance is repaid first, also
    when the mark then fires an emergency on that tick (120), and the product, the fund
    and the venue end as if the print had never been."""
    config = built_at(3.0)
    runs = []
    for wick in (True, False):
        strategy = smart_strategy("BTC-USDT", config)
        engine = strategy.engine
        short = engine.books.products[f"{SYMBOL}:SHORT"]
        engine.deposit(short.product, CAPITAL, 0)
        strategy.on_tick(Tick(SYMBOL, 1, Decimal(100), Decimal(100)), None)
        fund, floor = engine.books.insurance_fund, short.equity_floor
        assert floor > 0 and short.qty < 0
        if wick:
            events = strategy.on_tick(Tick(SYMBOL, 2, Decimal(330), Decimal(100)), None)
            [advanced] = [e for e in events if isinstance(e, InsuranceAdvanced)]
            assert not any(isinstance(e, LeverageTargetChanged) for e in events)
            assert short.equity(Decimal(330)) == floor and engine.nav(short.product) > 0
            assert short.insurance_owed == advanced.amount == floor - advanced.equity_before
            engine.books.check_balanced(engine.venue, engine.price)
        events = strategy.on_tick(Tick(SYMBOL, 3, Decimal(101), mark_after), None)
        emergency = any(isinstance(e, LeverageTargetChanged) and e.emergency for e in events)
        assert emergency is (mark_after == 120)
        if wick:
            [repaid] = [e for e in events if isinstance(e, InsuranceRepaid)]
            assert repaid.amount == advanced.amount and short.insurance_owed == 0
        if not emergency:
            assert engine.books.insurance_fund == fund
        engine.books.check_balanced(engine.venue, engine.price)
        books = engine.books
        runs.append((engine.nav(short.product), short.qty, books.insurance_fund, short.cash))
    assert runs[0] == runs[1]


def test_a_partial_recovery_from_a_wick_repays_only_what_the_equity_holds_above_its_floor() -> None:
    """A 3x short built at 100 and held up at a print of 330 (mark 100): the next print,
    200, recovers part of the way. Only the equity above the floor repays the advance;
    repaid whole, the product was left far below zero (NAV about -200). What is still
    owed is repaid as the price comes back to 100, and the fund ends where it began."""
    strategy = smart_strategy("BTC-USDT", built_at(3.0))
    engine = strategy.engine
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    engine.deposit(short.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(100), Decimal(100)), None)
    fund, floor, equity = (
        engine.books.insurance_fund,
        short.equity_floor,
        short.equity(Decimal(100)),
    )
    assert abs(short.leverage(Decimal(100)) - 3) < Decimal("0.05") and floor > 0
    events = strategy.on_tick(Tick(SYMBOL, 2, Decimal(330), Decimal(100)), None)
    [advanced] = [e for e in events if isinstance(e, InsuranceAdvanced)]
    # at 330 it is worth equity + qty x 230 (about 1 - 3 x 2.3 = -5.9 times its equity)
    assert advanced.equity_before == equity + short.qty * 230 < -5 * equity
    assert advanced.amount == floor - advanced.equity_before
    events = strategy.on_tick(Tick(SYMBOL, 3, Decimal(200), Decimal(100)), None)
    [repaid] = [e for e in events if isinstance(e, InsuranceRepaid)]
    # at 200 it holds the floor + |qty| x 130 (~3.9 x equity): it owes floor + ~5.9 x equity
    assert repaid.equity_before == floor - short.qty * 130
    assert repaid.amount == repaid.equity_before - floor < advanced.amount
    assert short.insurance_owed == advanced.amount - repaid.amount > 0
    assert short.equity(Decimal(200)) == floor
    assert engine.nav(short.product) == nav_of(floor, short.units) > 0
    engine.books.check_balanced(engine.venue, engine.price)
    events = strategy.on_tick(Tick(SYMBOL, 4, Decimal(100), Decimal(100)), None)
    [rest] = [e for e in events if isinstance(e, InsuranceRepaid)]
    assert rest.amount == advanced.amount - repaid.amount and short.insurance_owed == 0
    assert engine.books.insurance_fund == fund
    assert short.equity(Decimal(100)) == equity
    engine.books.check_balanced(engine.venue, engine.price)


def test_a_snapshot_from_before_insurance_advances_restores_with_none_owed() -> None:
    book = smart_engine("BTC-USDT", StrategyConfig()).books.products[f"{SYMBOL}:LONG"]
    book.insurance_owed = Decimal("12.5")
    saved = book.to_dict()
    assert type(book).from_dict(saved).insurance_owed == Decimal("12.5")
    del saved["insurance_owed"]
    assert type(book).from_dict(saved).insurance_owed == 0


def test_funding_is_paid_between_products_whose_positions_net_to_zero() -> None:
    """A long and a short of equal size net to nothing at the venue, which then pays no
    funding; the long still owes the short its funding, and the two sum to the venue's 0."""
    strategy = smart_strategy("BTC-USDT", StrategyConfig())
    engine = strategy.engine
    for product in (f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"):
        engine.deposit(product, Decimal(1_000_000), 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    long, short = (engine.books.products[f"{SYMBOL}:{side}"] for side in ("LONG", "SHORT"))
    assert engine.venue.position == 0 and long.qty == -short.qty != 0
    wallet = engine.venue.wallet
    [settled] = engine.on_funding(FundingRate(SYMBOL, 2, Decimal("0.0001")))
    assert dict(settled.allocations) == {
        long.product: long.qty * Decimal(30000) * Decimal("0.0001"),
        short.product: short.qty * Decimal(30000) * Decimal("0.0001"),
    }
    assert long.funding > 0 and short.funding == -long.funding
    assert engine.venue.wallet == wallet
    engine.books.check_balanced(engine.venue, engine.price)


def _order_at_a_print(order: str, size: Decimal) -> tuple[Strategy, ProductBook]:
    """A 3x short held up by an advance at a print of 330 against a mark of 100, then
    `order` ("deposit" of `size` USDT, "redeem" of `size` of its units, or "none"), the
    books checked after it."""
    strategy = smart_strategy("BTC-USDT", built_at(3.0))
    engine = strategy.engine
    short = engine.books.products[f"{SYMBOL}:SHORT"]
    engine.deposit(short.product, CAPITAL, 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(100), Decimal(100)), None)
    strategy.on_tick(Tick(SYMBOL, 2, Decimal(330), Decimal(100)), None)
    assert short.insurance_owed > 0 and short.leverage(Decimal(330)) > 100
    if order == "deposit":
        engine.deposit(short.product, size, 3)
    elif order == "redeem":
        engine.redeem(short.product, usdt_down(short.units * size), 3)
    engine.books.check_balanced(engine.venue, engine.price)
    return strategy, short


@pytest.mark.parametrize("order", ["deposit", "redeem"])
def test_an_order_while_an_advance_is_owed_moves_the_position_with_the_units(
    order: str,
) -> None:
    """At the print the product's leverage is ~1000x. An order scaled the position by
    it (a deposit doubled the short), then the product was rebuilt at the print, which
    made the print's loss real and the whole advance a claim. The position moves with
    the units now: a deposit trades nothing, a close sells its share, and the advance
    stays owed but for the closer's share."""
    _, before = _order_at_a_print("none", ZERO)
    _, short = _order_at_a_print(order, Decimal(10_000) if order == "deposit" else Decimal("0.5"))
    ratio = short.units / before.units
    if order == "deposit":
        assert (short.qty, short.insurance_owed) == (before.qty, before.insurance_owed)
    else:
        assert short.qty == to_step(before.qty * ratio, Decimal("0.001"))
        assert short.insurance_owed == usdt_down(before.insurance_owed * ratio)


@pytest.mark.parametrize(("order", "size"), [("deposit", "1"), ("redeem", "0.00000001")])
def test_a_small_order_at_a_print_costs_nobody_once_it_reverts(order: str, size: str) -> None:
    """Rebuilt at the print, a dust close or a 1 USDT deposit cost the holders 97%
    of their NAV and the fund 5.9M once the print reverted. Now, within 0.1% and 1 USDT
    of where they would be without it."""
    results = []
    for which in ("none", order):
        strategy, short = _order_at_a_print(which, Decimal(size))
        strategy.on_tick(Tick(SYMBOL, 4, Decimal(100), Decimal(100)), None)  # it reverts
        engine = strategy.engine
        engine.books.check_balanced(engine.venue, engine.price)
        results.append((engine.nav(short.product), engine.books.insurance_fund))
    (nav, fund), (nav_after, fund_after) = results
    assert abs(nav_after / nav - 1) < Decimal("0.001") and abs(fund_after - fund) < 1


# Steps of the mark (up to 3%), some of them carrying a last trade the mark ignores: a
# print from 90% under it to 300% over it (a wick), which the books value at.
wick_steps = st.lists(
    st.tuples(st.floats(-0.03, 0.03), st.one_of(st.none(), st.floats(-0.9, 3.0))),
    min_size=1,
    max_size=40,
)


@PROPERTY
@given(wick_steps)
@example([(-0.015625, None), (-0.015625, 1.0), (0.0, None)])  # liquidated, sized at the print
def test_nav_stays_positive_when_the_last_trade_wicks_away_from_the_mark(
    steps: list[tuple[float, float | None]],
) -> None:
    """The rules watch the mark, so a print it ignores forces no sale, while the books
    value every product at that print: at 330 against a mark of 100 a 3x short's NAV
    was -590 unless the fund advanced it to its floor (`Books.advance_floor`). Both
    sides, ticks whose last trade equals the mark and ticks whose does not, the NAV
    shown is above zero after every one, the venue never liquidates the account (a
    rebalance sized at a print twice the mark was insolvent at the mark), and the books
    balance (checked on every call)."""
    config = levered_config()
    signals, strategy = smart_run(config)
    engine = strategy.engine
    for product in (LONG, SHORT):
        engine.deposit(product, CAPITAL, T0)
    mark = 30_000.0
    for i, (move, wick) in enumerate([(0.0, None), *steps]):
        mark = min(max(mark * (1 + move), 10.0), 1e7)
        marked = Decimal(round(mark * 10)) / 10
        trade = marked if wick is None else Decimal(round(mark * (1 + wick) * 10)) / 10
        market = Tick(SYMBOL, T0 + i * TICK_NS, trade, marked)
        strategy.on_tick(market, signals.on_tick(market.ts_ns, market.price))
        for product in (LONG, SHORT):
            assert engine.nav(product) > 0, (i, product, trade, marked, engine.nav(product))
        assert engine.venue.liquidations == 0, (i, trade, marked)
    engine.books.check_balanced(engine.venue, engine.price)


def test_the_management_fee_is_charged_once_per_utc_day_for_the_time_since_the_last() -> None:
    """Hourly bars from 18:00 on one UTC day to 23:00 two days later, each closing a bar:
    the first starts the clock, and the fee is charged on the first bar of each new day
    only, for the time since the last charge (6 hours, then 24), at the configured annual
    rate on the equity at that bar: 2% a year on ~1,000,000 is ~13.70 for 6 hours and
    ~54.79 for a day. Charged on every bar instead, it is 24 small charges a day, each
    rounded down to the USDT quantum on its own."""
    engine = smart_engine("BTC-USDT", StrategyConfig())
    rate = engine.books.config.management_fee
    assert T0 % NS_PER_DAY == 0 and rate > 0
    start = T0 + 18 * NS_PER_HOUR
    engine.on_tick(Tick(SYMBOL, start, Decimal(30000)), [], True)
    for product in (LONG, SHORT):
        engine.deposit(product, CAPITAL, start)
    charged: list[ManagementFeeAccrued] = []
    expected: list[ManagementFeeAccrued] = []
    last_charge = start
    for hour in range(19, 72):
        ts, price = T0 + hour * NS_PER_HOUR, Decimal(30000 + 10 * hour)
        if hour % 24 == 0:  # the first bar of a UTC day: the time since the last charge
            fraction = rate * (ts - last_charge) / (365 * NS_PER_DAY)
            for product in (LONG, SHORT):
                equity = engine.books.products[product].equity(price)
                expected.append(ManagementFeeAccrued(product, ts, usdt_down(equity * fraction)))
            last_charge = ts
        events = engine.on_tick(Tick(SYMBOL, ts, price), [], True)
        charged.extend(e for e in events if isinstance(e, ManagementFeeAccrued))
    assert [e.ts_ns for e in expected] == [T0 + d * NS_PER_DAY for d in (1, 1, 2, 2)]
    assert charged == expected
    for fee, hours in zip(charged, (6, 6, 24, 24), strict=True):  # on equity within 3% of
        worked = CAPITAL * rate * hours / (365 * 24)  # the capital: 13.70, 54.79
        assert abs(fee.amount / worked - 1) < Decimal("0.03"), (fee, worked)
    for product in (LONG, SHORT):
        book = engine.books.products[product]
        assert book.management_fees == sum(e.amount for e in charged if e.product == product)
    engine.books.check_balanced(engine.venue, engine.price)


@pytest.mark.parametrize(
    ("long_to", "short_to"), [("1", "5"), ("5", "1"), ("1", "1"), ("5", "5"), ("2.5", "4")]
)
def test_a_netted_rebalance_leaves_both_products_at_or_just_under_target(
    long_to: str, short_to: str
) -> None:
    """A rebalance of both products in one order shares the whole order's costs by size
    (`execute_netted`); each sized before them, or on its own trade's costs alone (the
    impact of the larger net order is larger), ended above target: 5.0328x and 1.0016x
    for 5x and 1x, 100M USDT each. The books end at or under target, within 0.1%."""
    strategy = smart_strategy(SYMBOL, built_at(3.0))
    engine = strategy.engine
    books = [engine.books.products[f"{SYMBOL}:{side}"] for side in ("LONG", "SHORT")]
    for book in books:
        engine.deposit(book.product, Decimal(100_000_000), 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(50000)), None)
    targets = {books[0].product: Decimal(long_to), books[1].product: Decimal(short_to)}
    engine.targets.update(targets)
    events: list[object] = []
    engine._rebalance(2, [(b.product, False) for b in books], events)
    [hedge] = [e for e in events if isinstance(e, HedgeExecuted)]
    assert len(hedge.allocations) == 2  # one order for both
    for book in books:
        held = book.leverage(engine.price)
        assert targets[book.product] * Decimal("0.999") <= held <= targets[book.product]


@settings(max_examples=60, deadline=None)
@given(
    built=st.sampled_from([1.0, 2.0, 3.0, 5.0]),
    rates=st.lists(
        st.decimals(-MAX_FUNDING_RATE, MAX_FUNDING_RATE, places=5), min_size=1, max_size=12
    ),
    ticks_between=st.integers(1, 3),
)
@example(  # a rebalance sized before its own costs left 5.00134x, and funding then 5.50096x
    built=5.0,
    rates=[Decimal(r) for r in ("0", "0", "0.00059", "0.01760", "0.01816", "0.00205")],
    ticks_between=3,
)
def test_funding_never_carries_the_books_past_the_ceiling(
    built: float, rates: list[Decimal], ticks_between: int
) -> None:
    """At a flat price funding alone moves a product's leverage (its position stays):
    whatever the settlements (up to the largest rate the feed admits), the rules see it
    and every tick leaves both products within the ceiling; the engine's anchors model
    it as the controllers do (a deposit into an empty product is built on them). The
    rules model a rebalance as reaching its target: sized before its own costs, it left
    the books a little above it (5.00134x), and a settlement later took them past the
    ceiling unseen (~2% of random runs)."""
    config = built_at(built)
    strategy = smart_strategy(SYMBOL, config)
    for controller in strategy.controllers:
        strategy.engine.deposit(controller.product, Decimal(1_000_000), 0)
    price, ts = Decimal(30000), 0
    ceiling = Decimal(repr(config.leverage.leverage_ceiling))
    for rate in rates:
        for _ in range(ticks_between):
            ts += NS_PER_HOUR
            strategy.on_tick(Tick(SYMBOL, ts, price), None)
            for book in strategy.engine.books.products.values():
                assert book.leverage(price) <= ceiling, (book.product, rate)
        strategy.on_funding(FundingRate(SYMBOL, ts, rate))
        for controller in strategy.controllers:
            drawn = controller.snapshot()["drawn"]
            assert strategy.engine.anchors[controller.product][2] == drawn


def test_a_snapshot_of_a_later_release_is_refused_and_an_older_one_read() -> None:
    """Hedging restores its engine from Redis on every batch: a rollback must not read a
    later release's snapshot as far as it goes (the release before this one dropped what
    funding drew from each anchor, silently under `python -O`)."""
    strategy = smart_strategy(SYMBOL, built_at(3.0))
    for controller in strategy.controllers:
        strategy.engine.deposit(controller.product, Decimal(1_000_000), 0)
    strategy.on_tick(Tick(SYMBOL, 1, Decimal(30000)), None)
    strategy.on_funding(FundingRate(SYMBOL, 2, Decimal("0.001")))
    snapshot = json.loads(json.dumps(strategy.engine.snapshot()))
    fresh = smart_engine(SYMBOL, built_at(3.0))
    fresh.restore_state(snapshot)
    assert fresh.anchors == strategy.engine.anchors and all(a[2] for a in fresh.anchors.values())
    with pytest.raises(SnapshotIncompatible, match="engine snapshot version 3"):
        fresh.restore_state({**snapshot, "v": 3})
    older = {**snapshot, "v": 1, "anchors": {p: a[:2] for p, a in snapshot["anchors"].items()}}
    fresh.restore_state(older)
    assert all(a[2] == 0.0 for a in fresh.anchors.values())
    with pytest.raises(ValueError, match="an anchor is"):
        fresh.restore_state({**snapshot, "anchors": {"BTC-USDT:LONG": [1.0]}})


class WatchedVenue(PerpVenue):
    """A venue that records, after each call while the mark is known, its equity over
    its maintenance margin (below 1: a real exchange would liquidate, or refuse)."""

    __slots__ = ("engine", "margins")

    def transfer(self, amount: Decimal) -> None:
        super().transfer(amount)
        self._watch()

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        filled = super().execute(*args, **kwargs)
        self._watch()
        return filled

    def _watch(self) -> None:
        mark = self.engine.mark
        if mark and self.position:
            self.margins.append(self.equity(mark) / self.maintenance_margin(mark))


@pytest.mark.parametrize("closed", ["0.5", "0.99", "0.999"])
def test_a_large_close_keeps_the_account_above_maintenance_while_it_unwinds(closed: str) -> None:
    """The payout left the account before the position was cut to what stays: through
    a 99.9% close of a 5x product the account stood at ~5,000x, its equity below zero
    between slices, a withdrawal a real exchange refuses. It leaves once the position is
    cut now."""
    config = built_at(5.0)
    strategy = smart_strategy("BTC-USDT", config)
    engine = strategy.engine
    venue = WatchedVenue(config.instrument("BTC-USDT"), config.venue)
    venue.engine, venue.margins = engine, []
    engine.venue = venue
    long = "BTC-USDT:LONG"
    engine.deposit(long, Decimal(1_000_000), T0)
    strategy.on_tick(Tick("BTC-USDT", T0, Decimal(30_000)), None)
    assert engine.books.products[long].leverage(engine.price) > 4
    venue.margins.clear()
    units = engine.books.products[long].units
    engine.redeem(long, usdt_down(units * Decimal(closed)), T0 + NS_PER_HOUR)
    assert venue.margins and min(venue.margins) > 1


def test_a_deposit_at_a_print_the_mark_ignores_is_hedged() -> None:
    """The venue judged its initial margin at the last trade: a 5x long at a print 17%
    under an unchanged mark read 27.7x, and a deposit's hedge was refused (hedging then
    halts the symbol). At the mark, where the engine reads risk, it is 5x."""
    config = StrategyConfig(leverage=LeverageConfig(warmup_leverage=5.0))
    strategy = smart_strategy(SYMBOL, config)
    engine = strategy.engine
    strategy.on_tick(Tick(SYMBOL, T0, Decimal(10000), Decimal(10000)), None)
    engine.deposit(LONG, Decimal(100000), T0 + 1)
    strategy.on_tick(Tick(SYMBOL, T0 + 60 * 10**9, Decimal(10000), Decimal(10000)), None)
    assert (
        strategy.on_tick(Tick(SYMBOL, T0 + 120 * 10**9, Decimal(8300), Decimal(10000)), None) == []
    )
    before = engine.venue.position
    engine.deposit(LONG, Decimal(1000), T0 + 121 * 10**9)
    assert engine.venue.position > before
