"""`smartlev products|open|close|positions|watch` against an in-process fake gateway.

The fake answers with canned replies and the gateway's status codes, so these tests pin
what the CLI itself owns: the requests it sends, its tables, one-line errors with a
non-zero exit (never a traceback), and `watch` stopping cleanly on Ctrl-C. The real
gateway is exercised in tests/integration/test_gateway_e2e.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from rich.text import Text
from smartlev.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc, nav_pb2
from typer.testing import CliRunner

import shared.cli as cli_module
from shared.cli import GATEWAY_COMMANDS, app, main
from shared.serving import SERVER_ANSWERED

KEY = "test-key"
ROOT = Path(__file__).resolve().parents[2]
POSITION = "0123456789abcdef0123456789abcdef"
LATER_POSITION = "fedcba9876543210fedcba9876543210"  # on the listing's second page
PRODUCTS = [
    gateway_pb2.Product(
        product="BTC-USDT:LONG",
        symbol="BTC-USDT",
        side=common_pb2.LONG,
        nav="103.25000000",
        units="9990",
        price="49000.5",
        target_leverage="2.5",
        actual_leverage="2.41234567",
        regime=common_pb2.TREND_UP,
        reasons=["REGIME_TREND_ALIGNED", "RATE_LIMITED"],
        tradable=True,
        min_order="10",
        max_order="1000000",
        open_fee_rate="0.001",
        close_fee_rate="0.001",
    ),
    gateway_pb2.Product(
        product="BTC-USDT:SHORT",
        symbol="BTC-USDT",
        side=common_pb2.SHORT,
        nav="97.10000000",
        target_leverage="1",
        actual_leverage="1.0",
        regime=common_pb2.TREND_UP,
        tradable=False,
        not_tradable_reason="BTC-USDT:SHORT: the last trade is a print the mark ignores",
    ),
]


class FakeGateway(gateway_pb2_grpc.GatewayServicer):
    """Canned answers; records the last request of each method."""

    def __init__(self) -> None:
        self.requests: dict[str, object] = {}

    def _auth(self, context: grpc.ServicerContext) -> None:
        if ("authorization", f"Bearer {KEY}") not in context.invocation_metadata():
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "unknown API key")

    def ListProducts(
        self, request: gateway_pb2.ListProductsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListProductsReply:
        self._auth(context)
        return gateway_pb2.ListProductsReply(products=PRODUCTS)

    def GetProduct(
        self, request: gateway_pb2.GetProductRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Product:
        self._auth(context)
        for product in PRODUCTS:
            if product.product == request.product:
                return product
        context.abort(grpc.StatusCode.NOT_FOUND, f"unknown product {request.product!r}")
        raise AssertionError  # abort raises

    def OpenPosition(
        self, request: gateway_pb2.OpenPositionRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.OpenPositionReply:
        self._auth(context)
        self.requests["open"] = request
        if request.amount_usdt == "5":
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "amount_usdt: 5 is below the minimum order of 10",
            )
        if request.amount_usdt == "7":  # as the gateway sends its own: marked
            context.set_trailing_metadata(SERVER_ANSWERED)
            context.abort(grpc.StatusCode.UNAVAILABLE, "state store unavailable: Redis is down")
        if request.amount_usdt == "8":  # a proxy's or a dying server's: not marked
            context.abort(grpc.StatusCode.UNAVAILABLE, "Stream removed")
        if request.amount_usdt == "9":  # settled, but the answer comes too late
            time.sleep(5)  # past any delay of the Ctrl-C on a loaded machine
        return gateway_pb2.OpenPositionReply(
            order_id=POSITION,
            position_id=POSITION,
            product=request.product,
            amount=request.amount_usdt,
            fee="1.00000000",
            units="9.67554479",
            nav="103.25000000",
        )

    def ClosePosition(
        self, request: gateway_pb2.ClosePositionRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ClosePositionReply:
        self._auth(context)
        self.requests["close"] = request
        return gateway_pb2.ClosePositionReply(
            order_id="f" * 32,
            position_id=request.position_id,
            product="BTC-USDT:LONG",
            units="9.67554479",
            nav="104.00000000",
            gross="1006.25665816",
            fee="1.00625665",
            payout="1005.25040151",
            realized_pnl="5.25040151",
            position=gateway_pb2.Position(units="0"),
        )

    def ListPositions(
        self, request: gateway_pb2.ListPositionsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListPositionsReply:
        """Two pages: POSITION, then LATER_POSITION."""
        self._auth(context)
        self.requests.setdefault("list", [])
        self.requests["list"].append(request)  # type: ignore[attr-defined]
        if request.page_token == "page-2":
            later = gateway_pb2.Position(position_id=LATER_POSITION, product="ETH-USDT:SHORT")
            return gateway_pb2.ListPositionsReply(positions=[later])
        position = gateway_pb2.Position(
            position_id=POSITION,
            product="BTC-USDT:LONG",
            units="9.67554479",
            units_opened="9.67554479",
            entry_nav="103.25000000",
            amount="1000",
            cost="1000",
            nav="104.00000000",
            value="1006.25665816",
            unrealized_pnl="6.25665816",
            realized_pnl="0",
            fees="1.00000000",
            open=True,
        )
        return gateway_pb2.ListPositionsReply(positions=[position], next_page_token="page-2")

    def GetPosition(
        self, request: gateway_pb2.GetPositionRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.Position:
        self._auth(context)
        context.abort(grpc.StatusCode.NOT_FOUND, f"no position {request.position_id}")
        raise AssertionError

    def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.ServicerContext
    ) -> Iterator[nav_pb2.NavUpdated]:
        self._auth(context)
        self.requests["stream"] = request
        for i, nav in enumerate(("103.30000000", "103.40000000", "103.50000000")):
            yield nav_pb2.NavUpdated(
                product="BTC-USDT:LONG",
                nav=nav,
                price=f"4900{i}",
                target_leverage="2.5",
                actual_leverage="2.4",
                regime=common_pb2.TREND_UP,
                ts_event_ns=1_620_777_600_000_000_000 + i * 900_000_000_000,
            )
        while context.is_active():  # then nothing more: a quiet market
            time.sleep(0.05)


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeGateway, str]]:
    servicer = FakeGateway()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8),
        options=[  # takes a client's pings however often (the gateway: every 10 s)
            ("grpc.http2.min_ping_interval_without_data_ms", 0),
            ("grpc.http2.max_ping_strikes", 0),
        ],
    )
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)


@pytest.fixture
def cli(fake: tuple[FakeGateway, str], monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("SMARTLEV_GATEWAY", fake[1])
    monkeypatch.setenv("SMARTLEV_API_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "240")  # rich wraps to the terminal width
    return CliRunner()


def error_line(stderr: str) -> str:
    """The CLI's whole error output: exactly one line, no traceback."""
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]


