"""`smartlev`: the command line for people.

`backtest` runs the core offline; `products`, `open`, `close`, `positions` and `watch` talk
to the order gateway over gRPC (server from `--server` / `SMARTLEV_GATEWAY`, key from
`--api-key` / `SMARTLEV_API_KEY`). A refused call prints one line, `error: <CODE>:
<message>`, and exits 1; a usage error exits 2; never a traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import grpc
import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.measure import Measurement
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from smartlev.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, nav_pb2

from shared.adapters.market_data import DataError, load_market, parse_time
from shared.backtest import run_backtest, write_metrics, write_nav_csv
from shared.core.accounting import MAX_DEPOSIT
from shared.core.config import StrategyConfig
from shared.core.market import Bar
from shared.core.money import MoneyError
from shared.serving import SERVER_ANSWERED
from shared.settings import is_host_port, load_strategy

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="smartlev: smart-leverage products on perpetual futures.",
)
console = Console()
errors = Console(stderr=True)
# A product of a billion already trades in ~500 slices a rebalance (the venue's impact
# model slices orders, shared/core/hedging.py): past it, runs take hours and then memory.
# Below a dollar, fees and lots round a product's first units away.
MIN_CAPITAL, MAX_CAPITAL = Decimal(1), MAX_DEPOSIT  # a product's one deposit


@app.callback()
def _commands() -> None:
    """smartlev: smart-leverage products on perpetual futures."""


class TickMode(StrEnum):
    OHLC = "ohlc"
    CLOSE = "close"


def load_config(path: Path | None) -> StrategyConfig:
    """Defaults, overridden by a TOML or JSON file; unknown keys are refused."""
    try:
        return load_strategy(path)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None


def _parse_time(text: str | None, name: str) -> int | None:
    try:
        return parse_time(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{name}: {exc}") from None


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
        settings.instrument(symbol)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    wanted = f"--capital must be {MIN_CAPITAL:,} to {MAX_CAPITAL:,} USDT, got {capital!r}"
    try:
        seed = Decimal(capital)
    except ArithmeticError:  # its own text is decimal's internals ([<class ...>])
        raise typer.BadParameter(wanted) from None
    if not seed.is_finite() or not MIN_CAPITAL <= seed <= MAX_CAPITAL:
        raise typer.BadParameter(wanted)
    start_ns, end_ns = _parse_time(start, "--start"), _parse_time(end, "--end")
    interval = settings.features.bar_seconds * 1_000_000_000
    try:
        loaded = load_market(
            data,
            symbol,
            funding=funding,
            marks=marks,
            start_ns=start_ns,
            end_ns=end_ns,
            interval_ns=interval,
        )
    except DataError as exc:
        raise fail(str(exc), 2) from None
    for report in loaded.reports:  # text from the files: never markup
        console.print(report.summary(), markup=False, highlight=False)
    bars, rates, mark_prices = loaded.bars, loaded.rates, loaded.marks
    least = _least_capital(settings.instrument(symbol).lot_step, bars)
    if seed < least:
        raise fail(
            f"--capital {seed:,} is below {least:,} USDT: one lot of {symbol} "
            f"({settings.instrument(symbol).lot_step}) at the window's highest price is "
            "more than 1% of a 1x position there, and the figures would be the lots' rounding",
            2,
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        # writable, before the run (a run of minutes ended in a traceback, its results
        # lost, on a directory it could create or find but not write)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".writable-"):
            pass
    except OSError as exc:
        raise typer.BadParameter(
            f"cannot write to {out}: {exc.strerror or exc}", param_hint="--out"
        ) from None
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
        try:
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
        except MoneyError as exc:  # a policy the config takes that the books cannot run
            raise fail(f"the policy cannot run on this data: {exc}", 2) from None
    elapsed = time.perf_counter() - began
    smart = [p for p, s in result.series.items() if s.smart]
    # matplotlib is a third of the CLI's start: the gateway commands do without it
    from shared.chart import nav_chart

    try:
        figures = write_metrics(result, out / "metrics.json")
        write_nav_csv(result, out / "nav.csv")
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
    except OSError as exc:
        raise fail(f"cannot write the results to {out}: {exc}", 1) from None
    # The table needs ~175 columns; a log or pipe gets them rather than cut product names.
    Console(width=max(console.width, 180)).print(summary_table(figures))
    console.print(
        f"{result.ticks:,} ticks, {result.bars:,} bars, "
        f"{result.funding_events:,} funding settlements in {elapsed:.1f} s; "
        f"wrote {out}/metrics.json, nav.csv, chart.png",
        markup=False,
    )


def _least_capital(lot_step: Decimal, bars: Sequence[Bar]) -> Decimal:
    """The capital at which a lot is 1% of a 1x position at the highest price: below it
    nothing trades or the benchmarks sit far off their leverage (a 1x short at 0.07x)."""
    peak = max((bar.high for bar in bars), default=Decimal(0))
    return (lot_step * peak * 100).to_integral_value(rounding=ROUND_CEILING)


def summary_table(figures: dict[str, dict[str, object]]) -> Table:
    """metrics.json's figures; "trade costs" are the trading fees and the slippage, the
    management fee has its own column (often the larger cost)."""
    table = Table(title="products and benchmarks")
    for column in (
        "product",
        "final NAV",
        "return",
        "CAGR",
        "max DD",
        "Sharpe",
        "min NAV",
        "avg lev",
        "rebal",
        "emerg",
        "liquidations",
        "trade costs",
        "mgmt fees",
        "funding",
    ):
        table.add_column(column, justify="left" if column == "product" else "right")
    for product, row in figures.items():
        trade_costs = Decimal(str(row["trading_fees_paid"])) + Decimal(str(row["slippage_paid"]))
        table.add_row(
            f"[bold]{product}[/bold]" if row["smart"] else product,
            f"{Decimal(str(row['final_nav'])):.2f}",
            f"{row['total_return']:.1%}",
            "-" if row["cagr"] is None else f"{row['cagr']:.1%}",
            f"{row['max_drawdown']:.1%}",
            f"{row['sharpe']:.2f}",
            f"{Decimal(str(row['min_nav'])):.4f}",
            f"{row['avg_leverage']:.2f}",
            str(row["rebalances"]),
            str(row["emergency_deleverages"]),
            str(row["venue_liquidations"]),
            f"{trade_costs:,.0f}",
            f"{Decimal(str(row['management_fees_paid'])):,.0f}",
            f"{Decimal(str(row['funding_paid'])):,.0f}",
        )
    return table


# --------------------------------------------------------------------------- gateway

DEFAULT_GATEWAY = "127.0.0.1:50051"
CALL_TIMEOUT_S = 10.0
# A call in flight pings the gateway after this long without a frame, and gives the
# connection up when a ping goes unanswered for KEEPALIVE_TIMEOUT_MS: `watch` on a
# quiet market otherwise kept a frozen gateway's last NAVs on its board for good. (The
# gateway takes pings this often: its `min_ping_interval_without_data_ms`.)
KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000

ApiKey = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="SMARTLEV_API_KEY", show_envvar=True, help="Your gateway API key."
    ),
]
Server = Annotated[
    str,
    typer.Option(
        "--server", envvar="SMARTLEV_GATEWAY", show_envvar=True, help="Gateway host:port."
    ),
]


@dataclass(frozen=True, slots=True)
class Gateway:
    """A stub and the caller's credentials: every call goes through `call`."""

    stub: gateway_pb2_grpc.GatewayStub
    metadata: tuple[tuple[str, str], ...]
    channel: grpc.Channel

    def call(self, method: Any, request: object) -> Any:
        return method(request, metadata=self.metadata, timeout=CALL_TIMEOUT_S)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print `error: <message>` as one plain line on stderr; the caller raises the Exit."""
    errors.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True, highlight=False)
    return typer.Exit(code)


def rpc_error_line(exc: grpc.RpcError, server: str) -> str:
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = (exc.details() if isinstance(exc, grpc.Call) else None) or str(exc)
    name = code.name if code is not None else "UNKNOWN"
    if code is grpc.StatusCode.UNAVAILABLE:
        # The gateway's own (its Redis or Kafka down, a product busy: it marks what it
        # sends) or the transport's (no connection, or one lost mid-call: an order's
        # outcome then unknown, a retry with the same client order id settles it)
        trailing = exc.trailing_metadata() if isinstance(exc, grpc.Call) else None
        answered = any(tuple(item) in SERVER_ANSWERED for item in trailing or ())
        details = (
            f"{details} (the gateway at {server} answered)"
            if answered
            else f"cannot reach the gateway at {server}, or lost the connection ({details})"
        )
    return f"{name}: {details}"


GATEWAY_COMMANDS = frozenset({"products", "open", "close", "positions", "watch"})


def is_text(value: str) -> bool:
    """Whether `value` is UTF-8 text (not bytes Python carried as lone surrogates)."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


