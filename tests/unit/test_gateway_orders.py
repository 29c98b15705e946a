"""The gateway's pure part: validation, ids and quotes (with the core's formulas)."""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from smartlev.v1 import orders_pb2

from services.gateway.config import GatewaySettings
from services.gateway.orders import (
    Closed,
    Limits,
    Opened,
    PositionState,
    Rejected,
    canonical,
    client_order_id,
    close_units,
    order_amount,
    order_id,
    page_size,
    page_start,
    page_token,
    position_id,
    quote_close,
    quote_open,
)
from services.hedging.messages import order_step, products_by_symbol
from shared.core.accounting import QuoteMismatch, issue_terms, redeem_terms
from shared.core.config import StrategyConfig
from shared.core.money import usdt_down
from shared.core.products import smart_engine

LIMITS = Limits(
    min_order=Decimal("10"), max_order=Decimal("1000000"), amount_decimals=8, units_decimals=8
)
FEE = Decimal("0.001")
MIN = LIMITS.min_order


def close(position: PositionState, units: Decimal | None, nav: Decimal, ts_ns: int) -> Closed:
    """`quote_close` at FEE under LIMITS' minimum."""
    return quote_close(position, units, nav, FEE, ts_ns, min_order=MIN)


def _rejected(call: object, *args: object) -> Rejected:
    with pytest.raises(Rejected) as info:
        call(*args)  # type: ignore[operator]
    return info.value


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "required"),
        ("0", "> 0"),
        ("-1", "> 0"),
        ("NaN", "finite"),
        ("-inf", "finite"),
        ("Infinity", "finite"),
        ("1e3", "plain decimal"),
        (" 100", "plain decimal"),
        ("+100", "plain decimal"),
        ("0x10", "plain decimal"),
        ("10.123456789", "decimal places"),
        ("9.99999999", "below the minimum"),
        ("1000000.00000001", "above the maximum"),
    ],
)
def test_bad_amounts_are_invalid_with_a_reason(text: str, says: str) -> None:
    error = _rejected(order_amount, text, LIMITS)
    assert error.code is grpc.StatusCode.INVALID_ARGUMENT and says in str(error)


def test_amounts_within_limits_parse_exactly() -> None:
    assert order_amount("10", LIMITS) == Decimal("10")
    assert order_amount("1000000", LIMITS) == Decimal("1000000")
    assert order_amount("12.345678900", LIMITS) == Decimal("12.3456789")  # trailing zeros
    # written as given up to the product's precision, past it as that precision (30
    # places went into the position, the ledger, orders.events and hedging's books)
    assert str(order_amount("12.50", LIMITS)) == "12.50"
    assert str(order_amount("10." + "0" * 30, LIMITS)) == "10.00000000"
    assert str(close_units("0.05" + "0" * 28, False, LIMITS)) == "0.05000000"
    # eight places and a trailing zero: within the precision, not past it
    assert order_amount("10.123456780", LIMITS) == Decimal("10.12345678")


def test_close_units_need_exactly_one_of_units_or_all() -> None:
    assert close_units("", True, LIMITS) is None
    assert close_units("1.5", False, LIMITS) == Decimal("1.5")
    assert "not both" in str(_rejected(close_units, "1", True, LIMITS))
    assert "required" in str(_rejected(close_units, "", False, LIMITS))


def test_ids() -> None:
    assert client_order_id("a-Z_9") == "a-Z_9"
    for bad in ["", "x" * 65, "a b", "a:b", "é"]:
        assert _rejected(client_order_id, bad).code is grpc.StatusCode.INVALID_ARGUMENT
    pid = order_id("alice", "o-1")
    assert position_id(pid) == pid and len(pid) == 32
    assert order_id("alice", "o-1") == pid != order_id("bob", "o-1")
    # user ids take "-", "_" and "." as client ids do: without a separator between the
    # two, users "ab" and "a" shared position ids, and one's open overwrote the other's
    assert order_id("ab", "c") != order_id("a", "bc")
    for bad in ["", pid.upper(), pid[:-1], pid + "0"]:
        assert _rejected(position_id, bad).code is grpc.StatusCode.INVALID_ARGUMENT
    assert canonical(Decimal("100.00")) == canonical(Decimal("1E+2")) == "100"


