"""The backtester on the real 2019-2023 data, and its command line on bad input."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner, Result

from shared.adapters.market_data import (
    load_bars,
    load_funding,
    load_market,
    load_marks,
    parse_timestamp,
)
from shared.adapters.tick_replay import data_dir
from shared.backtest import metrics, run_backtest, write_metrics, write_nav_csv
from shared.cli import app, summary_table
from shared.codec import decimal_from_wire, decimal_to_wire
from shared.core.config import MARK_STEP, StrategyConfig
from shared.core.engine import Strategy
from shared.core.leverage import LeverageConfig
from shared.core.market import NS_PER_YEAR, Tick
from shared.core.money import MoneyError
from shared.core.venue import PerpVenue, VenueConfig

DATA = data_dir()
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"real data not found at {DATA}")
runner = CliRunner()


ALL_IN_AT_5X = LeverageConfig(
    warmup_leverage=5.0, base_trend_aligned=5.0, base_range=5.0, base_high_vol=5.0,
    base_trend_against=5.0, sigma_reference=20.0, max_raise_per_bar=1.0,
)  # fmt: skip


@needs_data
@pytest.mark.parametrize("symbol", ["BTC-USDT", "ETH-USDT"])
def test_the_margins_a_config_takes_are_not_liquidated_in_march_2020(symbol: str) -> None:
    """DESIGN section 5 at the config's edge: a policy at 5x whatever the regime, through
    the real hours of the March 2020 crash (a mark step of 13.7-21% in an hour). At the
    largest margin the check takes the account is never liquidated; at 0.09, which the
    check took before (twice the ceiling), it was."""
    asset = symbol.removesuffix("-USDT")
    loaded = load_market(
        DATA / f"{asset}USDT_perp_1h_2019_2023.csv", symbol,
        funding=DATA / f"{asset}USDT_funding_8h_2019_2023.csv",
        marks=DATA / f"{asset}USDT_mark_1h_2019_2023.csv",
        start_ns=parse_timestamp("2020-03-01T00:00:00Z"),
        end_ns=parse_timestamp("2020-04-01T00:00:00Z"),
    )  # fmt: skip
    step, ceiling = MARK_STEP, ALL_IN_AT_5X.leverage_ceiling
    edge = Decimal((1 - ceiling * step) / (ceiling * (1 + step))).quantize(Decimal("0.0001"))
    liquidations = []
    for margin in (edge - Decimal("0.0001"), Decimal("0.09")):
        venue = {"maintenance_margin": margin, "initial_margin": Decimal("0.1")}
        if margin > edge:
            with pytest.raises(ValidationError, match="maintenance_margin"):
                StrategyConfig.model_validate({"leverage": ALL_IN_AT_5X, "venue": venue})
        config = StrategyConfig.model_construct(leverage=ALL_IN_AT_5X, venue=VenueConfig(**venue))
        result = run_backtest(
            symbol, loaded.bars, loaded.rates, config, marks=loaded.marks, benchmarks=False
        )
        liquidations.append(sum(m["venue_liquidations"] for m in metrics(result).values()))
    taken, refused = liquidations
    assert taken == 0 < refused, liquidations


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("asset", ["BTC", "ETH"])
def test_smart_products_survive_2019_2023_where_fixed_3x_is_wiped_out(
    asset: str, capsys: pytest.CaptureFixture[str]
) -> None:
    symbol = f"{asset}-USDT"
    bars, _ = load_bars(DATA / f"{asset}USDT_perp_1h_2019_2023.csv", symbol)
    funding, _ = load_funding(DATA / f"{asset}USDT_funding_8h_2019_2023.csv", symbol)
    marks = load_marks(DATA / f"{asset}USDT_mark_1h_2019_2023.csv")
    lowest: dict[str, Decimal] = {}

    def every_tick(tick: Tick, regime: str | None, strategies: Sequence[Strategy]) -> None:
        """The NAV at every tick, not only at bar closes: the rules watch the mark, the
        books value at the last trade (ETH printed 323 on 2020-03-13 against a mark of
        96.6; the short's NAV was -177.87 on that tick, between two bar closes)."""
        for strategy in strategies:
            for product, book in strategy.engine.books.products.items():
                nav = book.nav(tick.price)
                lowest[product] = min(nav, lowest.get(product, nav))

    result = run_backtest(symbol, bars, funding, StrategyConfig(), marks=marks, on_tick=every_tick)
    figures = metrics(result)
    with capsys.disabled():
        from rich.console import Console

        Console(width=180).print(summary_table(figures))
    start = result.initial_nav
    years = result.covered_ns / NS_PER_YEAR  # the bars' time, first open to last close
    for product, row in figures.items():
        growth = float(result.series[product].navs[-1] / start)
        assert row["total_return"] == pytest.approx(growth - 1)
        assert row["cagr"] == pytest.approx(growth ** (1 / years) - 1 if growth else -1.0)
        assert row["min_nav"] == decimal_to_wire(lowest[product])  # every tick's, not a close's
    for side in ("LONG", "SHORT"):
        assert min(result.series[f"{symbol}:{side}"].navs) > 0
        assert lowest[f"{symbol}:{side}"] > 0, f"{side}: NAV {lowest[f'{symbol}:{side}']}"
        fixed = result.series[f"{symbol}:{side}:3X-FIXED"]
        assert min(fixed.navs) < start * Decimal("0.05"), "the 3x benchmark should lose > 95%"
    for strategy in result.strategies:
        strategy.engine.books.check_balanced(strategy.engine.venue, strategy.engine.price)
    smart_venue = result.strategies[0].engine.venue
    assert isinstance(smart_venue, PerpVenue) and smart_venue.liquidations == 0
    for strategy in result.strategies[1:]:  # a benchmark: one product, its own account
        (benchmark,) = strategy.controllers
        venue = strategy.engine.venue
        assert isinstance(venue, PerpVenue)
        assert figures[benchmark.product]["venue_liquidations"] == venue.liquidations
    assert figures[f"{symbol}:LONG:3X-FIXED"]["venue_liquidations"] == 1
    assert result.funding_events > 4000


@needs_data
def test_cli_writes_metrics_nav_and_chart(tmp_path: Path) -> None:
    out = tmp_path / "out"
    outcome = runner.invoke(
        app,
        [
            "backtest",
            "--data", str(DATA / "BTCUSDT_perp_1h_2019_2023.csv"),
            "--funding", str(DATA / "BTCUSDT_funding_8h_2019_2023.csv"),
            "--start", "2021-05-01", "--end", "2021-06-01",
            "--out", str(out),
        ],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    document = json.loads((out / "metrics.json").read_text())
    assert document["bars"] == 31 * 24
    assert document["start"] == "2021-05-01T00:00:00Z"  # where the capital goes in
    assert set(document["products"]) >= {
        "BTC-USDT:LONG",
        "BTC-USDT:SHORT",
        "BTC-USDT:LONG:3X-FIXED",
    }
    rows = (out / "nav.csv").read_text().splitlines()
    # the header, the start, every bar close, the last at the replay's last tick
    assert len(rows) == 1 + 1 + document["bars"]
    assert rows[0].startswith("timestamp,price,regime,BTC-USDT:LONG:target")
    assert rows[1].startswith("2021-05-01T00:00:00Z,")
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_data
def test_the_report_ends_at_the_last_tick_with_the_books_as_they_were_then() -> None:
    """The last bar closes on no later tick: its row is the last tick's, so the final
    NAV counts the final bar's move."""
    bars, _ = load_bars(DATA / "BTCUSDT_perp_1h_2019_2023.csv", "BTC-USDT")
    window = [b for b in bars if parse_timestamp("2021-05-18T00:00:00Z") <= b.open_ts_ns][:240]
    seen: list[tuple[int, dict[str, Decimal]]] = []

    def every_tick(tick: Tick, regime: str | None, strategies: Sequence[Strategy]) -> None:
        books = strategies[0].engine.books.products
        seen.append((tick.ts_ns, {p: b.nav(tick.price) for p, b in books.items()}))

    result = run_backtest("BTC-USDT", window, [], StrategyConfig(), on_tick=every_tick)
    last_ts, last_navs = seen[-1]
    assert result.times[-1] == last_ts
    assert len(result.times) == len(set(result.times))
    for product, nav in last_navs.items():
        assert result.series[product].navs[-1] == nav
    assert last_navs != seen[-4][1]  # the final bar moved the books after it opened


@needs_data
def test_nav_csv_and_metrics_write_exact_plain_decimals_even_for_a_wiped_out_product(
    tmp_path: Path,
) -> None:
    """March 2020 takes the fixed 3x long to zero: its NAV is written "0.00000000"."""
    window = {
        "start_ns": parse_timestamp("2020-03-01T00:00:00Z"),
        "end_ns": parse_timestamp("2020-03-20T00:00:00Z"),
    }
    bars, _ = load_bars(DATA / "BTCUSDT_perp_1h_2019_2023.csv", "BTC-USDT", **window)
    funding, _ = load_funding(DATA / "BTCUSDT_funding_8h_2019_2023.csv", "BTC-USDT", **window)
    result = run_backtest("BTC-USDT", bars, funding, StrategyConfig())
    write_nav_csv(result, tmp_path / "nav.csv")
    with (tmp_path / "nav.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(result.times)
    navs = [decimal_from_wire(row["BTC-USDT:LONG:3X-FIXED:nav"]) for row in rows]
    assert navs[-1] == 0  # the case this test is for
    for row in rows:
        for name, cell in row.items():
            if name == "price" or name.endswith(":nav"):
                decimal_from_wire(cell, name=name)  # plain notation, else DecodeError
    wiped = write_metrics(result, tmp_path / "metrics.json")["BTC-USDT:LONG:3X-FIXED"]
    assert (wiped["final_nav"], wiped["min_nav"]) == ("0.00000000",) * 2
    # 19 days: no CAGR (annualised, two days up 11% read 41,020,095,670%), the return
    assert (wiped["total_return"], wiped["cagr"]) == (-1.0, None)
    for name, value in json.loads((tmp_path / "metrics.json").read_text())["products"][
        "BTC-USDT:LONG:3X-FIXED"
    ].items():
        if isinstance(value, str) and name not in ("side",):
            decimal_from_wire(value, name=name)


@needs_data
def test_a_calendar_years_backtest_has_a_cagr() -> None:
    """The span ran from the first bar's open to the last one's: 2021's 8,760 bars
    measured 0.99989 years (0.99977 with one tick a bar), and the year had no CAGR, then
    one not its total return. A year is the bars' time, first open to last close."""
    window = {
        "start_ns": parse_timestamp("2021-01-01T00:00:00Z"),
        "end_ns": parse_timestamp("2022-01-01T00:00:00Z"),
    }
    bars, _ = load_bars(DATA / "BTCUSDT_perp_1h_2019_2023.csv", "BTC-USDT", **window)
    assert len(bars) == 8760
    for mode in ("ohlc", "close"):  # close mode records one row fewer: still a year
        year = metrics(run_backtest("BTC-USDT", bars, [], StrategyConfig(), tick_mode=mode))
        short = metrics(run_backtest("BTC-USDT", bars[:-1], [], StrategyConfig(), tick_mode=mode))
        for row in year.values():  # exactly a year: the CAGR is the total return
            assert row["cagr"] == pytest.approx(row["total_return"], rel=1e-12), mode
        assert all(row["cagr"] is None for row in short.values()), mode  # an hour short


def backtest_btc_with_marks(marks: str, out: Path) -> Result:
    """Two days of BTC bars, with the marks file `marks`."""
    return runner.invoke(
        app,
        [
            "backtest",
            "--data", str(DATA / "BTCUSDT_perp_1h_2019_2023.csv"),
            "--marks", str(DATA / marks),
            "--start", "2021-05-01", "--end", "2021-05-03",
            "--out", str(out),
        ],
    )  # fmt: skip


@needs_data
def test_cli_reports_the_marks_it_loaded(tmp_path: Path) -> None:
    outcome = backtest_btc_with_marks("BTCUSDT_mark_1h_2019_2023.csv", tmp_path / "out")
    assert outcome.exit_code == 0, outcome.output
    printed = " ".join(outcome.output.split())
    assert "BTCUSDT_mark_1h_2019_2023.csv: read 35269 rows, kept 48;" in printed


@needs_data
@pytest.mark.parametrize(("capital", "refused"), [("40", True), ("5965", True), ("5966", False)])
def test_cli_refuses_a_capital_the_lots_would_decide(
    capital: str, refused: bool, tmp_path: Path
) -> None:
    """At 40 USDT a 1x short benchmark held 0.07x in May 2021 and its figures said -20%;
    at 1 nothing traded at all (from a review). BTC's peak then: 59,654.9 (a lot 0.001)."""
    outcome = runner.invoke(
        app,
        [
            "backtest",
            "--data", str(DATA / "BTCUSDT_perp_1h_2019_2023.csv"),
            "--start", "2021-05-01", "--end", "2021-06-01",
            "--capital", capital, "--out", str(tmp_path / "o"),
        ],
    )  # fmt: skip
    printed = " ".join(outcome.output.split())
    if refused:
        assert outcome.exit_code == 2 and "is below 5,966 USDT: one lot of BTC-USDT" in printed
        assert not (tmp_path / "o").exists()
    else:
        assert outcome.exit_code == 0, printed


@needs_data
def test_cli_prints_file_names_and_paths_as_they_are(tmp_path: Path) -> None:
    """Text from files and paths went out as rich markup: a '[' in a directory's name
    ended the run in a MarkupError traceback, or named another directory (from a
    review)."""
    odd = tmp_path / "d[red]x"
    odd.mkdir()
    (odd / "marks.csv").symlink_to(DATA / "BTCUSDT_mark_1h_2019_2023.csv")
    out = tmp_path / "o[bold]9"
    outcome = backtest_btc_with_marks(str(odd / "marks.csv"), out)  # (an absolute path)
    assert outcome.exit_code == 0, outcome.output
    printed = "".join(outcome.output.split())
    assert "d[red]x/marks.csv:read" in printed and f"wrote{out}/metrics.json" in printed
    assert (out / "metrics.json").is_file()


@needs_data
def test_cli_refuses_marks_of_another_market_and_writes_nothing(tmp_path: Path) -> None:
    """BTC bars with ETH marks ran, the 2x and 3x longs liquidated on the first tick (the
    file's name says whose they are; the content check is test_market_data's)."""
    outcome = backtest_btc_with_marks("ETHUSDT_mark_1h_2019_2023.csv", tmp_path / "out")
    assert outcome.exit_code == 2
    printed = " ".join(outcome.output.split())
    assert "ETHUSDT_mark_1h_2019_2023.csv: the file is named for ETHUSDT, not BTC-USDT" in printed
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("timestamp,open,high,low\n", "missing"),
        (
            "timestamp,open,high,low,close,volume\n"
            "2021-01-01T00:00:00Z,1,2,1,2,1\n"
            "2021-01-01T00:00:00Z,1,2,1,2,1\n",
            "bad.csv:3: duplicate timestamp",
        ),
        (
            "timestamp,open,high,low,close,volume\n2021-01-01T00:00:00Z,1,2,1,-2,1\n",
            "bad.csv:2: close price must be > 0",
        ),
        (  # the file's own text in the message: not markup (a MarkupError traceback)
            "timestamp,open,high,low,close,volume\n2021-01-01T00:00:00Z,1,[/red],1,2,1\n",
            "bad.csv:2: high",
        ),
        (  # finite, and past what the core computes with: a traceback in the features
            "timestamp,open,high,low,close,volume\n2021-01-01T00:00:00Z,1,1e400,1,2,1\n",
            "bad.csv:2: high: Decimal('1E+400') is outside the wire range",
        ),
    ],
)
def test_cli_refuses_bad_data_with_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    data = tmp_path / "bad.csv"
    data.write_text(content)
    outcome = runner.invoke(app, ["backtest", "--data", str(data), "--out", str(tmp_path / "o")])
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.split())
    assert "Traceback" not in outcome.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--capital", "1e999999999"], "--capital must be 1 to 1,000,000,000 USDT"),
        (["--capital", "-5"], "--capital must be 1 to 1,000,000,000 USDT"),
        (["--capital", "1e-7"], "--capital must be 1 to 1,000,000,000 USDT"),  # buys no units
        (["--capital", "1e15"], "--capital must be 1 to 1,000,000,000 USDT"),  # ran out of memory
        # decimal's own text: "Invalid value: [<class 'decimal.ConversionSyntax'>]"
        (["--capital", "abc"], "--capital must be 1 to 1,000,000,000 USDT, got 'abc'"),
        (["--capital", "0x10"], "--capital must be 1 to 1,000,000,000 USDT, got '0x10'"),
        (["--out", "{file}/o"], "cannot write to"),
        # found, not writable (as root, only a kernel directory is): a traceback after the
        # run, its results lost
        (["--out", "/proc/self"], "cannot write to /proc/self"),
    ],
)
def test_cli_refuses_bad_options_with_a_clear_error(
    tmp_path: Path, args: list[str], message: str
) -> None:
    data = tmp_path / "bars.csv"
    data.write_text("timestamp,open,high,low,close,volume\n2021-01-01T00:00:00Z,1,2,1,2,1\n")
    args = [a.replace("{file}", str(data)) for a in args]
    outcome = runner.invoke(
        app, ["backtest", "--data", str(data), "--out", str(tmp_path / "o"), *args]
    )
    assert outcome.exit_code == 2
    assert message in " ".join(outcome.output.split())
    assert isinstance(outcome.exception, SystemExit)  # (an uncaught error lands here)


