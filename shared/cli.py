"""`smartlev`: the command line for people (backtest now; orders and NAV watch later)."""

from __future__ import annotations

import json
import time
import tomllib
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from shared.adapters.market_data import DataError, load_bars, load_funding, load_marks
from shared.backtest import run_backtest, write_metrics, write_nav_csv
from shared.chart import nav_chart
from shared.core.config import StrategyConfig

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="smartlev: smart-leverage products on perpetual futures.",
)
console = Console()
errors = Console(stderr=True)


@app.callback()
def _commands() -> None:
    """smartlev: smart-leverage products on perpetual futures."""


class TickMode(StrEnum):
    OHLC = "ohlc"
    CLOSE = "close"


def load_config(path: Path | None) -> StrategyConfig:
    """Defaults, overridden by a TOML or JSON file; unknown keys are refused."""
    if path is None:
        return StrategyConfig()
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise typer.BadParameter(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text.decode())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise typer.BadParameter(f"config {path} is not valid {path.suffix[1:]}: {exc}") from None
    try:
        return StrategyConfig.model_validate(data)
    except ValidationError as exc:
        raise typer.BadParameter(f"config {path}:\n{exc}") from None


def _parse_time(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise typer.BadParameter(f"{name}: {text!r} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000


@app.command()
def backtest(
    data: Annotated[Path, typer.Option(help="Perpetual 1h OHLCV CSV (see ../shared/data).")],
    out: Annotated[Path, typer.Option(help="Directory for metrics.json, nav.csv, chart.png.")],
    funding: Annotated[Path | None, typer.Option(help="Funding-rate CSV (8h).")] = None,
    marks: Annotated[Path | None, typer.Option(help="Mark-price 1h CSV.")] = None,
    symbol: Annotated[str, typer.Option(help="Underlying, e.g. BTC-USDT.")] = "BTC-USDT",
    start: Annotated[str | None, typer.Option(help="First bar, ISO-8601 UTC.")] = None,
    end: Annotated[str | None, typer.Option(help="End (exclusive), ISO-8601 UTC.")] = None,
    config: Annotated[Path | None, typer.Option(help="Policy config, TOML or JSON.")] = None,
    capital: Annotated[str, typer.Option(help="USDT seeded into each product.")] = "1000000",
    ticks: Annotated[TickMode, typer.Option(help="ohlc: 4 ticks per bar; close: 1.")] = (
        TickMode.OHLC
    ),
) -> None:
    """Run the smart long and short products beside fixed-leverage benchmarks."""
    settings = load_config(config)
    try:
        seed = Decimal(capital)
        settings.instrument(symbol)
    except (ArithmeticError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    if not seed.is_finite() or seed <= 0:
        raise typer.BadParameter(f"--capital must be a positive amount, got {capital}")
    start_ns, end_ns = _parse_time(start, "--start"), _parse_time(end, "--end")
    interval = settings.features.bar_seconds * 1_000_000_000
    try:
        bars, report = load_bars(
            data, symbol, start_ns=start_ns, end_ns=end_ns, interval_ns=interval
        )
        rates, funding_report = (
            load_funding(funding, symbol, start_ns=start_ns, end_ns=end_ns)
            if funding
            else ([], None)
        )
        mark_prices = load_marks(marks, start_ns=start_ns, end_ns=end_ns) if marks else None
    except DataError as exc:
        errors.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    console.print(report.summary())
    if funding_report is not None:
        console.print(funding_report.summary())
    out.mkdir(parents=True, exist_ok=True)
    total = len(bars) * (4 if ticks is TickMode.OHLC else 1)
    began = time.perf_counter()
    with Progress(
        TextColumn("backtest {task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,} ticks"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task(symbol, total=total)
        result = run_backtest(
            symbol,
            bars,
            rates,
            settings,
            capital=seed,
            marks=mark_prices,
            tick_mode=ticks.value,
            progress=lambda done: bar.update(task, completed=done),
        )
    elapsed = time.perf_counter() - began
    figures = write_metrics(result, out / "metrics.json")
    write_nav_csv(result, out / "nav.csv")
    smart = [p for p, s in result.series.items() if s.smart]
    nav_chart(
        out / "chart.png",
        f"{symbol}: smart leverage vs fixed-leverage tokens",
        result.times,
        result.prices,
        result.regimes,
        {p: s.navs for p, s in result.series.items()},
        {p: result.series[p].leverages for p in smart},
        {p: result.series[p].targets for p in smart},
        highlight=smart,
    )
    console.print(summary_table(figures))
    console.print(
        f"{result.ticks:,} ticks, {len(result.times):,} bars, "
        f"{result.funding_events:,} funding settlements in {elapsed:.1f} s; "
        f"wrote {out}/metrics.json, nav.csv, chart.png"
    )


def summary_table(figures: dict[str, dict[str, object]]) -> Table:
    table = Table(title="products and benchmarks")
    for column in (
        "product",
        "final NAV",
        "CAGR",
        "max DD",
        "Sharpe",
        "min NAV",
        "avg lev",
        "rebal",
        "emerg",
        "fees",
        "funding",
    ):
        table.add_column(column, justify="left" if column == "product" else "right")
    for product, row in figures.items():
        fees = Decimal(str(row["trading_fees_paid"])) + Decimal(str(row["slippage_paid"]))
        table.add_row(
            f"[bold]{product}[/bold]" if row["smart"] else product,
            f"{Decimal(str(row['final_nav'])):.2f}",
            f"{row['cagr']:.1%}",
            f"{row['max_drawdown']:.1%}",
            f"{row['sharpe']:.2f}",
            f"{Decimal(str(row['min_nav'])):.4f}",
            f"{row['avg_leverage']:.2f}",
            str(row["rebalances"]),
            str(row["emergency_deleverages"]),
            f"{fees:,.0f}",
            f"{Decimal(str(row['funding_paid'])):,.0f}",
        )
    return table


def main() -> None:
    app()
