"""Hedging's message <-> core conversions, exact, and its failure classification."""

from __future__ import annotations

import itertools
from decimal import Decimal

import grpc
import pytest
from aiokafka.errors import KafkaConnectionError
from hypothesis import given
from hypothesis import strategies as st
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from smartlev.v1 import leverage_pb2, orders_pb2

from services.hedging.desks import MARKET, ORDER, Inflight
from services.hedging.main import is_transient
from services.hedging.messages import (
    book_states,
    fresh_steps,
    hedge_update,
    market_step,
    order_step,
    products_by_symbol,
)
from shared import codec
from shared.core.accounting import BooksOutOfBalance
from shared.core.config import StrategyConfig
from shared.core.events import (
    FundingSettled,
    HedgeAllocation,
    HedgeExecuted,
    InsuranceClaimPaid,
    LeverageTargetChanged,
    ManagementFeeAccrued,
    OrderFilled,
)
from shared.core.market import FundingRate, Side, Tick
from shared.core.products import smart_engine
from shared.wire import targets_update

CONFIG = StrategyConfig()
PRODUCTS = products_by_symbol(CONFIG)
LONG, SHORT = "BTC-USDT:LONG", "BTC-USDT:SHORT"
money = st.decimals(
    min_value=Decimal("-1e15"), max_value=Decimal("1e15"), places=18, allow_nan=False
)
positive = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("1e9"), places=8)


def tick_update(
    price: Decimal,
    decisions: list[LeverageTargetChanged],
    seq: int = 5,
    mark: Decimal | None = None,
) -> leverage_pb2.TargetsUpdate:
    tick = Tick("BTC-USDT", 1_000, price, mark)
    market = codec.market_event_from_tick(tick, seq=seq, source="t", ts_init_ns=9)
    return targets_update(market, "BTC-USDT", seq, True, "TREND_UP", decisions, 9)


targets = st.decimals(min_value=Decimal(1), max_value=Decimal(5), places=8)


@given(positive, targets, positive, st.booleans(), st.booleans())
def test_targets_update_to_core_is_exact(
    price: Decimal, target: Decimal, previous: Decimal, rebalance: bool, emergency: bool
) -> None:
    decision = LeverageTargetChanged(
        LONG, Side.LONG, 1_000, price, target, previous, rebalance, emergency, ("A", "B"), "RANGE"
    )
    step = market_step(tick_update(price, [decision], mark=price * 2), PRODUCTS, CONFIG.leverage)
    assert step.event == Tick("BTC-USDT", 1_000, price, price * 2)
    assert step.decisions == (decision,)
    assert (step.symbol, step.seq, step.event_id, step.ts_init_ns) == (
        "BTC-USDT",
        5,
        "BTC-USDT:5",
        9,
    )


def test_a_redelivery_inside_one_batch_is_skipped_like_one_in_a_later_batch() -> None:
    """A stage that re-sent seqs 5-7 after a crash: both copies in one batch. The copies
    carry other prices (999, 998, 997) so that the one run is told apart: the first
    copy, as it was applied before the crash, never the redelivered one."""
    sent = [(5, 105), (6, 106), (7, 107), (5, 999), (6, 998), (7, 997), (8, 108)]
    steps = [
        market_step(tick_update(Decimal(price), [], seq=seq), PRODUCTS, CONFIG.leverage)
        for seq, price in sent
    ]

    def run(last_seq: int | None) -> list[tuple[int, str]]:
        return [(s.seq, s.message.market.tick.price) for s in fresh_steps(last_seq, steps)]

    first_copies = [(5, "105"), (6, "106"), (7, "107"), (8, "108")]
    assert run(4) == first_copies
    assert run(None) == first_copies
    assert run(6) == [(7, "107"), (8, "108")]