@given(
    amount=st.decimals(min_value="10", max_value="1000000", places=8),
    nav=st.decimals(min_value="0.01", max_value="100000", places=8),
    share=st.integers(min_value=1, max_value=100),
)
def test_quotes_are_the_core_formulas_and_costs_add_up(
    amount: Decimal, nav: Decimal, share: int
) -> None:
    opened = quote_open(
        pid="p" * 32,
        user="u",
        product="BTC-USDT:LONG",
        amount=amount,
        nav=nav,
        fee_rate=FEE,
        ts_ns=1,
    )
    fee, _, units = issue_terms(amount, nav, FEE)
    assert (opened.fee, opened.units, opened.position.cost) == (fee, units, amount)
    part = (units * share / 100).quantize(Decimal("0.00000001"))
    if part <= 0:
        return
    gross, close_fee = redeem_terms(part, nav, FEE)
    left = units - part
    if left and (gross < MIN or usdt_down(left * nav) < MIN):  # part worth, or leaves, less
        error = _rejected(close, opened.position, part, nav, 2)
        assert error.code is grpc.StatusCode.FAILED_PRECONDITION and "minimum" in str(error)
        return
    first = close(opened.position, part, nav, 2)
    assert (first.gross, first.fee, first.payout) == (gross, close_fee, gross - close_fee)
    if first.position.units == 0:
        assert first.position.cost == 0 and first.position.ts_closed_ns == 2
        return
    # the cost basis taken pro rata (to 1e-8, half-even), the running totals kept, and a
    # position with units left not stamped closed
    taken = (amount * part / units).quantize(Decimal("0.00000001"), ROUND_HALF_EVEN)
    after = first.position
    assert (after.units, after.cost) == (units - part, amount - taken)
    assert first.realized_pnl == first.payout - taken
    assert (after.realized_pnl, after.payout, after.fees) == (
        first.realized_pnl,
        first.payout,
        fee + close_fee,
    )
    assert after.ts_closed_ns == 0
    rest = close(first.position, None, nav, 3)
    assert rest.position.units == 0 and rest.position.cost == 0
    assert rest.position.ts_closed_ns == 3
    assert first.realized_pnl + rest.realized_pnl == first.payout + rest.payout - amount
    assert (rest.position.realized_pnl, rest.position.payout, rest.position.fees) == (
        first.realized_pnl + rest.realized_pnl,
        first.payout + rest.payout,
        fee + close_fee + rest.fee,
    )
    # what a position shows at a NAV: its value, and the PnL on the cost basis it keeps
    shown = after.to_proto(nav)
    value = usdt_down(after.units * nav)
    assert (Decimal(shown.value), Decimal(shown.unrealized_pnl)) == (value, value - after.cost)


def hundred_at_ten() -> Opened:
    """100 USDT of X:LONG opened at NAV 10."""
    return quote_open(
        pid="p" * 32,
        user="u",
        product="X:LONG",
        amount=Decimal(100),
        nav=Decimal(10),
        fee_rate=FEE,
        ts_ns=1,
    )


