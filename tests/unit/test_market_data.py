"""Loading the real Binance files, and refusing broken ones with a clear message.

Expected values are recomputed from the raw files with the plain csv module (an
independent reading), never copied in; the only facts taken as given are the data
README's statements (BTC placeholder until 2019-09-08 19:00, perps have no gaps).
"""

from __future__ import annotations

import csv
import itertools
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from shared.adapters.market_data import (
    DataError,
    LoadReport,
    check_marks_match,
    check_named_for,
    load_bars,
    load_funding,
    load_market,
    load_marks,
    load_marks_reported,
    parse_timestamp,
)
from shared.adapters.tick_replay import ReplaySource, backtest_stream, data_dir
from shared.core.market import NS_PER_HOUR, Bar, Tick

DATA = data_dir()  # $SMARTLEV_DATA_DIR, else ../shared/data
BTC_PERP = DATA / "BTCUSDT_perp_1h_2019_2023.csv"
BTC_SPOT = DATA / "BTCUSDT_spot_1h_2019_2023.csv"
BTC_MARK = DATA / "BTCUSDT_mark_1h_2019_2023.csv"
BTC_FUNDING = DATA / "BTCUSDT_funding_8h_2019_2023.csv"
ETH_PERP = DATA / "ETHUSDT_perp_1h_2019_2023.csv"
ETH_MARK = DATA / "ETHUSDT_mark_1h_2019_2023.csv"

needs_data = pytest.mark.skipif(
    not BTC_PERP.exists(), reason=f"real market data not found under {DATA}"
)

HEADER = "timestamp,open,high,low,close,volume\n"


def ns(text: str) -> int:
    """Independent reference conversion (strptime, not the loader's code path)."""
    dt = datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    return int(dt.timestamp()) * 1_000_000_000


def raw_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def write(tmp_path: Path, body: str, name: str = "bars.csv") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


# --- real data ------------------------------------------------------------------------


@needs_data
def test_btc_perp_skips_listing_placeholder_and_has_no_gaps() -> None:
    rows = raw_rows(BTC_PERP)
    bars, report = load_bars(BTC_PERP, "BTC-USDT")
    first_real = ns("2019-09-08T19:00:00Z")  # data README: placeholder until 19:00
    placeholders = [r for r in rows if ns(r["timestamp"]) < first_real]
    assert placeholders and all(
        len({r["open"], r["high"], r["low"], r["close"]}) == 1 for r in placeholders
    )
    assert report.rows_read == len(rows)
    assert report.placeholder_rows_skipped == len(placeholders)
    assert report.rows_kept == len(bars) == len(rows) - len(placeholders)
    assert bars[0].open_ts_ns == first_real
    assert bars[0].high != bars[0].low
    assert (report.gaps, report.missing_bars, report.rows_outside_window) == (0, 0, 0)
    last = rows[-1]
    assert bars[-1].open_ts_ns == ns(last["timestamp"])
    assert bars[-1].close == Decimal(last["close"])  # exact text, no float on the way
    assert all(b.symbol == "BTC-USDT" for b in bars)