# How an order's call can end without saying whether it settled: the id it was sent
# with is then what settles it once, on a retry.
OUTCOME_UNKNOWN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def _retry_with(order_id: str) -> str:
    return f"the order may have settled: retry with --client-order-id {order_id}"


@contextlib.contextmanager
def gateway(server: str, api_key: str | None, order_id: str | None = None) -> Iterator[Gateway]:
    """A channel to the gateway; any gRPC error ends the command with one line, exit 1.
    An order's (`order_id`) whose outcome is unknown names the id to retry it with: a
    retry with a new one (the default) would settle the order a second time."""
    if not api_key:
        raise fail("no API key: pass --api-key or set SMARTLEV_API_KEY", 2)
    if not (api_key.isascii() and api_key.isprintable()):  # gRPC metadata cannot carry it
        raise fail("the API key must be printable ASCII", 2)
    if not (is_text(server) and is_host_port(server)):  # gRPC's resolver printed its
        # internals (or raised, on bytes that are not UTF-8 in SMARTLEV_GATEWAY), or took the
        # port modulo 65536 (another server), or none (443)
        raise fail(
            f"--server must be host:port, the port 1-65535 (e.g. {DEFAULT_GATEWAY}), "
            f"got {server!r}",
            2,
        )
    channel = grpc.insecure_channel(
        server,
        options=[
            ("grpc.keepalive_time_ms", KEEPALIVE_MS),
            ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            # the core times a ping out on its own (60 s by default), not at the above
            ("grpc.http2.ping_timeout_ms", KEEPALIVE_TIMEOUT_MS),
            ("grpc.http2.max_pings_without_data", 0),  # a quiet stream is pinged on
            # `watch` reconnecting: tried again within seconds of a restart, not minutes
            ("grpc.initial_reconnect_backoff_ms", 500),
            ("grpc.max_reconnect_backoff_ms", 5000),
        ],
    )
    try:
        yield Gateway(
            gateway_pb2_grpc.GatewayStub(channel),
            (("authorization", f"Bearer {api_key}"),),
            channel,
        )
    except grpc.RpcError as exc:
        line = rpc_error_line(exc, server)
        code = exc.code() if isinstance(exc, grpc.Call) else None
        if order_id is not None and (code is None or code in OUTCOME_UNKNOWN):
            line += f"; {_retry_with(order_id)}"
        raise fail(line) from None
    except KeyboardInterrupt:  # Ctrl-C while an order was on its way: sent, or not
        if order_id is None:
            raise
        raise fail(f"interrupted; {_retry_with(order_id)}", 130) from None
    finally:
        channel.close()


