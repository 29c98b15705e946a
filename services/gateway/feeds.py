"""`nav.updates` and `orders.events` -> every open StreamNav / StreamPositions call of
this gateway.

One consumer per process (no consumer group: every instance needs every update), from
the end of each partition at start: streams carry what happens from now on. Positions
change through orders, and any gateway instance may settle a user's order, so a
position stream learns of changes from `orders.events` (every instance's relay publishes
there), not from this process's own settles. Each subscriber has a bounded queue; a
subscriber too slow to keep up loses its oldest updates (a stream wants the latest
value, not a backlog), never blocks the others.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client import Gauge
from smartlev.v1 import nav_pb2, orders_pb2

from shared.codec import DecodeError, decode, order_of
from shared.logging import get_logger
from shared.topics import TopicSpec

log = get_logger("gateway", "feeds")

SUBSCRIBERS = Gauge(
    "smartlev_gateway_stream_subscribers",
    "Open streams of this gateway: nav (StreamNav) and positions (StreamPositions).",
    ["stream"],
)


@dataclass(eq=False)
class Subscriber:
    products: frozenset[str] | None  # NAV updates of these products (None: every product)
    user: str | None = None  # order events of this user's positions (None: none)
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)

    def offer(self, item: object) -> None:
        """Enqueue without blocking; a full queue drops its oldest item."""
        if self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(item)


class StreamFeed:
    def __init__(self, bootstrap: str, navs: TopicSpec, orders: TopicSpec, queue_size: int) -> None:
        self.bootstrap = bootstrap
        self.nav_topic, self.orders_topic = navs.name, orders.name
        self.queue_size = queue_size
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        self.partitions = [
            TopicPartition(topic.name, p)
            for topic in (navs, orders)
            for p in range(topic.partitions)
        ]
        self.subscribers: set[Subscriber] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Connect, and fix the start at the current end of every partition. A missing
        topic stops the gateway saying so (aiokafka would ask for its metadata in a
        tight loop, ~200 requests/s, for as long as it is missing)."""
        await self.consumer.start()
        existing = await self.consumer.topics()
        for topic in (self.nav_topic, self.orders_topic):
            if topic not in existing:
                await self.consumer.stop()
                raise SystemExit(
                    f"gateway: topic {topic} does not exist on Kafka at {self.bootstrap}; "
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
    def subscribe(
        self, products: frozenset[str] | None, user: str | None = None
    ) -> Iterator[Subscriber]:
        subscriber = Subscriber(products, user, asyncio.Queue(self.queue_size))
        open_streams = SUBSCRIBERS.labels("nav" if user is None else "positions")
        self.subscribers.add(subscriber)
        open_streams.inc()
        try:
            yield subscriber
        finally:
            self.subscribers.discard(subscriber)
            open_streams.dec()

    def publish(self, update: nav_pb2.NavUpdated) -> None:
        for subscriber in list(self.subscribers):
            if subscriber.products is None or update.product in subscriber.products:
                subscriber.offer(update)

    def publish_order(self, event: orders_pb2.OrderEvent) -> None:
        user = order_of(event).user_id
        for subscriber in list(self.subscribers):
            if subscriber.user == user:
                subscriber.offer(event)

    async def _run(self) -> None:
        async for record in self.consumer:
            try:
                if record.topic == self.nav_topic:
                    self.publish(decode(nav_pb2.NavUpdated, record.value))
                elif any(s.user is not None for s in self.subscribers):  # else: not worth decoding
                    self.publish_order(decode(orders_pb2.OrderEvent, record.value))
            except DecodeError as exc:
                log.warning(
                    "stream_update_undecodable",
                    topic=record.topic,
                    offset=record.offset,
                    reason=exc.reason,
                )
