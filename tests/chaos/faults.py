"""The faults the chaos suite injects and the evidence it reads back, as plain helpers.

Bad input: for every stage's input topic, one payload of each kind a consumer must
dead-letter (docs/pipeline.md: "bad input never stops a consumer"). Each is built from a
message that would be *valid* but for the fault, and carries a huge seq, so a consumer
that wrongly accepted one would skip every good event after it: the good-flow check
catches that as loss instead of letting it pass silently.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import redis
from google.protobuf.message import Message
from kafka import KafkaConsumer, TopicPartition
from smartlev.v1 import hedging_pb2, leverage_pb2, market_pb2, orders_pb2

from shared import codec
from shared.adapters.tick_replay import make_producer
from shared.topics import (
    HEDGE_FILLS,
    LEVERAGE_TARGETS,
    MARKET_REGIMES,
    MARKET_TICKS,
    ORDERS_EVENTS,
    TopicSpec,
)

SYMBOL = "BTC-USDT"
M = TypeVar("M", bound=Message)
HUGE_SEQ = 10**15  # far beyond any replay: accepting it would skip all later events


@dataclass(frozen=True, slots=True)
class Consumed:
    """An input topic and the service that consumes it (and owns its .dlq twin)."""

    topic: TopicSpec
    service: str
    wrap: Callable[[market_pb2.MarketEvent], Message]  # a market event as this topic's value
    foreign: Message  # a valid message of another topic: the wrong schema


def market(
    price: str = "50000", seq: int = HUGE_SEQ, symbol: str = SYMBOL
) -> market_pb2.MarketEvent:
    """A tick as ingestion would publish it (valid unless `price` is not)."""
    tick = market_pb2.Tick(
        event_id=f"{symbol}:{seq}",
        symbol=symbol,
        ts_event_ns=1_620_777_600_000_000_000,
        ts_init_ns=1,
        price=price,
        mark_price=price,
        seq=seq,
        source="chaos",
    )
    return market_pb2.MarketEvent(tick=tick)


def _order(amount: str) -> orders_pb2.OrderEvent:
    opened = orders_pb2.PositionOpened(
        event_id="chaos:bad-order",
        position_id="chaos:bad-order",
        user_id="chaos",
        product=f"{SYMBOL}:LONG",
        ts_event_ns=1_620_777_600_000_000_000,
        ts_init_ns=1,
        amount=amount,
        client_order_id="chaos:bad-order",
    )
    return orders_pb2.OrderEvent(opened=opened)


def _hedge_update(market: market_pb2.MarketEvent) -> hedging_pb2.HedgeUpdate:
    return hedging_pb2.HedgeUpdate(event_id=f"{SYMBOL}:{HUGE_SEQ}", market=market)


CONSUMED: tuple[Consumed, ...] = (
    Consumed(MARKET_TICKS, "regime", lambda m: m, _order("100")),
    Consumed(MARKET_REGIMES, "leverage", lambda m: market_pb2.RegimeUpdate(market=m), _order("1")),
    Consumed(
        LEVERAGE_TARGETS, "hedging", lambda m: leverage_pb2.TargetsUpdate(market=m), _order("1")
    ),
    Consumed(ORDERS_EVENTS, "hedging", lambda m: _order("-1"), market()),
    Consumed(HEDGE_FILLS, "nav", _hedge_update, _order("1")),
)


def bad_payloads(consumed: Consumed) -> dict[str, bytes | None]:
    """kind -> value (None: a tombstone) that `consumed.service` must dead-letter."""
    valid = codec.encode(consumed.wrap(market()))
    return {
        "malformed": b"\xff\xff\xff\xff\x0f not protobuf at all",
        "truncated": valid[:-1],  # the cut always falls inside the last field
        "wrong_schema": codec.encode(consumed.foreign),
        "empty": b"",
        "tombstone": None,
        "invalid": codec.encode(consumed.wrap(market(price="NaN"))),
    }


def publish_raw(
    bootstrap: str, topic: str, payloads: Sequence[bytes | None], key: str | bytes = SYMBOL
) -> list[tuple[int, int]]:
    """Produce raw values (no codec) keyed by `key`; (partition, offset) of each."""
    producer = make_producer(bootstrap, value_serializer=None, client_id="smartlev-chaos")
    try:
        futures = [producer.send(topic, key=key, value=value) for value in payloads]
        metas = [future.get(timeout=30) for future in futures]
    finally:
        producer.close()
    return [(meta.partition, meta.offset) for meta in metas]


def read_topic(bootstrap: str, topic: str, message_type: type[M]) -> list[M]:
    """Every message on `topic` so far (all partitions, no group), decoded."""
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        enable_auto_commit=False,
        client_id="smartlev-chaos-reader",
    )
    try:
        parts = [
            TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())
        ]
        if not parts:
            return []
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        ends = consumer.end_offsets(parts)
        out: list[M] = []
        while any(consumer.position(tp) < ends[tp] for tp in parts):
            for records in consumer.poll(timeout_ms=500).values():
                out.extend(codec.decode(message_type, r.value) for r in records)
        return out
    finally:
        consumer.close()


def dead_letters(bootstrap: str, namespace: str) -> dict[str, list[market_pb2.DeadLetter]]:
    """Every DeadLetter of the namespace, by un-namespaced source topic."""
    return {
        c.topic.name: read_topic(bootstrap, f"{namespace}{c.topic.dlq_name}", market_pb2.DeadLetter)
        for c in CONSUMED
    }


def drop_redis_connections(client: redis.Redis, pid: int) -> int:
    """CLIENT KILL every Redis connection of process `pid` (found with `ss`): a Redis
    blip for one service only, which the shared redis-server and other users never see.
    Returns how many connections were closed."""
    port = client.connection_pool.connection_kwargs.get("port", 6379)
    listing = subprocess.run(
        ["ss", "-tnpH", "dst", f"127.0.0.1:{port}"], capture_output=True, text=True, check=True
    ).stdout
    mine = [line.split()[3] for line in listing.splitlines() if f"pid={pid}," in line]
    return sum(int(client.client_kill_filter(addr=addr) or 0) for addr in mine)
