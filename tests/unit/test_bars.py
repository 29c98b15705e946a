"""Bars -> ticks -> bars: properties of the interpolation and of BarBuilder."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.core.bars import BarBuilder, bar_to_ticks, ticks_from_bars
from shared.core.market import NS_PER_HOUR, Bar, Tick

prices = st.integers(min_value=1, max_value=10**9).map(lambda n: Decimal(n).scaleb(-4))
intervals = st.sampled_from([4, 5, 7, 1_000, 60 * 1_000_000_000, NS_PER_HOUR])


@st.composite
def bar_series(draw: st.DrawFn, interval_ns: int) -> list[Bar]:
    """Consistent bars on the interval grid, increasing, with random gaps."""
    slot = draw(st.integers(min_value=-1_000, max_value=1_000))
    bars = []
    for _ in range(draw(st.integers(min_value=1, max_value=30))):
        o, c, a, b = (draw(prices) for _ in range(4))
        bars.append(
            Bar("BTC-USDT", slot * interval_ns, o, max(o, c, a, b), min(o, c, a, b), c, Decimal(0))
        )
        slot += draw(st.integers(min_value=1, max_value=4))
    return bars


@st.composite
def interval_and_bars(draw: st.DrawFn) -> tuple[int, list[Bar]]:
    interval_ns = draw(intervals)
    return interval_ns, draw(bar_series(interval_ns))


def ohlc(bar: Bar) -> tuple[int, Decimal, Decimal, Decimal, Decimal]:
    return bar.open_ts_ns, bar.open, bar.high, bar.low, bar.close


def feed(builder: BarBuilder, ticks: list[Tick]) -> list[Bar]:
    return [bar for t in ticks if (bar := builder.on_tick(t.ts_ns, t.price)) is not None]


@given(interval_and_bars(), st.one_of(st.none(), prices), st.one_of(st.none(), prices))
def test_bar_to_ticks_order_and_times(
    case: tuple[int, list[Bar]], mark: Decimal | None, before: Decimal | None
) -> None:
    interval_ns, bars = case
    for bar in bars:
        ticks = bar_to_ticks(bar, interval_ns, mark, before)
        times = [t.ts_ns for t in ticks]
        assert times[0] == bar.open_ts_ns
        assert all(a < b for a, b in itertools.pairwise(times))
        assert times[-1] < bar.open_ts_ns + interval_ns
        assert [t.price for t in ticks][0::3] == [bar.open, bar.close]
        middle = [ticks[1].price, ticks[2].price]
        up = bar.close >= bar.open
        assert middle == ([bar.low, bar.high] if up else [bar.high, bar.low])
        assert all(t.symbol == bar.symbol for t in ticks)
        # the bar's closing mark only at its close: the earlier ticks come before it
        assert [t.mark_price for t in ticks] == [before, before, before, mark]


def test_bar_to_ticks_rejects_too_small_interval() -> None:
    bar = Bar("X", 0, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(0))
    with pytest.raises(ValueError, match="interval_ns"):
        bar_to_ticks(bar, 3)


@given(interval_and_bars())
def test_round_trip_through_bar_builder(case: tuple[int, list[Bar]]) -> None:
    interval_ns, bars = case
    ticks = list(ticks_from_bars(bars, interval_ns, mode="ohlc"))
    builder = BarBuilder("BTC-USDT", interval_ns)
    built = feed(builder, ticks)
    assert [ohlc(b) for b in built] == [ohlc(b) for b in bars[:-1]]
    # The last bar closes only when a later interval's first tick arrives.
    last = builder.on_tick(bars[-1].open_ts_ns + interval_ns, Decimal(1))
    assert last is not None and ohlc(last) == ohlc(bars[-1])


@given(interval_and_bars(), st.data())
def test_ticks_from_bars_modes_and_marks(case: tuple[int, list[Bar]], data: st.DataObject) -> None:
    interval_ns, bars = case
    marks = {b.open_ts_ns: data.draw(prices) for b in bars if data.draw(st.booleans())}
    closes = list(ticks_from_bars(bars, interval_ns, marks, mode="close"))
    assert [(t.ts_ns, t.price) for t in closes] == [
        (b.open_ts_ns + interval_ns - 1, b.close) for b in bars
    ]
    known = [marks.get(b.open_ts_ns) for b in bars]  # each bar's closing mark, or none
    assert [t.mark_price for t in closes] == known
    full = list(ticks_from_bars(bars, interval_ns, marks))
    assert len(full) == 4 * len(bars)
    assert all(a.ts_ns < b.ts_ns for a, b in itertools.pairwise(full))
    assert [t.mark_price for t in full[3::4]] == known
    # before its close, a bar's ticks carry the bar before's mark, if that bar is just
    # before it (nothing from ahead, nothing older than a bar)
    before = [None] + [
        mark if b.open_ts_ns == a.open_ts_ns + interval_ns else None
        for a, b, mark in zip(bars, bars[1:], known, strict=False)
    ]
    assert [t.mark_price for t in full[0::4]] == before


def test_ticks_from_bars_rejects_overlapping_bars() -> None:
    one = Decimal(1)
    bars = [Bar("X", ts, one, one, one, one, one) for ts in (0, NS_PER_HOUR // 2)]
    with pytest.raises(ValueError, match="overlaps"):
        list(ticks_from_bars(bars, NS_PER_HOUR))


@given(interval_and_bars(), st.data())
def test_snapshot_restore_mid_stream_is_seamless(
    case: tuple[int, list[Bar]], data: st.DataObject
) -> None:
    interval_ns, bars = case
    ticks = list(ticks_from_bars(bars, interval_ns))
    cut = data.draw(st.integers(min_value=0, max_value=len(ticks)))
    straight = BarBuilder("BTC-USDT", interval_ns)
    expected = feed(straight, ticks)
    first = BarBuilder("BTC-USDT", interval_ns)
    before = feed(first, ticks[:cut])
    resumed = BarBuilder.restore(json.loads(json.dumps(first.snapshot())))
    after = feed(resumed, ticks[cut:])
    assert before + after == expected
    assert resumed.snapshot() == straight.snapshot()


def test_bar_builder_aggregates_ticks_within_interval() -> None:
    builder = BarBuilder("X", 10)
    assert builder.on_tick(20, Decimal("5")) is None
    assert builder.on_tick(23, Decimal("7")) is None
    assert builder.on_tick(23, Decimal("3")) is None  # same time is not going back
    assert builder.on_tick(29, Decimal("4")) is None
    bar = builder.on_tick(50, Decimal("6"))  # intervals 30 and 40 had no ticks: no bars
    assert bar == Bar("X", 20, Decimal(5), Decimal(7), Decimal(3), Decimal(4), Decimal(0))


def test_bar_builder_rejects_time_going_backwards() -> None:
    builder = BarBuilder("X", NS_PER_HOUR)
    builder.on_tick(NS_PER_HOUR + 5, Decimal(1))
    with pytest.raises(ValueError, match="before the previous tick"):
        builder.on_tick(NS_PER_HOUR + 4, Decimal(1))
    restored = BarBuilder.restore(builder.snapshot())
    with pytest.raises(ValueError, match="before the previous tick"):
        restored.on_tick(NS_PER_HOUR + 4, Decimal(1))


@pytest.mark.parametrize(
    "broken",
    [
        {"symbol": "X"},
        {"symbol": "X", "interval_ns": 0, "last_ts_ns": None},
        {"symbol": "X", "interval_ns": 10, "last_ts_ns": 5},
        {
            "symbol": "X",
            "interval_ns": 10,
            "last_ts_ns": 5,
            "bar": {"open_ts_ns": 0, "open": 1.5, "high": "2", "low": "1", "close": "1"},
        },
        {
            "symbol": "X",
            "interval_ns": 10,
            "last_ts_ns": 5,
            "bar": {"open_ts_ns": 0, "open": "NaN", "high": "2", "low": "1", "close": "1"},
        },
        {
            "symbol": "X",
            "interval_ns": 10,
            "last_ts_ns": 15,
            "bar": {"open_ts_ns": 0, "open": "1", "high": "2", "low": "1", "close": "1"},
        },
        {  # the last tick at the next bar's open: it belongs to the next bar
            "symbol": "X",
            "interval_ns": 10,
            "last_ts_ns": 10,
            "bar": {"open_ts_ns": 0, "open": "1", "high": "2", "low": "1", "close": "1"},
        },
        {  # a bar not on the interval's grid: the next tick of its hour closed it, split
            "symbol": "X",
            "interval_ns": 10,
            "last_ts_ns": 5,
            "bar": {"open_ts_ns": 3, "open": "1", "high": "2", "low": "1", "close": "1"},
        },
    ],
)
def test_restore_refuses_malformed_snapshots(broken: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        BarBuilder.restore(broken)


def test_ticks_carry_a_mark_only_once_it_is_known() -> None:
    """A bar's closing mark is known at its close: its earlier ticks carry the one before
    (none at first); a bar without a mark carries none at its close, nor the next bar
    before its own (a hole in the marks froze the last one for days: risk rules blind)."""
    hour = 3_600_000_000_000
    bars = [Bar("X", i * hour, Decimal(10), Decimal(12), Decimal(9), Decimal(11), Decimal(0))
            for i in range(3)]  # fmt: skip
    marks = {0: Decimal("10.5"), 2 * hour: Decimal("11.5")}
    ticks = list(ticks_from_bars(bars, hour, marks))
    assert [t.mark_price for t in ticks] == [
        None, None, None, Decimal("10.5"),
        Decimal("10.5"), Decimal("10.5"), Decimal("10.5"), None,
        None, None, None, Decimal("11.5"),
    ]  # fmt: skip
    closes = list(ticks_from_bars(bars, hour, marks, mode="close"))
    assert [t.mark_price for t in closes] == [Decimal("10.5"), None, Decimal("11.5")]
    # a gap in the bars: the mark from before it is not carried past it
    after_gap = [bars[0], bars[2]._replace(open_ts_ns=5 * hour)]
    ticks = list(ticks_from_bars(after_gap, hour, {0: Decimal("10.5")}))
    assert [t.mark_price for t in ticks[4:]] == [None] * 4
    assert all(t.mark_price is None for t in ticks_from_bars(bars, hour))
