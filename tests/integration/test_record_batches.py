"""Real broker: BatchSender puts every message on the partition aiokafka's `send` (and
kafka-python) would choose, in the order given per key, across several record batches."""

from __future__ import annotations

import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import MessageSizeTooLargeError
from aiokafka.partitioner import DefaultPartitioner

from shared.adapters.kafka_admin import ensure_topics
from shared.adapters.record_batches import BatchSender
from shared.topics import ORDERS_EVENTS

pytestmark = pytest.mark.integration

KEYS = [b"BTC-USDT", b"ETH-USDT", b"BTC-USDT:LONG", b"ETH-USDT:SHORT", b"SOL-USDT"]


async def read_all(bootstrap: str, topic: str, partitions: int, expected: int) -> dict:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in range(partitions)}
        seen = 0
        for _ in range(100):
            for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                by_partition[tp.partition] += [(r.key, r.value) for r in records]
                seen += len(records)
            if seen >= expected:
                break
        return by_partition
    finally:
        await consumer.stop()


async def test_messages_land_where_send_would_put_them_in_order(kafka_bootstrap: str) -> None:
    topic = ORDERS_EVENTS.in_namespace(f"t{uuid.uuid4().hex[:8]}.")  # any keyed topic
    assert topic.partitions > 1
    ensure_topics(kafka_bootstrap, [topic])
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_bootstrap, acks="all", enable_idempotence=True
    )
    await producer.start()
    try:
        sender = BatchSender(producer)
        # ~1 KB values: 300 of them overflow the 16 KB batches several times per partition.
        messages = [
            (topic.name, KEYS[i % len(KEYS)], f"{i:06d}".encode() + bytes(1000)) for i in range(300)
        ]
        await sender.send_all(messages[:150])
        await sender.send_all(messages[150:])
        sent_one_by_one = await (await producer.send(topic.name, b"x", key=KEYS[0]))
        with pytest.raises(MessageSizeTooLargeError):
            await sender.send_all([(topic.name, KEYS[0], bytes(2_000_000))])
    finally:
        await producer.stop()
    got = await read_all(kafka_bootstrap, topic.name, topic.partitions, len(messages) + 1)
    assert sent_one_by_one.partition == expected_partition(KEYS[0], topic.partitions)
    for key in KEYS:
        where = expected_partition(key, topic.partitions)
        values = [value for k, value in got[where] if k == key and value != b"x"]
        assert values == [value for _, k, value in messages if k == key]
    assert sum(len(v) for v in got.values()) == len(messages) + 1  # nothing more, no copies


def expected_partition(key: bytes, partitions: int) -> int:
    """aiokafka's own choice (the partitioner its `send` uses), independent of the code
    under test, which computes it with `shared.topics.partition_for`."""
    every = list(range(partitions))
    return int(DefaultPartitioner()(key, every, every))