def _when(ts_ns: int) -> str:
    if not ts_ns:
        return "-"
    return datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _num(text: str, absent: str = "-") -> str:
    """An exact decimal off the wire in plain notation ("0E-8" -> "0.00000000")."""
    if not text:
        return absent
    try:
        value = Decimal(text)
    except InvalidOperation:
        return text
    return f"{value:f}" if value.is_finite() else text


def _leverage(text: str) -> str:
    try:
        return f"{Decimal(text):.2f}x" if text else "-"
    except InvalidOperation:
        return text


def _regime(value: int) -> str:
    """A regime this build does not know (a newer server's) shows as its number."""
    if not value:
        return "-"
    try:
        return common_pb2.Regime.Name(value)
    except ValueError:
        return f"#{value}"


def _pnl(text: str) -> str:
    """Exact figure, green when positive, red when negative."""
    if not text:
        return "-"
    shown = _num(text)
    colour = "red" if shown.startswith("-") else "green" if Decimal(text) > 0 else ""
    return f"[{colour}]{shown}[/{colour}]" if colour else shown


def _columns(table: Table, names: Iterable[str], left: tuple[str, ...], wrap: bool = False) -> None:
    """Right-aligned but `left`; whole on one line, or (`wrap`) folded, never cut."""
    for name in names:
        table.add_column(
            name,
            justify="left" if name in left else "right",
            no_wrap=not wrap,
            overflow="fold" if wrap else "ellipsis",
        )


