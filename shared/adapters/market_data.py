"""Load real market history (CSV) into core values, refusing anything doubtful.

The edge where files enter the system: every row is validated (exact `Decimal` prices
parsed from the text, consistent OHLC, strictly increasing timestamps on the interval
grid) and every imperfection that is tolerated rather than refused — listing
placeholders, rows outside the requested window, missing hours — is counted in a
`LoadReport`, so nothing is dropped or assumed silently.

Windows are half-open: a row is kept when `start_ns <= ts < end_ns`.
"""

from __future__ import annotations

import csv
import statistics
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from pathlib import Path

from shared.codec import wire_problem
from shared.core.market import (
    MAX_TS_NS,
    NS_PER_HOUR,
    NS_PER_SECOND,
    Bar,
    FundingRate,
    funding_rate_problem,
    market_figure_problem,
    market_price_problem,
)

BAR_COLUMNS = ("timestamp", "open", "high", "low", "close", "volume")
FUNDING_COLUMNS = ("timestamp", "funding_rate")

# A leading flat bar trading less than this (base units) is a listing placeholder, not a
# price: the data README's BTC rows trade 0.002 and 0.0 at a made-up 10000.0.
PLACEHOLDER_MAX_VOLUME = Decimal(1)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NS_PER_DAY = 86_400 * NS_PER_SECOND


