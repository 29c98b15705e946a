"""End to end through the running services, beside raw Kafka on the same broker (the
ceiling).

    python -m tests.bench.bench_pipeline [--seconds 6]

Starts venue, hedging, leverage, regime and NAV in a fresh namespace, seeds both smart
products, warms them up (`WARMUP_DAYS` of ticks at 1,000/s, not measured: one-time costs
of a fresh broker and of each service's first batch), then replays consecutive slices of
real BTC history through `services.ingestion replay` offered at 100 and 1,000 ticks/s
and at max speed. For each tick the latency is from the tick's publish (`ts_init_ns` on
market.ticks) to its NavUpdated's publish (the record's CreateTime, ms, set by the NAV
service's producer; the benchmark's own polling reader would add its delays). The rate
is the sustained one: ticks marked per second while the middle 80% of the case's
NavUpdateds were published (filling and draining the pipeline at either end is not
throughput). The CPU per tick is the five services' (the figure the machine's noise
moves least); "machine busy" is the share of all cores in use over the same window, by
everything on the machine (broker, Redis, ingestion, this benchmark's readers, the
services): near 100% every hop waits for a core. Beside them, on the same broker: the
raw kafka-python produce -> consume rate (the ceiling the goal is set against) and the
same messages passed through four forwarding processes that do no work, one per stage
between a tick and its NavUpdated, each with the stages' own Kafka I/O (aiokafka, one
record batch out per batch in): what the design's chain costs in Kafka hops alone on
this machine, before any stage's work. A second table splits each case's CPU per tick by
process (every service, ingestion, the broker, Redis, these readers; `CpuSplit`): at the
throughput goal the whole machine may spend cores / (half the ceiling) per tick.
Run by `make bench`; never a timed assertion in a test.
"""

from __future__ import annotations

import argparse
import itertools
import math
import multiprocessing
import os
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event

import uvloop
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition as AioTopicPartition
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from rich.console import Console
from rich.table import Table
from smartlev.v1 import market_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.market_data import load_bars
from shared.adapters.record_batches import BatchSender
from shared.adapters.tick_replay import data_dir, make_producer
from shared.core.bars import ticks_from_bars
from shared.core.market import NS_PER_HOUR
from shared.core.products import SIDES, product_id
from shared.pipeline_runner import (
    READER_FETCH,
    STAGES,
    Pipeline,
    chain_topic,
    remove_leftover_namespaces,
    replay_args,
)
from shared.settings import ServiceSettings, from_environment
from shared.topics import MARKET_TICKS, TopicSpec
from tests.bench.cpu import cpu_seconds, machine_cpu_seconds, process_cpu_seconds, stack_pid

SYMBOL = "BTC-USDT"
TICKS_PER_DAY = 24 * 4  # ohlc mode: four ticks per hourly bar
EVENT_SECONDS_PER_TICK = 900  # ... 15 minutes of market time apart
FIRST_DAY = datetime(2021, 1, 1, tzinfo=UTC)
# The stages between a tick and its NavUpdated, each a consume -> produce hop.
HOPS = ("regime", "leverage", "hedging", "nav")
CHAIN_MESSAGES = 20_000
# Replayed before the measured cases (the days before FIRST_DAY), not measured: each
# service's first batch starts its producer and freezes its heap (tens to hundreds of ms,
# once: the 100 ticks/s case's p99 was 64-74 ms without a warm-up, 23-25 ms with it), and
# a freshly started broker compiles its hot paths for minutes (its CPU per tick fell from
# ~1.0 to ~0.45 ms over the first ~30,000 ticks at 1,000/s): this covers the steepest part.
WARMUP_DAYS = 150
READ_EVERY_S = 0.05  # the benchmark's readers poll at most this often
console = Console(width=130)  # the tables stay whole when piped (80 columns otherwise)


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    rate: int | None  # offered ticks/s; None: as fast as ingestion publishes
    ticks: int
    marked: int
    rate_per_s: float
    cpu_ms_per_tick: float  # the five services' CPU (not ingestion's, not the broker's)
    machine_busy: float  # share of the machine's CPU busy while sustained (everything:
    # broker, Redis, ingestion, this benchmark's readers, the services)
    p50_ms: float
    p99_ms: float
    cpu_split: dict[str, float]  # ms of CPU per tick by process (CpuSplit)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)] if ordered else float("nan")


