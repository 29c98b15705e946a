"""BatchSender's partition lookups: the partitioner's answer, from a bounded cache."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import LeaderNotAvailableError
from aiokafka.producer.message_accumulator import BatchBuilder

from shared.adapters import record_batches
from shared.adapters.record_batches import BatchSender
from shared.topics import partition_for


class Partitions:
    """What BatchSender asks of a producer for a lookup: a topic's partitions."""

    def __init__(self) -> None:
        self.asked = 0

    async def partitions_for(self, topic: str) -> set[int]:
        self.asked += 1
        return {0, 1, 2}


def test_lookups_are_the_partitioners_and_the_cache_stays_bounded() -> None:
    """Dead letters carry whatever key bad input had: one cache entry each, for good."""
    producer = Partitions()
    sender = BatchSender(cast(AIOKafkaProducer, producer))

    async def run() -> list[Any]:
        keys = [f"junk-{n}".encode() for n in range(record_batches.PARTITIONS_CACHED + 500)]
        return [await sender.partition("t.dlq", key) for key in keys]

    found = asyncio.run(run())
    assert found == [partition_for(f"junk-{n}", 3) for n in range(len(found))]
    assert len(sender._partitions) == record_batches.PARTITIONS_CACHED
    asked = producer.asked
    asyncio.run(sender.partition("t.dlq", f"junk-{len(found) - 1}".encode()))
    assert producer.asked == asked  # the newest are still cached


class Broker:
    """A producer whose partition 0 has no leader: its first batch fails once the request
    timeout passes (aiokafka fails the batch at the head of the queue, and writes the
    next one if the leader is back by then)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.handed: list[int] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0}

    def create_batch(self) -> BatchBuilder:
        return BatchBuilder(1024, 0)  # ~10 of the messages below a batch

    async def send_batch(self, batch: BatchBuilder, topic: str, *, partition: int) -> Any:
        self.handed.append(partition)
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        if len(self.handed) == 1:
            done.set_exception(LeaderNotAvailableError())
        else:
            self.written.append(bytes(batch.build()))
            done.set_result(None)
        return done


def test_a_failed_batch_stops_the_batches_after_it_in_its_partition() -> None:
    """The next batch of a partition was handed over before the one before it was acked,
    and written when that one failed: the caller's retry of both put it first (the
    outbox relay published orders 51-1000 before 1-50)."""
    broker = Broker()
    sender = BatchSender(cast(AIOKafkaProducer, broker))
    messages = [("orders.events", b"BTC-USDT", b"x" * 80 + bytes([n])) for n in range(50)]
    with pytest.raises(LeaderNotAvailableError):
        asyncio.run(sender.send_all(messages))
    assert broker.handed == [0] and broker.written == []
