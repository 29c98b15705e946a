"""The fund's moves reach `hedge.fills`: reconcile's replay of the wire rebuilds the books
exactly through an advance at a wick (repaid, or made a claim by a rebalance) and a last
holder leaving at a stale quote (the fund takes what is left). They were missing from
the wire: the replay was off by the advance (5.9M) and by the unheld equity."""

from __future__ import annotations

from decimal import Decimal

import pytest
from smartlev.v1 import market_pb2, orders_pb2

from services.hedging.messages import hedge_update
from shared.core.config import StrategyConfig
from shared.core.events import (
    InsuranceAdvanced,
    InsuranceRepaid,
    LeverageTargetChanged,
    UnheldEquityTaken,
)
from shared.core.leverage import LeverageConfig
from shared.core.market import Side, Tick
from shared.core.products import smart_strategy
from shared.reconcile import Replay, Report, check_books, check_nav, render

SYMBOL = "BTC-USDT"


@pytest.mark.parametrize("case", ["repaid", "made_a_claim", "unheld"])
def test_the_wire_replays_the_funds_moves_exactly(case: str) -> None:
    config = StrategyConfig(leverage=LeverageConfig(warmup_leverage=3.0))
    strategy = smart_strategy(SYMBOL, config)
    engine = strategy.engine
    side = Side.LONG if case == "unheld" else Side.SHORT
    product = f"{SYMBOL}:{side.name}"
    updates, orders, seen = [], {}, []

    def record(event_id: str, events: list[object], **extra: object) -> None:
        seen.extend(type(e) for e in events)
        updates.append(hedge_update(engine, event_id, events, ts_init_ns=1, **extra))  # type: ignore[arg-type]

    def tick(seq: int, price: int, mark: int, decisions: list[LeverageTargetChanged]) -> None:
        t = Tick(SYMBOL, seq, Decimal(price), Decimal(mark))
        events = strategy.on_tick(t, None) if seq == 1 else engine.on_tick(t, decisions, False)
        market = market_pb2.MarketEvent(
            tick=market_pb2.Tick(
                symbol=SYMBOL, seq=seq, price=str(price), mark_price=str(mark), ts_event_ns=seq
            )
        )
        record(f"{SYMBOL}:{seq}", events, market=market)

    opened = orders_pb2.PositionOpened(
        event_id="o1", product=product, amount="1000000", ts_event_ns=0
    )
    orders["o1"] = orders_pb2.OrderEvent(opened=opened)
    record(f"{SYMBOL}:order:o1", engine.deposit(product, Decimal(1_000_000), 0))
    tick(1, 100, 100, [])
    if case == "unheld":
        quoted = engine.nav(product)
        tick(2, 102, 102, [])
        units = engine.books.products[product].units
        closed = orders_pb2.PositionClosed(
            event_id="o2", product=product, units=str(units), nav=str(quoted), ts_event_ns=3
        )
        orders["o2"] = orders_pb2.OrderEvent(closed=closed)
        record(f"{SYMBOL}:order:o2", engine.redeem(product, units, 3, quoted))
        assert UnheldEquityTaken in seen
    else:
        rebalance = [
            LeverageTargetChanged(
                product, side, 2, Decimal(330), Decimal(1), Decimal(3), True, False, (), "RANGE"
            )
        ]
        tick(2, 330, 100, rebalance if case == "made_a_claim" else [])
        tick(3, 101, 101, [])
        assert InsuranceAdvanced in seen
        assert (InsuranceRepaid in seen) is (case == "repaid")
    engine.books.check_balanced(engine.venue, engine.price)
    replay = Replay(SYMBOL, config, orders).apply_all(updates)
    wrong = [r for r in replay.rows + replay.totals(engine.books, engine.venue) if not r.ok]
    assert not wrong, wrong