@given(st.one_of(st.none(), st.integers(0, 20)), st.lists(st.integers(1, 20), max_size=30))
def test_fresh_steps_run_each_seq_once_in_rising_order(last: int | None, seqs: list[int]) -> None:
    steps = [
        market_step(tick_update(Decimal(1), [], seq=seq), PRODUCTS, CONFIG.leverage) for seq in seqs
    ]
    ran = [s.seq for s in fresh_steps(last, steps)]
    assert all(a < b for a, b in itertools.pairwise(ran))
    floor = 0 if last is None else last
    assert all(seq > floor for seq in ran)
    records = [seq for i, seq in enumerate(seqs) if seq > max([floor, *seqs[:i]])]
    assert ran == records  # every seq above all before it runs, nothing else


def test_funding_update_to_core() -> None:
    funding = FundingRate("BTC-USDT", 2_000, Decimal("-0.000125"))
    market = codec.market_event_from_funding(funding, seq=3, source="t", ts_init_ns=9)
    step = market_step(
        targets_update(market, "BTC-USDT", 3, False, "RANGE", [], 9), PRODUCTS, CONFIG.leverage
    )
    assert step.event == funding and step.decisions == () and step.event_id == "BTC-USDT:3"


def long_decision(target: Decimal = Decimal(2), side: Side = Side.LONG) -> LeverageTargetChanged:
    return LeverageTargetChanged(
        LONG, side, 1, Decimal(1), target, Decimal(1), True, False, (), "RANGE"
    )


