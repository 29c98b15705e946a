"""The topic registry: every Kafka topic smartlev uses, with its key, value type and config.

Nothing auto-creates topics (the broker has auto-create disabled): `ensure_topics` in
shared/adapters/kafka_admin.py creates exactly what is declared here, and services look
their topics up here instead of spelling names.

Keys. A topic's key decides which consumer instance sees a message and in what order.
Hedging nets all products of one underlying into one venue position, so everything it
consumes is keyed by **symbol**: all products of BTC-USDT land in one partition, in order,
on one instance (the product is a field of the payload). Only per-product outputs that
nobody nets (nav.updates, nav.latest) are keyed by product. All source topics have the
same partition count so faust can co-partition them.

Every topic has a `<name>.dlq` twin carrying `DeadLetter` for input that failed to
decode or validate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Literal

from google.protobuf.message import Message
from kafka.partitioner.default import murmur2
from smartlev.v1 import hedging_pb2, leverage_pb2, market_pb2, nav_pb2, orders_pb2

KeyKind = Literal["symbol", "product"]

DAY_MS = 24 * 3600 * 1000
FOREVER = -1  # retention.ms = -1: keep everything (history that rebuilds state)
DEFAULT_PARTITIONS = 3
COMPACTED_SEGMENT_MS = 3600 * 1000
DLQ_SUFFIX = ".dlq"


def partition_for(key: str | bytes, partitions: int) -> int:
    """The partition a key goes to: murmur2, as kafka-python's and aiokafka's default
    partitioners compute it (the stages' BatchSender calls this)."""
    raw = key.encode("utf-8") if isinstance(key, str) else key
    return (murmur2(raw) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicSpec:
    """One Kafka topic: what its key is, what its values are, and how it is kept."""

    name: str
    key: KeyKind
    value_type: type[Message]
    description: str
    partitions: int = DEFAULT_PARTITIONS
    replication: int = 1
    compacted: bool = False
    retention_ms: int = FOREVER

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip() or " " in self.name:
            raise ValueError(f"bad topic name {self.name!r}")
        if self.partitions < 1 or self.replication < 1:
            raise ValueError(f"{self.name}: partitions and replication must be >= 1")
        if self.retention_ms != FOREVER and self.retention_ms <= 0:
            raise ValueError(f"{self.name}: retention_ms must be > 0 or -1")

    @property
    def is_dlq(self) -> bool:
        return self.name.endswith(DLQ_SUFFIX)

    @property
    def dlq_name(self) -> str:
        if self.is_dlq:
            raise ValueError(f"{self.name} is itself a dead-letter topic")
        return self.name + DLQ_SUFFIX

    def configs(self) -> dict[str, str]:
        """Topic-level Kafka configs for CreateTopics. A compacted topic rolls a segment
        an hour (COMPACTED_SEGMENT_MS): Kafka compacts closed segments only, and by default
        rolls one a week, so a reader of current state replayed a week of every update."""
        if self.compacted:
            return {"cleanup.policy": "compact", "segment.ms": str(COMPACTED_SEGMENT_MS)}
        return {"cleanup.policy": "delete", "retention.ms": str(self.retention_ms)}

    def in_namespace(self, namespace: str) -> TopicSpec:
        """The same topic under a name prefix: a test or a second demo runs a whole
        isolated pipeline on the same broker (`namespace` from the services' settings)."""
        return replace(self, name=f"{namespace}{self.name}") if namespace else self

    def dlq(self) -> TopicSpec:
        """The dead-letter twin: same key, DeadLetter values, one partition, 30 days."""
        return TopicSpec(
            name=self.dlq_name,
            key=self.key,
            value_type=market_pb2.DeadLetter,
            description=f"rejected input of {self.name}, with the reason",
            partitions=1,
            replication=self.replication,
            retention_ms=30 * DAY_MS,
        )


MARKET_TICKS = TopicSpec(
    name="market.ticks",
    key="symbol",
    value_type=market_pb2.MarketEvent,
    description="ticks and funding rates in per-symbol order (ingestion)",
)
MARKET_REGIMES = TopicSpec(
    name="market.regimes",
    key="symbol",
    value_type=market_pb2.RegimeUpdate,
    description="regime per symbol with confidence and features (regime detection)",
    retention_ms=30 * DAY_MS,
)
LEVERAGE_TARGETS = TopicSpec(
    name="leverage.targets",
    key="symbol",  # not product: hedging nets every product of a symbol (module doc)
    value_type=leverage_pb2.TargetsUpdate,
    description="target leverage per product with reason codes (leverage targeting)",
    retention_ms=30 * DAY_MS,
)
HEDGE_FILLS = TopicSpec(
    name="hedge.fills",
    key="symbol",
    value_type=hedging_pb2.HedgeUpdate,
    description="net venue fills and funding, allocated to products (hedging execution)",
)
ORDERS_EVENTS = TopicSpec(
    name="orders.events",
    key="symbol",  # not product: hedging and NAV need them in order with the symbol's fills
    value_type=orders_pb2.OrderEvent,
    description="accepted user opens and closes (order gateway)",
)
NAV_UPDATES = TopicSpec(
    name="nav.updates",
    key="product",
    value_type=nav_pb2.NavUpdated,
    description="every NAV change per product, the history users chart (NAV accounting)",
)
NAV_LATEST = TopicSpec(
    name="nav.latest",
    key="product",
    value_type=nav_pb2.NavUpdated,
    description="last NAV per product (compacted): a new reader gets current state fast",
    compacted=True,
)

SOURCES: tuple[TopicSpec, ...] = (
    MARKET_TICKS,
    MARKET_REGIMES,
    LEVERAGE_TARGETS,
    HEDGE_FILLS,
    ORDERS_EVENTS,
    NAV_UPDATES,
    NAV_LATEST,
)
DEAD_LETTERS: tuple[TopicSpec, ...] = tuple(spec.dlq() for spec in SOURCES)
ALL_TOPICS: tuple[TopicSpec, ...] = SOURCES + DEAD_LETTERS
BY_NAME: dict[str, TopicSpec] = {spec.name: spec for spec in ALL_TOPICS}


def get(name: str) -> TopicSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {sorted(BY_NAME)}") from None


def message_types() -> Iterator[type[Message]]:
    """Every value type on any topic, once each (for codec registration)."""
    seen: set[str] = set()
    for spec in ALL_TOPICS:
        name = spec.value_type.DESCRIPTOR.full_name
        if name not in seen:
            seen.add(name)
            yield spec.value_type
