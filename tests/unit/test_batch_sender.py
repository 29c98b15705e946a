"""BatchSender's partition lookups: the partitioner's answer, from a bounded cache."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from aiokafka import AIOKafkaProducer

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
