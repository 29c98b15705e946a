"""shared.core.hedging: slicing and netting of products' requested changes."""

from __future__ import annotations

import math
from decimal import ROUND_DOWN, Decimal

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from shared.core.hedging import (
    HedgingConfig,
    PositionChange,
    execute_netted,
    netted_cost,
    plan_slices,
)
from shared.core.money import USDT_QUANTUM
from shared.core.venue import Liquidity
from tests.unit.stubs import BTC, LONG, SHORT, venue

D = Decimal
LOT = D("0.001")

# --- plan_slices ------------------------------------------------------------------------


def test_plan_slices_equal_slices_larger_first() -> None:
    # 10 lots x 0.001 x 50000 = 500 notional; max 200 -> ceil(2.5) = 3 slices;
    # divmod(10, 3) = (3, 1): one slice of 4 lots, two of 3.
    assert plan_slices(D("0.010"), D(50000), LOT, D(200)) == [D("0.004"), D("0.003"), D("0.003")]
    assert plan_slices(D("-0.010"), D(50000), LOT, D(200)) == [
        D("-0.004"),
        D("-0.003"),
        D("-0.003"),
    ]


def test_plan_slices_small_order_is_one_slice() -> None:
    assert plan_slices(D("0.5"), D(50000), LOT, D(2_000_000)) == [D("0.5")]


def test_plan_slices_lot_larger_than_max_gives_one_lot_per_slice() -> None:
    # one lot is 50 notional > max 10: cannot satisfy the max, so one lot per slice
    assert plan_slices(D("0.002"), D(50000), LOT, D(10)) == [LOT, LOT]


def test_plan_slices_regression_slice_over_max_notional() -> None:
    # 133.333 BTC at 30000 = 3,999,990 notional, max 2,000,000: count = ceil(1.999995) = 2,
    # 133333 lots -> 66667 + 66666; 66.667 x 30000 = 2,000,010 > 2,000,000.
    # Max lots per slice is floor(2e6 / 30) = 66666, so 3 slices are needed.
    slices = plan_slices(D("133.333"), D(30000), LOT, D(2_000_000))
    assert all(abs(s) * D(30000) <= D(2_000_000) for s in slices), slices


net_lots = st.integers(-(10**6), 10**6).filter(bool)
prices = st.integers(100, 10**7).map(lambda n: D(n).scaleb(-1))
max_notionals = st.integers(1, 10**8).map(D)


@settings(max_examples=300, deadline=None)
@given(net_lots, prices, max_notionals)
def test_plan_slices_sums_exactly_in_whole_lots(n: int, price: Decimal, max_n: Decimal) -> None:
    net = n * LOT
    slices = plan_slices(net, price, LOT, max_n)
    assert sum(slices, D(0)) == net
    assert all(s % LOT == 0 and s != 0 and (s > 0) == (net > 0) for s in slices)
    sizes = [abs(s) for s in slices]
    assert max(sizes) - min(sizes) <= LOT  # equal slices
    assert len(slices) <= abs(n)
    # never fewer slices than the notional demands
    assert len(slices) >= min(abs(n), math.ceil(abs(net) * price / max_n))


@settings(max_examples=300, deadline=None)
@given(net_lots, prices, max_notionals)
def test_plan_slices_respects_max_notional_with_minimal_count(
    n: int, price: Decimal, max_n: Decimal
) -> None:
    net = n * LOT
    slices = plan_slices(net, price, LOT, max_n)
    per_slice = int(max_n / (LOT * price))  # whole lots that fit in one slice
    if per_slice >= 1:
        assert all(abs(s) * price <= max_n for s in slices)
        assert len(slices) == math.ceil(abs(n) / per_slice)  # minimal
    else:
        assert len(slices) == abs(n)


# --- execute_netted ---------------------------------------------------------------------


def test_slices_that_do_not_add_up_to_the_net_change_are_refused_before_any_order() -> None:
    """The engine passes the slices of a turning close in (its two parts); ones that did
    not add up would move the venue by their sum while the books took each product's
    change."""
    v = venue(collateral="1000")
    before = v.snapshot()
    changes = [PositionChange(LONG, D("0.010")), PositionChange(SHORT, D("-0.004"))]
    with pytest.raises(ValueError, match=r"do not add up to the net change 0\.006"):
        execute_netted(v, 9, changes, D(50000), HedgingConfig(), slices=[D("0.005")])
    assert v.snapshot() == before  # no order sent
    hedge = execute_netted(
        v, 9, changes, D(50000), HedgingConfig(), slices=[D("0.002"), D("0.004")]
    )
    assert [f.qty for f in hedge.fills] == [D("0.002"), D("0.004")]


