"""Demo: replay real BTC ticks onto market.ticks and read them back, exactly.

    python -m shared.demo_roundtrip [-n 500] [--bootstrap 127.0.0.1:9092]

Ensures the topics exist, produces N ticks (plus the funding settlements between them) as
MarketEvent protobufs keyed by symbol, then consumes market.ticks from the offsets the
run started at and checks every message came back byte-identical and in order. Exits 1
on any mismatch or timeout.
"""

from __future__ import annotations

import argparse
import sys
import time
from decimal import Decimal

from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from smartlev.v1 import market_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.tick_replay import ReplaySource, event_symbol, make_producer, publish
from shared.settings import ServiceSettings, from_environment
from shared.topics import MARKET_TICKS

console = Console()


def end_offsets(bootstrap: str, topic: str) -> dict[TopicPartition, int]:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), enable_auto_commit=False)
    try:
        partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
        return dict(consumer.end_offsets(partitions))
    finally:
        consumer.close()


def consume_from(
    bootstrap: str, start: dict[TopicPartition, int], expected: int, timeout_s: float
) -> list[tuple[str, bytes, market_pb2.MarketEvent]]:
    """Read `expected` messages from `start` offsets: (key, raw value, decoded)."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        key_deserializer=codec.key_deserializer,
    )
    out: list[tuple[str, bytes, market_pb2.MarketEvent]] = []
    try:
        consumer.assign(list(start))
        for tp, offset in start.items():
            consumer.seek(tp, offset)
        deadline = time.monotonic() + timeout_s
        while len(out) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                for record in records:
                    event = codec.decode(market_pb2.MarketEvent, record.value)
                    out.append((record.key, record.value, event))
    finally:
        consumer.close()
    return out


def _row(event: market_pb2.MarketEvent) -> list[str]:
    from shared.core.market import NS_PER_SECOND

    which = event.WhichOneof("event")
    inner = getattr(event, which)
    ts = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(inner.ts_event_ns // NS_PER_SECOND))
    value = inner.price if which == "tick" else f"rate {inner.rate}"
    mark = inner.mark_price if which == "tick" else ""
    return [str(inner.seq), which, inner.symbol, ts, value, mark or "-"]


def run(ticks: int, bootstrap: str, symbol: str, timeout_s: float) -> int:
    console.print(f"[bold]smartlev round trip[/]: {ticks} {symbol} ticks via {bootstrap}")
    ensure_topics(bootstrap, verbose=False)
    events = list(ReplaySource(symbol=symbol).events(limit=ticks))
    sent_bytes = {e.SerializeToString(deterministic=True) for e in events}
    start = end_offsets(bootstrap, MARKET_TICKS.name)

    producer = make_producer(bootstrap)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), console=console
    ) as progress:
        task = progress.add_task("produce", total=len(events))
        t0 = time.perf_counter()
        publish(producer, events, on_sent=lambda n: progress.update(task, completed=n))
        produce_s = time.perf_counter() - t0
    producer.close()

    t1 = time.perf_counter()
    received = consume_from(bootstrap, start, len(events), timeout_s)
    consume_s = time.perf_counter() - t1
    # Only this run's symbol; another producer on the topic must not break the check.
    mine = [r for r in received if r[0] == symbol and r[1] in sent_bytes]

    problems: list[str] = []
    if len(mine) != len(events):
        problems.append(f"sent {len(events)} events, got back {len(mine)}")
    for i, (sent, (key, raw, got)) in enumerate(zip(events, mine, strict=False)):
        if got != sent or raw != sent.SerializeToString(deterministic=True):
            problems.append(f"event {i} differs: sent {sent} got {got}")
            break
        if key != event_symbol(sent):
            problems.append(f"event {i}: key {key!r} != {event_symbol(sent)!r}")
            break
    prices = [codec.decimal_from_wire(e.tick.price) for e in events if e.HasField("tick")]
    fundings = sum(1 for e in events if e.HasField("funding"))

    table = Table(title=f"{MARKET_TICKS.name}: first and last events")
    for column in ("seq", "kind", "symbol", "ts_event (UTC)", "price", "mark"):
        table.add_column(column)
    for event in events[:3]:
        table.add_row(*_row(event))
    table.add_row(*["..."] * 6)
    for event in events[-3:]:
        table.add_row(*_row(event))
    console.print(table)

    summary = Table(title="round trip", show_header=False)
    summary.add_row("events sent", f"{len(events)} ({len(prices)} ticks, {fundings} funding)")
    summary.add_row("events read back", str(len(mine)))
    summary.add_row("min / max price", f"{min(prices, default=Decimal(0))} / {max(prices)}")
    summary.add_row("produce", f"{len(events) / produce_s:,.0f} msg/s ({produce_s:.3f}s)")
    summary.add_row("consume", f"{len(mine) / consume_s:,.0f} msg/s ({consume_s:.3f}s)")
    summary.add_row("exact (bytes and order)", "[green]yes[/]" if not problems else "[red]NO[/]")
    console.print(summary)
    for problem in problems:
        console.print(f"[red]MISMATCH[/] {problem}")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--ticks", type=int, default=500)
    parser.add_argument("--symbol", default="BTC-USDT")
    parser.add_argument("--bootstrap", default=from_environment(ServiceSettings).kafka_bootstrap)
    parser.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)
    if args.ticks < 1:
        parser.error("--ticks must be >= 1")
    try:
        return run(args.ticks, args.bootstrap, args.symbol, args.timeout)
    except Exception as exc:
        console.print(f"[red]demo failed[/]: {type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
