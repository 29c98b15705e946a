"""Real broker: protobuf MarketEvents of real BTC history go through Kafka unchanged, with
kafka-python and with a faust agent. Each test uses its own topic (and faust app id), so
runs never read each other's messages. Broker: the `kafka_bootstrap` fixture
(conftest.py: $SMARTLEV_TEST_KAFKA_BOOTSTRAP or the local stack's 127.0.0.1:9092)."""

from __future__ import annotations

import asyncio
import csv
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import faust
import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from smartlev.v1 import market_pb2

from shared import codec
from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.tick_replay import data_dir, make_producer, publish
from shared.topics import COMPACTED_SEGMENT_MS, NAV_LATEST, TopicSpec
from tests.integration.kafka_configs import topic_configs

pytestmark = pytest.mark.integration

N = 300


def real_ticks(n: int) -> list[market_pb2.MarketEvent]:
    """The first n bars of the real BTC perp file, parsed here with csv + Decimal (not with
    the replay code under test), one tick per bar at its close."""
    events = []
    path = data_dir() / "BTCUSDT_perp_1h_2019_2023.csv"
    with path.open(newline="") as handle:
        for seq, row in enumerate(csv.DictReader(handle), start=1):
            if seq > n:
                break
            ts = datetime.fromisoformat(row["timestamp"].replace("Z", "+00:00"))
            ts_ns = int(ts.timestamp()) * 1_000_000_000
            close = Decimal(row["close"])
            events.append(
                market_pb2.MarketEvent(
                    tick=market_pb2.Tick(
                        event_id=f"test|BTC-USDT|{seq}",
                        symbol="BTC-USDT",
                        ts_event_ns=ts_ns,
                        ts_init_ns=time.time_ns(),
                        price=codec.decimal_to_wire(close),
                        seq=seq,
                        source="test",
                    )
                )
            )
    assert len(events) == n
    return events


@pytest.fixture
def topic(kafka_bootstrap: str) -> Iterator[TopicSpec]:
    spec = TopicSpec(
        name=f"test.roundtrip.{uuid.uuid4().hex[:12]}",
        key="symbol",
        value_type=market_pb2.MarketEvent,
        description="integration test topic",
        retention_ms=3_600_000,
    )
    report = ensure_topics(kafka_bootstrap, [spec], verbose=False)
    assert report.created == [spec.name]
    yield spec
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    try:
        admin.delete_topics([spec.name])
    finally:
        admin.close()


def test_ensure_topics_is_idempotent(kafka_bootstrap: str, topic: TopicSpec) -> None:
    again = ensure_topics(kafka_bootstrap, [topic], verbose=False)
    assert again.created == [] and again.existing == [topic.name]
    assert again.mismatched == []


def test_a_compacted_topic_rolls_a_segment_an_hour(kafka_bootstrap: str) -> None:
    """Kafka compacts closed segments only and rolls one a week by default: a reader of
    current state (`nav.latest`) replayed a week of every product's every update."""
    spec = replace(NAV_LATEST.in_namespace(f"t{uuid.uuid4().hex[:8]}."))
    assert ensure_topics(kafka_bootstrap, [spec], verbose=False).created == [spec.name]
    try:
        configs = topic_configs(kafka_bootstrap, spec.name)
        assert configs["cleanup.policy"] == "compact"
        assert configs["segment.ms"] == str(COMPACTED_SEGMENT_MS)
    finally:
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        admin.delete_topics([spec.name])
        admin.close()


def test_kafka_python_round_trip_is_exact(kafka_bootstrap: str, topic: TopicSpec) -> None:
    events = real_ticks(N)
    producer = make_producer(kafka_bootstrap, client_id="test-roundtrip")
    try:
        assert publish(producer, events, topic=topic.name) == N
    finally:
        producer.close()

    consumer = KafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        key_deserializer=codec.key_deserializer,
        value_deserializer=codec.deserializer(market_pb2.MarketEvent),
    )
    received: list[tuple[str, market_pb2.MarketEvent]] = []
    try:
        consumer.assign([TopicPartition(topic.name, p) for p in range(topic.partitions)])
        deadline = time.monotonic() + 30
        while len(received) < N and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                received.extend((r.key, r.value) for r in records)
    finally:
        consumer.close()

    assert len(received) == N
    # One symbol = one key = one partition: order is preserved end to end.
    assert [event for _, event in received] == events
    assert {key for key, _ in received} == {"BTC-USDT"}
    prices = [Decimal(e.tick.price) for _, e in received]
    assert prices[0] == Decimal("10000.0")  # the file's first (placeholder) close, exactly
    assert prices == [Decimal(e.tick.price) for e in events]


async def test_faust_agent_on_the_real_broker(
    kafka_bootstrap: str, topic: TopicSpec, tmp_path: Path
) -> None:
    events = real_ticks(N)
    app_id = f"smartlev-test-{uuid.uuid4().hex[:10]}"
    app = faust.App(
        app_id,
        datadir=str(tmp_path),
        broker=f"kafka://{kafka_bootstrap}",
        store="memory://",
        web_enabled=False,
        consumer_auto_offset_reset="earliest",
        topic_replication_factor=1,
        topic_partitions=topic.partitions,
        producer_acks=-1,
    )
    source = codec.faust_topic(app, topic)
    # A table too: its changelog is an internal topic faust must create on this broker.
    ticks_per_symbol = app.Table("ticks_per_symbol", default=int, partitions=topic.partitions)
    seen: list[tuple[str, market_pb2.MarketEvent]] = []
    done = asyncio.Event()

    @app.agent(source)
    async def collect(stream: faust.StreamT) -> None:
        async for key, event in stream.items():
            seen.append((key, event))
            ticks_per_symbol[key] += 1
            if len(seen) >= N:
                done.set()

    producer = make_producer(kafka_bootstrap, client_id="test-faust")
    try:
        publish(producer, events, topic=topic.name)
    finally:
        producer.close()

    internal: list[str] = []
    await app.start()
    try:
        await asyncio.wait_for(done.wait(), timeout=60)
        counted = ticks_per_symbol["BTC-USDT"]
    finally:
        await app.stop()
        admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        try:  # faust's own topics for this throwaway app id
            internal = sorted(t for t in admin.list_topics() if t.startswith(app_id))
            if internal:
                admin.delete_topics(internal)
        finally:
            admin.close()

    # Auto-create is off on the broker: faust created its internal topics itself (admin API).
    assert internal == [
        f"{app_id}-__assignor-__leader",
        f"{app_id}-ticks_per_symbol-changelog",
    ]
    assert counted == N

    assert [event for _, event in seen] == events
    assert {key for key, _ in seen} == {"BTC-USDT"}
    assert all(isinstance(e, market_pb2.MarketEvent) for _, e in seen)