def fits(table: Table) -> bool:
    """Whether the terminal is wide enough for every digit and id of `table`."""
    natural = Measurement.get(console, console.options.update_width(10_000), table).maximum
    return natural <= console.width


def show(table: Table, records: Callable[[], list[Table]]) -> None:
    """The table if the terminal is wide enough for every digit and id, else one
    field/value record per row (a cut id or amount is worse than a longer listing)."""
    if fits(table):
        console.print(table)
    else:
        for record in records():
            console.print(record)


def products_table(products: list[gateway_pb2.Product]) -> Table:
    table = Table(title="products")
    columns = ("product", "NAV", "price", "target", "actual", "regime", "why", "tradable")
    _columns(table, columns, left=("product", "why"))
    for p in products:
        table.add_row(
            p.product,
            _num(p.nav),
            _num(p.price),
            _leverage(p.target_leverage),
            _leverage(p.actual_leverage),
            _regime(p.regime),
            ", ".join(p.reasons) or "-",
            "yes" if p.tradable else "[red]no[/red]",
        )
    return table


def product_detail(p: gateway_pb2.Product) -> Table:
    """A receipt: a narrow terminal folds its figures and reason codes, never cuts them."""
    rows = [
        ("NAV", _num(p.nav)),
        ("units outstanding", _num(p.units)),
        ("equity (USDT)", _num(p.equity)),
        ("underlying price", _num(p.price)),
        ("target leverage", _leverage(p.target_leverage)),
        ("actual leverage", _leverage(p.actual_leverage)),
        ("regime", _regime(p.regime)),
        ("last leverage change", ", ".join(p.reasons) or "-"),
        ("marked at (market time)", _when(p.ts_event_ns)),
        ("tradable", "yes" if p.tradable else f"[red]no: {escape(p.not_tradable_reason)}[/red]"),
        ("order size (USDT)", f"{p.min_order} .. {p.max_order}"),
        ("open / close fee", f"{p.open_fee_rate} / {p.close_fee_rate}"),
    ]
    return receipt(p.product, rows)


def _total_pnl(p: gateway_pb2.Position) -> str:
    """Realized plus, while open, unrealized: what the position made so far ("-" for an
    open one with no NAV to value it at: its realized part alone showed 0)."""
    realized = Decimal(p.realized_pnl or "0")
    if not p.unrealized_pnl:
        return "-" if p.open else _pnl(str(realized))
    return _pnl(str(realized + Decimal(p.unrealized_pnl)))


def positions_table(positions: list[gateway_pb2.Position]) -> Table:
    table = Table(title="positions")
    columns = ("position", "product", "units", "NAV", "value", "PnL", "status")
    _columns(table, columns, left=("position", "product"))
    for p in positions:
        table.add_row(
            p.position_id,
            p.product,
            _num(p.units),
            _num(p.nav),
            _num(p.value),
            _total_pnl(p),
            "open" if p.open else "closed",
        )
    return table


def position_detail(p: gateway_pb2.Position) -> Table:
    return receipt(
        f"position {p.position_id}",
        [
            ("product", p.product),
            ("status", "open" if p.open else f"closed {_when(p.ts_closed_ns)} UTC"),
            ("opened", f"{_when(p.ts_opened_ns)} UTC"),
            ("paid in (USDT, fee included)", _num(p.amount)),
            ("units bought / held", f"{_num(p.units_opened)} / {_num(p.units)}"),
            ("entry NAV / NAV now", f"{_num(p.entry_nav)} / {_num(p.nav)}"),
            ("value (USDT)", _num(p.value)),
            ("cost of units held", _num(p.cost)),
            ("unrealized PnL", _pnl(p.unrealized_pnl)),
            ("realized PnL", _pnl(p.realized_pnl)),
            ("paid out (USDT)", _num(p.payout, "0")),
            ("fees paid (USDT)", _num(p.fees)),
        ],
    )


