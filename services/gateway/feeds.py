"""`nav.updates` and `orders.events` -> every open StreamNav / StreamPositions call of
this gateway.

One consumer per process (no consumer group: every instance needs every update). A
topic is fetched only while a stream wants it (`nav.updates`: NAV and position streams,
`orders.events`: position streams), its partitions paused otherwise: a gateway nobody
streams from spends nothing on them (with 8 clients ordering, following `orders.events`
regardless cost ~5% of the gateway's CPU per order). The first stream of a topic moves
its partitions to their current end before it reads its snapshot, so what happens after
the snapshot reaches it, and streams carry what happens from now on. Positions
change through orders, and any gateway instance may settle a user's order, so a
position stream learns of changes from `orders.events` (every instance's relay publishes
there), not from this process's own settles. Each subscriber has a bounded queue; a
subscriber too slow to keep up loses its oldest updates (a stream wants the latest
value, not a backlog), never blocks the others, and is told (`lost`): a position stream
then reads its positions afresh, so a dropped order event cannot leave one stale. A NAV
update put into a full queue takes the place of its product's oldest queued one, else
of another product's that a later one supersedes (`Updates`); only when every queued
NAV update is its product's latest does the oldest item go, so a burst leaves each
product's latest in the queue.
A failed fetch is retried for up to FETCH_GIVE_UP_S; past that, or if the fetch loop
ends otherwise (a bug), every open stream ends UNAVAILABLE (its client reconnects), new
ones are refused and /healthz says so (a restart is the cure), instead of streams
waiting forever on a feed that stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Counter, Gauge
from smartlev.v1 import nav_pb2, orders_pb2

from services.gateway.bounded import put_bounded
from shared.codec import POSITION_ID, DecodeError, decimal_from_wire, decode, order_of
from shared.core.market import MAX_SEQ
from shared.logging import get_logger
from shared.topics import TopicSpec

log = get_logger("gateway", "feeds")

SUBSCRIBERS = Gauge(
    "smartlev_gateway_stream_subscribers",
    "Open streams of this gateway: nav (StreamNav) and positions (StreamPositions).",
    ["stream"],
)
NAV_REPEATS = Counter(
    "smartlev_gateway_nav_repeats_total",
    "NAV updates streams were not shown: copies a NAV re-run sent again, or older seqs.",
)
FOLLOW_TIMEOUT_S = 5.0  # a stream that cannot reach Kafka to start is UNAVAILABLE after this
FETCH_RETRY_S = 1.0  # a failed fetch is tried again after this
FETCH_GIVE_UP_S = 30.0  # fetches failing for this long stop the feed


class FeedUnavailable(Exception):
    """Kafka did not answer when a stream needed it, or the feed stopped."""


class Updates(asyncio.Queue[object]):
    """A subscriber's queue, bounded. A NAV update put into a full one takes the place
    of the oldest queued one of its product: the stream wants each product's latest,
    and a burst (a fetch of hundreds, a catch-up after an outage) no longer drops a
    product's last update because others came after it."""

    def _init(self, maxsize: int) -> None:
        self._queue: deque[object] = deque()  # asyncio.Queue's own name: qsize() reads it

    def supersede(self, update: nav_pb2.NavUpdated) -> bool:
        """Make room for `update` with a NAV update a later one supersedes: the oldest
        queued of its own product, else the oldest of a product queued twice or more (a
        burst of one product's updates took another's only one: three products were
        enough). False: every queued NAV update is its product's latest."""
        navs = [q for q in self._queue if isinstance(q, nav_pb2.NavUpdated)]
        queued: dict[str, int] = {}
        for nav in navs:
            queued[nav.product] = queued.get(nav.product, 0) + 1
        own = next((nav for nav in navs if nav.product == update.product), None)
        twice = next((nav for nav in navs if queued[nav.product] > 1), None)
        superseded = own if own is not None else twice
        if superseded is None:
            return False
        self._queue.remove(superseded)
        return True


