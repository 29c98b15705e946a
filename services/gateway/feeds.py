"""`nav.updates` -> every open StreamNav / StreamPositions call of this gateway.

One consumer per process (no consumer group: every instance needs every update), from
the end of each partition at start: streams carry what happens from now on. Each
subscriber has a bounded queue; a subscriber too slow to keep up loses its oldest
updates (a NAV stream wants the latest value, not a backlog), never blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from smartlev.v1 import nav_pb2

from shared.codec import DecodeError, decode
from shared.logging import get_logger

log = get_logger("gateway", "feeds")


@dataclass(eq=False)
class Subscriber:
    products: frozenset[str] | None  # None: every product
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def offer(self, item: object) -> None:
        """Enqueue without blocking; a full queue drops its oldest item."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(item)


class NavFeed:
    def __init__(self, bootstrap: str, topic: str, partitions: int, queue_size: int) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.queue_size = queue_size
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        self.partitions = [TopicPartition(topic, p) for p in range(partitions)]
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, and fix the start at the current end of every partition. A missing
        topic stops the gateway saying so (aiokafka would ask for its metadata in a
        tight loop, ~200 requests/s, for as long as it is missing)."""
        await self.consumer.start()
        if self.topic not in await self.consumer.topics():
            await self.consumer.stop()
            raise SystemExit(
                f"gateway: topic {self.topic} does not exist on Kafka at {self.bootstrap}; "
                "create the topics first (`make up` does)"
            )
        self.consumer.assign(self.partitions)
        await self.consumer.seek_to_end(*self.partitions)
        for partition in self.partitions:
            await self.consumer.position(partition)
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.consumer.stop()

    @contextlib.contextmanager
    def subscribe(self, products: frozenset[str] | None) -> Iterator[Subscriber]:
        subscriber = Subscriber(products, asyncio.Queue(self.queue_size))
        self.subscribers.add(subscriber)
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)

    def publish(self, update: nav_pb2.NavUpdated) -> None:
        for subscriber in list(self.subscribers):
            if subscriber.products is None or update.product in subscriber.products:
                subscriber.offer(update)

    async def _run(self) -> None:
        async for record in self.consumer:
            try:
                update = decode(nav_pb2.NavUpdated, record.value)
            except DecodeError as exc:
                log.warning("nav_update_undecodable", offset=record.offset, reason=exc.reason)
                continue
            self.publish(update)