class TickClock:
    """seq -> publish time, read from the namespace's market.ticks."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap.split(","), **READER_FETCH)
        parts = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic) or ()]
        self.consumer.assign(parts)
        self.consumer.seek_to_beginning(*parts)
        self.published: dict[int, int] = {}

    def poll(self) -> None:
        for records in self.consumer.poll(timeout_ms=0).values():
            for record in records:
                event = codec.decode(market_pb2.MarketEvent, record.value)
                if event.WhichOneof("event") == "tick":
                    self.published[event.tick.seq] = event.tick.ts_init_ns

    def caught_up(self) -> bool:
        """Read up to the topic's end: a case must not end before its last ticks are
        known (they would count as the next case's, whose NavUpdateds already passed)."""
        assigned = self.consumer.assignment()
        ends = self.consumer.end_offsets(list(assigned))
        return all(self.consumer.position(tp) >= end for tp, end in ends.items())


# Names of the parts CpuSplit reads besides the services.
STACK_PROCESSES = ("kafka", "redis")  # the stack's own, by their pid files
INGESTION, READERS, MACHINE = "ingestion (replay)", "this benchmark's readers", "whole machine"


class CpuSplit:
    """Where the CPU goes in a case: every service of the pipeline, ingestion's replay,
    the broker and Redis (the stack's pid files), this benchmark's own process (its
    readers) and the whole machine, sampled together as the case goes, from just before
    its first tick went out (a replay's start-up, ~1 s of imports and file reading, is
    not the ticks' cost) to its end. Which part a faster pipeline has to shrink."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pids = {
            name: running.process.pid
            for name, running in pipeline.running.items()
            if not running.oneshot
        }
        for name in STACK_PROCESSES:
            if (pid := stack_pid(name)) is not None:
                self.pids[name] = pid
        self.pids[READERS] = os.getpid()
        self.last: dict[str, float] = {}
        self.first: dict[str, float] | None = None  # just before the first tick

    def sample(self, machine_busy_s: float, ticks_seen: bool) -> None:
        """Read every part (the machine's busy CPU seconds, read once per loop for both
        this and the busy share, come in); `ticks_seen`: the case's first ticks are out,
        so the sample before this one becomes the start (a tick may have gone out since
        it, none before it: the replay's start-up ends there, give or take a sample)."""
        previous = dict(self.last)
        for name, pid in self.pids.items():
            seconds = process_cpu_seconds(pid)
            if seconds is not None:  # an ended process (the replay) keeps its last value
                self.last[name] = seconds
        self.last[MACHINE] = machine_busy_s
        if ticks_seen and self.first is None:
            self.first = previous

    def ms_per_tick(self, ticks: int) -> dict[str, float]:
        first = self.first or {}
        return {
            name: (seconds - first.get(name, seconds)) * 1e3 / max(ticks, 1)
            for name, seconds in self.last.items()
        }


def run_case(
    pipeline: Pipeline, clock: TickClock, name: str, rate: int | None, days: int, day0: datetime
) -> Case:
    start, end = day0, day0 + timedelta(days=days)
    speed = "max" if rate is None else str(rate * EVENT_SECONDS_PER_TICK)
    args = replay_args(SYMBOL, f"{start:%Y-%m-%d}", f"{end:%Y-%m-%d}", speed=speed)
    long = product_id(SYMBOL, SIDES[0])
    reader = pipeline.nav_consumer(products=[long])  # the short's partition: not read
    before = set(clock.published)
    known = len(before)
    seen_at: dict[int, int] = {}  # tick seq -> when its NavUpdated was published
    services = [running.process.pid for running in pipeline.running.values()]
    cpu_before = cpu_seconds(services)
    split = CpuSplit(pipeline)
    machine: list[tuple[int, float, float]] = []  # (wall ns, busy s, all s) as it went
    try:
        while list(reader.poll(timeout_ms=200)):  # skip what earlier cases left
            pass
        replay = pipeline.start_replay(args)
        split.pids[INGESTION] = replay.pid
        idle_since = time.monotonic()
        while True:
            began = time.monotonic()
            busy_s, all_s = machine_cpu_seconds()
            machine.append((time.time_ns(), busy_s, all_s))
            split.sample(busy_s, ticks_seen=len(clock.published) > known)
            clock.poll()
            seen = list(reader.poll(timeout_ms=50))
            for seen_ns, update in seen:
                if update.product == long and update.event_id == f"{long}:{update.seq}":
                    seen_at[update.seq] = seen_ns
            pipeline.check_alive()
            if seen:
                idle_since = time.monotonic()
            if replay.poll() is not None:  # all published: done once every NAV is seen
                new = set(clock.published) - before  # (not per poll: O(ticks so far))
                if new and new <= seen_at.keys() and clock.caught_up():
                    break
            if time.monotonic() - idle_since > 30:
                raise pipeline.failure(pipeline.stalled_stage(), "stalled in the benchmark")
            # Latency comes from the records' own times, not from when this loop reads
            # them: reading in larger, rarer batches takes less CPU from the pipeline.
            time.sleep(max(READ_EVERY_S - (time.monotonic() - began), 0.0))
    finally:
        reader.close()
    cpu_ms = (cpu_seconds(services) - cpu_before) * 1e3
    ticks = sorted(set(clock.published) - before)
    latencies = [(seen_at[s] - clock.published[s]) / 1e6 for s in ticks]
    first, last, sustained = steady_window([seen_at[s] for s in ticks])
    return Case(
        name, rate, len(ticks), len(latencies), sustained, cpu_ms / len(ticks),
        busy_share(machine, first, last), _percentile(latencies, 0.50),
        _percentile(latencies, 0.99), split.ms_per_tick(len(ticks)),
    )  # fmt: skip


def steady_window(arrivals_ns: list[int]) -> tuple[int, int, float]:
    """(first, last, completions per second between them) of the middle 80% of the
    arrivals: filling and draining the pipeline at either end is not throughput."""
    ordered = sorted(arrivals_ns)
    low, high = int(0.1 * len(ordered)), int(0.9 * len(ordered))
    if high <= low or ordered[high] <= ordered[low]:
        return 0, 0, float("nan")
    return ordered[low], ordered[high], (high - low) / ((ordered[high] - ordered[low]) / 1e9)


def busy_share(machine: list[tuple[int, float, float]], first_ns: int, last_ns: int) -> float:
    """The machine's busy share of CPU between two wall times, from (wall ns, busy s,
    all s) samples."""
    inside = [sample for sample in machine if first_ns <= sample[0] <= last_ns]
    if len(inside) < 2:
        return float("nan")
    return busy_between(inside[0][1:], inside[-1][1:])


def busy_between(before: tuple[float, float], after: tuple[float, float]) -> float:
    """The machine's busy share between two `machine_cpu_seconds()` readings."""
    if after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def _forward(bootstrap: str, source: str, sink: str, messages: int, ready: Event) -> None:
    """One hop of the floor: the stages' own Kafka I/O (aiokafka in, one record batch per
    fetched batch out, acks=all) with no work between, until `messages` went through."""

    async def forward() -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=10
        )
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, acks="all", enable_idempotence=True
        )
        await consumer.start()
        await producer.start()
        try:
            consumer.assign([AioTopicPartition(source, 0)])
            await consumer.seek_to_beginning()
            sender = BatchSender(producer)
            ready.set()
            forwarded = 0
            while forwarded < messages:
                for records in (await consumer.getmany(timeout_ms=100)).values():
                    await sender.send_all((sink, r.key or b"", r.value or b"") for r in records)
                    forwarded += len(records)
        finally:
            await producer.stop()
            await consumer.stop()

    uvloop.run(forward())