def test_cross_sends_one_net_order_and_allocates_costs_10_to_4() -> None:
    v = venue(collateral="1000")
    changes = [PositionChange(LONG, D("0.010")), PositionChange(SHORT, D("-0.004"))]
    hedge = execute_netted(v, 9, changes, D(50000), HedgingConfig())
    # net +0.006 BTC, notional 300: one buy.
    # price: 300/50e6 = 6e-6; sqrt = 0.00244948974..; impact 0.0244948974.. bps;
    # total 0.5244948974.. bps; shift 50000 x that e-4 = 2.62247448..
    # 50002.6224.. -> ceil to tick 0.1 -> 50002.7
    assert [(f.qty, f.price) for f in hedge.fills] == [(D("0.006"), D("50002.7"))]
    # fee 0.006 x 50002.7 x 0.0004 = 300.0162 x 0.0004 = 0.12000648
    assert hedge.fills[0].fee == D("0.12000648")
    assert (hedge.symbol, hedge.ts_ns, hedge.reference_price, hedge.net_qty) == (
        BTC,
        9,
        D(50000),
        D("0.006"),
    )
    assert v.position == D("0.006")
    assert v.wallet == D("699.86379352")  # 1000 - (300.0162 + 0.12000648)
    # slippage total 300.0162 - 0.006 x 50000 = 0.0162, split 10:4 by largest remainder:
    # 0.01157142857.. -> 0.01157143 ; 0.00462857142.. -> 0.00462857
    # fees 0.12000648 split 10:4: 0.0857189142.. -> 0.08571891 ; 0.0342875657.. -> 0.03428757
    long, short = hedge.allocations
    assert (long.product, long.qty, long.notional) == (LONG, D("0.010"), D("500.000"))
    assert (long.slippage, long.fee) == (D("0.01157143"), D("0.08571891"))
    assert (short.product, short.qty, short.notional) == (SHORT, D("-0.004"), D("-200.000"))
    assert (short.slippage, short.fee) == (D("0.00462857"), D("0.03428757"))
    assert long.slippage + short.slippage == D("0.0162")
    assert long.fee + short.fee == v.fees_paid


def test_perfect_cross_trades_nothing_and_costs_nothing() -> None:
    v = venue(collateral="1000")
    before = v.snapshot()
    changes = [PositionChange(LONG, D("0.5")), PositionChange(SHORT, D("-0.5"))]
    hedge = execute_netted(v, 0, changes, D(50000), HedgingConfig())
    assert hedge.fills == ()
    assert hedge.net_qty == 0
    assert v.snapshot() == before
    assert [(a.qty, a.notional, a.slippage, a.fee) for a in hedge.allocations] == [
        (D("0.5"), D(25000), 0, 0),
        (D("-0.5"), D(-25000), 0, 0),
    ]


def test_large_net_order_is_sliced() -> None:
    v = venue(collateral="1000000")
    changes = [PositionChange(LONG, D(3))]
    hedge = execute_netted(v, 0, changes, D(50000), HedgingConfig(max_slice_notional=D(60000)))
    # 150000 / 60000 = 2.5 -> 3 slices of 1 BTC each
    assert [f.qty for f in hedge.fills] == [D(1), D(1), D(1)]
    assert v.position == D(3)


@pytest.mark.parametrize("bad", ["0.0015", "-0.0001", "1.0000001"])
def test_non_lot_quantity_raises_value_error_and_sends_nothing(bad: str) -> None:
    v = venue()
    before = v.snapshot()
    changes = [PositionChange(LONG, D("0.010")), PositionChange(SHORT, D(bad))]
    with pytest.raises(ValueError, match="not a whole number of lots"):
        execute_netted(v, 0, changes, D(50000), HedgingConfig())
    assert v.snapshot() == before


def test_maker_hedge_has_no_slippage() -> None:
    v = venue(collateral="1000000")
    changes = [PositionChange(LONG, D("0.3")), PositionChange(SHORT, D("-0.1"))]
    hedge = execute_netted(v, 0, changes, D(50000), HedgingConfig(liquidity=Liquidity.MAKER))
    # one maker buy of 0.2 at 50000: fee 0.2 x 50000 x 0.0002 = 2, split 3:1 = 1.5 / 0.5
    assert [a.slippage for a in hedge.allocations] == [0, 0]
    assert [a.fee for a in hedge.allocations] == [D("1.5"), D("0.5")]