@needs_data
def test_a_policy_the_books_cannot_run_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A policy the books cannot run (here a venue that refuses every fill, past the
    config's checks) ended in a traceback out of the core: it is one error line."""

    def no_fill(*args: object, **kwargs: object) -> Decimal:
        raise MoneyError("selling 69.000 at 29000 would fill at -486.7 (tick 0.1): no such fill")

    monkeypatch.setattr(PerpVenue, "fill_price", no_fill)
    outcome = runner.invoke(
        app,
        [
            "backtest", "--data", str(DATA / "BTCUSDT_perp_1h_2019_2023.csv"),
            "--out", str(tmp_path / "o"), "--start", "2021-01-01", "--end", "2021-01-03",
        ],
    )  # fmt: skip
    assert outcome.exit_code == 2, outcome.output
    assert "the policy cannot run on this data" in " ".join(outcome.output.split())
    assert isinstance(outcome.exception, SystemExit)


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        # 1e8 venue orders for a 1M trade: the backtest never ended
        ('[hedging]\nmax_slice_notional = "0.01"\n', "max_slice_notional"),
        # a ring of 1e11 bars per tracker: MemoryError, a traceback
        ("[features]\ntrend_horizons = [24, 72, 100000000000]\n", "at most 100,000 bars"),
        # a quantity times a price past the wire's 40 decimals: EncodeError, a traceback
        ('[instruments.BTC-USDT]\nprice_tick = "0.1"\nlot_step = "1E-40"\n', "12 decimals"),
        ('[instruments.BTC-USDT]\nprice_tick = "1E-13"\nlot_step = "0.001"\n', "12 decimals"),
        # a book 50 USDT deep: a rebalance sold 69 BTC at -486.7; 1M at 200 bps: sizing a
        # 1e9 deposit's hedge met "no such fill" after its units were issued
        ('[venue]\ndepth_notional = "50"\n', "at most 50%"),
        ('[venue]\nimpact_bps = "200"\ndepth_notional = "1000000"\n', "at most 50%"),
        ('[venue]\ndepth_notional = "1e-400"\n', "at most 50%"),  # 0.0 as a float
        ('[venue]\ndepth_notional = "1e-999990"\nimpact_bps = "0"\n', "at most 50%"),
    ],
)
def test_a_config_that_hung_or_crashed_the_backtest_is_refused(
    tmp_path: Path, setting: str, says: str
) -> None:
    config = tmp_path / "policy.toml"
    config.write_text(setting)
    data = tmp_path / "unused.csv"
    data.write_text("timestamp,open,high,low,close,volume\n")
    outcome = runner.invoke(
        app, ["backtest", "--data", str(data), "--out", str(tmp_path), "--config", str(config)]
    )
    assert outcome.exit_code == 2, outcome.output
    assert says in " ".join(outcome.output.replace("│", " ").split()), outcome.output


