"""ConsumerRuntime's holds (shared/consumer_stage.py), over a stand-in consumer: a held
record is never committed past while its partition is this instance's, and the hold
ends with the assignment (kept, it pulled the group's commit back when the partition
came back after others had read on)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import ConsumerRecord
from aiokafka.structs import TopicPartition

from shared.consumer_stage import ConsumerRuntime, _Rebalance
from shared.settings import ServiceSettings

TOPIC = "t.leverage.targets"
TP = TopicPartition(TOPIC, 0)


class StandInConsumer:
    """What `_handle`, `_commit` and the rebalance listener ask of the consumer."""

    def __init__(self) -> None:
        self.owned = {TP}
        self.commits: list[int] = []

    def assignment(self) -> set[TopicPartition]:
        return set(self.owned)

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(offsets[TP])


def record(offset: int) -> ConsumerRecord[Any, Any]:
    return ConsumerRecord(TOPIC, 0, offset, 0, 0, b"k", b"v", None, 1, 1, ())


def test_a_hold_caps_the_commits_of_its_assignment_and_ends_with_it() -> None:
    runtime = ConsumerRuntime(ServiceSettings(), commit_interval_s=0.0)
    consumer = StandInConsumer()
    runtime.consumer = consumer  # type: ignore[assignment]
    halted = {11, 13, 21}  # a halted symbol's records, among others applied

    async def handle(batch: list[ConsumerRecord[Any, Any]]) -> None:
        for r in batch:
            if r.offset in halted:
                runtime.hold(r)

    runtime._handlers[TOPIC] = handle

    async def scenario() -> None:
        for first in (0, 10, 20):
            await runtime._handle(consumer, {TP: [record(o) for o in range(first, first + 10)]})
        assert consumer.commits == [10, 11, 11]  # never past the first held record
        await _Rebalance(runtime).on_partitions_revoked([TP])
        assert consumer.commits[-1] == 11
        # others read on and committed 500; the partition comes back here
        await runtime._handle(consumer, {TP: [record(o) for o in range(500, 510)]})
        assert consumer.commits[-1] == 510  # not pulled back to 11

    asyncio.run(scenario())


def test_records_of_a_partition_that_moved_during_the_fetch_are_not_handled() -> None:
    """A partition revoked while its records were on their way is its new owner's from
    the committed offset: handled here too, its events would go out twice."""
    runtime = ConsumerRuntime(ServiceSettings(), commit_interval_s=0.0)
    consumer = StandInConsumer()
    runtime.consumer = consumer  # type: ignore[assignment]
    moved = TopicPartition(TOPIC, 1)
    handled: list[tuple[int, int]] = []

    async def handle(batch: list[ConsumerRecord[Any, Any]]) -> None:
        handled.extend((r.partition, r.offset) for r in batch)

    runtime._handlers[TOPIC] = handle
    gone = [ConsumerRecord(TOPIC, 1, o, 0, 0, b"k", b"v", None, 1, 1, ()) for o in (5, 6)]
    fetched = {TP: [record(0), record(1)], moved: gone}
    asyncio.run(runtime._handle(consumer, fetched))
    assert handled == [(0, 0), (0, 1)]
    assert consumer.commits == [2]
