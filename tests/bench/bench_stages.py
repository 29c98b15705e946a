"""Regime + leverage as processes on the real broker, beside raw kafka-python (the ceiling).

    .venv/bin/python -m tests.bench.bench_stages [--burst 20000] [--rate 1000] [--seconds 10]

Three numbers, measured in one run on the same broker:
- raw: kafka-python produce -> consume of the same messages (acks=all), no stage between;
- burst: `--burst` real BTC ticks (hourly OHLC -> 4 ticks a bar) published at once,
  events/s from the first send to the last TargetsUpdate read back;
- paced: ticks at `--rate`/s for `--seconds`, latency from the tick's `ts_init_ns`
  (stamped just before the send) to its TargetsUpdate being read back.

Every stage runs as `python -m services.<name>` in its own namespace, which is deleted
afterwards. Not a test: it prints a table and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Sequence

import redis
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table
from smartlev.v1 import leverage_pb2, market_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.tick_replay import ReplaySource, event_symbol, make_producer
from shared.pipeline_runner import LEVERAGE, REGIME, Pipeline, new_namespace
from shared.topics import LEVERAGE_TARGETS, MARKET_TICKS

SYMBOL = "BTC-USDT"
WARMUP = "ETH-USDT"  # warms the stages up without touching BTC's seqs


class Reader(threading.Thread):
    """Reads a topic from the start in the background; `on_value(value, receive_ns)`."""

    def __init__(
        self, bootstrap: str, topic: str, partitions: int, on_value: Callable[[bytes, int], None]
    ) -> None:
        super().__init__(daemon=True)
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(tps)
        self.consumer.seek_to_beginning(*tps)
        self.on_value = on_value
        self.count = 0
        self.last_ns = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for records in self.consumer.poll(timeout_ms=50).values():
                now = time.time_ns()
                for record in records:
                    self.on_value(record.value, now)
                    self.count += 1
                    self.last_ns = now

    def wait_for(self, count: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"read {self.count} of {count} within {timeout_s:.0f}s")
            time.sleep(0.01)

    def close(self) -> None:
        self.stopping.set()
        self.join(5)
        self.consumer.close()


def events(symbol: str, ticks: int) -> list[market_pb2.MarketEvent]:
    return list(ReplaySource(symbol=symbol).events(limit=ticks))


def raw_rate(bootstrap: str, messages: Sequence[market_pb2.MarketEvent]) -> float:
    """kafka-python producer -> consumer of the same messages through a fresh topic."""
    namespace = new_namespace("bench")
    spec = MARKET_TICKS.in_namespace(namespace)
    ensure_topics(bootstrap, [spec], verbose=False)
    reader = Reader(bootstrap, spec.name, spec.partitions, lambda value, now: None)
    reader.start()
    producer = make_producer(bootstrap)
    try:
        start = time.time_ns()
        for event in messages:
            producer.send(spec.name, key=event_symbol(event), value=event)
        producer.flush()
        reader.wait_for(len(messages), 120)
        return len(messages) / ((reader.last_ns - start) / 1e9)
    finally:
        producer.close()
        reader.close()
        delete_namespace(bootstrap, None, namespace)


def stamp(event: market_pb2.MarketEvent) -> market_pb2.MarketEvent:
    which = event.WhichOneof("event")
    getattr(event, which).ts_init_ns = time.time_ns()
    return event


def paced(send: Callable[[market_pb2.MarketEvent], object], items: list, rate: float) -> None:
    """Send at `rate` per second on a fixed schedule (no drift if a send is late)."""
    start = time.perf_counter()
    for index, event in enumerate(items):
        delay = start + index / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        send(stamp(event))


def delete_namespace(bootstrap: str, redis_url: str | None, namespace: str) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        mine = [t for t in admin.list_topics() if t.startswith(namespace)]
        if mine:
            admin.delete_topics(mine)
    finally:
        admin.close()
    if redis_url is not None:
        client = redis.Redis.from_url(redis_url)
        for key in client.scan_iter(match=f"{namespace}*"):
            client.delete(key)
        client.close()


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--burst", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=1000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    console = Console(width=120)
    paced_ticks = int(args.rate * args.seconds)
    btc = events(SYMBOL, args.burst + paced_ticks)
    burst, rest = btc[: args.burst], btc[args.burst :]
    warmup = events(WARMUP, 200)

    console.print(f"raw kafka-python produce -> consume, {len(burst)} messages ...")
    raw = raw_rate(args.bootstrap, burst)

    latencies_ms: list[float] = []
    lock = threading.Lock()

    def on_target(value: bytes, now: int) -> None:
        update = codec.decode(leverage_pb2.TargetsUpdate, value)
        which = update.market.WhichOneof("event")
        if getattr(update.market, which).symbol == SYMBOL and recording.is_set():
            with lock:
                latencies_ms.append((now - getattr(update.market, which).ts_init_ns) / 1e6)

    recording = threading.Event()
    with Pipeline.start(
        (REGIME, LEVERAGE), bootstrap=args.bootstrap, redis_url=args.redis
    ) as pipeline:
        out = pipeline.topic(LEVERAGE_TARGETS.name)
        reader = Reader(args.bootstrap, out, LEVERAGE_TARGETS.partitions, on_target)
        reader.start()
        producer = make_producer(args.bootstrap)
        ticks = pipeline.topic(MARKET_TICKS.name)

        def send(event: market_pb2.MarketEvent) -> object:
            return producer.send(ticks, key=event_symbol(event), value=event)

        try:
            console.print("warm-up ...")
            for event in warmup:
                send(event)
            producer.flush()
            reader.wait_for(len(warmup), 60)

            console.print(f"burst of {len(burst)} events through regime + leverage ...")
            start = time.time_ns()
            for event in burst:
                send(event)
            producer.flush()
            reader.wait_for(len(warmup) + len(burst), 600)
            burst_rate = len(burst) / ((reader.last_ns - start) / 1e9)

            console.print(f"{len(rest)} events paced at {args.rate:.0f}/s ...")
            latency_producer = make_producer(args.bootstrap, linger_ms=0)
            recording.set()
            paced(
                lambda e: latency_producer.send(ticks, key=event_symbol(e), value=e),
                rest,
                args.rate,
            )
            latency_producer.flush()
            reader.wait_for(len(warmup) + len(btc), 120)
            latency_producer.close()
        finally:
            producer.close()
            reader.close()
            pipeline.stop()
            delete_namespace(args.bootstrap, args.redis, pipeline.namespace)

    table = Table(title="regime + leverage as processes, this broker, this run")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("raw kafka-python produce -> consume (msg/s)", f"{raw:,.0f}")
    table.add_row(f"burst of {len(burst):,} ticks (events/s)", f"{burst_rate:,.0f}")
    table.add_row("burst / raw", f"{burst_rate / raw:.0%}")
    table.add_row(
        f"paced {args.rate:,.0f}/s: tick -> TargetsUpdate p50 (ms)", f"{pct(latencies_ms, 0.5):.1f}"
    )
    table.add_row("  p99 (ms)", f"{pct(latencies_ms, 0.99):.1f}")
    table.add_row("  max (ms)", f"{max(latencies_ms):.1f}")
    table.add_row("  mean (ms)", f"{statistics.fmean(latencies_ms):.1f}")
    console.print(table)


if __name__ == "__main__":
    main()