def eth_decision() -> LeverageTargetChanged:
    return LeverageTargetChanged(
        "ETH-USDT:LONG", Side.LONG, 1, Decimal(1), Decimal(2), Decimal(1), True, False, (), "RANGE"
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (leverage_pb2.TargetsUpdate(), "no market event"),
        (tick_update(Decimal(0), []), "price must be positive"),
        (tick_update(Decimal(1), [], seq=0), r"seq must be in \[1, 2\^53\)"),
        (tick_update(Decimal(1), [long_decision(Decimal(6))]), r"is 6, outside \[1.0, 5.0\]"),
        (tick_update(Decimal(1), [long_decision(Decimal(-3))]), "outside"),
        (tick_update(Decimal(1), [long_decision(side=Side.SHORT)]), "is on the SHORT side"),
        (
            tick_update(Decimal(1), [long_decision(), long_decision(Decimal(3))]),
            "two targets for 'BTC-USDT:LONG'",
        ),
        (tick_update(Decimal(1), [eth_decision()]), "not a product of BTC-USDT"),
    ],
)
def test_bad_targets_updates_are_refused(message: leverage_pb2.TargetsUpdate, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        market_step(message, PRODUCTS, CONFIG.leverage)


def test_unknown_symbol_and_funding_with_targets_are_refused() -> None:
    tick = Tick("DOGE-USDT", 1, Decimal(1))
    market = codec.market_event_from_tick(tick, seq=1, source="t", ts_init_ns=1)
    with pytest.raises(ValueError, match="unknown symbol"):
        market_step(
            targets_update(market, "DOGE-USDT", 1, False, "RANGE", [], 1), PRODUCTS, CONFIG.leverage
        )
    funding = codec.market_event_from_funding(
        FundingRate("BTC-USDT", 1, Decimal(0)), seq=1, source="t", ts_init_ns=1
    )
    message = tick_update(Decimal(1), [eth_decision()])
    message.market.CopyFrom(funding)
    with pytest.raises(ValueError, match="no leverage targets"):
        market_step(message, PRODUCTS, CONFIG.leverage)


@given(positive)
def test_orders_to_core_are_exact(amount: Decimal) -> None:
    opened = orders_pb2.OrderEvent(
        opened=orders_pb2.PositionOpened(
            event_id="o1", product=SHORT, amount=codec.decimal_to_wire(amount), ts_event_ns=4
        )
    )
    step = order_step(opened, PRODUCTS)
    assert (step.symbol, step.product, step.amount, step.units, step.ts_ns) == (
        "BTC-USDT",
        SHORT,
        amount,
        None,
        4,
    )
    assert step.event_id == "BTC-USDT:order:o1"
    closed = orders_pb2.OrderEvent(
        closed=orders_pb2.PositionClosed(
            event_id="c1", product=LONG, units=str(amount), ts_event_ns=5
        )
    )
    assert order_step(closed, PRODUCTS).units == amount


@pytest.mark.parametrize(
    ("order", "reason"),
    [
        (
            orders_pb2.OrderEvent(  # (a time, so that its check is not what refuses it)
                opened=orders_pb2.PositionOpened(
                    event_id="x", product=LONG, amount="0", ts_event_ns=1
                )
            ),
            "amount: must be > 0",
        ),
        (
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(event_id="x", product=LONG, amount="NaN")
            ),
            "not a plain decimal",
        ),
        (
            orders_pb2.OrderEvent(
                closed=orders_pb2.PositionClosed(
                    event_id="x", product=LONG, units="-1", ts_event_ns=1
                )
            ),
            "units: must be > 0",
        ),
        (
            orders_pb2.OrderEvent(
                closed=orders_pb2.PositionClosed(
                    event_id="x", product=LONG, units="0", ts_event_ns=1
                )
            ),
            "units: must be > 0",
        ),
        (
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(event_id="x", product="BTC-USDT:UP", amount="1")
            ),
            "unknown product",
        ),
        (  # ~1e24 slices of 2M: a MemoryError halted the symbol, after every restart too
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(event_id="x", product=LONG, amount="1" + "0" * 30)
            ),
            "at most 1,000,000,000",
        ),
        (
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(
                    event_id="x", product=LONG, amount="1000000000.00000001"
                )
            ),
            "at most 1,000,000,000",
        ),
        (  # finer than the books keep money: a transfer the venue does not keep
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(
                    event_id="x", product=LONG, amount="1000.123456789", ts_event_ns=1
                )
            ),
            "amount: must be a multiple of 1E-8",
        ),
        (
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(
                    event_id="x", product=LONG, amount="10", units="0.1000000001", ts_event_ns=1
                )
            ),
            "units: must be a multiple of 1E-8",
        ),
        (  # finer than the books keep units: the user's units taken for a payout of 0
            orders_pb2.OrderEvent(
                closed=orders_pb2.PositionClosed(
                    event_id="x", product=LONG, units="0.000000000001", ts_event_ns=1
                )
            ),
            "units: must be a multiple of 1E-8",
        ),
        (  # the venue refuses it: past the transfer, the symbol halted (after restarts too)
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(event_id="x", product=LONG, amount="10")
            ),
            "ts_event_ns: must be > 0",
        ),
        (  # finer than the books keep a NAV: ~1e40 units for 10 USDT, the fund paying
            orders_pb2.OrderEvent(
                opened=orders_pb2.PositionOpened(
                    event_id="x",
                    product=LONG,
                    amount="10",
                    nav="0." + "0" * 39 + "1",
                    ts_event_ns=1,
                )
            ),
            "nav: must be a positive multiple of",
        ),
        (
            orders_pb2.OrderEvent(
                closed=orders_pb2.PositionClosed(
                    event_id="x", product=LONG, units="1", nav="100.000000001", ts_event_ns=1
                )
            ),
            "nav: must be a positive multiple of",
        ),
    ],
)
def test_bad_orders_are_refused(order: orders_pb2.OrderEvent, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        order_step(order, PRODUCTS)


@given(st.lists(money, min_size=11, max_size=11))
def test_book_states_carry_the_exact_books(values: list[Decimal]) -> None:
    engine = smart_engine("BTC-USDT", CONFIG)
    book = engine.books.products[LONG]
    (
        book.units,
        book.cash,
        book.qty,
        book.equity_floor,
        book.trading_fees,
        book.slippage,
        book.funding,
        book.management_fees,
        book.insurance_received,
        book.last_nav,
        book.insurance_owed,
    ) = values
    state = book_states(engine)[0]
    assert state.product == LONG
    assert [
        Decimal(getattr(state, name))
        for name in (
            "units",
            "cash",
            "qty",
            "equity_floor",
            "trading_fees",
            "slippage",
            "funding",
            "management_fees",
            "insurance_received",
            "last_nav",
            "insurance_owed",
        )
    ] == values
    assert Decimal(state.target_leverage) == engine.targets[LONG]


def test_hedge_update_carries_every_event() -> None:
    engine = smart_engine("BTC-USDT", CONFIG)
    fills = (
        OrderFilled("BTC-USDT", 1, Decimal("1"), Decimal("100.1"), Decimal("0.04"), "TAKER"),
        OrderFilled("BTC-USDT", 1, Decimal("2"), Decimal("100.2"), Decimal("0.08"), "TAKER"),
    )
    hedge = HedgeExecuted(
        "BTC-USDT",
        1,
        Decimal(100),
        Decimal(3),
        fills,
        (
            HedgeAllocation(LONG, Decimal(4), Decimal(400), Decimal("0.4"), Decimal("0.16")),
            HedgeAllocation(SHORT, Decimal(-1), Decimal(-100), Decimal("0.1"), Decimal("-0.04")),
        ),
    )
    events = [
        hedge,
        FundingSettled(
            "BTC-USDT",
            1,
            Decimal("0.0001"),
            Decimal(100),
            Decimal("0.03"),
            ((LONG, Decimal("0.04")),),
        ),
        ManagementFeeAccrued(LONG, 1, Decimal("0.5")),
        InsuranceClaimPaid(SHORT, 1, Decimal("7"), Decimal("-1")),
    ]
    update = hedge_update(engine, "BTC-USDT:9", events, ts_init_ns=3)
    assert update.event_id == "BTC-USDT:9" and not update.HasField("market")
    filled = update.filled
    assert (filled.net_qty, filled.venue_fee, filled.slices) == ("3", "0.12", 2)
    assert filled.fill_price == "100.16666667"  # (100.1 + 200.4) / 3, to 1e-8
    assert [(a.product, a.qty, a.cost) for a in filled.allocations] == [
        (LONG, "4", "400.4"),
        (SHORT, "-1", "-99.9"),
    ]
    assert [(a.product, a.amount) for a in update.funding.allocations] == [(LONG, "0.04")]
    assert [(f.product, f.amount) for f in update.management_fees] == [(LONG, "0.5")]
    assert [(c.product, c.amount) for c in update.insurance_claims] == [(SHORT, "7")]
    assert [p.product for p in update.products] == [LONG, SHORT]
    with pytest.raises(ValueError, match="two hedges"):
        hedge_update(engine, "x", [hedge, hedge], ts_init_ns=0)


class _Call(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_transient_failures_are_retried_bugs_are_not() -> None:
    assert is_transient(_Call(grpc.StatusCode.UNAVAILABLE))
    assert is_transient(RedisConnectionError("down"))
    assert not is_transient(_Call(grpc.StatusCode.FAILED_PRECONDITION))
    assert not is_transient(BooksOutOfBalance("off by one"))
    assert not is_transient(KeyError("x"))
    # The shared rule: a script error or a refused command is a bug, not an outage.
    assert not is_transient(ResponseError("ERR user_script:3: attempt to compare nil"))
    assert is_transient(KafkaConnectionError())


def _stored(inflight: Inflight) -> dict[str, str]:
    """The Inflight's fields as Redis gives them back: text."""
    return {name: str(value) for name, value in inflight.fields().items()}


def test_an_inflight_reads_back_as_written() -> None:
    """An order's Inflight keeps where its record was read, so that the instance that
    resumes an order the books refuse dead-letters it from there (reliability 204): a
    source lost on the way back left such an order neither dead-lettered nor marked
    refused, and its close then went through."""
    order = Inflight(ORDER, (b"an order event",), ("orders.events", 3, 41, "BTC-USDT"))
    market = Inflight(MARKET, (b"targets 1", b"targets 2"))
    for inflight in (order, market):
        assert Inflight.from_fields(_stored(inflight)) == inflight
    assert Inflight.from_fields({"kind": "", "payloads": "[]", "source": ""}) is None


def test_a_source_written_with_other_payloads_is_none() -> None:
    """An older build writes the payloads only: one that began another order over this
    Inflight left its source standing, which names the other record."""
    written = _stored(Inflight(ORDER, (b"this order",), ("orders.events", 0, 7, "BTC-USDT")))
    written["payloads"] = _stored(Inflight(ORDER, (b"another order",)))["payloads"]
    assert Inflight.from_fields(written) == Inflight(ORDER, (b"another order",))