def test_a_close_that_turns_the_account_is_one_update_and_replays_exactly() -> None:
    """A close that turns the account's net position goes to the venue as two orders
    (to zero, then the rest, 251), and an update carries one fill: `hedge_update`
    refused the event's two hedges after the venue had filled both, and hedging halted
    the symbol on an ordinary close of the larger side. One hedge, replayed exactly."""
    config = StrategyConfig()
    strategy = smart_strategy(SYMBOL, config)
    engine = strategy.engine
    long, short = f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"
    updates, orders = [], {}
    for n, (product, amount) in enumerate(((long, 10_000), (short, 1_000)), start=1):
        opened = orders_pb2.PositionOpened(
            event_id=f"o{n}", product=product, amount=str(amount), ts_event_ns=0
        )
        orders[f"o{n}"] = orders_pb2.OrderEvent(opened=opened)
        events = engine.deposit(product, Decimal(amount), 0)
        updates.append(hedge_update(engine, f"{SYMBOL}:order:o{n}", events, ts_init_ns=1))  # type: ignore[arg-type]
    events = strategy.on_tick(Tick(SYMBOL, 1, Decimal(100), Decimal(100)), None)
    market = market_pb2.MarketEvent(
        tick=market_pb2.Tick(symbol=SYMBOL, seq=1, price="100", mark_price="100", ts_event_ns=1)
    )
    updates.append(hedge_update(engine, f"{SYMBOL}:1", events, ts_init_ns=1, market=market))  # type: ignore[arg-type]
    assert engine.venue.position > 0  # the long side is the larger
    quoted, units = engine.nav(long), engine.books.products[long].units
    closed = orders_pb2.PositionClosed(
        event_id="o3", product=long, units=str(units), nav=str(quoted), ts_event_ns=2
    )
    orders["o3"] = orders_pb2.OrderEvent(closed=closed)
    events = engine.redeem(long, units, 2, quoted)
    update = hedge_update(engine, f"{SYMBOL}:order:o3", events, ts_init_ns=1)  # type: ignore[arg-type]
    assert engine.venue.position < 0 and update.filled.slices >= 2  # turned: both parts
    updates.append(update)
    replay = Replay(SYMBOL, config, orders).apply_all(updates)
    wrong = [r for r in replay.rows + replay.totals(engine.books, engine.venue) if not r.ok]
    assert not wrong, wrong


def test_an_order_before_any_tick_marks_only_the_products_whose_units_moved() -> None:
    """NAV writes no hash for a product an order left without units, and reconcile
    expected one (six false rows for the other product of a symbol until its first
    tick, "books DO NOT balance", exit 1); a product without a mark expects none."""
    config = StrategyConfig()
    engine = smart_strategy(SYMBOL, config).engine
    long, short = f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"
    opened = orders_pb2.PositionOpened(event_id="o1", product=long, amount="1000", ts_event_ns=1)
    events = engine.deposit(long, Decimal(1000), 1)
    update = hedge_update(engine, f"{SYMBOL}:order:o1", events, ts_init_ns=1)  # type: ignore[arg-type]
    replay = Replay(SYMBOL, config, {"o1": orders_pb2.OrderEvent(opened=opened)})
    replay.apply_all([update])
    assert set(replay.marks) == {long}
    [unmarked] = check_nav(short, None, {})
    assert unmarked.ok
    [stray] = check_nav(short, None, {"nav": "100"})
    assert not stray.ok


@pytest.mark.parametrize("figure", ["sNaN", "NaN", "1E+999999999"])
def test_a_stored_figure_that_is_not_a_number_is_a_difference_not_a_traceback(
    figure: str,
) -> None:
    """A signalling NaN in the NAV hash or in hedging's positions hash was read as a
    Decimal and raised on `==` while the report was rendered, after the checks had
    caught what they catch (reliability 213): a traceback, exit 1. It is a row, named."""
    config = StrategyConfig()
    engine = smart_strategy(SYMBOL, config).engine
    long = f"{SYMBOL}:LONG"
    opened = orders_pb2.PositionOpened(event_id="o1", product=long, amount="1000", ts_event_ns=1)
    events = engine.deposit(long, Decimal(1000), 1)
    update = hedge_update(engine, f"{SYMBOL}:order:o1", events, ts_init_ns=1)  # type: ignore[arg-type]
    replay = Replay(SYMBOL, config, {"o1": orders_pb2.OrderEvent(opened=opened)})
    replay.apply_all([update])
    mark = replay.marks[long]
    stored = {"nav": figure, "equity": "1000", "units": "10", "qty": "0", "price": "1", "seq": "1"}
    positions = {long: figure, f"{SYMBOL}:SHORT": "0", "venue": "0"}
    rows = check_nav(long, mark, stored)
    rows += check_books(SYMBOL, engine.books, engine.venue, Decimal(1), positions=positions)  # type: ignore[arg-type]
    report = Report(rows=rows)
    text = render(report)
    wrong = {(r.check, r.subject) for r in report.rows if not r.ok}
    assert ("nav.nav", long) in wrong
    assert ("hedging.positions", f"{SYMBOL} {long}") in wrong
    assert f"'{figure}', not a number" in text or f"actual {Decimal(figure)}" in text