@needs_data
def test_btc_spot_gaps_are_counted_not_filled() -> None:
    rows = raw_rows(BTC_SPOT)
    stamps = [ns(r["timestamp"]) for r in rows]
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    expected_gaps = sum(1 for s in steps if s > NS_PER_HOUR)
    expected_missing = sum(s // NS_PER_HOUR - 1 for s in steps)
    bars, report = load_bars(BTC_SPOT, "BTC-USDT")
    # The data README says "14 short gaps of 2-3 hours"; the file itself has more (and
    # some longer), so the count is checked against the file, not the README.
    assert expected_gaps > 0
    assert (report.gaps, report.missing_bars) == (expected_gaps, expected_missing)
    assert [b.open_ts_ns for b in bars] == stamps  # gaps left as-is
    assert report.placeholder_rows_skipped == 0


@needs_data
def test_window_filtering_is_half_open_and_counted() -> None:
    start, end = ns("2020-03-12T00:00:00Z"), ns("2020-03-13T00:00:00Z")
    bars, report = load_bars(BTC_PERP, "BTC-USDT", start_ns=start, end_ns=end)
    assert [b.open_ts_ns for b in bars] == list(range(start, end, NS_PER_HOUR))
    assert report.rows_kept == 24
    assert report.rows_read == len(raw_rows(BTC_PERP))
    assert (
        report.rows_kept + report.rows_outside_window + report.placeholder_rows_skipped
        == report.rows_read
    )
    with pytest.raises(DataError, match="no bars left"):
        load_bars(BTC_PERP, "BTC-USDT", start_ns=ns("2030-01-01T00:00:00Z"))


@needs_data
def test_funding_loads_within_bounds() -> None:
    rows = raw_rows(BTC_FUNDING)
    rates, report = load_funding(BTC_FUNDING, "BTC-USDT")
    assert report.rows_kept == len(rates) == len(rows)
    assert [r.rate for r in rates] == [Decimal(r["funding_rate"]) for r in rows]
    assert all(abs(r.rate) < 1 for r in rates)
    assert any(r.rate < 0 for r in rates)  # negative funding is real and accepted
    cut = rates[len(rates) // 2].ts_ns
    later, windowed = load_funding(BTC_FUNDING, "BTC-USDT", start_ns=cut)
    assert later[0].ts_ns == cut and windowed.rows_outside_window == len(rows) // 2
    # a window between two settlements has none (a replay of it was refused)
    between, _ = load_funding(
        BTC_FUNDING, "BTC-USDT", start_ns=cut + 1, end_ns=cut + 7 * NS_PER_HOUR
    )
    assert between == []


@needs_data
def test_funding_gaps_are_counted_not_filled(tmp_path: Path) -> None:
    """Settlements every 8 h (data README: 00/08/16 UTC); a file with some missing was
    reported "0 gap(s)". The real file has none; one with rows cut out has them."""
    rows = raw_rows(BTC_FUNDING)
    stamps = [ns(r["timestamp"]) for r in rows]
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    assert all(s == 8 * NS_PER_HOUR for s in steps)  # an independent reading: no gap
    _, report = load_funding(BTC_FUNDING, "BTC-USDT")
    assert (report.gaps, report.missing_bars) == (0, 0)
    cut = [rows[i] for i in range(len(rows)) if i not in (10, 500, 501, 502)]
    body = "timestamp,funding_rate\n" + "".join(
        f"{r['timestamp']},{r['funding_rate']}\n" for r in cut
    )
    _, report = load_funding(write(tmp_path, body, "funding.csv"), "BTC-USDT")
    assert (report.gaps, report.missing_bars) == (2, 4)
    assert "2 gap(s) totalling 4 missing settlement(s)" in report.summary()


def test_funding_gap_counting(tmp_path: Path) -> None:
    """Gaps count between kept settlements only, as bars' do."""
    hours = ("2020-01-01T00", "2020-01-01T16", "2020-01-02T00", "2020-01-03T00", "2020-01-03T08")
    body = "timestamp,funding_rate\n" + "".join(f"{h}:00:00Z,0.0001\n" for h in hours)
    path = write(tmp_path, body, "funding.csv")
    rates, report = load_funding(path, "X")
    assert len(rates) == 5
    assert report == LoadReport(str(path), 5, 5, 0, 0, 2, 3, "settlement")
    window = {"start_ns": ns("2020-01-01T08:00:00Z"), "end_ns": ns("2020-01-03T00:00:00Z")}
    _, report = load_funding(path, "X", **window)
    assert (report.rows_kept, report.gaps, report.missing_bars) == (2, 0, 0)


@needs_data
def test_marks_map_bar_open_to_mark_close() -> None:
    rows = raw_rows(BTC_MARK)
    start = ns(rows[100]["timestamp"])
    marks = load_marks(BTC_MARK, start_ns=start, end_ns=start + 3 * NS_PER_HOUR)
    assert marks == {ns(r["timestamp"]): Decimal(r["close"]) for r in rows[100:103]}
    # the mark file begins months after the perp file: a window before it has no marks
    # (its ticks go without one; a replay of it was refused)
    first = ns(rows[0]["timestamp"])
    assert load_marks(BTC_MARK, start_ns=first - 24 * NS_PER_HOUR, end_ns=first) == {}
    assert load_bars(BTC_PERP, "BTC-USDT", start_ns=first - 24 * NS_PER_HOUR, end_ns=first)[0]


@needs_data
def test_a_window_after_a_file_ends_is_an_error_not_an_empty_file(tmp_path: Path) -> None:
    """A truncated download ran a year's replay without funding or marks, saying
    nothing: only a window the file goes on after may leave all its rows out."""
    for source, name in ((BTC_MARK, "marks.csv"), (BTC_FUNDING, "funding.csv")):
        with source.open() as whole:
            head = "".join(itertools.islice(whole, 400))  # the header and 399 rows
        (tmp_path / name).write_text(head)
    year = {"start_ns": ns("2022-01-01T00:00:00Z"), "end_ns": ns("2023-01-01T00:00:00Z")}
    with pytest.raises(DataError, match="no bars left"):
        load_marks(tmp_path / "marks.csv", **year)
    with pytest.raises(DataError, match="no funding rates left"):
        load_funding(tmp_path / "funding.csv", "BTC-USDT", **year)
    # the real file ends at 2023-12-31 16:00: none is due before 2024-01-01 00:00
    tail = {"start_ns": ns("2023-12-31T17:00:00Z"), "end_ns": ns("2024-01-01T00:00:00Z")}
    assert load_funding(BTC_FUNDING, "BTC-USDT", **tail)[0] == []
    with pytest.raises(DataError, match="no funding rates left"):  # one was due at 00:00
        load_funding(BTC_FUNDING, "BTC-USDT", start_ns=tail["start_ns"], end_ns=tail["end_ns"] + 1)


@needs_data
def test_marks_or_funding_that_stop_inside_the_window_are_an_error(tmp_path: Path) -> None:
    """A file cut off inside the window (a download that stopped at 2021-01-01) left the
    last mark on 14,496 ticks while the price ran from 29k to 64k and back, or paid
    642 settlements of 1,737, saying nothing. The whole files cover the window."""
    for source, name in ((BTC_MARK, "marks.csv"), (BTC_FUNDING, "funding.csv")):
        with source.open() as whole:
            rows = [line for line in whole if line[:4] < "2021" or line.startswith("timestamp")]
        (tmp_path / name).write_text("".join(rows))
    window = {"start_ns": ns("2020-12-30T00:00:00Z"), "end_ns": ns("2021-06-01T00:00:00Z")}
    whole = {"marks": BTC_MARK, "funding": BTC_FUNDING}
    assert next(iter(backtest_stream(BTC_PERP, "BTC-USDT", **whole, **window)))
    cut = {**whole, "marks": tmp_path / "marks.csv"}
    with pytest.raises(DataError, match=r"the marks end at 2020-12-31T23:00:00Z, before"):
        backtest_stream(BTC_PERP, "BTC-USDT", **cut, **window)
    cut = {**whole, "funding": tmp_path / "funding.csv"}
    with pytest.raises(DataError, match=r"the funding ends at 2020-12-31T16:00:00Z, more"):
        backtest_stream(BTC_PERP, "BTC-USDT", **cut, **window)
    # a window the cut files still cover is theirs alone
    early = {"start_ns": ns("2020-12-01T00:00:00Z"), "end_ns": ns("2021-01-01T00:00:00Z")}
    files = {"marks": tmp_path / "marks.csv", "funding": tmp_path / "funding.csv"}
    assert next(iter(backtest_stream(BTC_PERP, "BTC-USDT", **files, **early)))


@needs_data
def test_the_settlements_run_are_those_within_the_bars(tmp_path: Path) -> None:
    """A bars file that stops short (cut at 2019-10-20) with the whole funding file paid
    its 4,600 later settlements at the last price, frozen, with no tick between them
    (smart long NAV 28.37 against 73.76); bars that start late counted every settlement
    before them. The funding is the bars' span, however wide the window."""
    all_rates = load_funding(BTC_FUNDING, "BTC-USDT")[0]
    with BTC_PERP.open() as whole:
        lines = whole.readlines()
    cuts = {"head.csv": lines[:1001], "tail.csv": [lines[0], *lines[-288:]]}
    for name, rows in cuts.items():
        (tmp_path / name).write_text("".join(rows))
        loaded = load_market(tmp_path / name, "BTC-USDT", funding=BTC_FUNDING, marks=BTC_MARK)
        first, close = loaded.bars[0].open_ts_ns, loaded.bars[-1].open_ts_ns + NS_PER_HOUR
        inside = [rate for rate in all_rates if first <= rate.ts_ns < close]
        assert len(inside) < len(all_rates) / 10 and loaded.rates == inside, name
        assert loaded.reports[1].rows_kept == len(inside), name
        events = list(backtest_stream(tmp_path / name, "BTC-USDT", funding=BTC_FUNDING))
        assert isinstance(events[-1], Tick), name


@needs_data
def test_a_replay_source_is_the_backtest_stream_of_its_window() -> None:
    """Its own merge let funding run on past the window's end (2,919 settlements to the
    end of 2023 after two days of ticks)."""
    start, end = ns("2021-05-01T00:00:00Z"), ns("2021-05-03T00:00:00Z")
    source = ReplaySource(symbol="BTC-USDT", directory=DATA, start_ns=start, end_ns=end)
    events = list(source.market_values())
    assert events and all(start <= e.ts_ns < end for e in events)
    files = {"marks": BTC_MARK, "funding": BTC_FUNDING, "start_ns": start, "end_ns": end}
    assert events == list(backtest_stream(BTC_PERP, "BTC-USDT", **files))


@needs_data
def test_marks_come_with_their_load_report() -> None:
    rows = raw_rows(BTC_MARK)
    start = ns(rows[100]["timestamp"])
    marks, report = load_marks_reported(BTC_MARK, start_ns=start, end_ns=start + 3 * NS_PER_HOUR)
    assert marks == load_marks(BTC_MARK, start_ns=start, end_ns=start + 3 * NS_PER_HOUR)
    assert (report.rows_read, report.rows_kept) == (len(rows), 3)
    assert report.rows_outside_window == len(rows) - 3
    assert report.summary().startswith(f"{BTC_MARK}: read {len(rows)} rows, kept 3;")


@needs_data
def test_marks_of_another_market_are_refused() -> None:
    """ETH marks with BTC bars were taken silently (the 2x and 3x longs liquidated on
    the first tick). The same market's marks pass, either asset."""
    for perp, mark in ((BTC_PERP, BTC_MARK), (ETH_PERP, ETH_MARK)):
        check_marks_match(load_bars(perp, "X")[0], load_marks(mark), str(mark))
    btc, _ = load_bars(BTC_PERP, "BTC-USDT")
    with pytest.raises(DataError) as caught:
        check_marks_match(btc, load_marks(ETH_MARK), str(ETH_MARK))
    message = str(caught.value)
    assert message.startswith(f"{ETH_MARK}: the marks are not this market's")
    assert "a median 93.7% from the traded closes over 35269 hour(s)" in message


@needs_data
def test_a_replay_refuses_marks_of_another_market_as_the_backtest_does(tmp_path: Path) -> None:
    """`backtest_stream` (ingestion's replay) is the backtest's stream: the same refusal,
    also of marks whose file name does not say whose they are."""
    window = {"start_ns": ns("2021-05-01T00:00:00Z"), "end_ns": ns("2021-05-03T00:00:00Z")}
    assert next(iter(backtest_stream(BTC_PERP, "BTC-USDT", marks=BTC_MARK, **window)))
    unnamed = tmp_path / "marks.csv"
    unnamed.write_bytes(ETH_MARK.read_bytes())
    with pytest.raises(DataError, match="the marks are not this market's"):
        backtest_stream(BTC_PERP, "BTC-USDT", marks=unnamed, **window)


@pytest.mark.parametrize(
    ("name", "symbol", "refused"),
    [
        ("BTCUSDT_perp_1h_2019_2023.csv", "ETH-USDT", True),
        ("ETHUSDT_funding_8h_2019_2023.csv", "BTC-USDT", True),
        ("BTCUSDT_perp_1h_2019_2023.csv", "BTC-USDT", False),
        ("ETHUSDT.csv", "BTC-USDT", True),
        ("prices_1h.csv", "ETH-USDT", False),  # names no market: not judged
        ("BTC_1h.csv", "ETH-USDT", False),  # not the data files' naming
        ("ETHBTC_perp.csv", "ETH-USDT", False),  # another quote: not this naming either
    ],
)
def test_a_file_named_for_another_market_is_refused(name: str, symbol: str, refused: bool) -> None:
    """BTC's hours replayed as ETH-USDT (a mistyped --symbol, or file) were taken: ETH's
    products marked at BTC's prices, unless marks were given to cross-check."""
    if not refused:
        check_named_for(Path(name), symbol)
        return
    with pytest.raises(DataError, match=f"the file is named for .*, not {symbol}"):
        check_named_for(Path(name), symbol)


def test_the_backtest_and_the_replay_refuse_another_markets_files() -> None:
    window = {"start_ns": ns("2021-05-01T00:00:00Z"), "end_ns": ns("2021-05-03T00:00:00Z")}
    for files in ({"data": BTC_PERP}, {"data": ETH_PERP, "marks": BTC_MARK}):
        with pytest.raises(DataError, match="is named for BTCUSDT, not ETH-USDT"):
            backtest_stream(symbol="ETH-USDT", **files, **window)  # type: ignore[arg-type]


@pytest.mark.parametrize(("mark", "refused"), [("104.9", False), ("95.1", False), ("105.1", True)])
def test_marks_are_refused_past_a_median_five_percent_from_the_trades(
    mark: str, refused: bool
) -> None:
    """The bound is the median's: one hour far off (a wick) does not refuse a file, and
    an hour without a mark is not compared."""
    price = Decimal(100)
    bars = [
        Bar("X", ns(f"2020-01-01T0{hour}:00:00Z"), price, price, price, price, Decimal(1))
        for hour in range(4)
    ]
    marks = {bars[0].open_ts_ns: Decimal(200)} | {b.open_ts_ns: Decimal(mark) for b in bars[1:3]}
    if refused:
        with pytest.raises(DataError, match=r"a median 5\.1% from the traded closes over 3 hour"):
            check_marks_match(bars, marks, "marks.csv")
    else:
        check_marks_match(bars, marks, "marks.csv")
    check_marks_match(bars, {}, "marks.csv")  # no hour in common: nothing to compare


# --- timestamps -----------------------------------------------------------------------


def test_parse_timestamp_forms() -> None:
    z = parse_timestamp("2019-09-08T17:00:00Z")
    assert z == ns("2019-09-08T17:00:00Z")
    assert parse_timestamp("2019-09-08T17:00:00+00:00") == z
    assert parse_timestamp("2019-09-08T19:00:00+02:00") == z
    assert parse_timestamp("2019-09-08T17:00:00.5Z") == z + 500_000_000
    assert parse_timestamp("2019-09-08T18+01:00") == z  # hours and an offset


@pytest.mark.parametrize(
    "text",
    [
        "",
        "junk",
        "2019-13-01T00:00:00Z",
        "2019-09-08T25:00:00Z",
        "2019-09-08T17:00:00",
        "2019-09-08T17+01:00Z",  # both an offset and Z: read as 17:00 UTC before
        "2019-09-08T17:00-12Z",
    ],
)
def test_parse_timestamp_rejects_junk_and_naive(text: str) -> None:
    with pytest.raises(DataError):
        parse_timestamp(text)


# --- broken files ---------------------------------------------------------------------

GOOD = "2020-01-01T00:00:00Z,100,110,90,105,1\n"


@pytest.mark.parametrize(
    ("body", "line", "fragments"),
    [
        (HEADER + GOOD + "2020-01-01T01:00:00Z,abc,110,90,105,1\n", 3, ["open", "'abc'"]),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,NaN,90,105,1\n", 3, ["high", "not finite"]),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,110,-90,105,1\n", 3, ["low", "> 0"]),
        (  # a price no asset trades near: the books' figures would pass the wire's digits
            HEADER + GOOD + "2020-01-01T01:00:00Z,100,5e37,90,105,1\n",
            3,
            ["high", "above the highest price taken (1,000,000,000,000)"],
        ),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,110,90,105,-1\n", 3, ["volume", ">= 0"]),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,104,90,105,1\n", 3, ["inconsistent"]),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,110,101,105,1\n", 3, ["inconsistent"]),
        (HEADER + GOOD + GOOD, 3, ["duplicate", "line 2"]),
        (
            HEADER + GOOD + "2020-01-01T02:00:00Z,100,110,90,105,1\n"
            "2020-01-01T01:00:00Z,100,110,90,105,1\n",
            4,
            ["unsorted", "line 3"],
        ),
        (HEADER + GOOD + "2020-01-01T01:30:00Z,100,110,90,105,1\n", 3, ["whole number"]),
        (HEADER + GOOD + "yesterday,100,110,90,105,1\n", 3, ["timestamp", "'yesterday'"]),
        (  # ingestion refuses it: the backtester and the pipeline's replay differed
            HEADER + "1969-12-31T23:00:00Z,100,110,90,105,1\n" + GOOD,
            2,
            ["timestamp", "not after 1970"],
        ),
        (HEADER + GOOD + "2020-01-01T01:00:00Z,100,110,90\n", 3, ["expected 6 fields"]),
        (HEADER + GOOD + "\n", 3, ["blank line"]),
    ],
)
def test_bad_rows_name_file_line_and_problem(
    tmp_path: Path, body: str, line: int, fragments: list[str]
) -> None:
    path = write(tmp_path, body)
    with pytest.raises(DataError) as caught:
        load_bars(path, "X")
    message = str(caught.value)
    assert f"{path}:{line}:" in message
    for fragment in fragments:
        assert fragment in message