@dataclass(frozen=True, slots=True)
class ChainRun:
    rate_per_s: float  # paced: sustained, as for the cases; max: first send -> last read
    # Paced runs only (NaN at max speed): the machine's busy share while sending, and the
    # latency from each message's ts_init_ns to the CreateTime of its copy on the last
    # topic, as for the cases.
    machine_busy: float
    p50_ms: float
    p99_ms: float


def _real_events(count: int) -> list[market_pb2.MarketEvent]:
    """`count` MarketEvents of real BTC ticks (4 a bar, from the first bar on), seq from 1:
    the chain's messages are the size and content of ingestion's."""
    bars, _ = load_bars(data_dir() / "BTCUSDT_perp_1h_2019_2023.csv", SYMBOL)
    ticks = itertools.islice(ticks_from_bars(bars, NS_PER_HOUR), count)
    return [
        codec.market_event_from_tick(tick, seq=i, source="bench", ts_init_ns=0)
        for i, tick in enumerate(ticks, start=1)
    ]


def _read(bootstrap: str, topic: str, messages: int, ready: Event, results: Connection) -> None:
    """The chain's last reader, in a process of its own (in the producer's, the two
    shared one interpreter): each message's arrival (wall ns), CreateTime and value."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        # a fetch a message at 1,000/s cost the machine a third of a core (the latency
        # is the last topic's CreateTime, not this reader's: it may wait 10 ms)
        fetch_min_bytes=65536,
        fetch_max_wait_ms=10,
    )
    consumer.assign([TopicPartition(topic, 0)])
    consumer.seek_to_beginning()
    consumer.poll(timeout_ms=0)  # connected before the first message is sent
    ready.set()
    arrived: list[int] = []
    records: list[tuple[int, bytes]] = []
    deadline = time.monotonic() + 120
    try:
        while len(arrived) < messages:
            if time.monotonic() > deadline:
                results.send(RuntimeError(f"{len(arrived)} of {messages} arrived in 120 s"))
                return
            for batch in consumer.poll(timeout_ms=500).values():
                now = time.time_ns()
                arrived += [now] * len(batch)
                records += [(r.timestamp, r.value) for r in batch]
        results.send((arrived, records))
    finally:
        consumer.close()


def kafka_chain(bootstrap: str, hops: int, messages: int, rate: int | None = None) -> ChainRun:
    """Real ticks' MarketEvents produced with kafka-python (the issue sets the ceiling on
    it), passed through `hops` forwarding processes (each its own topic and process, no
    work) and read by a process of its own. 0 hops: the raw produce -> consume ceiling;
    4 hops: the floor of the design's chain regime -> leverage -> hedging -> NAV. At max
    speed (`rate` None) the rate is the reader's middle 80% of arrivals, as the cases'
    is their completions' (filling and draining are not throughput). Paced (`rate`
    messages/s, each stamped with its send time) the latency runs to the CreateTime of
    its copy on the last topic. (Ingestion's own producer as the source, no linger,
    measured the same p50 and p99 here, 6.1-6.4 / 14-15 ms against 6.2-6.5 / 11-18, at
    twice the machine's CPU: 95% busy against 50%.)"""
    topics = [chain_topic() for _ in range(hops + 1)]
    specs = [
        TopicSpec(name=name, key="symbol", value_type=market_pb2.MarketEvent,
                  description="bench", partitions=1, retention_ms=3_600_000)
        for name in topics
    ]  # fmt: skip
    ensure_topics(bootstrap, specs, verbose=False)
    events = _real_events(messages)
    spawn = multiprocessing.get_context("spawn")
    ready = [spawn.Event() for _ in range(hops + 1)]
    results, sink = spawn.Pipe(duplex=False)
    processes = [
        spawn.Process(target=_forward, args=(bootstrap, src, dst, messages, up), daemon=True)
        for src, dst, up in zip(topics[:-1], topics[1:], ready[:-1], strict=True)
    ]
    processes.append(
        spawn.Process(
            target=_read, args=(bootstrap, topics[-1], messages, ready[-1], sink), daemon=True
        )
    )
    for process in processes:
        process.start()
    raw = make_producer(bootstrap, value_serializer=None, client_id="bench-raw")
    try:
        for up in ready:
            if not up.wait(60):
                raise RuntimeError("a hop or the reader did not start within 60 s")
        busy_before = machine_cpu_seconds()
        started = time.perf_counter()
        if rate is None:
            payloads = [codec.encode(event) for event in events]
            for payload in payloads:
                raw.send(topics[0], key=SYMBOL, value=payload)
        else:
            for sent, event in enumerate(events):
                time.sleep(max(started + sent / rate - time.perf_counter(), 0.0))
                event.tick.ts_init_ns = time.time_ns()
                raw.send(topics[0], key=SYMBOL, value=codec.encode(event))
        raw.flush()
        busy_after = machine_cpu_seconds()
        if not results.poll(130):
            raise RuntimeError(f"{hops} hops: the reader did not answer in 130 s")
        answer = results.recv()
        if isinstance(answer, Exception):
            raise RuntimeError(f"{hops} hops: {answer}")
        arrived, records = answer
    finally:
        raw.close()
        for process in processes:
            process.join(10)
            if process.is_alive():
                process.kill()
        admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","))
        try:
            admin.delete_topics(topics)
        finally:
            admin.close()
    if rate is None:
        return ChainRun(steady_window(arrived)[2], *[float("nan")] * 3)
    # (CreateTime on the last topic, ns; the message's ts_init_ns)
    created = [(timestamp * 1_000_000, _sent_ns(value)) for timestamp, value in records]
    _, _, sustained = steady_window([at for at, _ in created])
    latencies = [(at - sent) / 1e6 for at, sent in created]
    return ChainRun(
        sustained, busy_between(busy_before, busy_after),
        _percentile(latencies, 0.50), _percentile(latencies, 0.99),
    )  # fmt: skip