@needs_data
def test_the_finest_instrument_steps_taken_run_at_the_largest_capital(tmp_path: Path) -> None:
    """12 decimals of price and of quantity, at 1e9 USDT a product: every figure fits
    the wire (at 40 decimals a product of them did not)."""
    config = tmp_path / "policy.toml"
    config.write_text('[instruments.BTC-USDT]\nprice_tick = "1E-12"\nlot_step = "1E-12"\n')
    outcome = runner.invoke(
        app,
        [
            "backtest", "--data", str(DATA / "BTCUSDT_perp_1h_2019_2023.csv"),
            "--out", str(tmp_path / "o"), "--config", str(config), "--capital", "1000000000",
            "--start", "2020-03-01", "--end", "2020-03-15",
        ],
    )  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "o" / "metrics.json").exists()


def test_cli_refuses_a_config_with_unknown_or_unsafe_fields(tmp_path: Path) -> None:
    config = tmp_path / "policy.toml"
    config.write_text("[leverage]\nl_max = 8.0\nemergency_move = 0.2\n")
    data = tmp_path / "unused.csv"
    data.write_text("timestamp,open,high,low,close,volume\n")
    outcome = runner.invoke(
        app, ["backtest", "--data", str(data), "--out", str(tmp_path), "--config", str(config)]
    )
    assert outcome.exit_code == 2
    assert "must be < 1" in outcome.output