def test_missing_columns_are_named(tmp_path: Path) -> None:
    path = write(tmp_path, "timestamp,open,high,close\n" + "2020-01-01T00:00:00Z,1,1,1\n")
    with pytest.raises(DataError) as caught:
        load_bars(path, "X")
    message = str(caught.value)
    assert "'low'" in message and "'volume'" in message  # which are missing
    assert "['timestamp', 'open', 'high', 'close']" in message  # which exist


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty file"):
        load_bars(write(tmp_path, ""), "X")
    with pytest.raises(DataError, match="no bars left"):
        load_bars(write(tmp_path, HEADER, "header_only.csv"), "X")
    with pytest.raises(DataError, match="no bars left"):  # no window left it out
        load_marks(write(tmp_path, HEADER, "marks_header_only.csv"))
    with pytest.raises(DataError, match="no funding rates left"):
        load_funding(write(tmp_path, "timestamp,funding_rate\n", "funding.csv"), "X")
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=f"{missing}: file not found"):
        load_bars(missing, "X")
    with pytest.raises(DataError, match="not found"):
        load_funding(missing, "X")


def test_placeholder_rule_is_leading_flat_low_volume_only(tmp_path: Path) -> None:
    body = (
        HEADER
        + "2020-01-01T00:00:00Z,50,50,50,50,0.002\n"  # placeholder
        + "2020-01-01T01:00:00Z,50,50,50,50,0\n"  # placeholder
        + "2020-01-01T03:00:00Z,100,110,90,105,7\n"  # first real bar (gap before it)
        + "2020-01-01T04:00:00Z,105,105,105,105,0\n"  # flat but not leading: kept
    )
    bars, report = load_bars(write(tmp_path, body), "X")
    assert [b.close for b in bars] == [Decimal(105), Decimal(105)]
    assert report.placeholder_rows_skipped == 2
    assert (report.gaps, report.missing_bars) == (0, 0)  # gaps count kept rows only
    assert "2 listing placeholder(s)" in report.summary()


