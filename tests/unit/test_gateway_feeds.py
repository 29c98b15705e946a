"""A stream's queue (services/gateway/feeds.py): bounded, and a burst of NAV updates
leaves each product's latest in it."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError
from smartlev.v1 import nav_pb2, orders_pb2

from services.gateway import feeds
from services.gateway.config import GatewaySettings
from services.gateway.feeds import NavSequence, StreamFeed, Subscriber, Updates
from shared.topics import NAV_UPDATES, ORDERS_EVENTS

SIZE = GatewaySettings().stream_queue


def nav(product: str, seq: int) -> nav_pb2.NavUpdated:
    return nav_pb2.NavUpdated(event_id=f"{product}:{seq}", product=product, seq=seq)


def drained(subscriber: Subscriber) -> list[object]:
    items = []
    while not subscriber.queue.empty():
        items.append(subscriber.queue.get_nowait())
    return items


def test_a_burst_keeps_every_products_latest_nav() -> None:
    """One fetch of 301 updates (the quiet product's partition first) reached a stream
    as its last 256: the quiet product's only update was dropped, for good."""
    subscriber = Subscriber(None, None, Updates(SIZE))
    subscriber.offer(nav("ETH-USDT:LONG", 1))
    for seq in range(1, 301):
        subscriber.offer(nav("BTC-USDT:LONG", seq))
    got = [(u.product, u.seq) for u in drained(subscriber) if isinstance(u, nav_pb2.NavUpdated)]
    assert ("ETH-USDT:LONG", 1) in got
    assert [seq for product, seq in got if product == "BTC-USDT:LONG"] == list(
        range(300 - SIZE + 2, 301)
    )  # the latest ones, in order
    assert not subscriber.lost  # nothing the stream wanted was dropped


def test_a_burst_of_one_product_leaves_the_others_only_updates() -> None:
    """Three products were enough to lose one for good: a full queue took the first
    product's only update to make room for the third's, though the second had hundreds
    queued (a NAV stream ignores `lost`: that NAV was never shown)."""
    subscriber = Subscriber(None, None, Updates(SIZE))
    subscriber.offer(nav("ETH-USDT:LONG", 1))
    for seq in range(1, SIZE):
        subscriber.offer(nav("BTC-USDT:LONG", seq))
    subscriber.offer(nav("BTC-USDT:SHORT", 1))
    got = [(u.product, u.seq) for u in drained(subscriber) if isinstance(u, nav_pb2.NavUpdated)]
    assert got[0] == ("ETH-USDT:LONG", 1) and got[-1] == ("BTC-USDT:SHORT", 1)
    assert [seq for product, seq in got if product == "BTC-USDT:LONG"] == list(range(2, SIZE))
    assert not subscriber.lost
    # every queued update its product's latest: only then the oldest goes, and it says so
    full = Subscriber(None, None, Updates(2))
    for product in ("BTC-USDT:LONG", "ETH-USDT:LONG", "ETH-USDT:SHORT"):
        full.offer(nav(product, 1))
    assert full.lost and [u.product for u in drained(full)] == ["ETH-USDT:LONG", "ETH-USDT:SHORT"]  # type: ignore[attr-defined]


def test_a_full_queue_without_an_older_nav_of_the_product_drops_its_oldest_and_says_so() -> None:
    subscriber = Subscriber(None, "alice", Updates(2))
    order = orders_pb2.OrderEvent()
    subscriber.offer(order)
    subscriber.offer(nav("BTC-USDT:LONG", 1))
    subscriber.offer(nav("BTC-USDT:LONG", 2))  # takes the place of seq 1
    assert not subscriber.lost
    subscriber.offer(nav("ETH-USDT:LONG", 1))  # none of its own queued: the order goes
    assert subscriber.lost
    assert [(u.product, u.seq) for u in drained(subscriber)] == [  # type: ignore[attr-defined]
        ("BTC-USDT:LONG", 2),
        ("ETH-USDT:LONG", 1),
    ]


def test_a_nav_run_sent_again_is_not_shown_again() -> None:
    """NAV sends a batch's updates before its state write: a re-run (a dropped Redis
    connection at the write, a crash) sends them again, and streams showed the NAV go
    1, 2, 3, 1, 2, 3. An order's re-mark repeats its tick's seq, so it passes (once),
    as does the first update of every product; an older seq never does."""
    shown = NavSequence()
    run = [nav("BTC-USDT:LONG", seq) for seq in (1, 2, 3)]
    remark = nav_pb2.NavUpdated(event_id="order-7", product="BTC-USDT:LONG", seq=3)
    other = nav("ETH-USDT:LONG", 1)
    sent = [*run, remark, *run, remark, other, nav("BTC-USDT:LONG", 4), run[2]]
    assert [(u.event_id, shown.fresh(u)) for u in sent] == [
        ("BTC-USDT:LONG:1", True),
        ("BTC-USDT:LONG:2", True),
        ("BTC-USDT:LONG:3", True),
        ("order-7", True),
        ("BTC-USDT:LONG:1", False),
        ("BTC-USDT:LONG:2", False),
        ("BTC-USDT:LONG:3", False),
        ("order-7", False),
        ("ETH-USDT:LONG:1", True),
        ("BTC-USDT:LONG:4", True),
        ("BTC-USDT:LONG:3", False),
    ]


def test_the_ids_kept_at_one_seq_are_bounded() -> None:
    """Orders re-mark at the last tick's seq for as long as no tick comes (a feed that
    stopped): the ids passed at it are the newest RECENT_IDS, not every order's."""
    shown = NavSequence()
    for n in range(NavSequence.RECENT_IDS + 5):
        assert shown.fresh(nav_pb2.NavUpdated(event_id=f"o{n}", product="P", seq=9))
    assert not shown.fresh(
        nav_pb2.NavUpdated(event_id=f"o{NavSequence.RECENT_IDS}", product="P", seq=9)
    )
    assert shown.fresh(nav_pb2.NavUpdated(event_id="o0", product="P", seq=9))  # forgotten


async def test_a_nav_update_past_the_largest_seq_is_skipped_not_kept_as_the_last() -> None:
    """NAV refuses seqs from 2^53 on; one on nav.updates (another producer's) became
    the product's last seq in the feed, and every real update after it was hidden from
    every stream until the gateway restarted. It is skipped as undecodable now."""
    feed = StreamFeed("127.0.0.1:9", NAV_UPDATES, ORDERS_EVENTS, queue_size=SIZE)
    subscriber = Subscriber(None, None, Updates(SIZE))
    feed.subscribers.add(subscriber)
    product = "BTC-USDT:LONG"
    for seq in (1, 2**64 - 1, 2, 2**53 - 1):
        update = nav_pb2.NavUpdated(event_id=f"{product}:{seq}", product=product, seq=seq)
        update.nav = "100"
        feed._dispatch(NAV_UPDATES.name, seq, update.SerializeToString())
    await feed.consumer.stop()  # never started: nothing to close but the object
    assert [u.seq for u in drained(subscriber)] == [1, 2, 2**53 - 1]  # type: ignore[attr-defined]


async def test_fetch_failures_apart_in_time_do_not_stop_the_feed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The feed gives up after fetches have failed for `give_up_s` in a row (every stream
    then ends UNAVAILABLE, and /healthz turns red until a restart). Two failures an hour
    apart, with good fetches between, are not that: the clock starts again at a good
    fetch."""
    feed = StreamFeed("127.0.0.1:9", NAV_UPDATES, ORDERS_EVENTS, queue_size=SIZE, give_up_s=60)
    clock = [1000.0]
    monkeypatch.setattr(feeds.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(feeds, "FETCH_RETRY_S", 0)
    script = ["fail", "ok", "ok", "fail", "ok"]

    async def getmany(timeout_ms: int) -> dict[object, list[object]]:
        if not script:
            raise asyncio.CancelledError  # the end of the script: the feed ran through
        step = script.pop(0)
        clock[0] += 1800.0  # half an hour between fetches
        if step == "fail":
            raise KafkaConnectionError()
        return {}

    monkeypatch.setattr(feed.consumer, "getmany", getmany)
    with pytest.raises(asyncio.CancelledError):
        await feed._run()
    assert not script
    await feed.consumer.stop()  # never started: nothing to close but the object


class PartitionedConsumer:
    """What `StreamFeed.start` asks of its consumer."""

    def __init__(self) -> None:
        self.assigned: list[TopicPartition] = []

    async def start(self) -> None:
        pass

    async def topics(self) -> set[str]:
        return {NAV_UPDATES.name, ORDERS_EVENTS.name}

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def pause(self, *partitions: TopicPartition) -> None:
        pass


async def test_the_feed_reads_every_partition_the_topics_have(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Producers write to the partitions the broker has (DESIGN: a stage scales by more
    of them); the feed assigned the registry's three, and updates written to the others
    never reached a stream: no error, no dead letter."""
    feed = StreamFeed("127.0.0.1:9", NAV_UPDATES, ORDERS_EVENTS, queue_size=SIZE)
    await feed.consumer.stop()  # never started: nothing to close but the object
    consumer = PartitionedConsumer()
    idle = asyncio.Event()
    monkeypatch.setattr(feed, "consumer", consumer)
    monkeypatch.setattr(feed, "_run", idle.wait)

    async def six_partitions(topic: str) -> set[int]:  # as the gateway's producer says
        return set(range(6))

    await feed.start(six_partitions)
    assert {(tp.topic, tp.partition) for tp in consumer.assigned} == {
        (topic.name, p) for topic in (NAV_UPDATES, ORDERS_EVENTS) for p in range(6)
    }
    assert NAV_UPDATES.partitions < 6  # the registry's count, which the feed used
    assert feed._task is not None
    feed._task.cancel()


async def test_a_stream_shows_no_ones_order_in_a_navs_id() -> None:
    """An order's re-mark is published under its order's id (an open's is the position
    id): every user's StreamNav showed other users' position ids, and with a guessable
    client order id, whose order it was. Streams show a digest that names no one, one
    per order."""
    feed = StreamFeed("127.0.0.1:9", NAV_UPDATES, ORDERS_EVENTS, queue_size=SIZE)
    subscriber = Subscriber(None, "bob", Updates(SIZE))
    feed.subscribers.add(subscriber)
    product, pid = "BTC-USDT:LONG", "354da4e3effe4c12370e3633022c3bd2"
    sent = [
        (f"{product}:7", 7),  # a tick's NAV
        (f"{product}:BTC-USDT:order:{pid}", 7),  # alice's open, re-marked at seq 7
        (f"{product}:BTC-USDT:order:{'f' * 32}", 7),  # another order at the same seq
    ]
    for event_id, seq in sent:
        update = nav_pb2.NavUpdated(event_id=event_id, product=product, seq=seq, nav="100")
        feed._dispatch(NAV_UPDATES.name, seq, update.SerializeToString())
    await feed.consumer.stop()  # never started: nothing to close but the object
    shown = [u.event_id for u in drained(subscriber)]  # type: ignore[attr-defined]
    assert shown[0] == f"{product}:7"
    assert all(pid not in i and "order" not in i for i in shown)
    assert len(set(shown)) == 3 and all(i.startswith(f"{product}:7") for i in shown)
