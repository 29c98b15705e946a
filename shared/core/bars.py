"""Bars <-> ticks, pure.

Hourly bars are the finest long history, but the core reacts to ticks: replaying a bar
as only its close would hide the intrabar extremes that trigger emergency deleverage.
So each bar is interpolated into four ticks (open, both extremes, close), and the live
path folds ticks back into bars with `BarBuilder`; the two are inverse on OHLC.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from decimal import Decimal
from typing import Literal, TypeGuard

from shared.core.market import Bar, Tick

# Smallest interval that leaves room for four strictly increasing ns offsets in a bar.
MIN_INTERVAL_NS = 4


def _check_interval(interval_ns: int) -> None:
    if interval_ns < MIN_INTERVAL_NS:
        raise ValueError(f"interval_ns must be >= {MIN_INTERVAL_NS}, got {interval_ns}")


def bar_to_ticks(
    bar: Bar, interval_ns: int, mark: Decimal | None = None, mark_before: Decimal | None = None
) -> tuple[Tick, Tick, Tick, Tick]:
    """Four ticks inside the bar: open, the two extremes, close.

    Which extreme came first is unknown; we take the conventional assumption that an up
    bar (close >= open) dipped first (open -> low -> high -> close) and a down bar rallied
    first (open -> high -> low -> close), i.e. the path with the least travel. Ticks sit
    at open_ts, +interval/3, +2*interval/3 and +interval-1 ns: strictly increasing and
    strictly before the next bar opens. `mark` is the bar's closing mark price: only the
    close tick carries it (the others come before it is known, so a risk rule reading it
    there would see the mark up to a bar early); they carry `mark_before`, the last mark
    known when they happen (the previous bar's close; None: no mark yet).
    """
    _check_interval(interval_ns)
    t0 = bar.open_ts_ns
    first, second = (bar.low, bar.high) if bar.close >= bar.open else (bar.high, bar.low)
    return (
        Tick(bar.symbol, t0, bar.open, mark_before),
        Tick(bar.symbol, t0 + interval_ns // 3, first, mark_before),
        Tick(bar.symbol, t0 + 2 * interval_ns // 3, second, mark_before),
        Tick(bar.symbol, t0 + interval_ns - 1, bar.close, mark),
    )


def ticks_from_bars(
    bars: Iterable[Bar],
    interval_ns: int,
    marks: Mapping[int, Decimal] | None = None,
    mode: Literal["ohlc", "close"] = "ohlc",
) -> Iterator[Tick]:
    """Replay bars as a tick stream; `marks` maps bar open ts_ns -> the bar's closing
    mark price, which a tick carries only once it is known (at the bar's close; before
    it, the previous bar's). A bar without a mark, or the one after a gap in the bars,
    carries none where it has none (the engine then reads the price, as live, where a
    mark over 10 s old is dropped): carried on, one mark stood for days through a hole
    in the file, and the risk rules, which read the mark, missed a crash.

    mode "ohlc": four ticks per bar (see `bar_to_ticks`); mode "close": one tick per bar
    at its last ns, at the close. Bars must not overlap (ValueError), so ticks never go
    back in time; gaps between bars are kept.
    """
    _check_interval(interval_ns)
    next_open: int | None = None
    known: Decimal | None = None  # the last closing mark so far
    for bar in bars:
        if next_open is not None and bar.open_ts_ns < next_open:
            raise ValueError(
                f"bar at {bar.open_ts_ns} overlaps the previous bar (ends at {next_open})"
            )
        if bar.open_ts_ns != next_open:
            known = None  # the mark before a gap is no mark of this bar's time
        next_open = bar.open_ts_ns + interval_ns
        closing = marks.get(bar.open_ts_ns) if marks is not None else None
        if mode == "ohlc":
            yield from bar_to_ticks(bar, interval_ns, closing, known)
        else:
            yield Tick(bar.symbol, next_open - 1, bar.close, closing)
        known = closing


class BarBuilder:
    """Aggregates a tick stream into fixed-interval bars, O(1) per tick; emits a bar when
    the first tick of a later interval arrives.

    Intervals are aligned to the epoch (floor of ts / interval). Ticks carry no traded
    size, so built bars have volume 0. Its whole state is a few numbers, so a service can
    checkpoint it (`snapshot`) and resume after a restart (`restore`) without replay.
    """

    __slots__ = (
        "_close",
        "_high",
        "_last_ts",
        "_low",
        "_open",
        "_open_ts",
        "interval_ns",
        "symbol",
    )

    def __init__(self, symbol: str, interval_ns: int) -> None:
        if interval_ns <= 0:
            raise ValueError(f"interval_ns must be > 0, got {interval_ns}")
        self.symbol = symbol
        self.interval_ns = interval_ns
        self._last_ts: int | None = None
        self._open_ts = 0
        self._open = self._high = self._low = self._close = Decimal(0)

    def on_tick(self, ts_ns: int, price: Decimal) -> Bar | None:
        """Fold one tick in; return the previous bar if this tick closes it.

        Intervals without ticks produce no bar. ts_ns equal to the last tick is fine,
        earlier is a ValueError (a bar already emitted cannot change).
        """
        if self._last_ts is not None and ts_ns < self._last_ts:
            raise ValueError(f"tick at {ts_ns} is before the previous tick at {self._last_ts}")
        open_ts = ts_ns - ts_ns % self.interval_ns
        closed: Bar | None = None
        if self._last_ts is not None and open_ts == self._open_ts:
            if price > self._high:
                self._high = price
            elif price < self._low:
                self._low = price
            self._close = price
        else:
            if self._last_ts is not None:
                closed = self._current()
            self._open_ts = open_ts
            self._open = self._high = self._low = self._close = price
        self._last_ts = ts_ns
        return closed

    def _current(self) -> Bar:
        return Bar(
            self.symbol, self._open_ts, self._open, self._high, self._low, self._close, Decimal(0)
        )

    def snapshot(self) -> dict[str, object]:
        """JSON-serialisable state; Decimals as strings so they stay exact."""
        state: dict[str, object] = {
            "symbol": self.symbol,
            "interval_ns": self.interval_ns,
            "last_ts_ns": self._last_ts,
        }
        if self._last_ts is not None:
            state["bar"] = {
                "open_ts_ns": self._open_ts,
                "open": str(self._open),
                "high": str(self._high),
                "low": str(self._low),
                "close": str(self._close),
            }
        return state

    @classmethod
    def restore(cls, snapshot: dict[str, object]) -> BarBuilder:
        """Inverse of `snapshot`; ValueError on a malformed one (never a half-built object)."""
        symbol, interval_ns = snapshot.get("symbol"), snapshot.get("interval_ns")
        last_ts = snapshot.get("last_ts_ns")
        if not isinstance(symbol, str) or not _is_int(interval_ns) or interval_ns <= 0:
            raise ValueError(f"bad BarBuilder snapshot (symbol/interval_ns): {snapshot!r}")
        builder = cls(symbol, interval_ns)
        if last_ts is None:
            return builder
        bar = snapshot.get("bar")
        if not _is_int(last_ts) or not isinstance(bar, dict):
            raise ValueError(f"bad BarBuilder snapshot (last_ts_ns/bar): {snapshot!r}")
        open_ts = bar.get("open_ts_ns")
        prices = [_exact_price(bar.get(k)) for k in ("open", "high", "low", "close")]
        if (
            not _is_int(open_ts)
            or open_ts % interval_ns
            or not open_ts <= last_ts < open_ts + interval_ns
        ):
            raise ValueError(f"bad BarBuilder snapshot (bar open_ts_ns): {snapshot!r}")
        builder._last_ts, builder._open_ts = last_ts, open_ts
        builder._open, builder._high, builder._low, builder._close = prices
        return builder


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _exact_price(text: object) -> Decimal:
    """A finite Decimal from its string form; anything else (a float too) is refused."""
    try:
        price = Decimal(text) if isinstance(text, str) else None
    except ArithmeticError:
        price = None
    if price is None or not price.is_finite():
        raise ValueError(f"bad BarBuilder snapshot price: {text!r}")
    return price