def test_products_table_shows_nav_leverage_regime_and_reasons(cli: CliRunner) -> None:
    result = cli.invoke(app, ["products"])
    assert result.exit_code == 0, result.output
    for text in ("BTC-USDT:LONG", "103.25000000", "2.50x", "2.41x", "TREND_UP", "RATE_LIMITED"):
        assert text in result.stdout


def test_a_regime_this_build_does_not_know_shows_as_its_number(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server newer than the CLI may publish one: the table ended in a traceback."""
    newer = gateway_pb2.Product()
    newer.CopyFrom(PRODUCTS[0])
    newer.regime = 99  # type: ignore[assignment]
    monkeypatch.setattr(sys.modules[__name__], "PRODUCTS", [newer, *PRODUCTS[1:]])
    result = cli.invoke(app, ["products"])
    assert result.exit_code == 0, result.output
    assert "#99" in result.stdout and "BTC-USDT:LONG" in result.stdout


def test_one_product_in_full(cli: CliRunner) -> None:
    result = cli.invoke(app, ["products", "BTC-USDT:LONG"])
    assert result.exit_code == 0, result.output
    assert "REGIME_TREND_ALIGNED, RATE_LIMITED" in result.stdout
    assert "10 .. 1000000" in result.stdout


@pytest.mark.parametrize("columns", ["30", "40"])
def test_one_product_folds_what_a_narrow_terminal_cannot_show(
    columns: str, cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 30 columns its NAV read "123.456789…", at 40 its reasons "REGIME_TREND_ALI…"
    (from a review): folded now, as a receipt's."""
    monkeypatch.setenv("COLUMNS", columns)
    result = cli.invoke(app, ["products", "BTC-USDT:LONG"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    cells = "".join(
        line.split("│")[2].strip() for line in result.stdout.splitlines() if line.count("│") == 3
    )
    for shown in (PRODUCTS[0].nav, PRODUCTS[0].equity, "REGIME_TREND_ALIGNED,RATE_LIMITED"):
        assert shown in cells, result.stdout


def test_a_product_not_tradable_says_why_as_the_gateway_does(cli: CliRunner) -> None:
    """It said "no fresh NAV" whatever the gateway's reason (a NAV held up at a print
    was fresh)."""
    result = cli.invoke(app, ["products", "BTC-USDT:SHORT"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert f"no: {PRODUCTS[1].not_tradable_reason}" in result.stdout
    assert "fresh" not in result.stdout


def test_unknown_product_is_one_error_line_and_exit_1(cli: CliRunner) -> None:
    result = cli.invoke(app, ["products", "DOGE-USDT:LONG"])
    assert result.exit_code == 1
    assert error_line(result.stderr) == "error: NOT_FOUND: unknown product 'DOGE-USDT:LONG'"


def test_wrong_key_is_unauthenticated(cli: CliRunner) -> None:
    result = cli.invoke(app, ["products", "--api-key", "nope"])
    assert result.exit_code == 1
    assert error_line(result.stderr) == "error: UNAUTHENTICATED: unknown API key"


def test_missing_key_is_a_usage_error(cli: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SMARTLEV_API_KEY")
    result = cli.invoke(app, ["positions"])
    assert result.exit_code == 2
    assert "no API key: pass --api-key or set SMARTLEV_API_KEY" in error_line(result.stderr)


@pytest.mark.parametrize("key", ["é-key", "key\twith-tab"])
def test_a_key_metadata_cannot_carry_is_a_usage_error(cli: CliRunner, key: str) -> None:
    """gRPC refused it as INTERNAL "Invalid metadata", its core's log on stderr."""
    result = cli.invoke(app, ["products", "--api-key", key])
    assert result.exit_code == 2
    assert error_line(result.stderr) == "error: the API key must be printable ASCII"


@pytest.mark.parametrize(
    "server",
    [
        "",
        " ",
        "127.0.0.1:116527",
        "127.0.0.1:0",
        "127.0.0.1",
        "ipv4:1.2.3",
        ":50051",
        "localhost:²",  # str.isdigit took it, int() then raised: a traceback
        "localhost:５００５１",
    ],
)
def test_a_server_that_is_not_host_port_is_a_usage_error(cli: CliRunner, server: str) -> None:
    """gRPC's resolver printed its internal log lines and a stack trace, exit 1 (blank,
    or no port number); took port 116527 as 50991 (116527 - 65536: another server); and
    went to 443 with no port at all."""
    result = cli.invoke(app, ["products", "--server", server, "--api-key", "k"])
    assert result.exit_code == 2
    assert error_line(result.stderr) == (
        "error: --server must be host:port, the port 1-65535 (e.g. 127.0.0.1:50051), "
        f"got {server!r}"
    )


def test_unreachable_gateway_names_the_address(cli: CliRunner) -> None:
    result = cli.invoke(app, ["products", "--server", "127.0.0.1:1"])
    assert result.exit_code == 1
    line = error_line(result.stderr)
    assert line.startswith("error: UNAVAILABLE: cannot reach the gateway at 127.0.0.1:1")


def test_a_gateway_that_answers_unavailable_is_not_called_unreachable(
    cli: CliRunner, fake: tuple[FakeGateway, str]
) -> None:
    """The gateway's own UNAVAILABLE (its Redis or Kafka down, a busy product) was worded
    "cannot reach the gateway at ...": the user checked an address that was fine. One
    the gateway did not mark (a connection lost mid-call) must not read as its answer:
    an order's outcome is then unknown."""
    retry = "; the order may have settled: retry with --client-order-id o-1"
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "7", "--client-order-id", "o-1"])
    assert result.exit_code == 1
    assert error_line(result.stderr) == (
        "error: UNAVAILABLE: state store unavailable: Redis is down "
        f"(the gateway at {fake[1]} answered){retry}"
    )
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "8", "--client-order-id", "o-1"])
    assert error_line(result.stderr) == (
        f"error: UNAVAILABLE: cannot reach the gateway at {fake[1]}, or lost the "
        f"connection (Stream removed){retry}"
    )


def test_an_order_whose_outcome_is_unknown_names_the_id_that_retries_it(
    cli: CliRunner, fake: tuple[FakeGateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The id a command made up was shown only on success: after a timeout the user
    could not tell whether the order settled, and running the command again made a new
    id, a second position if the first had settled. A refusal changed nothing: no id."""
    monkeypatch.setattr("shared.cli.CALL_TIMEOUT_S", 0.2)
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "9"])
    assert result.exit_code == 1
    sent = fake[0].requests["open"]
    assert isinstance(sent, gateway_pb2.OpenPositionRequest)
    assert error_line(result.stderr) == (
        "error: DEADLINE_EXCEEDED: Deadline Exceeded; the order may have settled: retry "
        f"with --client-order-id {sent.client_order_id}"
    )
    refused = cli.invoke(app, ["open", "BTC-USDT:LONG", "5"])
    assert "client-order-id" not in refused.stderr


def test_open_sends_the_order_and_prints_the_receipt(
    cli: CliRunner, fake: tuple[FakeGateway, str]
) -> None:
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "1000", "--client-order-id", "my-order-1"])
    assert result.exit_code == 0, result.output
    sent = fake[0].requests["open"]
    assert sent == gateway_pb2.OpenPositionRequest(
        client_order_id="my-order-1", product="BTC-USDT:LONG", amount_usdt="1000"
    )
    for text in (POSITION, "9.67554479", "103.25000000", "1.00000000"):
        assert text in result.stdout


def test_open_without_an_id_gets_a_fresh_one_each_time(
    cli: CliRunner, fake: tuple[FakeGateway, str]
) -> None:
    ids = set()
    for _ in range(2):
        assert cli.invoke(app, ["open", "BTC-USDT:LONG", "1000"]).exit_code == 0
        sent = fake[0].requests["open"]
        assert isinstance(sent, gateway_pb2.OpenPositionRequest)
        ids.add(sent.client_order_id)
    assert len(ids) == 2


@pytest.mark.parametrize(
    ("order", "kind"),
    [
        (["open", "BTC-USDT:LONG", "1000"], "open"),
        (["close", POSITION, "--all"], "close"),
    ],
)
def test_an_empty_client_order_id_is_sent_as_given(
    cli: CliRunner, fake: tuple[FakeGateway, str], order: list[str], kind: str
) -> None:
    """A new id stood in for it: a script retrying with an unset variable made a new
    order every time. The gateway refuses it (INVALID_ARGUMENT)."""
    assert cli.invoke(app, [*order, "--client-order-id", ""]).exit_code == 0
    sent = fake[0].requests[kind]
    assert isinstance(sent, gateway_pb2.OpenPositionRequest | gateway_pb2.ClosePositionRequest)
    assert sent.client_order_id == ""


def test_refused_open_is_invalid_argument(cli: CliRunner) -> None:
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "5"])
    assert result.exit_code == 1
    assert error_line(result.stderr) == (
        "error: INVALID_ARGUMENT: amount_usdt: 5 is below the minimum order of 10"
    )


@pytest.mark.parametrize("args", [[], ["--units", "1", "--all"]])
def test_close_needs_units_or_all(cli: CliRunner, args: list[str]) -> None:
    result = cli.invoke(app, ["close", POSITION, *args])
    assert result.exit_code == 2
    assert error_line(result.stderr) == "error: give either --units N or --all"


def test_close_all_and_partial(cli: CliRunner, fake: tuple[FakeGateway, str]) -> None:
    result = cli.invoke(app, ["close", POSITION, "--all"])
    assert result.exit_code == 0, result.output
    sent = fake[0].requests["close"]
    assert isinstance(sent, gateway_pb2.ClosePositionRequest)
    assert (sent.position_id, sent.all, sent.units) == (POSITION, True, "")
    for text in ("1005.25040151", "1.00625665", "5.25040151", "104.00000000"):
        assert text in result.stdout
    assert cli.invoke(app, ["close", POSITION, "--units", "2.5"]).exit_code == 0
    sent = fake[0].requests["close"]
    assert isinstance(sent, gateway_pb2.ClosePositionRequest)
    assert (sent.all, sent.units) == (False, "2.5")


def test_positions_table(cli: CliRunner, fake: tuple[FakeGateway, str]) -> None:
    fake[0].requests.pop("list", None)  # the fake serves the whole module
    result = cli.invoke(app, ["positions", "--all"])
    assert result.exit_code == 0, result.output
    assert fake[0].requests["list"] == [  # every page, each asked with the listing's flag
        gateway_pb2.ListPositionsRequest(include_closed=True),
        gateway_pb2.ListPositionsRequest(include_closed=True, page_token="page-2"),
    ]
    for text in (POSITION, "9.67554479", "6.25665816", "open", LATER_POSITION):
        assert text in result.stdout


def test_a_narrow_terminal_gets_records_not_cut_ids(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "60")
    result = cli.invoke(app, ["positions"])
    assert result.exit_code == 0, result.output
    assert f"position {POSITION}" in result.stdout and "…" not in result.stdout
    assert "6.25665816" in result.stdout


def test_a_receipt_folds_what_the_terminal_is_too_narrow_for(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 50 columns the open receipt cut the position id to "b09471f3e93e2d64119997764fb…",
    and at 80 a 63-character client order id: the id a close needs, the one a retry
    must reuse. They fold instead."""
    monkeypatch.setenv("COLUMNS", "50")
    client_id = "order-2024-05-12-rebalance-" + "x" * 36
    result = cli.invoke(app, ["open", "BTC-USDT:LONG", "1000", "--client-order-id", client_id])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    cells = "".join(
        line.split("│")[2].strip() for line in result.stdout.splitlines() if line.count("│") == 3
    )
    assert POSITION in cells and client_id in cells, result.stdout


@pytest.mark.parametrize(
    ("position", "shown"),
    [
        (gateway_pb2.Position(open=True, realized_pnl="0"), "-"),  # no NAV to value it at
        (gateway_pb2.Position(open=True, realized_pnl="2", unrealized_pnl="-5"), "-3"),
        (gateway_pb2.Position(open=False, realized_pnl="-1.5"), "-1.5"),
        (gateway_pb2.Position(open=False, realized_pnl="0"), "0"),
    ],
)
def test_the_positions_pnl_is_unknown_while_an_open_one_has_no_nav(
    position: gateway_pb2.Position, shown: str
) -> None:
    """An open position with no NAV yet showed PnL 0 in the table (its open fee paid),
    where its detail view said "-"."""
    assert Text.from_markup(cli_module._total_pnl(position)).plain == shown


def test_unknown_position(cli: CliRunner) -> None:
    result = cli.invoke(app, ["positions", "f" * 32])
    assert result.exit_code == 1
    assert error_line(result.stderr) == f"error: NOT_FOUND: no position {'f' * 32}"


def test_watch_streams_until_count(cli: CliRunner, fake: tuple[FakeGateway, str]) -> None:
    result = cli.invoke(app, ["watch", "BTC-USDT:LONG", "--count", "3"])
    assert result.exit_code == 0, result.output
    assert fake[0].requests["stream"] == gateway_pb2.StreamNavRequest(products=["BTC-USDT:LONG"])
    assert "103.50000000" in result.stdout  # the last update is on the board
    assert "+0.24%" in result.stdout  # 103.50 against 103.25 when the watch began
    assert "BTC-USDT:SHORT" not in result.stdout


def test_the_watch_board_does_not_step_back_to_an_update_older_than_its_row() -> None:
    """The stream can start a fetch behind the products `watch` read first: an update
    older than the row took the NAV back. An equal seq (an order's re-mark) is news."""
    board = cli_module.NavBoard({}, {})
    board.rows["BTC-USDT:LONG"] = nav_pb2.NavUpdated(product="BTC-USDT:LONG", nav="100", seq=10)
    for seq, nav in ((9, "99"), (10, "101"), (8, "98"), (11, "102")):
        board.apply(nav_pb2.NavUpdated(product="BTC-USDT:LONG", nav=nav, seq=seq))
        if seq == 10:
            assert board.rows["BTC-USDT:LONG"].nav == "101"
    assert (board.rows["BTC-USDT:LONG"].nav, board.updates) == ("102", 2)


@pytest.mark.parametrize(
    ("columns", "left_out"),
    [(240, ()), (80, ("market time",)), (60, ("market time", "target", "change")), (30, ())],
)
def test_watch_leaves_columns_out_before_it_cuts_a_figure(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch, columns: int, left_out: tuple[str, ...]
) -> None:
    """At 80 columns the board cut every NAV to "10…" (its README table is 103 wide):
    the least wanted columns go first; product, NAV and price stay, whole (wrapped in
    a terminal too narrow even for them)."""
    monkeypatch.setenv("COLUMNS", str(columns))
    result = cli.invoke(app, ["watch", "--count", "3"])
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    body = [line.split("│")[1:-1] for line in result.stdout.splitlines() if line[:1] == "│"]
    products, navs = ("".join(cells[i].strip() for cells in body) for i in (0, 1))
    assert "103.50000000" in navs and "97.10000000" in navs  # wrapped pieces joined again
    assert "BTC-USDT:SHORT" in products
    for column in left_out:
        assert column not in result.stdout, column
    if columns == 240:
        assert "market time" in result.stdout and "target" in result.stdout


class Blackhole:
    """A TCP relay to `upstream` that can stop passing bytes without closing anything:
    a gateway host that froze, or a network that dropped silently (no FIN, no RST)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                client, _ = self.listener.accept()
                server = socket.create_connection(self.upstream)
                self.sockets += [client, server]
                for source, sink in ((client, server), (server, client)):
                    threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if not self.frozen.is_set():  # frozen: read, and never pass on
                    sink.sendall(data)

    def close(self) -> None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked in recv; close does not
            sock.close()


def test_watch_gives_up_a_gateway_that_stopped_answering(
    cli: CliRunner, fake: tuple[FakeGateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a quiet market a frozen gateway (or a silently dropped network) sends nothing,
    as a live one does: `watch` kept the last NAVs on its board for good. Its pings now
    go unanswered, and it ends saying so."""
    monkeypatch.setattr(cli_module, "KEEPALIVE_MS", 300)
    monkeypatch.setattr(cli_module, "KEEPALIVE_TIMEOUT_MS", 500)
    monkeypatch.setattr(cli_module, "RECONNECT_PATIENCE_S", 1.5)  # (60 s)
    blackhole = Blackhole(fake[1])
    monkeypatch.setenv("SMARTLEV_GATEWAY", blackhole.address)
    threading.Timer(4.0, blackhole.frozen.set).start()  # the board drawn, then silence
    backstop = threading.Timer(30.0, blackhole.close)  # ends a watch that never notices
    backstop.start()
    try:
        result = cli.invoke(app, ["watch", "BTC-USDT:LONG"])
    finally:
        backstop.cancel()
        blackhole.close()
    assert result.exit_code == 1, result.output
    line = error_line(result.stderr)
    assert line.startswith("error: UNAVAILABLE") and "ping" in line.lower(), line
    assert line.endswith("no gateway streaming for 1.5 s, gave up"), line  # it tried again
    assert "reconnecting" in result.stdout  # and the board said so meanwhile


class Updates(FakeGateway):
    """A gateway whose NAV stream sends `navs`, then waits (`hold`) or ends with OK."""

    def __init__(self, navs: list[str], hold: bool = True) -> None:
        super().__init__()
        self.navs, self.hold, self.streams = navs, hold, 0

    def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.ServicerContext
    ) -> Iterator[nav_pb2.NavUpdated]:
        self._auth(context)
        self.streams += 1
        for nav in self.navs:
            yield nav_pb2.NavUpdated(product="BTC-USDT:LONG", nav=nav, price="49000")
        while self.hold and context.is_active():
            time.sleep(0.05)


def serve(servicer: FakeGateway, port: int = 0) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port


def test_watch_goes_on_after_a_gateway_restart(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A restart ended every open stream UNAVAILABLE, the gateway's contract saying its
    client reconnects; `watch` ended instead, its board gone (from a review)."""
    before = Updates(["101.00000000", "102.00000000"])
    first, port = serve(before)
    after = Updates(["103.00000000", "104.00000000"])
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")

    def restart() -> None:
        deadline = time.monotonic() + 20
        while before.streams == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)  # its two updates drawn
        first.stop(grace=None)
        time.sleep(1.0)  # down a while: the watch waits, saying so
        restarted.append(serve(after, port)[0])

    restarted: list[grpc.Server] = []
    threading.Thread(target=restart, daemon=True).start()
    try:
        result = cli.invoke(app, ["watch", "BTC-USDT:LONG", "--count", "4"])
    finally:
        for server in restarted:
            server.stop(grace=None)
    assert result.exit_code == 0, result.output
    assert (before.streams, after.streams) == (1, 1)
    assert "104.00000000" in result.stdout and "(4 updates" in result.stdout


class NoStream(Updates):
    """Up, and answering at once that it cannot stream (its feed stopped, Kafka away)."""

    def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.ServicerContext
    ) -> Iterator[nav_pb2.NavUpdated]:
        self.streams += 1
        context.abort(grpc.StatusCode.UNAVAILABLE, "the NAV feed stopped")
        yield from ()


def test_watch_pauses_between_tries_and_gives_up_on_a_gateway_that_cannot_stream(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its channel stays ready: `watch` asked again ~16 times a second, its patience
    counted anew each time, for ever (from a review). Pauses grow; the patience runs
    from the loss."""
    monkeypatch.setattr(cli_module, "RECONNECT_PATIENCE_S", 3.0)
    servicer = NoStream([])
    server, port = serve(servicer)
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")
    began = time.monotonic()
    try:
        result = cli.invoke(app, ["watch", "BTC-USDT:LONG"])
    finally:
        server.stop(grace=None)
    assert result.exit_code == 1, result.output
    assert 3.0 <= time.monotonic() - began < 10.0
    assert 2 <= servicer.streams <= 4  # after 0, 0.5, 1.5 s (and 3.5 s: past the patience)
    line = error_line(result.stderr)
    assert "the NAV feed stopped" in line and line.endswith("streaming for 3 s, gave up")


class RestartsTwice(Updates):
    """Stream 1: an update, then a restart; stream 2: a quiet market for `quiet_s`, then
    another restart; then updates."""

    def __init__(self, quiet_s: float) -> None:
        super().__init__([])
        self.quiet_s = quiet_s

    def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.ServicerContext
    ) -> Iterator[nav_pb2.NavUpdated]:
        self.streams += 1
        if self.streams == 1:
            yield nav_pb2.NavUpdated(product="BTC-USDT:LONG", nav="101.00000000")
            context.abort(grpc.StatusCode.UNAVAILABLE, "restart one")
        if self.streams == 2:
            time.sleep(self.quiet_s)  # connected, nothing trades
            context.abort(grpc.StatusCode.UNAVAILABLE, "restart two")
        for nav in ("102.00000000", "103.00000000"):
            yield nav_pb2.NavUpdated(product="BTC-USDT:LONG", nav=nav)


def test_a_quiet_market_between_two_restarts_is_not_counted_as_an_outage(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No update came after the first reconnect (the gateway sends none until the market
    moves): the first loss's time stood, and the second restart ended `watch` at once,
    its patience spent while it was streaming (from a review)."""
    monkeypatch.setattr(cli_module, "RECONNECT_PATIENCE_S", 2.0)
    monkeypatch.setattr(cli_module, "RECONNECT_MOST_PAUSE_S", 1.0)
    servicer = RestartsTwice(quiet_s=3.0)  # longer than the patience
    server, port = serve(servicer)
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")
    try:
        result = cli.invoke(app, ["watch", "BTC-USDT:LONG", "--count", "3"])
    finally:
        server.stop(grace=None)
    assert result.exit_code == 0, result.output
    assert servicer.streams == 3 and "103.00000000" in result.stdout


class MovedWhileDown(Updates):
    """A gateway restarted while the long product's NAV moved to 120 (seq 9): its first
    stream is lost at once; the second sends only the short product's next update."""

    def __init__(self) -> None:
        super().__init__([])
        self.listed = 0

    def ListProducts(
        self, request: gateway_pb2.ListProductsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListProductsReply:
        self.listed += 1
        long = gateway_pb2.Product(product="BTC-USDT:LONG", nav="110.00000000", seq=8)
        if self.listed > 1:  # read again after the restart
            long = gateway_pb2.Product(product="BTC-USDT:LONG", nav="120.00000000", seq=9)
        short = gateway_pb2.Product(product="BTC-USDT:SHORT", nav="97.00000000", seq=8)
        return gateway_pb2.ListProductsReply(products=[long, short])

    def StreamNav(
        self, request: gateway_pb2.StreamNavRequest, context: grpc.ServicerContext
    ) -> Iterator[nav_pb2.NavUpdated]:
        self.streams += 1
        if self.streams == 1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        yield nav_pb2.NavUpdated(product="BTC-USDT:SHORT", nav="96.00000000", seq=10)


def test_watch_catches_up_on_what_was_published_while_it_reconnected(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new stream follows what comes after it: the long's move while the gateway was
    down showed only at its next tick, the board meanwhile calling 110 live (from a
    review)."""
    servicer = MovedWhileDown()
    server, port = serve(servicer)
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")
    try:
        result = cli.invoke(app, ["watch", "--count", "1"])
    finally:
        server.stop(grace=None)
    assert result.exit_code == 0, result.output
    assert (servicer.listed, servicer.streams) == (2, 2)
    assert "120.00000000" in result.stdout and "110.00000000" not in result.stdout
    assert "96.00000000" in result.stdout and "(1 updates" in result.stdout  # not counted


def test_ctrl_c_while_watch_reconnects_ends_it_quietly() -> None:
    """It exited 1 saying it had given up on the gateway."""
    servicer = NoStream([])
    server, port = serve(servicer)
    env = {
        **os.environ,
        "SMARTLEV_GATEWAY": f"127.0.0.1:{port}",
        "SMARTLEV_API_KEY": KEY,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
    }
    process = subprocess.Popen(
        [sys.executable, "-c", "from shared.cli import main; main()", "watch"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while servicer.streams == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)  # in its pause before the next try
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=30)
    finally:
        server.stop(grace=None)
    assert process.returncode == 0, err.decode()
    assert err == b""


def test_watch_says_so_when_the_gateway_ends_the_stream(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway's stream never ends on its own; one that did (a proxy's, a faulty
    server's) ended `watch` with status 0 and nothing said (from a review)."""
    server, port = serve(Updates(["101.00000000"], hold=False))
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")
    try:
        result = cli.invoke(app, ["watch", "BTC-USDT:LONG"])
    finally:
        server.stop(grace=None)
    assert result.exit_code == 1, result.output
    assert error_line(result.stderr) == "error: the gateway ended the stream"


def test_watch_unknown_product(cli: CliRunner) -> None:
    result = cli.invoke(app, ["watch", "NOPE:LONG"])
    assert result.exit_code == 1
    assert error_line(result.stderr) == "error: NOT_FOUND: unknown product NOPE:LONG"


def ctrl_c(
    fake: tuple[FakeGateway, str], args: list[str], request: str, after_s: float
) -> tuple[int, bytes, bytes]:
    """Run the CLI with `args`, press Ctrl-C `after_s` after the fake got its `request`:
    (exit status, stdout, stderr)."""
    env = {
        **os.environ,
        "SMARTLEV_GATEWAY": fake[1],
        "SMARTLEV_API_KEY": KEY,
        "COLUMNS": "240",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "gen")]),
    }
    fake[0].requests.pop(request, None)
    process = subprocess.Popen(
        [sys.executable, "-c", "from shared.cli import main; main()", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and request not in fake[0].requests:
        time.sleep(0.02)
    time.sleep(after_s)
    process.send_signal(signal.SIGINT)
    # Generous: under a loaded CI machine a CLI once needed more than 10 s to exit here.
    out, err = process.communicate(timeout=30)
    return process.returncode, out, err


def test_watch_stops_cleanly_on_ctrl_c(fake: tuple[FakeGateway, str]) -> None:
    # after 0.3 s the stream's updates are drawn; it waits on a quiet market
    status, out, err = ctrl_c(fake, ["watch"], "stream", 0.3)
    assert status == 0, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert b"103.50000000" in out


def test_an_argument_that_is_not_utf8_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Its bytes reach Python as lone surrogates, which protobuf refused with a traceback."""
    monkeypatch.setattr(sys, "argv", ["smartlev", "open", "BTC-USDT:LONG", "10\udcff"])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    assert error_line(capsys.readouterr().err) == (
        "error: argument 3 is not UTF-8 text: '10\\udcff'"
    )


def test_only_a_gateway_commands_arguments_must_be_utf8(
    cli: CliRunner,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The backtest's file names may be any bytes the file system takes (refused as not
    UTF-8, a file it could open was not read); a server from SMARTLEV_GATEWAY that is
    not UTF-8 is a bad server, as one given with --server (it raised in gRPC)."""
    commands = {c.name or getattr(c.callback, "__name__", "") for c in app.registered_commands}
    assert commands - {"backtest", "reconcile"} == GATEWAY_COMMANDS  # every one checked
    name = tmp_path / "perp\udce9.csv"
    monkeypatch.setattr(sys, "argv", ["smartlev", "backtest", "--data", str(name)])
    with pytest.raises(SystemExit):
        main()
    assert "UTF-8" not in capsys.readouterr().err
    monkeypatch.setenv("SMARTLEV_GATEWAY", "h\udce9:50051")
    result = cli.invoke(app, ["products"])
    assert result.exit_code == 2
    assert error_line(result.stderr).startswith("error: --server must be host:port")


def test_ctrl_c_during_an_order_names_the_id_that_retries_it(
    fake: tuple[FakeGateway, str],
) -> None:
    """Sent, the order may settle whatever the CLI does next: Ctrl-C ended the command
    without the id, the commonest way for an outcome to be unknown."""
    order = ["open", "BTC-USDT:LONG", "9", "--client-order-id", "o-2"]
    status, _, err = ctrl_c(fake, order, "open", 0)  # the fake answers 5 s later
    assert status == 130
    assert error_line(err.decode()) == (
        "error: interrupted; the order may have settled: retry with --client-order-id o-2"
    )


class EndlessPages(FakeGateway):
    def ListPositions(
        self, request: gateway_pb2.ListPositionsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListPositionsReply:
        super().ListPositions(request, context)  # its checks and its record of requests
        return gateway_pb2.ListPositionsReply(next_page_token="same")


def test_positions_stops_at_a_page_token_sent_again(
    cli: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A faulty server's repeated token made `positions` ask for ever, its memory
    growing (from a review)."""
    servicer = EndlessPages()
    server, port = serve(servicer)
    monkeypatch.setenv("SMARTLEV_GATEWAY", f"127.0.0.1:{port}")
    try:
        result = cli.invoke(app, ["positions"])
    finally:
        server.stop(grace=None)
    assert result.exit_code == 1, result.output
    assert error_line(result.stderr) == (
        "error: the gateway sent page token 'same' again: listing stopped"
    )
    assert len(servicer.requests["list"]) == 2  # type: ignore[arg-type]