def _sent_ns(value: bytes) -> int:
    return codec.decode(market_pb2.MarketEvent, value).tick.ts_init_ns


def _ms(split: dict[str, float], part: str) -> str:
    return f"{split[part]:.3f}" if part in split else "-"


def cpu_table(cases: list[Case]) -> Table:
    """CPU per tick by process, per case: which part a tick costs most."""
    table = Table(title="Where a tick's CPU goes (ms per tick, from the case's first tick)")
    table.add_column("process", no_wrap=True)
    for case in cases:
        table.add_column(case.name, justify="right")
    labels = {"kafka": "broker (Kafka)", "redis": "Redis"}
    parts = [INGESTION, *HOPS[:3], "venue", HOPS[3], *STACK_PROCESSES, READERS]
    for part in parts:
        if any(part in case.cpu_split for case in cases):
            table.add_row(labels.get(part, part), *(_ms(case.cpu_split, part) for case in cases))
    table.add_row(
        "all of these",
        *(f"{sum(case.cpu_split.get(part, 0.0) for part in parts):.3f}" for case in cases),
    )
    table.add_row(
        f"{MACHINE} ({os.cpu_count()} cores)", *(_ms(case.cpu_split, MACHINE) for case in cases)
    )
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="target length per case")
    args = parser.parse_args()
    settings = from_environment(ServiceSettings)
    bootstrap = settings.kafka_bootstrap
    # Earlier runs' namespaces cost the broker on every request: measure without them.
    remove_leftover_namespaces(bootstrap, settings.redis_url)
    console.print("[bold]==> pipeline: starting the services[/]")
    cases: list[Case] = []
    with Pipeline.start(
        STAGES, namespace=f"bench{uuid.uuid4().hex[:8]}.", bootstrap=bootstrap,
        redis_url=settings.redis_url,
    ) as pipeline:  # fmt: skip
        warm_from = FIRST_DAY - timedelta(days=WARMUP_DAYS)
        for product in (product_id(SYMBOL, side) for side in SIDES):
            pipeline.deposit(product, Decimal(1_000_000), int(warm_from.timestamp() * 1e9))
        clock = TickClock(bootstrap, pipeline.topic(MARKET_TICKS.name))
        console.print(
            f"    warm-up: {WARMUP_DAYS * TICKS_PER_DAY:,} ticks at 1,000/s (not measured)"
        )
        run_case(pipeline, clock, "warm-up", 1000, WARMUP_DAYS, warm_from)
        day = FIRST_DAY
        # Offered load x seconds: long enough for a steady state at every rate.
        for name, rate, ticks in (
            ("100 ticks/s", 100, int(100 * args.seconds)),
            ("1,000 ticks/s", 1000, int(1000 * args.seconds)),
            ("max", None, int(1000 * args.seconds)),
        ):
            days = max(ticks // TICKS_PER_DAY, 1)
            console.print(f"    {name}: {days * TICKS_PER_DAY} ticks ({days} days from {day:%F})")
            cases.append(run_case(pipeline, clock, name, rate, days, day))
            day += timedelta(days=days)
    console.print(
        f"    raw produce -> consume, then through {len(HOPS)} hops ({' -> '.join(HOPS)}), "
        "at max speed and at 1,000 messages/s"
    )
    paced = int(1000 * args.seconds)
    ceiling = kafka_chain(bootstrap, 0, CHAIN_MESSAGES)
    floor = kafka_chain(bootstrap, len(HOPS), CHAIN_MESSAGES)
    floor_paced = kafka_chain(bootstrap, len(HOPS), paced, rate=1000)

    table = Table(title="End to end: tick published -> its NavUpdated published (loopback)")
    columns = (
        "case",
        "ticks",
        "ticks/s end to end",
        "services CPU/tick",
        "machine busy",
        "p50 latency",
        "p99 latency",
    )
    for column in columns:
        case_column = column == "case"
        table.add_column(column, justify="left" if case_column else "right", no_wrap=case_column)
    for case in cases:
        table.add_row(
            case.name, f"{case.marked:,}", f"{case.rate_per_s:,.0f}",
            f"{case.cpu_ms_per_tick:.2f} ms", f"{case.machine_busy:.0%}",
            f"{case.p50_ms:,.1f} ms", f"{case.p99_ms:,.1f} ms",
        )  # fmt: skip
    floor_name = f"floor: {len(HOPS)} hops, no work"
    for label, count, run in (
        (f"{floor_name}, 1,000/s", paced, floor_paced),
        ("ceiling: raw produce -> consume", CHAIN_MESSAGES, ceiling),
        (f"{floor_name}, max", CHAIN_MESSAGES, floor),
    ):
        paced_only = (
            "-" if math.isnan(value) else shown
            for value, shown in (
                (run.machine_busy, f"{run.machine_busy:.0%}"),
                (run.p50_ms, f"{run.p50_ms:,.1f} ms"),
                (run.p99_ms, f"{run.p99_ms:,.1f} ms"),
            )
        )
        table.add_row(label, f"{count:,}", f"{run.rate_per_s:,.0f}", "-", *paced_only)
    console.print(table)
    console.print(cpu_table(cases))
    fastest = max(case.rate_per_s for case in cases)
    at_1000 = next(case for case in cases if case.rate == 1000)
    at_max = next(case for case in cases if case.rate is None)
    console.print(
        f"goals: end to end >= half the ceiling ({ceiling.rate_per_s / 2:,.0f}/s): "
        f"{'met' if fastest >= ceiling.rate_per_s / 2 else 'NOT met'} ({fastest:,.0f}/s; "
        f"the floor: {floor.rate_per_s / ceiling.rate_per_s:.0%} of the ceiling); p99 < 50 ms "
        f"at 1,000 ticks/s: {'met' if at_1000.p99_ms < 50 else 'NOT met'} "
        f"({at_1000.p99_ms:,.1f} ms; the floor: {floor_paced.p99_ms:,.1f} ms)"
    )
    cores = os.cpu_count() or 1
    console.print(
        f"at half the ceiling, {cores} cores leave {cores * 1e3 / (ceiling.rate_per_s / 2):.3f} "
        f"ms of CPU per tick for the whole machine; at max it took "
        f"{_ms(at_max.cpu_split, MACHINE)}"
    )


if __name__ == "__main__":
    main()