@given(
    units=st.decimals(min_value="0", max_value="1000000", places=8),
    opened=st.decimals(min_value="0.00000001", max_value="1000000", places=8),
    figures=st.lists(
        st.decimals(min_value="-1000000", max_value="1000000", places=8), min_size=6, max_size=6
    ),
    times=st.tuples(st.integers(1, 2**62), st.integers(0, 2**62)),
)
def test_a_position_reads_back_as_it_was_stored(
    units: Decimal, opened: Decimal, figures: list[Decimal], times: tuple[int, int]
) -> None:
    """What the gateway writes to Redis and reads again, field for field: a field
    written under another's name (the open time as the close time) or read from
    another's (units_opened from units) showed users wrong figures and threw the
    streams' closed-before checks off."""
    entry_nav, amount, cost, realized, payout, fees = figures
    position = PositionState(
        "p" * 32, "u", "BTC-USDT:LONG", units, opened, entry_nav, amount, cost, realized,
        payout, fees, *times,
    )  # fmt: skip
    assert PositionState.from_fields(position.fields()) == position


def test_an_open_holds_all_the_units_it_bought_and_was_never_closed() -> None:
    opened = quote_open(
        pid="p" * 32,
        user="u",
        product="BTC-USDT:LONG",
        amount=Decimal("1000"),
        nav=Decimal("103.25"),
        fee_rate=FEE,
        ts_ns=7,
    )
    position = opened.position
    assert position.units == position.units_opened == opened.units > 0
    assert (position.ts_opened_ns, position.ts_closed_ns) == (7, 0)
    assert position.fields()["ts_closed_ns"] == "0"


def test_a_partial_close_takes_its_share_of_the_cost_rounded_half_to_even() -> None:
    """100.00000001 of cost over 2 units, 1 closed: the share is 50.000000005, a tie at
    the USDT quantum. Half to even takes 50.00000000 and leaves 50.00000001 with the
    units kept (half up left 50.00000000, a quantum moved from the kept to the closed)."""
    position = PositionState(
        "p" * 32, "u", "BTC-USDT:LONG", Decimal(2), Decimal(2), Decimal(50),
        Decimal("100.00000001"), Decimal("100.00000001"), Decimal(0), Decimal(0), Decimal(0),
        1, 0,
    )  # fmt: skip
    closed = quote_close(position, Decimal(1), Decimal(10), Decimal(0), 2, min_order=Decimal(1))
    assert closed.position.cost == Decimal("50.00000001")


def test_closing_more_than_held_or_a_closed_position_fails_the_precondition() -> None:
    opened = hundred_at_ten()
    error = _rejected(close, opened.position, opened.units + Decimal("1e-8"), Decimal(10), 2)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION and "holds" in str(error)
    closed = close(opened.position, None, Decimal(10), 2).position
    error = _rejected(close, closed, None, Decimal(10), 3)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION and "closed" in str(error)


def test_part_of_a_position_closes_for_the_minimum_order_all_of_it_for_anything() -> None:
    """Closes that pay nothing cannot sell a position off piecemeal, nor leave dust; a
    position worth less than the minimum still closes (all of it, or all its units)."""
    opened = hundred_at_ten()
    error = _rejected(close, opened.position, Decimal("0.99999999"), Decimal(10), 2)
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert "worth 9.99999990 USDT at NAV 10, below the minimum order of 10" in str(error)
    assert close(opened.position, Decimal(1), Decimal(10), 2).gross == MIN  # inclusive
    # nor may it leave less: dust costs more to hedge than it is worth
    most = opened.units - Decimal("0.99999999")
    error = _rejected(close, opened.position, most, Decimal(10), 2)
    assert "leaves 0.99999999 worth 9.99999990 USDT at NAV 10" in str(error)
    assert close(opened.position, opened.units - 1, Decimal(10), 2).position.units == 1
    # a NAV fallen to 1e-4: the whole position is worth 0.000999 USDT, and still closes
    fallen = Decimal("0.0001")
    assert _rejected(close, opened.position, Decimal(1), fallen, 2).code is (
        grpc.StatusCode.FAILED_PRECONDITION
    )
    for units in (None, opened.units):
        closed = close(opened.position, units, fallen, 2)
        assert closed.position.units == 0 and closed.gross < MIN


