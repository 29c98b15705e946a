"""The NAV service's input check: a HedgeUpdate it cannot mark exactly is refused (a dead
letter with the reason), never marked and published."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from decimal import Decimal

import pytest
from smartlev.v1 import common_pb2, hedging_pb2

from services.hedging.messages import hedge_update
from services.nav.marking import (
    BookState,
    FillsEvent,
    Unmarkable,
    as_last_marked,
    mark,
    marked_update,
    nav_updated,
    parse_update,
    state_fields,
)
from shared import codec
from shared.core.config import StrategyConfig
from shared.core.market import Side, Tick
from shared.core.money import ZERO
from shared.core.products import smart_engine

LONG = "BTC-USDT:LONG"

SYMBOL = "BTC-USDT"
T0 = 1_600_000_000 * 1_000_000_000


def tick_update(seq: int = 1) -> hedging_pb2.HedgeUpdate:
    """What hedging publishes for a tick, built by hedging's own wire builder."""
    engine = smart_engine(SYMBOL, StrategyConfig())
    tick = Tick(SYMBOL, T0, Decimal("43210.5"))
    events = engine.on_tick(tick, (), False)
    market = codec.market_event_from_tick(tick, seq=seq, source="t", ts_init_ns=1)
    return hedge_update(engine, f"{SYMBOL}:{seq}", events, ts_init_ns=1, market=market)


def negative_units(update: hedging_pb2.HedgeUpdate) -> None:
    update.products[0].units = "-1.00000000"


def a_negative_target(update: hedging_pb2.HedgeUpdate) -> None:
    update.products[0].target_leverage = "-7"


def a_negative_advance(update: hedging_pb2.HedgeUpdate) -> None:
    update.products[1].insurance_owed = "-5"


def a_stranger_book(update: hedging_pb2.HedgeUpdate) -> None:
    update.products[1].product = "ETH-USDT:SHORT"


def no_books(update: hedging_pb2.HedgeUpdate) -> None:
    del update.products[:]


def no_seq(update: hedging_pb2.HedgeUpdate) -> None:
    update.market.tick.seq = 0


def a_zero_price(update: hedging_pb2.HedgeUpdate) -> None:
    update.market.tick.price = "0"


def a_seq_past_2_53(update: hedging_pb2.HedgeUpdate) -> None:
    """Redis's Lua compares seqs as doubles: 2^53 + 1 and + 2 were one seq, and every
    tick after the first was published, then not written (DUPLICATE)."""
    update.market.tick.seq = 2**53 + 1


def a_price_finer_than_the_books(update: hedging_pb2.HedgeUpdate) -> None:
    update.market.tick.price = "43210.5000000000001"


def a_price_past_the_highest(update: hedging_pb2.HedgeUpdate) -> None:
    update.market.tick.price = "5" + "0" * 37


def an_empty_products_nav_of_zero(update: hedging_pb2.HedgeUpdate) -> None:
    """Published as it is (its NAV with no units), and the gateway sold at it."""
    update.products[0].units = "0"
    update.products[0].last_nav = "0"


def a_brace_in_the_symbol(update: hedging_pb2.HedgeUpdate) -> None:
    """A hash tag Redis keys cannot carry (it stopped the stage at its first read)."""
    update.market.tick.symbol = "A{B"
    for book, side in zip(update.products, ("LONG", "SHORT"), strict=True):
        book.product = f"A{{B:{side}"


def an_order_of_two_symbols(update: hedging_pb2.HedgeUpdate) -> None:
    update.ClearField("market")
    update.products[1].product = "ETH-USDT:SHORT"


def a_product_of_three_parts(update: hedging_pb2.HedgeUpdate) -> None:
    update.products[0].product = "BTC-USDT:LONG:X"


def a_product_twice(update: hedging_pb2.HedgeUpdate) -> None:
    """Marked twice under one event id: Redis kept the first, nav.latest the last."""
    update.products.add().CopyFrom(update.products[0])