change_lots = st.integers(-5000, 5000)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(change_lots, min_size=1, max_size=5),
    st.integers(10_000, 10**7).map(lambda n: D(n).scaleb(-2)),
    st.sampled_from([Liquidity.TAKER, Liquidity.MAKER]),
    st.integers(50, 10**6).map(D),
    st.integers(-(10**6), 10**6).map(lambda n: D(n).scaleb(-3)),
)
# found by CI: a part that got no leftover quantum is short of its share of the uncut
# fee by its remainder plus its share of the dust, which can pass one quantum
@example([282, -5000, -5000], D("13113.23"), Liquidity.MAKER, D(50), D(0).scaleb(-3))
def test_netting_identity_is_exact(
    lots: list[int],
    reference: Decimal,
    liquidity: Liquidity,
    max_slice: Decimal,
    start_position: Decimal,
) -> None:
    v = venue(collateral="1000000000000")  # margins 1,000 BTC at 100,000 and more
    if start_position:
        v.execute(0, start_position, reference)
    wallet, position, fees_paid = v.wallet, v.position, v.fees_paid
    changes = [PositionChange(f"P{i}", n * LOT) for i, n in enumerate(lots)]
    config = HedgingConfig(max_slice_notional=max_slice, liquidity=liquidity)
    hedge = execute_netted(v, 1, changes, reference, config)
    net = sum((c.qty for c in changes), D(0))
    allocs = hedge.allocations
    assert [a.product for a in allocs] == [c.product for c in changes]
    assert [a.qty for a in allocs] == [c.qty for c in changes]
    assert hedge.net_qty == net
    assert v.position - position == net
    assert sum((f.qty for f in hedge.fills), D(0)) == net
    assert len(hedge.fills) == (len(plan_slices(net, reference, LOT, max_slice)) if net else 0)
    # the identity: what the products are charged is exactly what the venue wallet paid
    charged = sum((a.qty * reference + a.slippage + a.fee for a in allocs), D(0))
    assert charged == wallet - v.wallet
    assert sum((a.fee for a in allocs), D(0)) == v.fees_paid - fees_paid
    cost = sum((f.qty * f.price for f in hedge.fills), D(0))
    assert sum((a.slippage for a in allocs), D(0)) == cost - net * reference
    # pro rata to |requested change|: shares are taken of the total cut to whole quanta,
    # so a part is at most one quantum from its exact share (the dust goes to the largest)
    weights = [abs(c.qty) for c in changes]
    if sum(weights) > 0 and len(changes) > 1:
        largest = max(range(len(weights)), key=lambda i: (weights[i], -i))
        fees = v.fees_paid - fees_paid
        whole = fees.quantize(USDT_QUANTUM, rounding=ROUND_DOWN)
        for i, a in enumerate(allocs):
            share = whole * weights[i] / sum(weights)  # of the total cut to whole quanta
            if i == largest:
                share += fees - whole  # the dust below a quantum: the largest's
            assert abs(a.fee - share) < USDT_QUANTUM
    if net == 0:
        assert all(a.fee == 0 and a.slippage == 0 for a in allocs)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(-200_000, 200_000).filter(bool).map(lambda n: n * LOT),
    st.integers(-200_000, 200_000).map(lambda n: n * LOT),
    st.integers(10**5, 10**7).map(lambda n: D(n).scaleb(-2)),
    st.integers(10**5, 10**7).map(D),
    st.booleans(),
)
def test_netted_cost_is_what_the_netted_order_pays(
    net: Decimal, before: Decimal, reference: Decimal, max_slice: Decimal, same_instant: bool
) -> None:
    """Sizing prices a trade with `netted_cost` before making it: slice by slice, each
    walking the book on from the one before, and from what an earlier order of the same
    instant took (`same_instant`), it is exactly the fees and slippage the trade pays."""
    v = venue(collateral="100000000")
    if before:
        v.execute(5, before, reference)
    at = 5 if same_instant else 6
    config = HedgingConfig(max_slice_notional=max_slice)
    quoted = netted_cost(v, at, net, reference, config)
    wallet = v.wallet
    execute_netted(v, at, [PositionChange(LONG, net)], reference, config)
    assert quoted == wallet - v.wallet - net * reference