class DataError(ValueError):
    """Input that cannot be trusted; the message names the file, the line and the fault."""


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load did with imperfect input: rows_read == rows_kept + the skipped counts."""

    path: str
    rows_read: int
    rows_kept: int
    placeholder_rows_skipped: int
    rows_outside_window: int
    gaps: int
    missing_bars: int  # or missing settlements, in a funding file (`unit`)
    unit: str = "bar"

    def summary(self) -> str:
        return (
            f"{self.path}: read {self.rows_read} rows, kept {self.rows_kept}; skipped "
            f"{self.placeholder_rows_skipped} listing placeholder(s) and "
            f"{self.rows_outside_window} outside the window; {self.gaps} gap(s) "
            f"totalling {self.missing_bars} missing {self.unit}(s), not filled"
        )


# --- timestamps -----------------------------------------------------------------------


@lru_cache(maxsize=8192)
def _day_ns(text: str) -> int:
    return (date.fromisoformat(text) - _EPOCH.date()).days * _NS_PER_DAY


@lru_cache(maxsize=4096)
def _time_of_day_ns(text: str) -> int:
    t = time.fromisoformat(text)
    return ((t.hour * 60 + t.minute) * 60 + t.second) * NS_PER_SECOND + t.microsecond * 1000


def parse_timestamp(text: str) -> int:
    """ISO-8601 instant with an explicit offset ('Z' or '+00:00') -> integer UTC ns.

    A timestamp without an offset is refused: its instant is ambiguous. The exact form
    'YYYY-MM-DDTHH:MM:SSZ' of the data files takes a cached fast path (a few distinct
    dates and hours cover thousands of rows).
    """
    try:
        if len(text) == 20 and text[10] == "T" and text[13] == text[16] == ":" and text[19] == "Z":
            return _day_ns(text[:10]) + _time_of_day_ns(text[11:19])
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise DataError(f"not an ISO-8601 timestamp: {text!r}") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise DataError(f"timestamp has no UTC offset (ambiguous instant): {text!r}")
    delta = parsed - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * NS_PER_SECOND + delta.microseconds * 1000


def parse_time(text: str | None) -> int | None:
    """A time a person typed: ISO-8601, UTC unless it says otherwise -> ns since the
    epoch (the data files' own timestamps must say, `parse_timestamp`). ValueError."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"{text!r} is not an ISO-8601 time (e.g. 2021-05-12 or 2021-05-12T08:00:00Z)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000


def _format_ns(ts_ns: int) -> str:
    seconds, ns = divmod(ts_ns, NS_PER_SECOND)
    text = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return text if ns == 0 else f"{text} (+{ns} ns)"


def _format_span(span_ns: int) -> str:
    """A span as hours, minutes and seconds (to the ms): "4h34m56.000s"."""
    hours, rest = divmod(span_ns, 3600 * NS_PER_SECOND)
    minutes, rest = divmod(rest, 60 * NS_PER_SECOND)
    return f"{hours}h{minutes:02d}m{rest / NS_PER_SECOND:06.3f}s"


# --- rows -----------------------------------------------------------------------------


class _Rows:
    """Validated CSV rows of one file: maps required column -> text, tracks the line."""

    def __init__(self, path: Path, required: Sequence[str]) -> None:
        self.name = str(path)
        self.path = path
        self.required = required
        self.line = 0

    def error(self, what: str) -> DataError:
        return DataError(f"{self.name}:{self.line}: {what}")

    def __iter__(self) -> Iterator[list[str]]:
        """Yields each data row's required fields in `required` order."""
        try:
            with self.path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.reader(handle)
                header = next(reader, None)
                self.line = reader.line_num
                if header is None:
                    raise DataError(f"{self.name}: empty file (no header line)")
                names = [h.strip() for h in header]
                missing = [c for c in self.required if c not in names]
                if missing:
                    raise self.error(
                        f"missing required column(s) {missing}; the header has {names}"
                    )
                index = [names.index(c) for c in self.required]
                width = len(names)
                for row in reader:
                    self.line = reader.line_num
                    if len(row) != width:
                        raise self.error(
                            "blank line"
                            if not row
                            else f"expected {width} fields, got {len(row)}: {row}"
                        )
                    yield [row[i] for i in index]
        except FileNotFoundError:
            raise DataError(f"{self.name}: file not found") from None
        except csv.Error as exc:
            raise self.error(f"unreadable CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise self.error(f"not UTF-8 text: {exc.reason}") from None
        except OSError as exc:
            raise DataError(f"{self.name}: cannot read: {exc.strerror or exc}") from None

    def timestamp(self, text: str) -> int:
        """An instant ingestion takes (after 1970, before 2262): one it refuses made the
        backtester and the pipeline's replay of the same file differ."""
        try:
            ts = parse_timestamp(text)
        except DataError as exc:
            raise self.error(f"timestamp: {exc}") from None
        if not 0 < ts < MAX_TS_NS:
            raise self.error(f"timestamp: {text!r} is not after 1970 and before 2262")
        return ts

    def number(self, column: str, text: str) -> Decimal:
        """An exact, finite decimal parsed from the file's own text (never via float), of
        at most MAX_MARKET_DECIMALS places, as a replay through ingestion admits it (so
        the backtester and the pipeline see the same ticks)."""
        try:
            value = Decimal(text)
        except (InvalidOperation, ValueError):
            raise self.error(f"{column}: {text!r} is not a number") from None
        if not value.is_finite():
            raise self.error(f"{column}: {text!r} is not finite")
        # the core cannot compute with it either
        beyond = wire_problem(value, column) or market_figure_problem(value, column)
        if beyond is not None:
            raise self.error(beyond)
        return value


class _Order:
    """Strictly increasing timestamps; names the earlier line on a duplicate or disorder."""

    def __init__(self, rows: _Rows) -> None:
        self.rows = rows
        self.prev_ts: int | None = None
        self.prev_line = 0

    def check(self, ts: int) -> None:
        prev = self.prev_ts
        if prev is not None and ts <= prev:
            if ts == prev:
                raise self.rows.error(
                    f"duplicate timestamp {_format_ns(ts)} (also on line {self.prev_line})"
                )
            raise self.rows.error(
                f"timestamps not increasing (unsorted): {_format_ns(ts)} comes after "
                f"{_format_ns(prev)} on line {self.prev_line}"
            )
        self.prev_ts = ts
        self.prev_line = self.rows.line


def _in_window(ts: int, start_ns: int | None, end_ns: int | None) -> bool:
    return (start_ns is None or ts >= start_ns) and (end_ns is None or ts < end_ns)


# --- loaders --------------------------------------------------------------------------


def load_bars(
    path: Path,
    symbol: str,
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
    interval_ns: int = NS_PER_HOUR,
    required: bool = True,
) -> tuple[list[Bar], LoadReport]:
    """Validated OHLCV bars of one file, in time order, with the report of what was skipped.
    None is an error (DataError), but for a file that is not `required` (marks) whose
    rows go on after the window: a window before the file begins (or in a hole of it) is
    then simply without it. A file that ends before the window is still an error (a
    truncated download would run a year without marks, saying nothing).

    Every row is checked, including skipped ones: prices > 0, volume >= 0,
    low <= min(open, close), high >= max(open, close), and each timestamp a whole number
    of intervals after the previous one. Missing intervals are kept as gaps (not filled)
    and counted over the kept rows. Leading flat, near-zero-volume rows before the first
    real bar (high != low) are listing placeholders and skipped.
    """
    if interval_ns <= 0:
        raise ValueError(f"interval_ns must be > 0, got {interval_ns}")
    rows = _Rows(path, BAR_COLUMNS)
    order = _Order(rows)
    bars: list[Bar] = []
    read = placeholders = outside = gaps = missing = later = 0
    leading = True
    for ts_text, o_text, h_text, l_text, c_text, v_text in rows:
        read += 1
        ts = rows.timestamp(ts_text)
        prev = order.prev_ts
        order.check(ts)
        if prev is not None and (ts - prev) % interval_ns:
            raise rows.error(
                f"timestamp {_format_ns(ts)} is not a whole number of intervals "
                f"({interval_ns} ns) after {_format_ns(prev)} on line {order.prev_line}"
            )
        o = rows.number("open", o_text)
        h = rows.number("high", h_text)
        low = rows.number("low", l_text)
        c = rows.number("close", c_text)
        v = rows.number("volume", v_text)
        for column, price in (("open", o), ("high", h), ("low", low), ("close", c)):
            if price <= 0:
                raise rows.error(f"{column} price must be > 0, got {price}")
            beyond = market_price_problem(price, column)
            if beyond is not None:
                raise rows.error(beyond)
        if v < 0:
            raise rows.error(f"volume must be >= 0, got {v}")
        if h < max(o, c) or low > min(o, c):
            raise rows.error(
                f"inconsistent bar: high {h} < max(open, close) or low {low} > "
                f"min(open, close) (open {o}, close {c})"
            )
        if leading:
            if h == low and v < PLACEHOLDER_MAX_VOLUME:
                placeholders += 1
                continue
            leading = False
        if not _in_window(ts, start_ns, end_ns):
            outside += 1
            later += end_ns is not None and ts >= end_ns
            continue
        if bars:
            skipped = _missing(bars[-1].open_ts_ns, ts, interval_ns)
            gaps, missing = gaps + (skipped > 0), missing + skipped
        bars.append(Bar(symbol, ts, o, h, low, c, v))
    report = LoadReport(rows.name, read, len(bars), placeholders, outside, gaps, missing)
    if not bars and (required or not later):
        raise DataError(f"{rows.name}: no bars left ({report.summary()})")
    return bars, report


FUNDING_INTERVAL_NS = 8 * 3600 * 10**9  # the files' settlements: every eight hours
# Closer than this, a settlement is not one of the schedule's (an exchange's own times
# carry milliseconds of jitter, never hours).
LEAST_FUNDING_APART_NS = FUNDING_INTERVAL_NS - 3600 * 10**9


def _missing(previous_ns: int, ts_ns: int, interval_ns: int) -> int:
    """Whole intervals missing between two kept rows (0: none)."""
    return max((ts_ns - previous_ns) // interval_ns - 1, 0)


def load_funding(
    path: Path,
    symbol: str,
    *,
    start_ns: int | None = None,
    end_ns: int | None = None,
) -> tuple[list[FundingRate], LoadReport]:
    """Validated funding settlements: any sign, but |rate| <= MAX_FUNDING_RATE (above it
    is a broken file, not a market), timestamps strictly increasing. A window with no
    settlement has none when the file goes on after it (eight hours or less between two
    settlements, or before the file begins) or when none is due in it (it ends within
    eight hours of the file's last); one a file that stops short of it is an error.
    Settlements missing between two kept ones (more than eight hours apart) are counted
    as gaps, as missing bars are: a replay through them pays no funding there."""
    rows = _Rows(path, FUNDING_COLUMNS)
    order = _Order(rows)
    rates: list[FundingRate] = []
    read = outside = later = gaps = missing = 0
    last_before: int | None = None  # the last settlement before the window
    for ts_text, rate_text in rows:
        read += 1
        ts = rows.timestamp(ts_text)
        prev, prev_line = order.prev_ts, order.prev_line
        order.check(ts)
        if prev is not None and ts - prev < LEAST_FUNDING_APART_NS:
            # charged again: a row repeated with a few ms of jitter, a merge of two
            # downloads, a time between two settlements
            raise rows.error(
                f"settlement at {_format_ns(ts)} is only {_format_span(ts - prev)} after "
                f"the one on line {prev_line}: the files settle every eight hours (a "
                "repeated row, or one off the schedule)"
            )
        rate = rows.number("funding_rate", rate_text)
        beyond = funding_rate_problem(rate, "funding_rate")
        if beyond is not None:
            raise rows.error(beyond)
        if not _in_window(ts, start_ns, end_ns):
            outside += 1
            later += end_ns is not None and ts >= end_ns
            if start_ns is not None and ts < start_ns:
                last_before = ts
            continue
        if rates:
            skipped = _missing(rates[-1].ts_ns, ts, FUNDING_INTERVAL_NS)
            gaps, missing = gaps + (skipped > 0), missing + skipped
        rates.append(FundingRate(symbol, ts, rate))
    report = LoadReport(rows.name, read, len(rates), 0, outside, gaps, missing, "settlement")
    # none due: the window ends before the settlement after the last one the file has
    none_due = (
        end_ns is not None
        and last_before is not None
        and end_ns <= last_before + FUNDING_INTERVAL_NS
    )
    if not rates and not later and not none_due:
        raise DataError(f"{rows.name}: no funding rates left ({report.summary()})")
    return rates, report


def load_marks(
    path: Path, *, start_ns: int | None = None, end_ns: int | None = None
) -> dict[int, Decimal]:
    """Mark-price file -> {bar open ts_ns: mark close} (`load_marks_reported`)."""
    return load_marks_reported(path, start_ns=start_ns, end_ns=end_ns)[0]


def load_marks_reported(
    path: Path, *, start_ns: int | None = None, end_ns: int | None = None
) -> tuple[dict[int, Decimal], LoadReport]:
    """Mark-price file -> {bar open ts_ns: mark close}, validated as hourly bars (none
    in a window the file does not reach: its ticks go without a mark), with the report
    of what was skipped."""
    bars, report = load_bars(path, "mark", start_ns=start_ns, end_ns=end_ns, required=False)
    return {bar.open_ts_ns: bar.close for bar in bars}, report


# The same market's mark stays next to its last trade: over 2019-2023 the median of
# |mark close / trade close - 1| is 0.008% for BTC and 0.010% for ETH (0.18% and 0.24%
# in their worst day, 2.6% and 0.9% in their worst hour); ETH marks against BTC trades
# give 93.7%, BTC marks against ETH trades 1,493%. Far from both:
MAX_MEDIAN_MARK_DEVIATION = Decimal("0.05")


def check_covered(
    bars: Sequence[Bar],
    interval_ns: int,
    marks: Mapping[int, Decimal] | None,
    marks_name: str,
    rates: Sequence[FundingRate] | None,
    funding_name: str,
) -> None:
    """DataError if the marks or the funding stop short of the bars: a file cut off inside
    the window (a download that stopped) left every tick after its end with the last
    mark, frozen for months (the risk rules and the venue's liquidation read it), or no
    funding paid, with nothing said. The last mark must be of the last bar or the one
    before; the settlement due after the last one must fall after the last bar closes."""
    if not bars:
        return
    last_ns = bars[-1].open_ts_ns
    if marks and max(marks) < last_ns - interval_ns:
        raise DataError(
            f"{marks_name}: the marks end at {_format_ns(max(marks))}, before the bars do "
            f"({_format_ns(last_ns)}): the file stops short of the window"
        )
    if rates and rates[-1].ts_ns + FUNDING_INTERVAL_NS < last_ns + interval_ns:
        raise DataError(
            f"{funding_name}: the funding ends at {_format_ns(rates[-1].ts_ns)}, more than "
            f"eight hours before the bars do ({_format_ns(last_ns)}): the file stops short"
        )


@dataclass(frozen=True, slots=True)
class MarketFiles:
    """A symbol's bars in a window, with the funding settled and the marks over it."""

    bars: list[Bar]
    rates: list[FundingRate]
    marks: dict[int, Decimal] | None
    reports: list[LoadReport]  # the bars', then the funding's and the marks' if given


def load_market(
    data: Path,
    symbol: str,
    *,
    funding: Path | None = None,
    marks: Path | None = None,
    start_ns: int | None = None,
    end_ns: int | None = None,
    interval_ns: int = NS_PER_HOUR,
) -> MarketFiles:
    """What the backtest command and the replay stream both run on: the files loaded and
    checked against each other (DataError if a file is named for another market, the
    marks are another market's, or the marks or the funding stop short of the bars); the
    settlements are those within the bars' span."""
    for path in (data, funding, marks):
        if path is not None:
            check_named_for(path, symbol)
    bars, report = load_bars(
        data, symbol, start_ns=start_ns, end_ns=end_ns, interval_ns=interval_ns
    )
    reports = [report]
    rates: list[FundingRate] = []
    if funding:
        # The bars' span, not only the window: a settlement after the last bar closes is
        # paid at its last price with no tick after it (a bars file that stops short
        # paid four years of funding at one frozen price), one before the first bar
        # pays nothing, and neither is a settlement of the run.
        first, end = bars[0].open_ts_ns, bars[-1].open_ts_ns + interval_ns
        span = {"start_ns": max(first, start_ns or first), "end_ns": min(end, end_ns or end)}
        rates, report = load_funding(funding, symbol, **span)
        reports.append(report)
    mark_prices = None
    if marks:
        mark_prices, report = load_marks_reported(marks, start_ns=start_ns, end_ns=end_ns)
        reports.append(report)
        check_marks_match(bars, mark_prices, str(marks))
    check_covered(bars, interval_ns, mark_prices, str(marks), rates, str(funding))
    return MarketFiles(bars, rates, mark_prices, reports)


def check_named_for(path: Path, symbol: str) -> None:
    """DataError if the file's name starts with another market's symbol in the data
    files' naming (`BTCUSDT_perp_1h...` given for ETH-USDT: its prices traded as the
    other market's, silently, unless marks were given to cross-check). A name that
    names no market this way (`prices.csv`) is not judged."""
    base, _, quote = symbol.partition("-")
    named = path.stem.split("_", 1)[0]
    if named.isupper() and named.isalnum() and named.endswith(quote) and named != base + quote:
        raise DataError(
            f"{path}: the file is named for {named}, not {symbol} ({base + quote}_...); "
            "pass the files of the market traded"
        )


def check_marks_match(bars: Sequence[Bar], marks: Mapping[int, Decimal], marks_name: str) -> None:
    """DataError if the marks cannot be the traded market's: the median distance from
    the bars' closes over the hours both have is above MAX_MEDIAN_MARK_DEVIATION (ETH
    marks with BTC bars liquidated the leveraged benchmarks on the first tick, silently).
    No hour in common: nothing to compare, and no tick carries a mark."""
    deviations = [
        abs(marks[bar.open_ts_ns] / bar.close - 1) for bar in bars if bar.open_ts_ns in marks
    ]
    if not deviations:
        return
    median = statistics.median(deviations)
    if median > MAX_MEDIAN_MARK_DEVIATION:
        raise DataError(
            f"{marks_name}: the marks are not this market's: their closes are a median "
            f"{median:.1%} from the traded closes over {len(deviations)} hour(s) "
            f"(the same market's stay within {MAX_MEDIAN_MARK_DEVIATION:.0%})"
        )