def test_hedging_settles_an_order_exactly_as_the_gateway_quoted_it() -> None:
    """The gateway's quote, through orders.events, applied by the books at the quoted NAV:
    same units, same payout; a doctored quote is refused (QuoteMismatch -> dead letter)
    before anything moves, the venue's wallet included."""
    config = StrategyConfig()
    products = products_by_symbol(config)
    nav = Decimal("100")  # a product with no units is worth the initial NAV at any price
    opened = quote_open(
        pid="a" * 32,
        user="u",
        product="BTC-USDT:LONG",
        amount=Decimal("1234.56789"),
        nav=nav,
        fee_rate=config.accounting.open_fee,
        ts_ns=1,
    )
    event = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="a" * 32,
            product="BTC-USDT:LONG",
            amount="1234.56789",
            units=str(opened.units),
            nav=str(nav),
            ts_event_ns=1,
        )
    )
    engine = smart_engine("BTC-USDT", config)
    step = order_step(event, products)
    assert step.amount is not None
    engine.deposit(step.product, step.amount, 1, step.nav, quoted_units=step.units)
    closed = quote_close(opened.position, None, nav, config.accounting.close_fee, 2, min_order=MIN)
    close = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="b" * 32,
            product="BTC-USDT:LONG",
            units=str(closed.units),
            nav=str(nav),
            payout=str(closed.payout),
            ts_event_ns=2,
        )
    )
    step = order_step(close, products)
    assert step.units is not None
    engine.redeem(step.product, step.units, 2, step.nav, quoted_payout=step.payout)

    books, wallet = engine.books.snapshot(), engine.venue.wallet
    event.opened.units = str(opened.units + Decimal("0.00000001"))
    step = order_step(event, products)
    assert step.amount is not None
    with pytest.raises(QuoteMismatch, match="the gateway quoted"):
        engine.deposit(step.product, step.amount, 3, step.nav, quoted_units=step.units)
    assert (engine.books.snapshot(), engine.venue.wallet) == (books, wallet)
    close.closed.payout = str(closed.payout - Decimal("0.00000001"))
    engine.deposit(step.product, step.amount, 4, step.nav)  # units to close again
    books, wallet = engine.books.snapshot(), engine.venue.wallet
    step = order_step(close, products)
    assert step.units is not None
    with pytest.raises(QuoteMismatch, match="the gateway quoted"):
        engine.redeem(step.product, step.units, 5, step.nav, quoted_payout=step.payout)
    assert (engine.books.snapshot(), engine.venue.wallet) == (books, wallet)


def test_the_transport_must_take_what_the_gateway_checks() -> None:
    """A transport limit under the gateway's would refuse with RESOURCE_EXHAUSTED what the
    gateway means to refuse with INVALID_ARGUMENT and its reason."""
    assert GatewaySettings(max_message_bytes=4096, transport_max_bytes=4096).max_message_bytes
    says = r"transport_max_bytes \(4096\) must be at least max_message_bytes \(8192\)"
    with pytest.raises(ValidationError, match=says):
        GatewaySettings(max_message_bytes=8192, transport_max_bytes=4096)


def test_page_sizes_default_and_cap() -> None:
    """As gateway.proto documents them: 0 is 100, above 1000 is 1000."""
    assert page_size(0) == 100
    assert page_size(7) == 7
    assert page_size(1000) == 1000
    assert page_size(1001) == page_size(2**31 - 1) == 1000
    assert _rejected(page_size, -1).code is grpc.StatusCode.INVALID_ARGUMENT


@given(include_closed=st.booleans(), last=st.text("0123456789abcdef", min_size=32, max_size=32))
def test_a_page_token_names_where_the_next_page_starts(include_closed: bool, last: str) -> None:
    token = page_token(include_closed, last)
    assert page_start(token, include_closed) == last
    assert _rejected(page_start, token, not include_closed).code is grpc.StatusCode.INVALID_ARGUMENT
    assert page_start("", include_closed) is None