@dataclass(eq=False)
class Subscriber:
    products: frozenset[str] | None  # NAV updates of these products (None: every product)
    user: str | None = None  # order events of this user's positions (None: none)
    queue: Updates = field(default_factory=Updates)
    lost: bool = False  # an update was dropped: the stream reads its state afresh

    def offer(self, item: object) -> None:
        """Enqueue without blocking. A full queue makes room with the NAV update the new
        one supersedes, else by dropping its oldest item (and says so)."""
        if self.queue.full():
            superseded = isinstance(item, nav_pb2.NavUpdated) and self.queue.supersede(item)
            if not superseded:
                self.queue.get_nowait()
                self.lost = True
        self.queue.put_nowait(item)


class NavSequence:
    """Which NAV updates a stream has not been shown: NAV sends a batch's updates before
    its state write, so a re-run (a transient error, a crash) sends them again, and a
    stream showed the NAV going back (1, 2, 3, 1, 2, 3). Per product, the seq of the
    last update passed on and the event ids passed at it (an order's re-mark repeats
    its tick's seq; the newest RECENT_IDS of them are kept)."""

    RECENT_IDS = 10_000

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, dict[str, None]]] = {}

    def fresh(self, update: nav_pb2.NavUpdated) -> bool:
        seq, ids = self._last.get(update.product, (-1, {}))
        if update.seq < seq or (update.seq == seq and update.event_id in ids):
            return False
        if update.seq > seq:
            ids = {}
            self._last[update.product] = (update.seq, ids)
        put_bounded(ids, update.event_id, None, self.RECENT_IDS)
        return True