def receipt(title: str, rows: list[tuple[str, str]]) -> Table:
    """Field and value; a value too wide for the terminal folds, never cut: the ids on
    it are what a close or a retry needs."""
    table = Table(title=title, show_header=False)
    table.add_column("field")
    table.add_column("value", justify="right", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    return table


@app.command()
def products(
    product: Annotated[str | None, typer.Argument(help="One product, e.g. BTC-USDT:LONG.")] = None,
    api_key: ApiKey = None,
    server: Server = DEFAULT_GATEWAY,
) -> None:
    """List the products (NAV, leverage, regime, why), or show one in full."""
    with gateway(server, api_key) as gw:
        if product is None:
            reply: gateway_pb2.ListProductsReply = gw.call(
                gw.stub.ListProducts, gateway_pb2.ListProductsRequest()
            )
            found = list(reply.products)
            show(products_table(found), lambda: [product_detail(p) for p in found])
        else:
            one: gateway_pb2.Product = gw.call(
                gw.stub.GetProduct, gateway_pb2.GetProductRequest(product=product)
            )
            console.print(product_detail(one))


def _order_id(client_order_id: str | None) -> str:
    """The id an order goes with: a new one only when none was given (an empty one is
    the gateway's to refuse, or a script's retry with an unset variable made a new
    order every time)."""
    return f"cli-{uuid.uuid4().hex[:20]}" if client_order_id is None else client_order_id


@app.command("open")
def open_position(
    product: Annotated[str, typer.Argument(help="Product, e.g. BTC-USDT:LONG.")],
    amount: Annotated[str, typer.Argument(help="USDT to pay in, open fee included.")],
    client_order_id: Annotated[
        str | None,
        typer.Option(help="Idempotency key: repeat it to retry safely (default: a new one)."),
    ] = None,
    api_key: ApiKey = None,
    server: Server = DEFAULT_GATEWAY,
) -> None:
    """Open a position: pay AMOUNT USDT into PRODUCT at the current NAV."""
    order_id = _order_id(client_order_id)
    request = gateway_pb2.OpenPositionRequest(
        client_order_id=order_id, product=product, amount_usdt=amount
    )
    with gateway(server, api_key, order_id) as gw:
        reply: gateway_pb2.OpenPositionReply = gw.call(gw.stub.OpenPosition, request)
    console.print(
        receipt(
            f"opened {reply.product}",
            [
                ("position", reply.position_id),
                ("paid (USDT)", _num(reply.amount)),
                ("fee (USDT)", _num(reply.fee)),
                ("units", _num(reply.units)),
                ("NAV", _num(reply.nav)),
                ("client order id", order_id),
            ],
        )
    )


@app.command("close")
def close_position(
    position_id: Annotated[str, typer.Argument(help="The position to close.")],
    units: Annotated[str | None, typer.Option(help="Units to redeem (a partial close).")] = None,
    all_units: Annotated[bool, typer.Option("--all", help="Redeem every unit.")] = False,
    client_order_id: Annotated[
        str | None,
        typer.Option(help="Idempotency key: repeat it to retry safely (default: a new one)."),
    ] = None,
    api_key: ApiKey = None,
    server: Server = DEFAULT_GATEWAY,
) -> None:
    """Close a position, or part of it, at the current NAV."""
    if (units is None) == (not all_units):
        raise fail("give either --units N or --all", 2)
    order_id = _order_id(client_order_id)
    request = gateway_pb2.ClosePositionRequest(
        client_order_id=order_id, position_id=position_id, units=units or "", all=all_units
    )
    with gateway(server, api_key, order_id) as gw:
        reply: gateway_pb2.ClosePositionReply = gw.call(gw.stub.ClosePosition, request)
    console.print(
        receipt(
            f"closed {_num(reply.units)} units of {reply.product}",
            [
                ("position", reply.position_id),
                ("units redeemed", _num(reply.units)),
                ("NAV", _num(reply.nav)),
                ("gross (USDT)", _num(reply.gross)),
                ("fee (USDT)", _num(reply.fee)),
                ("payout (USDT)", _num(reply.payout)),
                ("realized PnL (USDT)", _pnl(reply.realized_pnl)),
                ("units left", _num(reply.position.units)),
                ("client order id", order_id),
            ],
        )
    )


@app.command()
def positions(
    position_id: Annotated[str | None, typer.Argument(help="One position.")] = None,
    include_closed: Annotated[
        bool, typer.Option("--all", help="Include closed positions.")
    ] = False,
    api_key: ApiKey = None,
    server: Server = DEFAULT_GATEWAY,
) -> None:
    """Your positions, valued at the current NAV."""
    with gateway(server, api_key) as gw:
        if position_id is not None:
            one: gateway_pb2.Position = gw.call(
                gw.stub.GetPosition, gateway_pb2.GetPositionRequest(position_id=position_id)
            )
            console.print(position_detail(one))
            return
        held: list[gateway_pb2.Position] = []
        token, asked = "", set()
        while True:  # every page
            asked.add(token)
            request = gateway_pb2.ListPositionsRequest(
                include_closed=include_closed, page_token=token
            )
            reply: gateway_pb2.ListPositionsReply = gw.call(gw.stub.ListPositions, request)
            held.extend(reply.positions)
            token = reply.next_page_token
            if not token:
                break
            if token in asked:  # a faulty server's: the listing would never end
                raise fail(f"the gateway sent page token {token!r} again: listing stopped")
    if held:
        show(positions_table(held), lambda: [position_detail(p) for p in held])
    else:
        console.print("no positions" if include_closed else "no open positions")


@dataclass(slots=True)
class NavBoard:
    """The latest NAV of each watched product, and what it opened the watch at."""

    rows: dict[str, nav_pb2.NavUpdated]
    first: dict[str, Decimal]
    updates: int = 0
    lost: str | None = None  # why the stream was lost, while reconnecting

    def apply(self, update: nav_pb2.NavUpdated) -> None:
        """Show `update` unless it is older than the row (the stream can start a fetch
        behind the products read first); an equal seq, an order's re-mark, is shown."""
        held = self.rows.get(update.product)
        if held is not None and update.seq < held.seq:
            return
        self.rows[update.product] = update
        if update.nav:
            self.first.setdefault(update.product, Decimal(update.nav))
        self.updates += 1

    def refresh(self, update: nav_pb2.NavUpdated) -> None:
        """A row read afresh (not a stream's update, not counted): kept only when newer
        than the row, or at its seq with other figures (an order's re-mark)."""
        held = self.rows.get(update.product)
        if (
            held is None
            or update.seq > held.seq
            or (update.seq == held.seq and update.nav != held.nav)
        ):
            self.rows[update.product] = update

    def table(self) -> Table:
        """As many columns as the terminal shows whole, the least wanted left out first
        (a live board cannot fall back to records as `show` does; a cut NAV is worse
        than a missing column); product, NAV and price always, wrapped if they must."""
        rows = [self._cells(product) for product in sorted(self.rows)]
        shown = list(WATCH_COLUMNS)
        for column in WATCH_DROPPED_FIRST:
            table = self._table(shown, rows)
            if fits(table):
                return table
            shown.remove(column)
        return self._table(shown, rows, wrap=True)

    def _cells(self, product: str) -> dict[str, str]:
        u = self.rows[product]
        start = self.first.get(product)
        return {
            "product": product,
            "NAV": _num(u.nav),
            "change": f"{Decimal(u.nav) / start - 1:+.2%}" if u.nav and start else "-",
            "price": _num(u.price) if u.price != "0" else "-",
            "target": _leverage(u.target_leverage),
            "actual": _leverage(u.actual_leverage),
            "regime": _regime(u.regime),
            "market time": _when(u.ts_event_ns),
        }

    def _table(self, shown: list[str], rows: list[dict[str, str]], wrap: bool = False) -> Table:
        title = f"NAV live ({self.updates} updates; Ctrl-C to stop)"
        if self.lost is not None:  # the figures are the last ones, not live
            title = f"NAV as last seen ({self.updates} updates): reconnecting, {self.lost}"
        table = Table(title=escape(title))
        _columns(table, shown, left=("product",), wrap=wrap)
        for cells in rows:
            table.add_row(*(cells[name] for name in shown))
        return table


WATCH_COLUMNS = ("product", "NAV", "change", "price", "target", "actual", "regime", "market time")
WATCH_DROPPED_FIRST = ("market time", "target", "change", "actual", "regime")


def _as_update(p: gateway_pb2.Product) -> nav_pb2.NavUpdated:
    return nav_pb2.NavUpdated(
        product=p.product,
        nav=p.nav,
        price=p.price,
        target_leverage=p.target_leverage,
        actual_leverage=p.actual_leverage,
        regime=p.regime,
        ts_event_ns=p.ts_event_ns,
        seq=p.seq,
    )


@app.command()
def watch(
    products: Annotated[
        list[str] | None, typer.Argument(help="Products to watch (default: all).")
    ] = None,
    count: Annotated[
        int | None, typer.Option(min=1, help="Stop after this many updates (default: never).")
    ] = None,
    api_key: ApiKey = None,
    server: Server = DEFAULT_GATEWAY,
) -> None:
    """Stream NAV updates live as a refreshing table until Ctrl-C."""
    wanted = list(products or [])
    with gateway(server, api_key) as gw:
        listed: gateway_pb2.ListProductsReply = gw.call(
            gw.stub.ListProducts, gateway_pb2.ListProductsRequest()
        )
        known = {p.product: p for p in listed.products}
        unknown = [p for p in wanted if p not in known]
        if unknown:
            raise fail(f"NOT_FOUND: unknown product {', '.join(unknown)}")
        board = NavBoard({}, {})
        for name in wanted or sorted(known):
            board.rows[name] = _as_update(known[name])
            if known[name].nav:
                board.first[name] = Decimal(known[name].nav)
        request = gateway_pb2.StreamNavRequest(products=wanted)
        streams: list[Any] = []  # the one open now is the last
        stopping = threading.Event()

        def stop_on_ctrl_c(signum: int, frame: object) -> None:
            """Ctrl-C cancels the stream (from another thread, as gRPC allows) instead of
            raising KeyboardInterrupt wherever the main thread is, possibly inside gRPC
            or rich holding a lock; the loop below then ends on the cancelled stream."""
            stopping.set()
            if streams:
                threading.Thread(target=streams[-1].cancel, daemon=True).start()

        previous = signal.signal(signal.SIGINT, stop_on_ctrl_c)
        lost_at: float | None = None  # when the stream was lost, until an update comes
        pause = RECONNECT_FIRST_PAUSE_S
        try:
            with Live(board.table(), console=console, auto_refresh=False) as live:
                while not stopping.is_set():
                    streams[:] = [gw.stub.StreamNav(request, metadata=gw.metadata)]
                    opened = time.monotonic()
                    if stopping.is_set():  # Ctrl-C cancelled the stream before it
                        return
                    try:
                        for update in streams[-1]:
                            board.apply(update)
                            board.lost, lost_at, pause = None, None, RECONNECT_FIRST_PAUSE_S
                            live.update(board.table(), refresh=True)
                            if count is not None and board.updates >= count:
                                return
                    except grpc.RpcError as exc:
                        code = exc.code() if isinstance(exc, grpc.Call) else None
                        if stopping.is_set():
                            return
                        if code is not grpc.StatusCode.UNAVAILABLE:
                            raise
                        # a restart, a lost connection: the board says so and goes on
                        # once the gateway streams again (the stream's contract: its
                        # client reconnects), or ends RECONNECT_PATIENCE_S after the loss
                        board.lost = rpc_error_line(exc, server)
                        live.update(board.table(), refresh=True)
                        if time.monotonic() - opened >= RECONNECT_MOST_PAUSE_S:
                            # held open a while, updates or not (a quiet market): the
                            # gateway was streaming, and this loss is a new one
                            lost_at, pause = None, RECONNECT_FIRST_PAUSE_S
                        lost_at = time.monotonic() if lost_at is None else lost_at
                        deadline = lost_at + RECONNECT_PATIENCE_S
                        if not _reconnected(gw.channel, stopping, pause, deadline):
                            if stopping.is_set():
                                return
                            raise fail(
                                f"{board.lost}; no gateway streaming for "
                                f"{RECONNECT_PATIENCE_S:g} s, gave up"
                            ) from None
                        pause = min(pause * 2, RECONNECT_MOST_PAUSE_S)
                        board.lost = None  # connected: live, unless the next stream fails
                        _catch_up(gw, board)
                        live.update(board.table(), refresh=True)
                        continue
                    if not stopping.is_set():  # ended as done: never the gateway's own
                        raise fail("the gateway ended the stream")
        finally:
            signal.signal(signal.SIGINT, previous)
            for stream in streams:
                stream.cancel()
            if not console.is_terminal:
                console.line()  # Live leaves its last frame unterminated off a terminal


def _catch_up(gw: Gateway, board: NavBoard) -> None:
    """The NAVs published while the stream was lost: a new stream follows what comes
    after it, so they showed only at each product's next tick (never, in a quiet
    market). Read as `ListProducts` has them; the next stream says what is wrong."""
    with contextlib.suppress(grpc.RpcError):
        listed = gw.call(gw.stub.ListProducts, gateway_pb2.ListProductsRequest())
        for product in listed.products:
            if product.product in board.rows:
                board.refresh(_as_update(product))


# A gateway restart is bridged; one not streaming this long after the loss (gone, a host
# that froze, a feed that keeps failing) ends `watch`. Between tries a pause that grows:
# a gateway that answers at once it cannot stream is not asked again at once.
RECONNECT_PATIENCE_S = 60.0
RECONNECT_FIRST_PAUSE_S, RECONNECT_MOST_PAUSE_S = 0.5, 5.0


def _reconnected(
    channel: grpc.Channel, stopping: threading.Event, pause_s: float, deadline: float
) -> bool:
    """After `pause_s`, whether the channel is ready by `deadline` (monotonic); False on
    Ctrl-C or past the deadline."""
    if stopping.wait(min(pause_s, max(deadline - time.monotonic(), 0.0))):
        return False
    ready = grpc.channel_ready_future(channel)
    try:
        while not ready.done():
            if stopping.wait(0.1) or time.monotonic() > deadline:
                return False
        return time.monotonic() <= deadline
    finally:
        ready.cancel()


@app.command()
def reconcile(
    namespace: Annotated[str, typer.Option(help="Pipeline prefix, e.g. 't1234abcd.'")] = "",
    symbol: Annotated[
        list[str] | None, typer.Option(help="Symbol (repeatable); default all.")
    ] = None,
    bootstrap: Annotated[str, typer.Option(envvar="SMARTLEV_KAFKA_BOOTSTRAP")] = "127.0.0.1:9092",
    redis_url: Annotated[
        str, typer.Option(envvar="SMARTLEV_REDIS_URL")
    ] = "redis://127.0.0.1:6379/0",
    config: Annotated[
        Path | None,
        typer.Option(
            envvar="SMARTLEV_STRATEGY_CONFIG",
            help="The policy file the pipeline runs with (TOML or JSON); default: defaults.",
        ),
    ] = None,
) -> None:
    """Check the books (DESIGN section 5) from Redis and Kafka: exit 0 balanced, 1 with
    each difference listed, 2 when it cannot check."""
    from shared.reconcile import run

    strategy = load_config(config if config and str(config) else None)
    raise typer.Exit(run(namespace, symbol or [], bootstrap, redis_url, strategy))


def main() -> None:
    # A gateway command's arguments go out as protobuf strings, which must be UTF-8:
    # bytes that are not reach Python as lone surrogates, which protobuf refused with a
    # traceback (the backtest's file names may be any bytes the file system takes)
    if sys.argv[1:2] and sys.argv[1] in GATEWAY_COMMANDS:
        for i, arg in enumerate(sys.argv[1:], 1):
            if not is_text(arg):
                fail(f"argument {i} is not UTF-8 text: {arg!r}", 2)
                raise SystemExit(2)
    app()
