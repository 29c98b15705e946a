"""Real broker: the stages' fetchers let the broker hold a fetch long only while every
assigned partition is in it (shared/stream.py, `wait_long_when_idle`), a long-held
fetch still ends as soon as a record arrives, and a plain-consumer stage's records are
not held up behind a fetch sent while it handled a long batch."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from shared import stream
from shared.adapters.kafka_admin import ensure_topics
from shared.consumer_stage import ConsumerRuntime, start_consumer
from shared.settings import KafkaSettings, ServiceSettings
from shared.topics import MARKET_TICKS

pytestmark = pytest.mark.integration

LONG_MS = 5_000  # far above anything the assertions wait for


def record_fetch_waits(fetcher: Any) -> list[int]:
    """The max wait of every fetch request the fetcher sends from now on."""
    waits: list[int] = []
    send = fetcher._proc_fetch_request

    def proc_fetch_request(assignment: Any, node_id: int, request: Any) -> Any:
        waits.append(request._max_wait_ms)
        return send(assignment, node_id, request)

    fetcher._proc_fetch_request = proc_fetch_request
    return waits


@pytest.fixture
async def consumer(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition], list[int]]]:
    monkeypatch.setattr(stream, "IDLE_FETCH_MAX_WAIT_MS", LONG_MS)
    topic = MARKET_TICKS.in_namespace(f"t{uuid.uuid4().hex[:8]}.")
    ensure_topics(kafka_bootstrap, [topic])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=stream.FETCH_MAX_WAIT_MS,
    )
    await consumer.start()
    try:
        waits = record_fetch_waits(consumer._fetcher)
        stream.wait_long_when_idle(consumer._fetcher)  # before any partition is assigned
        tps = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
        consumer.assign(tps)
        await consumer.seek_to_end(*tps)
        yield consumer, tps, waits
    finally:
        await consumer.stop()


async def produce(bootstrap: str, tp: TopicPartition) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(tp.topic, b"tick", partition=tp.partition)
    finally:
        await producer.stop()


async def take_all(reader: AIOKafkaConsumer) -> int:
    fetched = await reader.getmany(timeout_ms=LONG_MS // 2)
    return sum(len(records) for records in fetched.values())


async def test_an_idle_consumer_waits_long_and_a_record_ends_the_wait(
    consumer: tuple[AIOKafkaConsumer, list[TopicPartition], list[int]], kafka_bootstrap: str
) -> None:
    reader, tps, waits = consumer
    await asyncio.sleep(1.0)
    assert waits and set(waits) == {LONG_MS}, waits  # with the short wait: ~100 fetches
    assert len(waits) <= 2

    await produce(kafka_bootstrap, tps[0])
    record = await asyncio.wait_for(reader.getone(), timeout=LONG_MS / 1000 / 2)
    assert record.value == b"tick"


async def test_the_wait_stays_short_while_a_partition_is_left_out_of_the_fetch(
    consumer: tuple[AIOKafkaConsumer, list[TopicPartition], list[int]], kafka_bootstrap: str
) -> None:
    reader, tps, waits = consumer
    await asyncio.sleep(0.2)

    # Fetched, not consumed: the next fetches leave that partition out, so they are short.
    await produce(kafka_bootstrap, tps[0])
    await asyncio.sleep(0.5)
    assert waits[-1] == stream.FETCH_MAX_WAIT_MS, waits
    assert await take_all(reader) == 1  # as faust does: getmany
    await asyncio.sleep(0.3)
    assert waits[-1] == LONG_MS, waits  # every partition back in the fetch

    # Paused: resuming must not wait behind a long fetch, so fetches are short meanwhile.
    reader.pause(tps[1])
    await produce(kafka_bootstrap, tps[0])  # ends the long fetch in flight
    assert await take_all(reader) == 1
    await asyncio.sleep(0.3)
    assert waits[-1] == stream.FETCH_MAX_WAIT_MS, waits
    reader.resume(tps[1])
    await asyncio.sleep(0.3)
    assert waits[-1] == LONG_MS, waits


async def test_records_of_a_partition_the_app_does_not_read_leave_the_wait_long(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A faust app's own table writes come back on its changelog partitions, which it
    does not read outside recovery: fetched, they stay buffered for good. Only the
    partitions it reads decide the wait."""
    monkeypatch.setattr(stream, "IDLE_FETCH_MAX_WAIT_MS", LONG_MS)
    namespace = f"t{uuid.uuid4().hex[:8]}."
    ticks = MARKET_TICKS.in_namespace(namespace)
    changelog = MARKET_TICKS.in_namespace(f"{namespace}changelog.")
    ensure_topics(kafka_bootstrap, [ticks, changelog])
    reader = AIOKafkaConsumer(
        bootstrap_servers=kafka_bootstrap,
        enable_auto_commit=False,
        fetch_max_wait_ms=stream.FETCH_MAX_WAIT_MS,
    )
    await reader.start()
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await producer.start()
    try:
        waits = record_fetch_waits(reader._fetcher)
        stream.wait_long_when_idle(reader._fetcher, lambda tp: tp.topic != changelog.name)
        read = [TopicPartition(ticks.name, p) for p in range(ticks.partitions)]
        unread = [TopicPartition(changelog.name, p) for p in range(changelog.partitions)]
        reader.assign(read + unread)
        await reader.seek_to_end(*read, *unread)
        await producer.send_and_wait(changelog.name, b"row", partition=0)
        await asyncio.sleep(0.5)  # fetched and buffered, never taken
        assert TopicPartition(changelog.name, 0) in reader._fetcher._records
        sent = len(waits)
        await asyncio.sleep(0.5)
        assert len(waits) - sent <= 1 and waits[-1] == LONG_MS, waits  # idle: held long

        await producer.send_and_wait(ticks.name, b"tick", partition=1)  # ends the wait
        fetched = await reader.getmany(*read, timeout_ms=LONG_MS // 2)
        assert sum(len(records) for records in fetched.values()) == 1
    finally:
        await producer.stop()
        await reader.stop()


async def test_a_stage_batch_longer_than_the_prefetch_backoff_does_not_stall_its_partition(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plain-consumer stage (hedging, NAV) waits long only while idle. While it handles
    a batch of partition 0 for longer than aiokafka's prefetch backoff (0.1 s), the next
    records of partition 0 wait fetched and a fetch for the other partitions goes out;
    were that one held long (it was: 500 ms), partition 0's next records would wait
    behind it."""
    monkeypatch.setattr(stream, "IDLE_FETCH_MAX_WAIT_MS", LONG_MS)
    namespace = f"t{uuid.uuid4().hex[:8]}."
    topic = MARKET_TICKS.in_namespace(namespace)
    ensure_topics(kafka_bootstrap, [topic])
    settings = ServiceSettings(
        service="fetchtest", namespace=namespace, kafka=KafkaSettings(bootstrap=kafka_bootstrap)
    )
    reader = ConsumerRuntime(settings).new_consumer()
    tps = [TopicPartition(topic.name, p) for p in range(topic.partitions)]
    reader.assign(tps)
    producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await start_consumer(reader)
    await producer.start()
    try:
        waits = record_fetch_waits(reader._fetcher)
        await reader.seek_to_end(*tps)
        await asyncio.sleep(0.5)
        assert waits and set(waits) == {LONG_MS}, waits  # idle: few, long fetches

        await producer.send_and_wait(topic.name, b"1", partition=0)
        assert await take_all(reader) == 1  # a batch taken: its handling begins
        await producer.send_and_wait(topic.name, b"2", partition=0)  # fetched meanwhile
        await asyncio.sleep(0.25)  # the handling, past the prefetch backoff
        assert await take_all(reader) == 1  # the next batch, fetched already

        await producer.send_and_wait(topic.name, b"3", partition=0)
        sent = time.monotonic()
        assert await take_all(reader) == 1
        waited_s = time.monotonic() - sent
        # Not held up behind the other partitions' fetch (it would be for LONG_MS); a
        # fixed 500 ms wait already failed the idle check above.
        assert waited_s < LONG_MS / 1000 / 5, waited_s
    finally:
        await producer.stop()
        await reader.stop()