class StreamFeed:
    def __init__(
        self,
        bootstrap: str,
        navs: TopicSpec,
        orders: TopicSpec,
        queue_size: int,
        give_up_s: float = FETCH_GIVE_UP_S,
    ) -> None:
        self.bootstrap = bootstrap
        self.give_up_s = give_up_s
        self.nav_topic, self.orders_topic = navs.name, orders.name
        self.queue_size = queue_size
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
        )
        self.partitions = {
            topic.name: [TopicPartition(topic.name, p) for p in range(topic.partitions)]
            for topic in (navs, orders)
        }
        self.subscribers: set[Subscriber] = set()
        self._streams = dict.fromkeys(self.partitions, 0)  # open streams following each topic
        self._switch = asyncio.Lock()  # one topic starts being followed at a time
        self._task: asyncio.Task[None] | None = None
        self.stopped: FeedUnavailable | None = None  # why the fetch loop ended
        self.navs_shown = NavSequence()
        self._ids_key = os.urandom(32)  # this process's: see `shown_id`

    async def start(self, partitions_of: Callable[[str], Awaitable[set[int]]]) -> None:
        """Connect, every partition paused until a stream wants its topic. A missing topic
        stops the gateway saying so (aiokafka would ask for its metadata in a
        tight loop, ~200 requests/s, for as long as it is missing). `partitions_of` is
        the broker's count (a producer's `partitions_for`: a consumer has no metadata
        of a topic it was not assigned)."""
        await self.consumer.start()
        existing = await self.consumer.topics()
        for topic in (self.nav_topic, self.orders_topic):
            if topic not in existing:
                await self.consumer.stop()
                raise SystemExit(
                    f"gateway: topic {topic} does not exist on Kafka at {self.bootstrap}; "
                    "create the topics first (`make up` does)"
                )
        # the topics' own partitions: producers write to every one the broker has, and a
        # topic made with more than the registry's count kept the rest from every stream
        self.partitions = {
            topic: [TopicPartition(topic, p) for p in sorted(await partitions_of(topic))]
            for topic in self.partitions
        }
        every = [tp for partitions in self.partitions.values() for tp in partitions]
        self.consumer.assign(every)
        self.consumer.pause(*every)
        self._task = asyncio.create_task(self._run())
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        self.stopped = FeedUnavailable(f"stream feed stopped: {task.exception()!r}")
        log.error("stream_feed_stopped", error=str(self.stopped))
        for subscriber in list(self.subscribers):
            subscriber.offer(self.stopped)

    def health(self) -> bool | str:
        return True if self.stopped is None else str(self.stopped)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])  # the error it ended on, if any, was logged
        await self.consumer.stop()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, products: frozenset[str] | None, user: str | None = None
    ) -> AsyncIterator[Subscriber]:
        """A stream's subscription: NAV updates of `products`, and with a `user` that
        user's order events. FeedUnavailable (nothing subscribed) when a topic nobody
        followed cannot be followed from its end. The ends are read outside the lock
        (each stream waits at most FOLLOW_TIMEOUT_S); counts, seeks, pauses and resumes
        change under it, and a subscription whose view of the idle topics moved while it
        read them looks again."""
        if self.stopped is not None:
            raise self.stopped
        subscriber = Subscriber(products, user, Updates(self.queue_size))
        topics = [self.nav_topic] if user is None else [self.nav_topic, self.orders_topic]
        while True:
            idle = self._idle(topics)
            ends = await self._ends(idle) if idle else {}
            async with self._switch:
                if self._idle(topics) != idle:
                    continue
                for partition, end in ends.items():
                    self.consumer.seek(partition, end)
                if idle:
                    self.consumer.resume(*idle)
                for topic in topics:
                    self._streams[topic] += 1
                self.subscribers.add(subscriber)
                if self.stopped is not None:  # it stopped while this one subscribed
                    subscriber.offer(self.stopped)
                break
        open_streams = SUBSCRIBERS.labels("nav" if user is None else "positions")
        open_streams.inc()
        try:
            yield subscriber
        finally:
            open_streams.dec()
            async with self._switch:
                self.subscribers.discard(subscriber)
                for topic in topics:
                    self._streams[topic] -= 1
                    if not self._streams[topic]:
                        self.consumer.pause(*self.partitions[topic])

    def _idle(self, topics: list[str]) -> list[TopicPartition]:
        """The partitions of `topics` that no stream follows (paused)."""
        return [tp for topic in topics if not self._streams[topic] for tp in self.partitions[topic]]

    async def _ends(self, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
        """Where `partitions` end now: a stream that starts following them reads on from
        there (a paused partition's position is wherever its last stream left it)."""
        try:
            ends = await asyncio.wait_for(self.consumer.end_offsets(partitions), FOLLOW_TIMEOUT_S)
        except (KafkaError, TimeoutError) as exc:
            raise FeedUnavailable(f"cannot read where {partitions[0].topic} ends: {exc!r}") from exc
        return dict(ends)

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
        failing_since: float | None = None
        while True:
            try:
                fetched = await self.consumer.getmany(timeout_ms=1000)
            except KafkaError as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since >= self.give_up_s:
                    raise
                log.warning("stream_feed_fetch_failed", error=repr(exc))
                await asyncio.sleep(FETCH_RETRY_S)
                continue
            failing_since = None
            for records in fetched.values():
                for record in records:
                    self._dispatch(record.topic, record.offset, record.value)

    def shown_id(self, update: nav_pb2.NavUpdated) -> str:
        """The id streams show: `<product>:<seq>` for a tick's NAV; an order's re-mark
        carries its order's id (an open's is its position id), which every user's
        StreamNav showed, so it is shown as a keyed digest, one per order, that names
        no one."""
        plain = f"{update.product}:{update.seq}"
        if update.event_id == plain:
            return plain
        digest = hmac.new(self._ids_key, update.event_id.encode(), hashlib.sha256)
        return f"{plain}:{digest.hexdigest()[:16]}"

    def _dispatch(self, topic: str, offset: int, value: bytes) -> None:
        """Decode and check what streams read of an update (a NAV to value positions at,
        a position id to look up), so that a bad record is skipped here instead of
        ending every stream it reaches."""
        try:
            if topic == self.nav_topic:
                update = decode(nav_pb2.NavUpdated, value)
                decimal_from_wire(update.nav, name="nav")
                if update.seq > MAX_SEQ:  # as NAV refuses: one would hide the product for good
                    raise DecodeError("NavUpdated", f"seq {update.seq} is past 2^53 - 1")
                if self.navs_shown.fresh(update):
                    update.event_id = self.shown_id(update)
                    self.publish(update)
                else:
                    NAV_REPEATS.inc()
            else:
                event = decode(orders_pb2.OrderEvent, value)
                position_id = order_of(event).position_id
                if not POSITION_ID.fullmatch(position_id):
                    shown = position_id[:80]
                    raise DecodeError("OrderEvent", f"position_id {shown!r} is not an id")
                self.publish_order(event)
        except DecodeError as exc:
            log.warning("stream_update_undecodable", topic=topic, offset=offset, reason=exc.reason)