def test_a_regime_this_build_does_not_know_is_marked_as_unspecified() -> None:
    """A rolling deploy puts a newer regime stage ahead of NAV: its new regime number,
    carried through hedging, dead-lettered every tick update, and the NAV froze."""
    update = tick_update(7)
    update.regime = 99
    event = parse_update(update)
    assert (event.kind, event.seq, event.regime) == ("tick", 7, common_pb2.REGIME_UNSPECIFIED)
    assert [b.product for b in event.books] == [f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"]


def test_a_valid_update_parses_with_every_book() -> None:
    event = parse_update(tick_update(7))
    assert (event.kind, event.symbol, event.seq, event.price) == (
        "tick",
        SYMBOL,
        7,
        Decimal("43210.5"),
    )
    assert [b.product for b in event.books] == [f"{SYMBOL}:LONG", f"{SYMBOL}:SHORT"]


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (negative_units, r"BTC-USDT:LONG.units must be >= 0, got -1"),
        (a_negative_target, r"BTC-USDT:LONG.target_leverage must be >= 0, got -7"),
        (a_negative_advance, r"BTC-USDT:SHORT.insurance_owed must be >= 0, got -5"),
        (a_stranger_book, r"books of \['ETH-USDT:SHORT'\] on a 'BTC-USDT' tick"),
        (no_books, "carries no product books"),
        (no_seq, "tick seq is missing"),
        (a_zero_price, "tick price must be > 0"),
        (a_seq_past_2_53, "tick seq must be below 2\\^53, got 9007199254740993"),
        (a_price_finer_than_the_books, "tick.price has 13 decimal places, more than 12"),
        (a_price_past_the_highest, "tick.price 5000+ is above the highest price taken"),
        (an_empty_products_nav_of_zero, "BTC-USDT:LONG.last_nav must be > 0, got 0"),
        (a_brace_in_the_symbol, r"product 'A\{B:LONG': symbol 'A\{B' must be 1-40 characters"),
        (an_order_of_two_symbols, r"books of \['ETH-USDT:SHORT'\] on a 'BTC-USDT' order"),
        (a_product_of_three_parts, "is not <symbol>:LONG or <symbol>:SHORT"),
        (a_product_twice, "a product's books come more than once"),
    ],
)
def test_an_update_that_cannot_be_marked_exactly_is_refused(
    spoil: Callable[[hedging_pb2.HedgeUpdate], None], reason: str
) -> None:
    update = tick_update()
    spoil(update)
    with pytest.raises(ValueError, match=reason):
        parse_update(update)


@pytest.mark.parametrize(
    ("qty", "units", "cash"),
    [
        ("9" * 39, None, None),  # worth more than 40 integer digits at any real price
        (None, "0." + "0" * 39 + "1", "9" * 39),  # a NAV of ~1e79 per unit
    ],
)
def test_books_past_what_a_nav_can_be_are_unmarkable(
    qty: str | None, units: str | None, cash: str | None
) -> None:
    """Each figure is within the wire's range (it parses); the NAV it makes is not."""
    update = tick_update()
    book = update.products[0]
    book.qty, book.units, book.cash = qty or book.qty, units or book.units, cash or book.cash
    event = parse_update(update)
    assert event.price is not None
    with pytest.raises(Unmarkable, match=r"BTC-USDT:LONG: its books cannot be marked at 43210\.5"):
        marked_update(event.books[0], event.price, Decimal(100), event, 1, 1)
    # the other product's books mark as `mark` does, into the same NavUpdated
    marked, message = marked_update(event.books[1], event.price, Decimal(100), event, 1, 1)
    assert marked == mark(event.books[1], event.price, Decimal(100))
    assert message == nav_updated(marked, event, 1, 1)


@pytest.mark.parametrize("cash", ["-500", "0.000000001"])
def test_units_held_at_no_nav_above_zero_are_unmarkable(cash: str) -> None:
    """Equity below zero, or under a NAV quantum a unit, on a product that holds units
    was published as a NAV of -50.05 or 0 (DESIGN: NAV > 0 on every path)."""
    update = tick_update()
    book = update.products[0]
    book.units, book.cash, book.qty = "10", cash, "0"
    event = parse_update(update)
    assert event.price is not None
    with pytest.raises(Unmarkable, match=r"BTC-USDT:LONG: its books mark 10 units at a NAV"):
        marked_update(event.books[0], event.price, Decimal(100), event, 1, 1)
    book.cash = "0.0000001"  # one quantum a unit: the least NAV there is
    event = parse_update(update)
    assert event.price is not None
    marked, _ = marked_update(event.books[0], event.price, Decimal(100), event, 1, 1)
    assert marked.nav == Decimal("0.00000001")


