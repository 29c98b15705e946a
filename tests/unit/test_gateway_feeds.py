"""A stream's queue (services/gateway/feeds.py): bounded, and a burst of NAV updates
leaves each product's latest in it."""

from __future__ import annotations

from smartlev.v1 import nav_pb2, orders_pb2

from services.gateway.config import GatewaySettings
from services.gateway.feeds import Subscriber, Updates

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
