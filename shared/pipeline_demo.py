"""Demo: real BTC history through the running services, watched live, then charted.

    python -m shared.pipeline_demo [--start 2021-04-01 --end 2021-07-01] [--out out/demo]

Starts venue, hedging, leverage, regime and NAV as subprocesses in a fresh namespace (so
it never disturbs `make up`'s services or an earlier run), seeds 1,000,000 USDT into each
smart product, replays the slice through `services.ingestion replay --speed max`, shows
price, regime, target and actual leverage and NAV per product from `nav.updates` in a
table refreshed 4x a second, and writes <out>/pipeline.png. Exits 1 if no NAV update
arrives for --stall-s seconds, naming the service whose log to read.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table
from smartlev.v1 import common_pb2, nav_pb2

from shared.adapters.market_data import parse_time
from shared.chart import nav_chart
from shared.core.products import SIDES, product_id
from shared.interrupts import interrupt_on_hangup
from shared.pipeline_runner import (
    DEMO_RUNS,
    STAGES,
    Pipeline,
    PipelineError,
    new_namespace,
    remove_leftover_namespaces,
    replay_args,
)
from shared.settings import ServiceSettings, from_environment

console = Console()
if not console.is_terminal:  # piped, rich takes 80 columns: the table gets its 110
    console = Console(width=max(console.width, 110))
CAPITAL = Decimal(1_000_000)


@dataclass
class Series:
    """The pipeline's tick-by-tick path, as NavUpdated tells it (for the chart).

    nav.updates is keyed by product, so the products' updates arrive from different
    partitions at their own pace: they are kept per product by seq and joined at the end.
    """

    by_seq: dict[str, dict[int, nav_pb2.NavUpdated]] = field(default_factory=dict)
    latest: dict[str, nav_pb2.NavUpdated] = field(default_factory=dict)
    ticks: int = 0

    def add(self, update: nav_pb2.NavUpdated, products: list[str]) -> None:
        self.latest[update.product] = update
        if update.event_id != f"{update.product}:{update.seq}":
            return  # an order's re-mark, not a tick
        if update.product == products[0]:
            self.ticks += 1
        self.by_seq.setdefault(update.product, {})[update.seq] = update

    def rows(self, products: list[str]) -> list[list[nav_pb2.NavUpdated]]:
        """One row per tick every product has been marked on, in tick order."""
        seqs = set.intersection(*(set(self.by_seq.get(p, {})) for p in products))
        return [[self.by_seq[p][seq] for p in products] for seq in sorted(seqs)]


def table(series: Series, products: list[str], elapsed_s: float) -> Table:
    view = Table(
        title=f"smartlev pipeline: {series.ticks} ticks marked in {elapsed_s:.0f}s "
        f"({series.ticks / max(elapsed_s, 1e-9):.0f} ticks/s)"
    )
    for column in ("product", "time", "price", "regime", "target", "actual", "NAV", "seq"):
        view.add_column(
            column, justify="left" if column in ("product", "regime") else "right", no_wrap=True
        )
    for product in products:
        u = series.latest.get(product)
        if u is None:
            view.add_row(product, *["-"] * 7)
            continue
        when = datetime.fromtimestamp(u.ts_event_ns / 1e9, UTC).strftime("%Y-%m-%d %H:%M")
        view.add_row(
            product,
            when if u.ts_event_ns else "-",
            f"{Decimal(u.price):,.1f}",
            common_pb2.Regime.Name(u.regime).removeprefix("REGIME_"),
            f"{float(u.target_leverage):.2f}x",
            f"{float(u.actual_leverage):.2f}x",
            f"{Decimal(u.nav):,.4f}",
            str(u.seq),
        )
    return view


def run(args: argparse.Namespace) -> int:
    products = [product_id(args.symbol, side) for side in SIDES]
    settings = from_environment(ServiceSettings)
    # the previous demo's namespace, kept until now to be looked at
    remove_leftover_namespaces(settings.kafka_bootstrap, settings.redis_url, leftovers=DEMO_RUNS)
    console.print(f"[bold]==> starting the services[/] (namespace {args.namespace})")
    started = time.monotonic()
    with Pipeline.start(
        STAGES,
        namespace=args.namespace,
        bootstrap=settings.kafka_bootstrap,
        redis_url=settings.redis_url,
    ) as pipeline:
        console.print(f"    logs: {pipeline.log_dir}")
        for product in products:
            pipeline.deposit(product, CAPITAL, args.start_ns)
        series = Series()
        reader = pipeline.nav_consumer()
        replay = None
        last_seen = replay_started = time.monotonic()
        try:
            with Live(table(series, products, 0), console=console, refresh_per_second=4) as live:
                while True:
                    fresh = list(reader.poll(timeout_ms=250))
                    for _, update in fresh:
                        series.add(update, products)
                    now = time.monotonic()
                    if fresh:
                        last_seen = now
                    if replay is None and all(p in series.latest for p in products):
                        console.print("==> deposits applied; replaying through ingestion")
                        replay = pipeline.start_replay(
                            replay_args(args.symbol, args.start, args.end)
                        )
                        replay_started = now
                    live.update(table(series, products, now - started))
                    if replay is not None and replay.poll() is not None and not fresh:
                        if replay.returncode != 0:
                            raise pipeline.failure("ingestion", f"exited with {replay.returncode}")
                        if _drained(pipeline) and now - last_seen > 1.0:
                            break
                    if now - last_seen > args.stall_s:
                        stage = pipeline.stalled_stage()
                        raise pipeline.failure(
                            stage, f"stalled: no NAV update for {args.stall_s:.0f}s"
                        )
        finally:
            reader.close()
            if not console.is_terminal:
                console.line()  # Live leaves its last frame unterminated off a terminal
        elapsed = time.monotonic() - replay_started
    args.out.mkdir(parents=True, exist_ok=True)
    chart = args.out / "pipeline.png"
    rows = series.rows(products)
    nav_chart(
        chart,
        f"{args.symbol} through the services, {args.start}..{args.end}",
        [row[0].ts_event_ns for row in rows],
        [Decimal(row[0].price) for row in rows],
        [common_pb2.Regime.Name(row[0].regime) for row in rows],
        {p: [Decimal(row[i].nav) for row in rows] for i, p in enumerate(products)},
        {p: [float(row[i].actual_leverage) for row in rows] for i, p in enumerate(products)},
        {p: [float(row[i].target_leverage) for row in rows] for i, p in enumerate(products)},
        highlight=products,
    )
    console.print(
        f"==> {series.ticks} ticks through ingestion -> regime -> leverage -> hedging -> "
        f"venue -> NAV in {elapsed:.1f}s ({series.ticks / elapsed:.0f} ticks/s)"
    )
    console.print(f"==> pipeline chart: {chart}")
    return 0


def _drained(pipeline: Pipeline) -> bool:
    """Every market event made it through hedging (hedge.fills = ticks + orders)."""
    counts = pipeline.topic_counts(["market.ticks", "orders.events", "hedge.fills"])
    return counts["hedge.fills"] >= counts["market.ticks"] + counts["orders.events"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbol", default="BTC-USDT")
    parser.add_argument("--start", default="2021-04-01")
    parser.add_argument("--end", default="2021-07-01")
    parser.add_argument("--out", type=Path, default=Path("out/demo"))
    parser.add_argument("--stall-s", type=float, default=30.0)
    parser.add_argument("--namespace", default=None, help="default: a fresh demoXXXXXXXX.")
    args = parser.parse_args(argv)
    try:  # before any service starts; as the replay reads them (UTC unless they say)
        args.start_ns, end_ns = parse_time(args.start), parse_time(args.end)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.start_ns < end_ns:
        parser.error(f"--start {args.start} is not before --end {args.end}")
    args.namespace = args.namespace or new_namespace("demo")
    interrupt_on_hangup()
    try:
        return run(args)
    except PipelineError as exc:
        console.print("[bold red]pipeline demo failed[/]")
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