@pytest.mark.parametrize(
    ("stored", "expected"),
    [
        ({"regime": "TREND_DOWN"}, common_pb2.TREND_DOWN),  # the product's last regime
        ({}, common_pb2.REGIME_UNSPECIFIED),  # no tick marked it yet
        ({"regime": "SIDEWAYS"}, common_pb2.REGIME_UNSPECIFIED),  # another build's name
    ],
)
def test_an_orders_re_mark_is_in_the_products_last_regime(
    stored: dict[str, str], expected: int
) -> None:
    update = tick_update()
    update.ClearField("market")
    update.event_id = "BTC-USDT:order:o1"
    order = parse_update(update)
    assert order.regime == common_pb2.REGIME_UNSPECIFIED  # an order's update carries none
    assert as_last_marked(order, stored).regime == expected
    # one that carries a regime keeps it
    carrying = replace(order, regime=common_pb2.RANGE)
    assert as_last_marked(carrying, {"regime": "TREND_DOWN"}).regime == common_pb2.RANGE


def test_an_order_that_traded_nothing_is_re_marked_at_the_products_last_market_time() -> None:
    """A deposit too small for one lot has no fill, so no time: its re-mark dated the
    product's NAV 1970 (`ts_event_ns` 0 in the update and the hash)."""
    update = tick_update()
    update.ClearField("market")
    update.event_id = "BTC-USDT:order:o1"
    order = parse_update(update)
    assert order.ts_event_ns == 0
    assert as_last_marked(order, {"ts": "1620777600000000000"}).ts_event_ns == 1620777600000000000
    assert as_last_marked(order, {}).ts_event_ns == 0  # nothing marked yet
    filled = replace(order, ts_event_ns=7)  # one that traded keeps its fill's time
    assert as_last_marked(filled, {"ts": "1620777600000000000"}).ts_event_ns == 7


def test_the_nav_hash_says_when_the_insurance_fund_holds_the_nav_up() -> None:
    """The gateway takes no order at a NAV the fund holds up at a print the mark ignores
    (1% of the mark's value for a 3x short at a print 3.3x the mark): it reads that in
    the hash, from the advance hedging's books carry."""
    update = tick_update()
    update.products[0].insurance_owed = "5876386.42"
    event = parse_update(update)
    held, free = event.books
    assert (held.advanced, free.advanced) == (Decimal("5876386.42"), 0)
    marked, _ = marked_update(held, Decimal("43210.5"), Decimal(100), event, 1, 1)
    assert state_fields(marked, event, 1, 1)["advanced"] == Decimal("5876386.42")
    update.products[0].insurance_owed = ""  # from a build before it: none
    assert parse_update(update).books[0].advanced == 0


def test_an_empty_product_is_worth_the_nav_its_books_last_settled_at() -> None:
    """Not the stored mark's: a product emptied at a settled NAV showed the mark before,
    and reconcile's NAV check then differed."""
    book = BookState(LONG, Side.LONG, ZERO, ZERO, ZERO, Decimal(1), last_nav=Decimal("130.5"))
    assert mark(book, Decimal(40000), Decimal(100)).nav == Decimal("130.5")


def test_a_tick_that_changed_no_target_keeps_the_last_reasons() -> None:
    """DESIGN section 4: the reasons of the last leverage change stay shown; a tick that
    changed nothing does not blank them."""
    book = BookState(LONG, Side.LONG, Decimal(1), Decimal(100), ZERO, Decimal(1), None)
    event = FillsEvent("tick", "e", "BTC-USDT", 2, 1, 1, Decimal(40000), 1, (book,), ())
    assert "reasons" not in state_fields(mark(book, Decimal(40000), Decimal(100)), event, 2, 1)