def test_gap_counting(tmp_path: Path) -> None:
    body = HEADER + "".join(
        f"2020-01-01T{h:02d}:00:00Z,100,110,90,105,1\n" for h in (0, 1, 4, 5, 7)
    )
    bars, report = load_bars(write(tmp_path, body), "X")
    assert report == LoadReport(str(tmp_path / "bars.csv"), 5, 5, 0, 0, 2, 3)
    assert len(bars) == 5


def test_prices_are_exact_decimals(tmp_path: Path) -> None:
    # 20 significant digits, 12 places (the most a market figure may have): a float
    # keeps 17 of them
    body = HEADER + "2020-01-01T00:00:00Z,0.1,12345678.123456789012,0.1,0.2,1e-3\n"
    (bar,), _ = load_bars(write(tmp_path, body), "X")
    assert bar.high == Decimal("12345678.123456789012") != Decimal(float(bar.high))
    assert bar.volume == Decimal("0.001")


@pytest.mark.parametrize(
    ("row", "fragments"),
    [
        ("2020-01-01T08:00:00Z,1\n", ["funding_rate", "|rate| must be <= 0.05"]),
        ("2020-01-01T08:00:00Z,0.0500001\n", ["out of bounds"]),
        ("2020-01-01T08:00:00Z,0.0001000000000\n", ["13 decimal places, more than 12"]),
        ("2020-01-01T08:00:00Z,-1.5\n", ["out of bounds"]),
        ("2020-01-01T08:00:00Z,inf\n", ["not finite"]),
        ("2020-01-01T00:00:00Z,0.0001\n", ["duplicate"]),
        # charged twice: a repeat with an exchange's ms of jitter, one off the schedule
        ("2020-01-01T00:00:00.004Z,0.0001\n", ["only 0h00m00.004s after the one on line 2"]),
        ("2020-01-01T04:34:56Z,0.0001\n", ["only 4h34m56.000s after", "every eight hours"]),
        ("2020-01-01T06:59:59Z,0.0001\n", ["only 6h59m59.000s after"]),
    ],
)
def test_bad_funding_rows(tmp_path: Path, row: str, fragments: list[str]) -> None:
    path = write(tmp_path, "timestamp,funding_rate\n2020-01-01T00:00:00Z,-0.0003\n" + row)
    with pytest.raises(DataError) as caught:
        load_funding(path, "X")
    assert f"{path}:3:" in str(caught.value)
    for fragment in fragments:
        assert fragment in str(caught.value)
